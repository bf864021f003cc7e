//! `null-co`: a device that stores nothing. Writes succeed, reads return
//! zeroes. Optional `latency-ns` delays every completion. The overhead
//! baseline of the device layer.
//!
//! QEMU's `read-zeroes=false` leaves a read's buffer as it was; here the
//! buffer comes from a pool that held other requests' data (other clients'
//! too), so reads are zeroed either way and the option only changes what
//! block status reports (data, as in QEMU, or zeroes).

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::drivers::queue::CompletionQueue;
use crate::error::{BdevError, IoError};
use crate::graph::OpenCtx;
use crate::io::{BlockStatus, Done, Io, IoKind};
use crate::options::OptReader;

/// QEMU's default size for null devices.
const NULL_SIZE_DEFAULT: u64 = 1 << 30;
const NULL_BLOCK_SIZE: u32 = 512;

pub struct NullBdev {
    size: u64,
    latency: Duration,
    read_zeroes: bool,
}

pub fn open(_ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let size = opts.u64_opt("size")?.unwrap_or(NULL_SIZE_DEFAULT);
    let latency = Duration::from_nanos(opts.u64_opt("latency-ns")?.unwrap_or(0));
    let read_zeroes = opts.bool_opt("read-zeroes")?.unwrap_or(false);
    opts.finish()?;
    if size % u64::from(NULL_BLOCK_SIZE) != 0 {
        return Err(BdevError::invalid(format!("size {size} is not a multiple of {NULL_BLOCK_SIZE}")));
    }
    Ok(Arc::new(NullBdev { size, latency, read_zeroes }))
}

fn execute(io: &mut Io) -> Result<(), IoError> {
    if io.kind == IoKind::Read {
        // Never hand out what the pooled buffer held before (see the module notes).
        io.buf_mut().fill(0);
    }
    Ok(())
}

impl Bdev for NullBdev {
    fn driver(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        NULL_BLOCK_SIZE
    }

    fn read_only(&self) -> bool {
        false
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let queue = (self.latency.is_zero()).then(|| CompletionQueue::new("null-co", execute));
        Ok(Rc::new(NullChannel { bdev: self, queue }))
    }

    fn info(&self) -> BdevInfo {
        let mut desc = json!({"driver": "null-co", "size": self.size});
        if self.read_zeroes {
            desc["read-zeroes"] = json!(true);
        }
        BdevInfo {
            filename: format!("json:{desc}"),
            direct: false,
            no_flush: false,
            actual_size: Some(0),
            format_specific: None,
        }
    }
}

struct NullChannel {
    bdev: Arc<NullBdev>,
    /// Without latency: completed by a poller on the next tick.
    queue: Option<CompletionQueue>,
}

impl Channel for NullChannel {
    fn submit(&self, io: Io, done: Done) {
        match &self.queue {
            Some(q) => q.push(io, done),
            None => {
                // With latency every request waits on its own timer (a test
                // feature; the allocation per request does not matter here).
                let deadline = Instant::now() + self.bdev.latency;
                reactor::spawn_local(async move {
                    reactor::sleep_until(deadline).await;
                    let mut io = io;
                    let res = execute(&mut io);
                    done.complete(io, res);
                });
            }
        }
    }

    fn block_status(&self, _offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let st = if self.bdev.read_zeroes { BlockStatus::zero(len) } else { BlockStatus::data(len, None) };
        Box::pin(async move { Ok(st) })
    }
}
