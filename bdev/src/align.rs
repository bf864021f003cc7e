//! Requests that are not aligned to the device's block size, made aligned:
//! reads through a bounce buffer, writes by read-modify-write, write-zeroes
//! by zeroing the partial edge blocks, discards by shrinking to the aligned
//! interior (a discard is advisory).
//!
//! This is the slow path: only O_DIRECT devices have a block size above
//! one byte, and well-behaved clients (NBD advertises the minimum block
//! size) stay aligned. A read-modify-write is not serialised against a
//! concurrent write to the same edge block; clients that issue overlapping
//! unaligned writes in parallel get one of them.

use reactor::IoBuf;

use crate::channel::BlockChannel;
use crate::error::IoError;
use crate::io::{Io, IoFlags, IoKind};

fn round_down(v: u64, bs: u64) -> u64 {
    v / bs * bs
}

fn round_up(v: u64, bs: u64) -> u64 {
    v.div_ceil(bs) * bs
}

/// Executes an unaligned request with aligned ones; returns it with its result.
pub(crate) async fn unaligned(ch: &BlockChannel, mut io: Io) -> (Io, Result<(), IoError>) {
    let bs = u64::from(ch.block_size());
    let res = match io.kind {
        IoKind::Read => read(ch, &mut io, bs).await,
        IoKind::Write => write(ch, &mut io, bs).await,
        IoKind::WriteZeroes => write_zeroes(ch, &io, bs).await,
        IoKind::Discard => {
            let (start, end) = (round_up(io.offset, bs), round_down(io.end(), bs));
            if start < end { ch.submit_raw(Io::discard(start, end - start)).await.1 } else { Ok(()) }
        }
        IoKind::Flush => ch.submit_raw(Io::flush()).await.1,
    };
    (io, res)
}

async fn read(ch: &BlockChannel, io: &mut Io, bs: u64) -> Result<(), IoError> {
    let start = round_down(io.offset, bs);
    let end = round_up(io.end(), bs);
    let (bounce, res) = ch.submit_raw(Io::read(start, IoBuf::new((end - start) as usize))).await;
    res?;
    let bounce = bounce.buf.expect("read returns its buffer");
    let at = (io.offset - start) as usize;
    let len = io.len as usize;
    io.buf_mut().copy_from_slice(&bounce[at..at + len]);
    Ok(())
}

/// Reads the blocks covering `[start, end)` that the new data only partly
/// overwrites into `bounce` (which covers `[start, end)`).
async fn fill_edges(
    ch: &BlockChannel,
    bounce: &mut IoBuf,
    start: u64,
    end: u64,
    data_start: u64,
    data_end: u64,
    bs: u64,
) -> Result<(), IoError> {
    let head_partial = data_start != start;
    let tail_partial = data_end != end;
    if head_partial {
        let block = ch.submit_raw(Io::read(start, IoBuf::new(bs as usize))).await;
        block.1?;
        bounce[..bs as usize].copy_from_slice(&block.0.buf.expect("read returns its buffer"));
    }
    if tail_partial && (!head_partial || end - bs != start) {
        let block = ch.submit_raw(Io::read(end - bs, IoBuf::new(bs as usize))).await;
        block.1?;
        let at = (end - bs - start) as usize;
        bounce[at..at + bs as usize].copy_from_slice(&block.0.buf.expect("read returns its buffer"));
    }
    Ok(())
}

async fn write(ch: &BlockChannel, io: &mut Io, bs: u64) -> Result<(), IoError> {
    let start = round_down(io.offset, bs);
    let end = round_up(io.end(), bs);
    let mut bounce = IoBuf::new((end - start) as usize);
    fill_edges(ch, &mut bounce, start, end, io.offset, io.end(), bs).await?;
    let at = (io.offset - start) as usize;
    bounce[at..at + io.len as usize].copy_from_slice(io.buf_mut());
    ch.submit_raw(Io::write(start, bounce, io.flags)).await.1
}

async fn write_zeroes(ch: &BlockChannel, io: &Io, bs: u64) -> Result<(), IoError> {
    let (start, end) = (round_down(io.offset, bs), round_up(io.end(), bs));
    let (inner_start, inner_end) = (round_up(io.offset, bs), round_down(io.end(), bs));
    // Partial edge blocks: read-modify-write them with zeroes.
    let mut edges = Vec::new();
    if io.offset != start {
        edges.push(start);
    }
    if io.end() != end && !edges.contains(&(end - bs)) {
        edges.push(end - bs);
    }
    for block in edges {
        let (got, res) = ch.submit_raw(Io::read(block, IoBuf::new(bs as usize))).await;
        res?;
        let mut buf = got.buf.expect("read returns its buffer");
        let z_start = io.offset.max(block) - block;
        let z_end = io.end().min(block + bs) - block;
        buf[z_start as usize..z_end as usize].fill(0);
        ch.submit_raw(Io::write(block, buf, io.flags.without(IoFlags::MAY_UNMAP | IoFlags::NO_FALLBACK))).await.1?;
    }
    if inner_start < inner_end {
        ch.submit_raw(Io::write_zeroes(inner_start, inner_end - inner_start, io.flags)).await.1?;
    }
    Ok(())
}
