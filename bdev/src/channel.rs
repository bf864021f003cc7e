//! The front door of every I/O: [`BlockChannel`].
//!
//! Written once for all drivers: bounds and read-only checks, the node's
//! discard and detect-zeroes policies, bouncing of unaligned requests, and
//! the `async` helpers (`read`, `write`, ...) for code written as tasks.
//! Failures found here still travel the completion path (on the next tick),
//! so a caller never sees its completion inside `submit`.
//!
//! Channels are cached per reactor and node id: the first use of a node on a
//! reactor creates its channel there.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use reactor::IoBuf;
use slab::Slab;

use crate::align;
use crate::bdev::Channel;
use crate::bitmap::{Bitmap, BitmapSet};
use crate::error::IoError;
use crate::io::{BlockStatus, Done, Io, IoDone, IoFlags, IoKind};
use crate::options::{DetectZeroes, DiscardMode};

/// Largest read or write accepted in one request; callers split larger ones.
pub const IO_BYTES_MAX: u64 = 64 << 20;

/// Node properties the front door enforces, fixed when the node opens.
#[derive(Debug, Clone, Copy)]
pub struct ChannelPolicy {
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub discard: DiscardMode,
    pub detect_zeroes: DetectZeroes,
    /// Writes flagged [`IoFlags::COMPRESS`] are taken (else refused).
    pub compress: bool,
}

/// A node's channel on the current reactor, with its policy.
#[derive(Clone)]
pub struct BlockChannel {
    inner: Rc<dyn Channel>,
    policy: ChannelPolicy,
    /// The node's dirty bitmaps, marked as writes complete (None: a
    /// driver's own channel on a child, whose metadata writes nobody tracks).
    track: Option<Rc<Tracker>>,
}

impl BlockChannel {
    pub fn new(inner: Rc<dyn Channel>, policy: ChannelPolicy) -> BlockChannel {
        debug_assert!(policy.block_size.is_power_of_two());
        BlockChannel { inner, policy, track: None }
    }

    /// This channel marks `bitmaps` with every write, write-zeroes and
    /// discard that completes through it.
    pub fn tracking(mut self, bitmaps: Arc<BitmapSet>) -> BlockChannel {
        self.track = Some(Rc::new_cyclic(|me| Tracker {
            set: bitmaps,
            seen: Cell::new(u64::MAX),
            recording: RefCell::new(Vec::new()),
            pending: RefCell::new(Slab::new()),
            me: me.clone(),
        }));
        self
    }

    pub fn size(&self) -> u64 {
        self.policy.size
    }

    pub fn block_size(&self) -> u32 {
        self.policy.block_size
    }

    pub fn read_only(&self) -> bool {
        self.policy.read_only
    }

    /// The driver's channel, bypassing the front door (drivers stacking on
    /// a child they already validated for).
    pub fn raw(&self) -> &Rc<dyn Channel> {
        &self.inner
    }

    fn check(&self, io: &Io) -> Result<(), IoError> {
        let p = &self.policy;
        if io.kind.is_write() && p.read_only {
            return Err(IoError::ReadOnly);
        }
        if io.flags.contains(IoFlags::COMPRESS) && !(p.compress && io.kind == IoKind::Write) {
            return Err(IoError::NotSupported);
        }
        match io.kind {
            IoKind::Flush => return Ok(()),
            IoKind::Read | IoKind::Write => {
                let Some(buf) = &io.buf else {
                    return Err(IoError::Invalid);
                };
                if buf.len() as u64 != io.len || io.len > IO_BYTES_MAX {
                    return Err(IoError::Invalid);
                }
            }
            IoKind::Discard | IoKind::WriteZeroes => {}
        }
        match io.offset.checked_add(io.len) {
            Some(end) if end <= p.size => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    fn aligned(&self, io: &Io) -> bool {
        let mask = u64::from(self.policy.block_size) - 1;
        (io.offset | io.len) & mask == 0
    }

    /// Submits a request; `done` receives it back with its result.
    pub fn submit(&self, mut io: Io, done: Done) {
        if let Err(e) = self.check(&io) {
            return done.complete_later(io, Err(e));
        }
        match io.kind {
            IoKind::Flush => {}
            _ if io.len == 0 => return done.complete_later(io, Ok(())),
            IoKind::Discard if self.policy.discard == DiscardMode::Ignore => {
                return done.complete_later(io, Ok(()));
            }
            IoKind::WriteZeroes if self.policy.discard == DiscardMode::Ignore => {
                io.flags = io.flags.without(IoFlags::MAY_UNMAP);
            }
            IoKind::Write if self.policy.detect_zeroes != DetectZeroes::Off && is_zero(io.buf.as_deref()) => {
                io.kind = IoKind::WriteZeroes;
                let unmap =
                    self.policy.detect_zeroes == DetectZeroes::Unmap && self.policy.discard == DiscardMode::Unmap;
                io.flags = if unmap { io.flags | IoFlags::MAY_UNMAP } else { io.flags.without(IoFlags::MAY_UNMAP) };
            }
            _ => {}
        }
        let done = match &self.track {
            Some(t) if io.kind.is_write() && t.active() => t.wrap(done, io.offset, io.len),
            _ => done,
        };
        if io.kind == IoKind::Flush || self.aligned(&io) {
            self.inner.submit(io, done);
        } else {
            let this = self.clone();
            reactor::spawn_local(async move {
                let (io, res) = align::unaligned(&this, io).await;
                done.complete(io, res);
            });
        }
    }

    /// Submits and waits.
    pub fn submit_io(&self, io: Io) -> IoFuture {
        let table = ASYNC_IO.with(Rc::clone);
        let key = table.slots.borrow_mut().insert(Slot::Waiting(None));
        self.submit(io, Done::new(table.clone(), key as u64));
        IoFuture { table, key, finished: false }
    }

    /// Submits to the driver directly (already checked and aligned) and waits.
    pub(crate) fn submit_raw(&self, io: Io) -> IoFuture {
        let table = ASYNC_IO.with(Rc::clone);
        let key = table.slots.borrow_mut().insert(Slot::Waiting(None));
        self.inner.submit(io, Done::new(table.clone(), key as u64));
        IoFuture { table, key, finished: false }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, IoError> {
        let (io, res) = self.submit_io(Io::read(offset, IoBuf::new(len))).await;
        res.map(|()| io.buf.expect("read returns its buffer"))
    }

    /// Writes `buf` at `offset`; the buffer comes back either way.
    pub async fn write(&self, offset: u64, buf: IoBuf, flags: IoFlags) -> (IoBuf, Result<(), IoError>) {
        let (io, res) = self.submit_io(Io::write(offset, buf, flags)).await;
        (io.buf.expect("write returns its buffer"), res)
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: IoFlags) -> Result<(), IoError> {
        self.submit_io(Io::write_zeroes(offset, len, flags)).await.1
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.submit_io(Io::discard(offset, len)).await.1
    }

    pub async fn flush(&self) -> Result<(), IoError> {
        self.submit_io(Io::flush()).await.1
    }

    /// What the range at `offset` holds (a run of at most `len` bytes).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        if offset >= self.policy.size {
            return Err(IoError::OutOfRange);
        }
        let len = len.min(self.policy.size - offset);
        let st = self.inner.block_status(offset, len).await?;
        Ok(BlockStatus { len: st.len.clamp(1, len), ..st })
    }
}

/// Marks a node's recording bitmaps as writes complete, on whichever
/// reactor serves them: a failed write counts too (it may have changed
/// part of the range), as in QEMU.
struct Tracker {
    set: Arc<BitmapSet>,
    /// The set's generation `recording` was taken at.
    seen: Cell<u64>,
    recording: RefCell<Vec<Arc<Bitmap>>>,
    /// Writes in flight: their completion and range.
    pending: RefCell<Slab<(Done, u64, u64)>>,
    me: Weak<Tracker>,
}

impl Tracker {
    /// True when some bitmap records (one atomic load when nothing changed).
    fn active(&self) -> bool {
        let g = self.set.generation();
        if g != self.seen.get() {
            *self.recording.borrow_mut() = self.set.recording();
            self.seen.set(g);
        }
        !self.recording.borrow().is_empty()
    }

    fn wrap(&self, done: Done, offset: u64, len: u64) -> Done {
        let key = self.pending.borrow_mut().insert((done, offset, len));
        Done::new(self.me.upgrade().expect("tracker alive while its channel submits"), key as u64)
    }
}

impl IoDone for Tracker {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let (done, offset, len) = self.pending.borrow_mut().remove(tag as usize);
        self.active();
        for b in self.recording.borrow().iter() {
            b.bits().set_range(offset, len);
        }
        done.complete(io, res);
    }
}

fn is_zero(buf: Option<&[u8]>) -> bool {
    let Some(buf) = buf else { return false };
    // Eight bytes at a time, then the tail byte by byte.
    let (words, tail) = buf.split_at(buf.len() / 8 * 8);
    words.chunks_exact(8).all(|w| w == [0u8; 8]) && tail.iter().all(|&b| b == 0)
}

enum Slot {
    Waiting(Option<Waker>),
    Done(Io, Result<(), IoError>),
    /// The future was dropped; the request is still in the driver.
    Abandoned,
}

/// Completions of requests awaited by tasks on this thread.
struct AsyncIoTable {
    slots: RefCell<Slab<Slot>>,
}

impl IoDone for AsyncIoTable {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let key = tag as usize;
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut(key) else {
            tracing::error!(key, "completion for an unknown awaited request");
            return;
        };
        match std::mem::replace(slot, Slot::Done(io, res)) {
            Slot::Waiting(waker) => {
                drop(slots);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Slot::Abandoned => {
                // Nobody waits: the request (and its buffer) is released now.
                let done = slots.remove(key);
                drop(slots);
                drop(done);
            }
            Slot::Done(..) => tracing::error!(key, "request completed twice"),
        }
    }
}

thread_local! {
    static ASYNC_IO: Rc<AsyncIoTable> = Rc::new(AsyncIoTable { slots: RefCell::new(Slab::new()) });
}

/// The completion of a request submitted with [`BlockChannel::submit_io`]:
/// the request (with its buffer) and its result.
pub struct IoFuture {
    table: Rc<AsyncIoTable>,
    key: usize,
    finished: bool,
}

impl Future for IoFuture {
    type Output = (Io, Result<(), IoError>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key;
        let mut slots = self.table.slots.borrow_mut();
        match &mut slots[key] {
            Slot::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(..) => {
                let Slot::Done(io, res) = slots.remove(key) else { unreachable!() };
                drop(slots);
                self.finished = true;
                Poll::Ready((io, res))
            }
            Slot::Abandoned => unreachable!("polled an abandoned request"),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut slots = self.table.slots.borrow_mut();
        match slots.get(self.key) {
            Some(Slot::Done(..)) => {
                let done = slots.remove(self.key);
                drop(slots);
                drop(done);
            }
            Some(_) => slots[self.key] = Slot::Abandoned,
            None => {}
        }
    }
}

/// Channels of this reactor, by node id.
type ChannelCache = RefCell<HashMap<u64, BlockChannel>>;

thread_local! {
    static CHANNELS: ChannelCache = RefCell::new(HashMap::new());
}

/// This reactor's channel for node `id`, created by `create` on first use.
pub(crate) fn cached_channel<E>(id: u64, create: impl FnOnce() -> Result<BlockChannel, E>) -> Result<BlockChannel, E> {
    if let Some(ch) = CHANNELS.with(|c| c.borrow().get(&id).cloned()) {
        return Ok(ch);
    }
    let ch = create()?;
    CHANNELS.with(|c| c.borrow_mut().insert(id, ch.clone()));
    Ok(ch)
}

/// Forgets this reactor's channel for node `id` (the node is going away).
pub(crate) fn drop_cached_channel(id: u64) {
    let ch = CHANNELS.with(|c| c.borrow_mut().remove(&id));
    drop(ch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(Some(&[0u8; 4099])));
        let mut b = [0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(Some(&b)));
        b[4098] = 0;
        b[3] = 1;
        assert!(!is_zero(Some(&b)));
        assert!(!is_zero(None));
    }
}
