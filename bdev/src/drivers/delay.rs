//! `delay`: a filter that adds latency, like SPDK's delay bdev.
//!
//! Requests pass to the `file` child unchanged; when the child completes
//! one, the completion is held for the request type's latency and then
//! delivered. A slow disk in a test: a mirror target that lags, a guest
//! whose requests take milliseconds.
//!
//! ```text
//!   submit ──▶ child ──▶ done: due = now + latency(kind) ──▶ FIFO per kind
//!                                                            │
//!   poller (per channel): complete every head whose due time has passed
//! ```
//!
//! Each request type has one latency, so due times within a FIFO only grow
//! and the poller looks at three queue heads per tick. No allocation per
//! request: the in-flight table is a slab, the queues are rings. While
//! completions wait the poller reports work, so an adaptive reactor keeps
//! polling and delivers them on time; with none waiting it goes idle.
//!
//! Options: `file` (the child), `latency-ns` (every request type, default
//! 0), and `read-latency-ns`, `write-latency-ns` (writes, write-zeroes and
//! discards), `flush-latency-ns` overriding it per type.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{PollStatus, PollerId};
use serde_json::json;
use slab::Slab;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::channel::BlockChannel;
use crate::error::{BdevError, IoError};
use crate::graph::{Node, OpenCtx};
use crate::io::{BlockStatus, Done, Io, IoDone, IoKind};
use crate::lock::Perms;
use crate::options::OptReader;

/// Largest latency accepted (an hour): beyond it a request would outlive
/// any client's patience, and the sum with `Instant::now()` stays exact.
const LATENCY_NS_MAX: u64 = 3_600_000_000_000;
/// Completions delivered per poller run at most.
const COMPLETIONS_PER_POLL_MAX: usize = 1024;

/// The request classes with a latency of their own.
#[derive(Debug, Clone, Copy)]
enum Class {
    Read = 0,
    Write = 1,
    Flush = 2,
}

impl Class {
    fn of(kind: IoKind) -> Class {
        match kind {
            IoKind::Read => Class::Read,
            IoKind::Write | IoKind::WriteZeroes | IoKind::Discard => Class::Write,
            IoKind::Flush => Class::Flush,
        }
    }
}

pub struct DelayBdev {
    file: Arc<Node>,
    read_only: bool,
    /// Indexed by [`Class`].
    latency: [Duration; 3],
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    let mut latency_opt = |key: &str, default: u64| -> Result<u64, BdevError> {
        let ns = opts.u64_opt(key)?.unwrap_or(default);
        if ns > LATENCY_NS_MAX {
            return Err(BdevError::invalid(format!("'{key}' must be at most {LATENCY_NS_MAX} (an hour), not {ns}")));
        }
        Ok(ns)
    };
    let all = latency_opt("latency-ns", 0)?;
    let read = latency_opt("read-latency-ns", all)?;
    let write = latency_opt("write-latency-ns", all)?;
    let flush = latency_opt("flush-latency-ns", all)?;
    opts.finish()?;
    let read_only = ctx.common().read_only;
    let file = ctx.open_child("file", file, if read_only { Perms::read() } else { Perms::write() })?;
    let read_only = read_only || file.read_only();
    let latency = [read, write, flush].map(Duration::from_nanos);
    Ok(Arc::new(DelayBdev { file, read_only, latency }))
}

impl Bdev for DelayBdev {
    fn driver(&self) -> &'static str {
        "delay"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn block_size(&self) -> u32 {
        self.file.bdev().block_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let file = self.file.channel()?;
        let inner = Rc::new(Inner {
            latency: self.latency,
            inflight: RefCell::new(Slab::with_capacity(128)),
            due: RefCell::new(std::array::from_fn(|_| VecDeque::with_capacity(128))),
            closed: Cell::new(false),
        });
        let polled = Rc::clone(&inner);
        let poller = reactor::current().register_poller("delay", move || polled.poll());
        Ok(Rc::new(DelayChannel { file, inner, poller }))
    }

    fn home(&self) -> Option<reactor::Handle> {
        self.file.home()
    }

    fn info(&self) -> BdevInfo {
        let child = self.file.bdev().info();
        let file = child
            .filename
            .strip_prefix("json:")
            .map_or_else(|| json!(child.filename), |desc| serde_json::from_str(desc).unwrap_or_else(|_| json!(desc)));
        let [r, w, f] = self.latency.map(|d| d.as_nanos() as u64);
        let desc = json!({"driver": "delay", "file": file, "read-latency-ns": r, "write-latency-ns": w,
                          "flush-latency-ns": f});
        BdevInfo { filename: format!("json:{desc}"), format_specific: None, ..child }
    }
}

/// A completion waiting for its due time.
struct Waiting {
    due: Instant,
    io: Io,
    res: Result<(), IoError>,
    done: Done,
}

/// The per-channel state the child's completions and the poller share.
struct Inner {
    latency: [Duration; 3],
    /// The caller's completion of each request the child holds; the slab
    /// key is the tag the child completes with.
    inflight: RefCell<Slab<Done>>,
    /// Completions waiting, per [`Class`], in due order.
    due: RefCell<[VecDeque<Waiting>; 3]>,
    /// The channel is gone (and its poller): deliver at once.
    closed: Cell<bool>,
}

impl Inner {
    fn poll(&self) -> PollStatus {
        let now = Instant::now();
        let mut delivered = 0;
        let mut waiting = false;
        for class in 0..3 {
            while delivered < COMPLETIONS_PER_POLL_MAX {
                // Pop before completing: the caller may submit again from its callback.
                let w = {
                    let mut due = self.due.borrow_mut();
                    match due[class].front() {
                        Some(w) if w.due <= now => due[class].pop_front(),
                        _ => None,
                    }
                };
                let Some(w) = w else { break };
                w.done.complete(w.io, w.res);
                delivered += 1;
            }
            waiting |= !self.due.borrow()[class].is_empty();
        }
        PollStatus::from_busy(delivered > 0 || waiting)
    }
}

impl IoDone for Inner {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let done = self.inflight.borrow_mut().remove(tag as usize);
        if self.closed.get() {
            return done.complete(io, res);
        }
        let class = Class::of(io.kind);
        let due = Instant::now() + self.latency[class as usize];
        self.due.borrow_mut()[class as usize].push_back(Waiting { due, io, res, done });
    }
}

struct DelayChannel {
    file: BlockChannel,
    inner: Rc<Inner>,
    poller: PollerId,
}

impl Channel for DelayChannel {
    fn submit(&self, io: Io, done: Done) {
        let tag = self.inner.inflight.borrow_mut().insert(done) as u64;
        let me: Rc<dyn IoDone> = Rc::clone(&self.inner) as Rc<dyn IoDone>;
        self.file.raw().submit(io, Done::new(me, tag));
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let file = self.file.clone();
        Box::pin(async move { file.block_status(offset, len).await })
    }
}

impl Drop for DelayChannel {
    fn drop(&mut self) {
        if let Some(r) = reactor::try_current() {
            r.unregister_poller(self.poller);
        }
        // Nothing polls any more: what waits is delivered now, and what the
        // child still holds is delivered as it completes.
        self.inner.closed.set(true);
        let waiting: Vec<Waiting> = self.inner.due.borrow_mut().iter_mut().flat_map(|q| q.drain(..)).collect();
        for w in waiting {
            w.done.complete_later(w.io, w.res);
        }
    }
}
