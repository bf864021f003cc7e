//! `malloc`: a RAM disk shared by every reactor (SPDK's malloc bdev).
//! Contents start zeroed and vanish with the node.

use std::rc::Rc;
use std::sync::Arc;

use reactor::MemRegion;
use serde_json::json;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::drivers::queue::CompletionQueue;
use crate::error::{BdevError, IoError};
use crate::graph::OpenCtx;
use crate::io::{BlockStatus, Done, Io, IoKind};
use crate::options::OptReader;

const MALLOC_BLOCK_SIZE_DEFAULT: u32 = 512;

pub struct MallocBdev {
    mem: Arc<MemRegion>,
    block_size: u32,
}

pub fn open(_ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let size = opts.u64_req("size")?;
    let block_size = opts.u64_opt("block-size")?.unwrap_or(u64::from(MALLOC_BLOCK_SIZE_DEFAULT));
    opts.finish()?;
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(BdevError::invalid(format!("block-size {block_size} must be a power of two from 512 to 65536")));
    }
    if size == 0 || size % block_size != 0 {
        return Err(BdevError::invalid(format!(
            "size {size} must be a non-zero multiple of the block size {block_size}"
        )));
    }
    let len = usize::try_from(size).map_err(|_| BdevError::invalid(format!("size {size} is too large")))?;
    let mem = MemRegion::new(len).map_err(|e| BdevError::invalid(format!("cannot allocate {size} bytes: {e}")))?;
    Ok(Arc::new(MallocBdev { mem: Arc::new(mem), block_size: block_size as u32 }))
}

fn execute(mem: &MemRegion, io: &mut Io) -> Result<(), IoError> {
    let offset = io.offset as usize;
    match io.kind {
        IoKind::Read => mem.read(offset, io.buf_mut()),
        IoKind::Write => mem.write(offset, io.buf.as_deref().expect("write carries a buffer")),
        IoKind::WriteZeroes => mem.zero(offset, io.len as usize),
        IoKind::Discard => mem.discard(offset, io.len as usize),
        IoKind::Flush => {}
    }
    Ok(())
}

impl Bdev for MallocBdev {
    fn driver(&self) -> &'static str {
        "malloc"
    }

    fn size(&self) -> u64 {
        self.mem.len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let mem = Arc::clone(&self.mem);
        Ok(Rc::new(MallocChannel { queue: CompletionQueue::new("malloc", move |io| execute(&mem, io)) }))
    }

    fn info(&self) -> BdevInfo {
        let desc = json!({"driver": "malloc", "size": self.mem.len()});
        BdevInfo {
            filename: format!("json:{desc}"),
            direct: false,
            no_flush: false,
            actual_size: None,
            format_specific: None,
        }
    }
}

struct MallocChannel {
    queue: CompletionQueue,
}

impl Channel for MallocChannel {
    fn submit(&self, io: Io, done: Done) {
        self.queue.push(io, done);
    }

    fn block_status(&self, _offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        Box::pin(async move { Ok(BlockStatus::data(len, None)) })
    }
}
