//! The transmission phase of one connection.
//!
//! The reader decodes requests and submits them to the export's node at
//! once — many in flight, completing in any order. Write payloads go from
//! the socket straight into the request's I/O buffer. Completions (plain
//! callbacks, no task per request) queue replies; the writer sends them in
//! vectored writes, read data included without a user-space copy: any
//! number of replies without data per write, but read data only a little
//! at a time (see [`REPLY_WRITE_DATA_MAX`]).
//!
//! Memory is bounded: the reader stops taking requests while
//! [`INFLIGHT_MAX`] requests or [`INFLIGHT_BYTES_MAX`] bytes are in flight
//! (a client that never reads its replies therefore stalls only itself).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bdev::{BackendChannel, BlockStatus, DirtyBits, Done, Io, IoDone, IoError, IoFlags, Node};
use reactor::{IoBuf, LocalNotify};
use slab::Slab;

use super::negotiate::{Context, PAYLOAD_BYTES_MAX, Session};
use crate::consts::{cmd, cmd_flags, errno, qemu_state, reply_flags, state};
use crate::sock::Sock;
use crate::transmission::{
    Extent, ReplyTarget, Request, RequestDecoder, encode_block_status, encode_error_chunk, encode_offset_data_header,
    encode_simple_reply,
};

/// Requests of one connection in flight at most.
pub const INFLIGHT_MAX: usize = 256;
/// Payload bytes of one connection in flight at most.
pub const INFLIGHT_BYTES_MAX: u64 = 64 << 20;
/// Replies sent by one vectored write at most.
const REPLY_BATCH_MAX: usize = 256;
/// Read data sent by one vectored write at most (a larger reply goes
/// alone). A write into a Unix socket copies inline, on the reactor: a
/// wave of twenty 4 KiB replies in one write held the reactor for ~30 µs,
/// while the client saw nothing until the first socket buffer landed and
/// the requests it sent back waited unread. In small writes the client
/// starts on the first reply at once, and the reader runs between writes
/// (measured: 4 KiB random reads +4–6%, 64 KiB sequential reads +5–7%).
const REPLY_WRITE_DATA_MAX: u64 = 8 << 10;
/// Extents in one block status reply at most.
const STATUS_EXTENTS_MAX: usize = 1024;

/// The NBD error for an I/O failure (one exhaustive mapping).
pub fn nbd_errno(e: IoError, write: bool) -> u32 {
    match e {
        IoError::Io | IoError::Os(_) => errno::EIO,
        IoError::NoSpace => errno::ENOSPC,
        IoError::ReadOnly => errno::EPERM,
        IoError::OutOfRange if write => errno::ENOSPC,
        IoError::OutOfRange | IoError::Invalid => errno::EINVAL,
        IoError::NotSupported => errno::ENOTSUP,
        IoError::NoMem => errno::ENOMEM,
        IoError::Canceled => errno::ESHUTDOWN,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransmitError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] crate::ProtoError),
    #[error("{0}")]
    Abuse(String),
}

enum Reply {
    Simple {
        cookie: u64,
        error: u32,
    },
    Read {
        cookie: u64,
        offset: u64,
        result: Result<IoBuf, u32>,
    },
    /// One list of extents per selected context: (context id, extents).
    Status {
        cookie: u64,
        offset: u64,
        result: Result<Vec<(u32, Vec<Extent>)>, u32>,
    },
}

struct Pending {
    cookie: u64,
    kind: u16,
    bytes: u64,
}

struct Conn {
    ch: Rc<BackendChannel>,
    size: u64,
    session: Session,
    pending: RefCell<Slab<Pending>>,
    replies: RefCell<VecDeque<(Reply, u64)>>,
    writer_wake: LocalNotify,
    reader_wake: LocalNotify,
    inflight: Cell<usize>,
    inflight_bytes: Cell<u64>,
    reader_done: Cell<bool>,
    broken: Cell<bool>,
}

impl Conn {
    fn queue(&self, reply: Reply, bytes: u64) {
        self.replies.borrow_mut().push_back((reply, bytes));
        self.writer_wake.notify();
    }

    fn admit(&self, bytes: u64) {
        self.inflight.set(self.inflight.get() + 1);
        self.inflight_bytes.set(self.inflight_bytes.get() + bytes);
    }

    fn full(&self) -> bool {
        self.inflight.get() >= INFLIGHT_MAX || self.inflight_bytes.get() >= INFLIGHT_BYTES_MAX
    }

    /// Answers a request at once with an error (or success).
    fn reply_now(&self, req: &Request, error: u32) {
        self.admit(0);
        let reply = if req.kind == cmd::READ && self.session.structured {
            Reply::Read { cookie: req.cookie, offset: req.offset, result: Err(error) }
        } else {
            Reply::Simple { cookie: req.cookie, error }
        };
        self.queue(reply, 0);
    }
}

impl IoDone for Conn {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let p = self.pending.borrow_mut().remove(tag as usize);
        let write = p.kind != cmd::READ;
        let reply = match p.kind {
            cmd::READ => Reply::Read {
                cookie: p.cookie,
                offset: io.offset,
                result: res.map(|()| io.buf.expect("reads return their buffer")).map_err(|e| nbd_errno(e, false)),
            },
            _ => Reply::Simple { cookie: p.cookie, error: res.err().map_or(0, |e| nbd_errno(e, write)) },
        };
        self.queue(reply, p.bytes);
    }
}

/// Serves requests until the client disconnects (or breaks the protocol),
/// then waits for every request in flight to be answered or dropped.
pub async fn serve(mut sock: Sock, session: Session) -> Result<(), TransmitError> {
    let ch = session.export.backend.channel().map_err(|e| TransmitError::Abuse(format!("export channel: {e}")))?;
    let conn = Rc::new(Conn {
        size: ch.size(),
        ch,
        session,
        pending: RefCell::new(Slab::with_capacity(64)),
        replies: RefCell::new(VecDeque::with_capacity(64)),
        writer_wake: LocalNotify::new(),
        reader_wake: LocalNotify::new(),
        inflight: Cell::new(0),
        inflight_bytes: Cell::new(0),
        reader_done: Cell::new(false),
        broken: Cell::new(false),
    });
    let writer = reactor::spawn_local(write_loop(Rc::clone(&conn), Sock::new(sock.fd().clone())));
    let res = read_loop(&conn, &mut sock).await;
    conn.reader_done.set(true);
    conn.writer_wake.notify();
    writer.await;
    if conn.broken.get() {
        sock.shutdown();
    }
    // Requests still in the device complete into `conn` and are dropped
    // there; wait for them so the node is idle when we report done.
    while !conn.pending.borrow().is_empty() {
        conn.writer_wake.notified().await;
    }
    res
}

async fn read_loop(conn: &Rc<Conn>, sock: &mut Sock) -> Result<(), TransmitError> {
    let mut dec = RequestDecoder::new(false);
    loop {
        while conn.full() && !conn.broken.get() {
            conn.reader_wake.notified().await;
        }
        if conn.broken.get() {
            return Ok(());
        }
        match dec.next()? {
            None => {
                if !sock.buffered().is_empty() {
                    let n = sock.buffered().len();
                    dec.push(sock.buffered());
                    sock.consume(n);
                    continue;
                }
                if sock.fill().await? == 0 {
                    return Ok(());
                }
            }
            Some(req) => {
                if !handle(conn, sock, &mut dec, req).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Reads a write payload into a fresh buffer: what the decoder already
/// holds, then straight from the socket.
async fn read_payload(sock: &mut Sock, dec: &mut RequestDecoder, len: usize) -> Result<IoBuf, TransmitError> {
    let mut buf = IoBuf::new(len);
    let mut have = dec.copy_payload(&mut buf);
    // Bytes received but not yet handed to the decoder belong to it too.
    if have < len && !sock.buffered().is_empty() {
        let n = sock.buffered().len().min(len - have);
        buf[have..have + n].copy_from_slice(&sock.buffered()[..n]);
        sock.consume(n);
        dec.payload_read_directly(n as u64)?;
        have += n;
    }
    while have < len {
        let (res, b) = sock.recv_into(buf, have, len - have).await;
        buf = b;
        match res? {
            0 => return Err(TransmitError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            n => {
                dec.payload_read_directly(n as u64)?;
                have += n;
            }
        }
    }
    Ok(buf)
}

/// Handles one request; false ends the connection (disconnect requested).
async fn handle(
    conn: &Rc<Conn>,
    sock: &mut Sock,
    dec: &mut RequestDecoder,
    req: Request,
) -> Result<bool, TransmitError> {
    let s = &conn.session;
    let len = req.length;
    // A write's payload is part of the stream whatever happens to the write.
    let payload = if req.kind == cmd::WRITE {
        if len > u64::from(PAYLOAD_BYTES_MAX) {
            return Err(TransmitError::Abuse(format!("write of {len} bytes exceeds the maximum payload")));
        }
        Some(read_payload(sock, dec, len as usize).await?)
    } else {
        None
    };
    if req.check_command().is_err() || req.check_flags(false, s.transmission_flags).is_err() {
        conn.reply_now(&req, errno::EINVAL);
        return Ok(true);
    }
    let in_bounds = req.offset.checked_add(len).is_some_and(|end| end <= conn.size);
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && !s.export.writable {
        conn.reply_now(&req, errno::EPERM);
        return Ok(true);
    }
    let fua = if req.flags & cmd_flags::FUA != 0 { IoFlags::FUA } else { IoFlags::NONE };
    let io = match req.kind {
        cmd::DISC => return Ok(false),
        cmd::READ => {
            if len > u64::from(PAYLOAD_BYTES_MAX) || !in_bounds {
                conn.reply_now(&req, errno::EINVAL);
                return Ok(true);
            }
            Io::read(req.offset, IoBuf::new(len as usize))
        }
        cmd::WRITE => {
            if !in_bounds {
                conn.reply_now(&req, errno::ENOSPC);
                return Ok(true);
            }
            Io::write(req.offset, payload.expect("write payload read"), fua)
        }
        cmd::FLUSH => Io::flush(),
        cmd::TRIM | cmd::WRITE_ZEROES if !in_bounds => {
            conn.reply_now(&req, errno::ENOSPC);
            return Ok(true);
        }
        cmd::TRIM => Io { flags: fua, ..Io::discard(req.offset, len) },
        cmd::WRITE_ZEROES => {
            let mut flags = fua;
            if req.flags & cmd_flags::NO_HOLE == 0 {
                flags = flags | IoFlags::MAY_UNMAP;
            }
            if req.flags & cmd_flags::FAST_ZERO != 0 {
                flags = flags | IoFlags::NO_FALLBACK;
            }
            Io::write_zeroes(req.offset, len, flags)
        }
        cmd::BLOCK_STATUS => {
            if s.contexts.is_empty() || len == 0 || !in_bounds {
                conn.reply_now(&req, errno::EINVAL);
                return Ok(true);
            }
            block_status(conn, &req);
            return Ok(true);
        }
        cmd::CACHE => {
            conn.reply_now(&req, 0);
            return Ok(true);
        }
        _ => {
            conn.reply_now(&req, errno::EINVAL);
            return Ok(true);
        }
    };
    let bytes = if matches!(req.kind, cmd::READ | cmd::WRITE) { len } else { 0 };
    conn.admit(bytes);
    let tag = conn.pending.borrow_mut().insert(Pending { cookie: req.cookie, kind: req.kind, bytes }) as u64;
    let target: Rc<dyn IoDone> = Rc::clone(conn) as Rc<dyn IoDone>;
    conn.ch.submit(io, Done::new(target, tag));
    Ok(true)
}

/// Extents of one context's answer, as QEMU builds them: a run with the
/// flags of the previous extent extends it, and once the list is full (one
/// extent with `NBD_CMD_FLAG_REQ_ONE`) the answer ends where the flags
/// change, short of the request's end.
struct ExtentList {
    extents: Vec<Extent>,
    max: usize,
}

impl ExtentList {
    fn new(one: bool) -> ExtentList {
        ExtentList { extents: Vec::new(), max: if one { 1 } else { STATUS_EXTENTS_MAX } }
    }

    /// Adds `len` bytes with `flags`; false when they did not fit.
    fn add(&mut self, len: u64, flags: u64) -> bool {
        debug_assert!(len > 0 && len <= u64::from(u32::MAX), "runs are cut at the request's 32-bit length");
        if let Some(last) = self.extents.last_mut()
            && last.flags == flags
            && last.length + len <= u64::from(u32::MAX)
        {
            last.length += len;
            return true;
        }
        if self.extents.len() >= self.max {
            return false;
        }
        self.extents.push(Extent { length: len, flags });
        true
    }
}

/// The exported chain as QEMU numbers its layers for
/// `qemu:allocation-depth`. QEMU walks from the exported node down
/// filters and backing files, counting every node it passes, filters
/// included; a node's own answer looks through filters and through a raw
/// format node to the node below, but a raw node has no backing file of
/// its own, so the walk ends there. Block status here counts backing
/// files only and looks through every pass-through node, so:
///
/// | held by | block status depth | QEMU's layer |
/// |---|---|---|
/// | the first format node below the filters | 0 | 1 |
/// | its k-th backing file, `filters` filters above it | k | filters + k + 1 |
/// | anything below a raw node's first layer | k ≥ 1 | 0 (the walk ended) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layers {
    /// Filter nodes above the first node that is not one.
    filters: u32,
    /// That node has a backing file the walk continues into.
    backed: bool,
}

impl Layers {
    fn of(root: &Arc<Node>) -> Layers {
        let mut node = Arc::clone(root);
        let mut filters = 0;
        while node.bdev().is_filter()
            && let Some(below) = node.chain_next()
        {
            filters += 1;
            node = below;
        }
        let backed = node.children().iter().any(|(role, _)| *role == "backing");
        Layers { filters, backed }
    }

    fn depth(self, st: &BlockStatus) -> u32 {
        match (st.allocated, st.depth) {
            (false, _) => qemu_state::UNALLOCATED,
            (true, 0) => 1,
            (true, k) if self.backed => self.filters + k + 1,
            (true, _) => qemu_state::UNALLOCATED,
        }
    }
}

/// A status query's answer as flags of one context.
fn status_flags(context: Context, layers: Layers, st: &BlockStatus) -> u64 {
    match context {
        Context::BaseAllocation => {
            u64::from(if st.data { 0 } else { state::HOLE } | if st.zero { state::ZERO } else { 0 })
        }
        Context::AllocationDepth => u64::from(layers.depth(st)),
        Context::Bitmap(_) => unreachable!("bitmaps are answered from their bits"),
    }
}

/// `base:allocation` or `qemu:allocation-depth` for `[offset, end)`, from
/// the node's block status.
async fn status_extents(conn: &Conn, context: Context, offset: u64, end: u64, one: bool) -> Result<Vec<Extent>, u32> {
    // What the export serves now (a job may have moved it).
    let layers = Layers::of(&conn.session.export.backend.root());
    let mut list = ExtentList::new(one);
    let mut pos = offset;
    while pos < end {
        let st = conn.ch.block_status(pos, end - pos).await.map_err(|e| nbd_errno(e, false))?;
        if !list.add(st.len, status_flags(context, layers, &st)) {
            break;
        }
        pos += st.len;
    }
    Ok(list.extents)
}

/// `qemu:dirty-bitmap:` for `[offset, end)`: dirty or clean runs at the
/// bitmap's granularity, the first and last cut at the request.
fn bitmap_extents(bits: &DirtyBits, offset: u64, end: u64, one: bool) -> Vec<Extent> {
    let mut list = ExtentList::new(one);
    let mut pos = offset;
    while pos < end {
        let (dirty, run_end) = bits.run_at(pos, end);
        let flags = if dirty { qemu_state::DIRTY } else { 0 };
        if !list.add(run_end - pos, u64::from(flags)) {
            break;
        }
        pos = run_end;
    }
    list.extents
}

/// Answers a block status request from a task (it may need metadata I/O):
/// one list of extents per selected context.
fn block_status(conn: &Rc<Conn>, req: &Request) {
    conn.admit(0);
    let (conn, cookie, offset, end) = (Rc::clone(conn), req.cookie, req.offset, req.offset + req.length);
    let one = req.flags & cmd_flags::REQ_ONE != 0;
    reactor::spawn_local(async move {
        let mut answers = Vec::with_capacity(conn.session.contexts.len());
        let mut result = Ok(());
        for &context in &conn.session.contexts {
            let extents = match context {
                Context::Bitmap(i) => {
                    Ok(bitmap_extents(conn.session.export.bitmaps[i].bitmap().bits(), offset, end, one))
                }
                _ => status_extents(&conn, context, offset, end, one).await,
            };
            match extents {
                Ok(e) => answers.push((context.id(), e)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        conn.queue(Reply::Status { cookie, offset, result: result.map(|()| answers) }, 0);
    });
}

/// How many queued replies the next vectored write sends: at least one, at
/// most [`REPLY_BATCH_MAX`], and read data up to [`REPLY_WRITE_DATA_MAX`].
fn next_write(q: &VecDeque<(Reply, u64)>) -> usize {
    let mut data = 0;
    let mut n = 0;
    for (reply, _) in q.iter().take(REPLY_BATCH_MAX) {
        let len = match reply {
            Reply::Read { result: Ok(buf), .. } => buf.len() as u64,
            _ => 0,
        };
        if n > 0 && data + len > REPLY_WRITE_DATA_MAX {
            break;
        }
        data += len;
        n += 1;
    }
    n
}

/// Sends queued replies, many per vectored write, until the reader is done
/// and nothing is in flight (or the socket breaks).
async fn write_loop(conn: Rc<Conn>, sock: Sock) {
    let mut headers: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if conn.replies.borrow().is_empty() {
            if conn.reader_done.get() && conn.inflight.get() == 0 || conn.broken.get() {
                return;
            }
            conn.writer_wake.notified().await;
            continue;
        }
        let batch: Vec<(Reply, u64)> = {
            let mut q = conn.replies.borrow_mut();
            let n = next_write(&q);
            q.drain(..n).collect()
        };
        headers.clear();
        // Buffer 0 holds every header; read data follows as its own buffers.
        let mut bufs: Vec<IoBuf> = vec![IoBuf::new(0)];
        let mut segs: Vec<(usize, usize, usize)> = Vec::with_capacity(batch.len() * 2);
        let mut released = 0u64;
        let answered = batch.len();
        for (reply, bytes) in batch {
            released += bytes;
            let start = headers.len();
            match reply {
                Reply::Simple { cookie, error } => headers.extend_from_slice(&encode_simple_reply(error, cookie)),
                Reply::Read { cookie, offset, result: Ok(data) } => {
                    if conn.session.structured {
                        let t = ReplyTarget { cookie, offset, extended: false };
                        let _ =
                            encode_offset_data_header(t, reply_flags::DONE, offset, data.len() as u64, &mut headers);
                    } else {
                        headers.extend_from_slice(&encode_simple_reply(0, cookie));
                    }
                    segs.push((0, start, headers.len() - start));
                    segs.push((bufs.len(), 0, data.len()));
                    bufs.push(data);
                    continue;
                }
                Reply::Read { cookie, offset, result: Err(error) }
                | Reply::Status { cookie, offset, result: Err(error) } => {
                    if conn.session.structured {
                        let t = ReplyTarget { cookie, offset, extended: false };
                        let _ = encode_error_chunk(t, reply_flags::DONE, error, "", &mut headers);
                    } else {
                        headers.extend_from_slice(&encode_simple_reply(error, cookie));
                    }
                }
                Reply::Status { cookie, offset, result: Ok(answers) } => {
                    // One chunk per context; the last one ends the reply.
                    let t = ReplyTarget { cookie, offset, extended: false };
                    let last = answers.len().saturating_sub(1);
                    for (i, (id, extents)) in answers.iter().enumerate() {
                        let flags = if i == last { reply_flags::DONE } else { 0 };
                        let _ = encode_block_status(t, flags, *id, extents, &mut headers);
                    }
                }
            }
            segs.push((0, start, headers.len() - start));
        }
        bufs[0] = IoBuf::from_slice(&headers);
        let (res, bufs) = sock.send_vectored(bufs, segs).await;
        // Read buffers go back to the pool here.
        drop(bufs);
        // Every reply of the batch is answered, or the connection is gone.
        conn.inflight.set(conn.inflight.get() - answered);
        conn.inflight_bytes.set(conn.inflight_bytes.get() - released);
        conn.reader_wake.notify();
        if let Err(e) = res {
            tracing::debug!(error = %e, "NBD reply failed; closing the connection");
            conn.broken.set(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(len: usize) -> (Reply, u64) {
        (Reply::Read { cookie: 1, offset: 0, result: Ok(IoBuf::new(len)) }, len as u64)
    }

    fn simple() -> (Reply, u64) {
        (Reply::Simple { cookie: 1, error: 0 }, 0)
    }

    fn runs(extents: &[Extent]) -> Vec<(u64, u64)> {
        extents.iter().map(|e| (e.length, e.flags)).collect()
    }

    #[test]
    fn bitmap_extents_follow_the_granularity_inside_and_the_request_at_its_ends() {
        let bits = DirtyBits::new(1 << 20, 65536);
        bits.set_range(65536, 1);
        bits.set_range(3 * 65536, 2 * 65536);
        assert_eq!(
            runs(&bitmap_extents(&bits, 1000, 6 * 65536 + 5, false)),
            [(65536 - 1000, 0), (65536, 1), (65536, 0), (2 * 65536, 1), (65536 + 5, 0)]
        );
        assert_eq!(runs(&bitmap_extents(&bits, 65536 + 10, 65536 + 100, false)), [(90, 1)]);
        assert_eq!(runs(&bitmap_extents(&bits, 0, 1 << 20, true)), [(65536, 0)], "REQ_ONE: the first run");
        assert_eq!(runs(&bitmap_extents(&bits, 5 * 65536, 1 << 20, false)), [(11 * 65536, 0)]);
        // An export larger than the bitmap (a bitmap of a smaller backing file).
        let small = DirtyBits::new(100_000, 4096);
        small.set_all();
        assert_eq!(runs(&bitmap_extents(&small, 90_000, 200_000, false)), [(10_000, 1), (100_000, 0)]);
    }

    #[test]
    fn a_full_extent_list_takes_only_runs_that_extend_its_last_extent() {
        let mut l = ExtentList::new(true);
        assert!(l.add(10, 1) && l.add(20, 1));
        assert!(!l.add(5, 0));
        assert_eq!(runs(&l.extents), [(30, 1)]);
        let mut l = ExtentList::new(false);
        assert!(l.add(u64::from(u32::MAX) - 1, 0) && l.add(2, 0));
        assert_eq!(runs(&l.extents), [(u64::from(u32::MAX) - 1, 0), (2, 0)], "lengths stay within 32 bits");
    }

    #[test]
    fn layers_are_numbered_as_qemu_numbers_them() {
        let st = |allocated, depth| BlockStatus { allocated, depth, ..BlockStatus::unallocated(1) };
        let chain = Layers { filters: 0, backed: true };
        assert_eq!([chain.depth(&st(false, 2)), chain.depth(&st(true, 0)), chain.depth(&st(true, 2))], [0, 1, 3]);
        let filtered = Layers { filters: 2, backed: true };
        assert_eq!([filtered.depth(&st(true, 0)), filtered.depth(&st(true, 1))], [1, 4]);
        let raw_over_chain = Layers { filters: 1, backed: false };
        assert_eq!([raw_over_chain.depth(&st(true, 0)), raw_over_chain.depth(&st(true, 1))], [1, 0]);
    }

    #[test]
    fn a_write_carries_little_read_data_but_many_bare_replies() {
        let q: VecDeque<_> = (0..21).map(|_| read(4096)).collect();
        assert_eq!(next_write(&q), 2, "two 4 KiB reads fill a write");
        let q: VecDeque<_> = (0..8).map(|_| read(64 << 10)).collect();
        assert_eq!(next_write(&q), 1, "a large read goes alone");
        let q: VecDeque<_> = (0..300).map(|_| simple()).collect();
        assert_eq!(next_write(&q), REPLY_BATCH_MAX);
        let q: VecDeque<_> = [simple(), simple(), read(4096), simple(), read(4096), read(4096)].into();
        assert_eq!(next_write(&q), 5, "bare replies ride along with the data");
        let q: VecDeque<_> = [(Reply::Read { cookie: 1, offset: 0, result: Err(5) }, 0), read(8192), read(1)].into();
        assert_eq!(next_write(&q), 2);
    }
}
