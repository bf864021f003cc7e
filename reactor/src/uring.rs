//! The reactor's io_uring: the in-flight table, submission batching and
//! completion dispatch.
//!
//! One of the two modules of the workspace that hold `unsafe` (the other is
//! `buf`). The contract of io_uring is that everything an SQE points to stays
//! valid until its CQE. It is discharged here and only here:
//!
//! - an [`Op`] owns every resource the kernel touches: its [`IoBuf`] (heap
//!   memory that does not move when the `Op` value moves) and a [`SharedFd`]
//!   reference that keeps the descriptor open;
//! - the `Op` enters the in-flight slab *before* its SQE is pushed, keyed by
//!   the SQE's `user_data`, and leaves it only when the CQE for that key is
//!   reaped — the completion hands the `Op` (and so the buffer) back;
//! - `user_data` is the slab key *and* a generation: a slab key is reused as
//!   soon as its operation ends, so a cancel still queued for the old
//!   operation (or any late word about it) must not reach the new one;
//! - a dropped [`OpFuture`] does not free anything: its entry is marked
//!   abandoned and released when the CQE arrives;
//! - dropping the ring with operations in flight leaks their resources (with
//!   an error log) instead of freeing memory the kernel may still write.
//!
//! Every failure reaches the submitter as a completion (a negative errno), so
//! callers have one path.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;

use crate::buf::IoBuf;

/// A file descriptor shared by a device and every operation in flight on it.
pub type SharedFd = Arc<OwnedFd>;

/// `user_data` of cancel requests, whose own completions are ignored.
const CANCEL_USER_DATA: u64 = u64::MAX;
/// Most slices one vectored write takes (the kernel's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// An operation for the kernel, owning everything the kernel will touch.
#[derive(Debug)]
pub enum Op {
    Nop,
    /// Read `len` bytes at file `offset` into `buf[at..at + len]`.
    /// An offset of `u64::MAX` reads at the file position (pipes, eventfds).
    Read {
        fd: SharedFd,
        offset: u64,
        buf: IoBuf,
        at: usize,
        len: usize,
    },
    /// Write `buf[at..at + len]` at file `offset`; `fua` makes it durable
    /// before completion (RWF_DSYNC).
    Write {
        fd: SharedFd,
        offset: u64,
        buf: IoBuf,
        at: usize,
        len: usize,
        fua: bool,
    },
    Fsync {
        fd: SharedFd,
        datasync: bool,
    },
    Fallocate {
        fd: SharedFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Receive into `buf[at..at + len]` from a socket.
    Recv {
        fd: SharedFd,
        buf: IoBuf,
        at: usize,
        len: usize,
    },
    /// Send `buf[at..at + len]` on a socket (never raises SIGPIPE).
    Send {
        fd: SharedFd,
        buf: IoBuf,
        at: usize,
        len: usize,
    },
    /// Write several buffer slices in order (`writev`): `segs` are
    /// (buffer index, start, length) into `bufs`. `iov` is scratch the op
    /// fills when it is submitted. Used on sockets, at their position.
    Writev {
        fd: SharedFd,
        bufs: Vec<IoBuf>,
        segs: Vec<(usize, usize, usize)>,
        iov: Vec<libc::iovec>,
    },
    /// Accept a connection; the result is the new descriptor.
    Accept {
        fd: SharedFd,
    },
    /// Wait until the descriptor is ready for `events` (POLLIN, ...).
    PollAdd {
        fd: SharedFd,
        events: u32,
    },
}

impl Op {
    /// The buffer the operation owned, now that the kernel is done with it.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } | Op::Recv { buf, .. } | Op::Send { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The buffers of a vectored write, back from the kernel.
    pub fn into_bufs(self) -> Vec<IoBuf> {
        match self {
            Op::Writev { bufs, .. } => bufs,
            other => other.into_buf().into_iter().collect(),
        }
    }

    fn check(&self) {
        match self {
            Op::Read { buf, at, len, .. }
            | Op::Write { buf, at, len, .. }
            | Op::Recv { buf, at, len, .. }
            | Op::Send { buf, at, len, .. } => {
                assert!(
                    at.checked_add(*len).is_some_and(|end| end <= buf.capacity()),
                    "uring op range {at}+{len} beyond buffer capacity {}",
                    buf.capacity()
                );
                assert!(*len <= u32::MAX as usize, "uring op length {len} above u32");
            }
            Op::Writev { bufs, segs, .. } => {
                assert!(!segs.is_empty() && segs.len() <= IOV_MAX, "writev with {} segments", segs.len());
                for &(b, start, len) in segs {
                    let cap = bufs.get(b).map_or(0, IoBuf::capacity);
                    assert!(
                        start.checked_add(len).is_some_and(|end| end <= cap),
                        "writev segment {start}+{len} beyond buffer {b}"
                    );
                }
            }
            _ => {}
        }
    }

    /// Builds the SQE. The pointers it carries stay valid while `self` sits
    /// in the in-flight slab (see the module documentation).
    fn entry(&mut self) -> squeue::Entry {
        match self {
            Op::Nop => opcode::Nop::new().build(),
            Op::Read { fd, offset, buf, at, len } => {
                // SAFETY: check() established at + len <= capacity, so the
                // offset pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(*at) };
                opcode::Read::new(types::Fd(fd.as_raw_fd()), ptr, *len as u32).offset(*offset).build()
            }
            Op::Write { fd, offset, buf, at, len, fua } => {
                // SAFETY: as for Read.
                let ptr = unsafe { buf.as_mut_ptr().add(*at) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, *len as u32).offset(*offset).rw_flags(flags).build()
            }
            Op::Fsync { fd, datasync } => {
                let flags = if *datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                opcode::Fsync::new(types::Fd(fd.as_raw_fd())).flags(flags).build()
            }
            Op::Fallocate { fd, mode, offset, len } => {
                opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), *len).offset(*offset).mode(*mode).build()
            }
            Op::Recv { fd, buf, at, len } => {
                // SAFETY: as for Read.
                let ptr = unsafe { buf.as_mut_ptr().add(*at) };
                opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, *len as u32).build()
            }
            Op::Send { fd, buf, at, len } => {
                // SAFETY: as for Read.
                let ptr = unsafe { buf.as_mut_ptr().add(*at) };
                opcode::Send::new(types::Fd(fd.as_raw_fd()), ptr, *len as u32).flags(libc::MSG_NOSIGNAL).build()
            }
            Op::Writev { fd, bufs, segs, iov } => {
                iov.clear();
                for &(b, start, len) in segs.iter() {
                    // wrapping_add stays inside the buffer: check() bounded start + len.
                    let base = bufs[b].as_mut_ptr().wrapping_add(start);
                    iov.push(libc::iovec { iov_base: base.cast(), iov_len: len });
                }
                opcode::Writev::new(types::Fd(fd.as_raw_fd()), iov.as_ptr(), iov.len() as u32).offset(u64::MAX).build()
            }
            Op::Accept { fd } => {
                opcode::Accept::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            }
            Op::PollAdd { fd, events } => opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), *events).build(),
        }
    }
}

/// Accepts one connection on listening socket `fd`.
pub async fn accept(ring: &Rc<Ring>, fd: &SharedFd) -> io::Result<OwnedFd> {
    let (res, _) = ring.submit(Op::Accept { fd: Arc::clone(fd) }).await;
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    // SAFETY: a non-negative accept result is a new descriptor that nothing
    // else owns; it is wrapped exactly once, here.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res) })
}

/// Receives completions of operations submitted with [`Ring::submit_with`].
pub trait OpCallback {
    /// `res` is the kernel's result: bytes or a descriptor when non-negative,
    /// a negative errno otherwise. `op` returns the operation's resources.
    fn op_done(&self, tag: u64, res: i32, op: Op);
}

enum Waiter {
    /// An `OpFuture` waits; holds its waker once polled.
    Future(Option<Waker>),
    /// Completed; the `OpFuture` has not collected the result yet.
    Done(i32),
    /// The `OpFuture` was dropped; release the entry at the CQE.
    Abandoned,
    Callback(Rc<dyn OpCallback>, u64),
    /// The reactor's wake-up read on its eventfd.
    Wakeup,
}

struct Inflight {
    op: Op,
    /// Tells this operation from earlier ones under the same slab key.
    generation: u32,
    waiter: Waiter,
    /// Straight to the kernel's worker pool (IOSQE_ASYNC), see
    /// [`Ring::submit_punted_with`].
    punt: bool,
}

struct RingInner {
    ring: IoUring,
    inflight: Slab<Inflight>,
    /// Keys whose SQE did not fit in the submission queue yet.
    backlog: VecDeque<usize>,
    /// Cancel requests that did not fit yet: the target's `user_data`.
    cancel_backlog: VecDeque<u64>,
    /// Generation of the next operation.
    next_generation: u32,
    /// SQEs pushed since the last successful enter.
    unsubmitted: bool,
    /// Scratch space for reaped CQEs, reused every tick.
    reaped: Vec<(u64, i32)>,
    wakeup_armed: bool,
    stats: RingStats,
}

/// Counters for benchmarks and introspection.
#[derive(Debug, Default, Clone, Copy)]
pub struct RingStats {
    pub submitted: u64,
    pub completed: u64,
    pub enters: u64,
}

/// One io_uring owned by one reactor thread.
pub struct Ring {
    inner: RefCell<RingInner>,
}

impl Ring {
    /// Lets the kernel's io-wq workers of this ring (the threads that run
    /// requests it cannot complete inline, such as buffered I/O on some
    /// file systems) run on `cores`. They inherit the reactor's pinning
    /// otherwise and would share its one core.
    pub fn set_worker_cores(&self, cores: &[usize]) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; all zero bits is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cores.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: `c` is below CPU_SETSIZE, inside the set's bits.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        self.inner.borrow().ring.submitter().register_iowq_aff(&set)
    }

    /// Caps the kernel workers that run this thread's bounded requests
    /// (regular files) at `bounded`: work submitted with
    /// [`Ring::submit_punted_with`] starts a worker per waiting request
    /// otherwise, up to four per CPU, which only crowd the reactors.
    pub fn set_max_workers(&self, bounded: u32) -> io::Result<()> {
        // [bounded, unbounded]; 0 leaves a limit as it is.
        let mut max = [bounded.max(1), 0];
        self.inner.borrow().ring.submitter().register_iowq_max_workers(&mut max)
    }

    /// Sets up a ring with `entries` submission slots (completion queue twice that).
    ///
    /// Completion work the kernel has for this thread (finished disk reads,
    /// socket data) waits until the reactor next enters the ring
    /// (`IORING_SETUP_DEFER_TASKRUN`) instead of interrupting it with an IPI
    /// wherever it is; the reactor enters whenever the kernel flags such
    /// work (`IORING_SETUP_TASKRUN_FLAG`). Kernels without it (before 6.1)
    /// get a plain ring.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let build = |deferred: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(entries.saturating_mul(2)).setup_single_issuer().setup_clamp();
            if deferred {
                b.setup_defer_taskrun().setup_taskrun_flag();
            }
            b.build(entries)
        };
        let ring = build(true)
            .or_else(|e| if e.raw_os_error() == Some(libc::EINVAL) { build(false) } else { Err(e) })
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("io_uring setup failed ({e}); io_uring may be disabled (sysctl kernel.io_uring_disabled) or blocked by seccomp"),
                )
            })?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::other("kernel lacks IORING_FEAT_EXT_ARG (Linux 5.11 or newer is needed)"));
        }
        Ok(Ring {
            inner: RefCell::new(RingInner {
                ring,
                inflight: Slab::with_capacity(entries as usize),
                backlog: VecDeque::new(),
                cancel_backlog: VecDeque::new(),
                next_generation: 0,
                unsubmitted: false,
                reaped: Vec::with_capacity(entries as usize * 2),
                wakeup_armed: false,
                stats: RingStats::default(),
            }),
        })
    }

    /// Submits `op`; `cb.op_done(tag, ..)` runs on this reactor once it completes.
    pub fn submit_with(&self, op: Op, cb: Rc<dyn OpCallback>, tag: u64) {
        self.queue(op, Waiter::Callback(cb, tag), false);
    }

    /// As [`Ring::submit_with`], but the kernel runs the operation in its
    /// worker pool without first trying it inline (IOSQE_ASYNC). For files
    /// the kernel cannot do without blocking (tmpfs has no non-blocking
    /// path): it would punt them anyway, but only work marked this way
    /// makes it start another worker while one is busy — otherwise every
    /// copy of the ring runs on a single worker, one after another.
    pub fn submit_punted_with(&self, op: Op, cb: Rc<dyn OpCallback>, tag: u64) {
        self.queue(op, Waiter::Callback(cb, tag), true);
    }

    /// Submits `op` and returns a future for its completion.
    pub fn submit(self: &Rc<Self>, op: Op) -> OpFuture {
        let key = self.queue(op, Waiter::Future(None), false);
        OpFuture { ring: Rc::clone(self), key, done: false }
    }

    fn queue(&self, op: Op, waiter: Waiter, punt: bool) -> usize {
        op.check();
        let mut inner = self.inner.borrow_mut();
        let generation = inner.generation();
        let key = inner.inflight.insert(Inflight { op, generation, waiter, punt });
        inner.push(key);
        key
    }

    /// Operations in the in-flight table, the eventfd wake-up read included.
    pub fn inflight(&self) -> usize {
        self.inner.borrow().inflight.len()
    }

    pub fn stats(&self) -> RingStats {
        self.inner.borrow().stats
    }

    /// True when SQEs wait for an enter.
    pub fn has_pending_submissions(&self) -> bool {
        let inner = self.inner.borrow();
        inner.unsubmitted || !inner.backlog.is_empty() || !inner.cancel_backlog.is_empty()
    }

    /// Arms a read on the reactor's eventfd (if not armed) so a blocking wait
    /// returns when another thread signals it.
    pub(crate) fn arm_wakeup(&self, eventfd: &SharedFd) {
        let mut inner = self.inner.borrow_mut();
        if inner.wakeup_armed {
            return;
        }
        inner.wakeup_armed = true;
        let op = Op::Read { fd: Arc::clone(eventfd), offset: u64::MAX, buf: IoBuf::new(8), at: 0, len: 8 };
        let generation = inner.generation();
        let key = inner.inflight.insert(Inflight { op, generation, waiter: Waiter::Wakeup, punt: false });
        inner.push(key);
    }

    /// Sends queued SQEs to the kernel (one `io_uring_enter`), and when
    /// `wait` is given, blocks until one completion arrives or the timeout
    /// passes (`Some(None)` waits without limit).
    pub fn enter(&self, wait: Option<Option<Duration>>) {
        let mut inner = self.inner.borrow_mut();
        inner.refill_from_backlog();
        if !inner.unsubmitted && wait.is_none() && !inner.ring.submission().taskrun() {
            return;
        }
        inner.stats.enters += 1;
        let res = match wait {
            None => inner.ring.submit(),
            Some(None) => inner.ring.submit_and_wait(1),
            Some(Some(timeout)) => {
                let ts = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&ts);
                inner.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => {
                let left = inner.ring.submission().len();
                inner.unsubmitted = left > 0;
            }
            Err(e) => match e.raw_os_error() {
                // ETIME: the wait timed out; EINTR: a signal; EAGAIN/EBUSY:
                // the kernel is short of resources or the CQ is full — retry
                // after reaping.
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    let left = inner.ring.submission().len();
                    inner.unsubmitted = left > 0;
                }
                _ => tracing::error!(error = %e, "io_uring_enter failed"),
            },
        }
        inner.refill_from_backlog();
    }

    /// Reaps every available completion and dispatches it. Returns how many
    /// operations completed.
    pub fn reap(&self) -> usize {
        let mut reaped = {
            let mut inner = self.inner.borrow_mut();
            let mut reaped = std::mem::take(&mut inner.reaped);
            for cqe in inner.ring.completion() {
                reaped.push((cqe.user_data(), cqe.result()));
            }
            reaped
        };
        let count = reaped.len();
        for (user_data, res) in reaped.drain(..) {
            if user_data != CANCEL_USER_DATA {
                self.dispatch(user_data, res);
            }
        }
        let mut inner = self.inner.borrow_mut();
        inner.stats.completed += count as u64;
        inner.reaped = reaped;
        count
    }

    fn dispatch(&self, user_data: u64, res: i32) {
        let (key, generation) = split_user_data(user_data);
        let mut inner = self.inner.borrow_mut();
        let Some(entry) = inner.inflight.get_mut(key).filter(|e| e.generation == generation) else {
            tracing::error!(key, generation, "completion for an unknown io_uring operation");
            return;
        };
        match &mut entry.waiter {
            Waiter::Future(waker) => {
                let waker = waker.take();
                entry.waiter = Waiter::Done(res);
                drop(inner);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Waiter::Done(_) => tracing::error!(key, "second completion for an io_uring operation"),
            Waiter::Abandoned => {
                inner.inflight.remove(key);
            }
            Waiter::Wakeup => {
                inner.inflight.remove(key);
                inner.wakeup_armed = false;
            }
            Waiter::Callback(..) => {
                let entry = inner.inflight.remove(key);
                drop(inner);
                if let Waiter::Callback(cb, tag) = entry.waiter {
                    cb.op_done(tag, res, entry.op);
                }
            }
        }
    }

    fn cancel(&self, key: usize) {
        let mut inner = self.inner.borrow_mut();
        inner.push_cancel(key);
    }
}

/// The `user_data` of the operation at slab `key` of `generation`.
fn user_data(key: usize, generation: u32) -> u64 {
    debug_assert!(key < u32::MAX as usize, "in-flight slab beyond 2^32 entries");
    (u64::from(generation) << 32) | key as u64
}

fn split_user_data(user_data: u64) -> (usize, u32) {
    ((user_data & u64::from(u32::MAX)) as usize, (user_data >> 32) as u32)
}

impl RingInner {
    fn generation(&mut self) -> u32 {
        let g = self.next_generation;
        self.next_generation = g.wrapping_add(1);
        g
    }

    fn push(&mut self, key: usize) {
        if !self.backlog.is_empty() || !self.try_push(key) {
            self.backlog.push_back(key);
        }
    }

    fn try_push(&mut self, key: usize) -> bool {
        let inflight = &mut self.inflight[key];
        let mut entry = inflight.op.entry().user_data(user_data(key, inflight.generation));
        if inflight.punt {
            entry = entry.flags(squeue::Flags::ASYNC);
        }
        // Test: uring_tests::abandoned_read_keeps_buffer_until_completion.
        // SAFETY: the SQE points only into resources owned by the Op at `key`
        // in the in-flight slab, kept there until its CQE is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if pushed {
            self.unsubmitted = true;
            self.stats.submitted += 1;
        }
        pushed
    }

    fn push_cancel(&mut self, key: usize) {
        let target = user_data(key, self.inflight[key].generation);
        let entry = opcode::AsyncCancel::new(target).build().user_data(CANCEL_USER_DATA);
        // SAFETY: a cancel SQE carries no pointers, only the target's user_data.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.unsubmitted = true;
        } else {
            self.cancel_backlog.push_back(target);
        }
    }

    fn refill_from_backlog(&mut self) {
        while let Some(&key) = self.backlog.front() {
            if !self.try_push(key) {
                return;
            }
            self.backlog.pop_front();
        }
        while let Some(target) = self.cancel_backlog.pop_front() {
            let (key, generation) = split_user_data(target);
            // The operation ended meanwhile (its key may serve another now).
            if self.inflight.get(key).is_none_or(|e| e.generation != generation) {
                continue;
            }
            let entry = opcode::AsyncCancel::new(target).build().user_data(CANCEL_USER_DATA);
            // SAFETY: a cancel SQE carries no pointers.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.cancel_backlog.push_front(target);
                return;
            }
            self.unsubmitted = true;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        let live = inner.inflight.len() - usize::from(inner.wakeup_armed);
        if live > 0 {
            tracing::error!(live, "io_uring dropped with operations in flight; leaking their buffers");
        }
        // Whatever is still in flight may be written by the kernel until the
        // ring fd closes and the requests are torn down: never free it.
        for (_, entry) in std::mem::take(&mut inner.inflight) {
            std::mem::forget(entry.op);
        }
    }
}

/// The completion of an operation submitted with [`Ring::submit`]: the
/// kernel's result and the operation (with its buffer) back.
pub struct OpFuture {
    ring: Rc<Ring>,
    key: usize,
    done: bool,
}

impl OpFuture {
    /// Requests cancellation; the future still resolves (usually with -ECANCELED).
    pub fn cancel(&self) {
        if !self.done {
            self.ring.cancel(self.key);
        }
    }
}

impl Future for OpFuture {
    type Output = (i32, Op);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, Op)> {
        assert!(!self.done, "OpFuture polled after completion");
        let key = self.key;
        let mut inner = self.ring.inner.borrow_mut();
        let entry = &mut inner.inflight[key];
        match &mut entry.waiter {
            Waiter::Done(res) => {
                let res = *res;
                let entry = inner.inflight.remove(key);
                drop(inner);
                self.done = true;
                Poll::Ready((res, entry.op))
            }
            Waiter::Future(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            _ => unreachable!("OpFuture entry in a foreign state"),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.ring.inner.borrow_mut();
        let entry = &mut inner.inflight[self.key];
        if let Waiter::Done(_) = entry.waiter {
            // Completed but never collected: the kernel is done with it.
            inner.inflight.remove(self.key);
            return;
        }
        entry.waiter = Waiter::Abandoned;
        inner.push_cancel(self.key);
    }
}

#[cfg(test)]
mod uring_tests {
    use super::*;
    use std::io::Write as _;

    fn block_on<F: Future>(ring: &Rc<Ring>, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            ring.enter(Some(Some(Duration::from_millis(100))));
            ring.reap();
        }
    }

    fn temp_file(content: &[u8]) -> (tempfile::NamedTempFile, SharedFd) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f.flush().unwrap();
        let fd: OwnedFd = f.reopen().unwrap().into();
        (f, Arc::new(fd))
    }

    #[test]
    fn read_write_roundtrip_through_futures() {
        let ring = Rc::new(Ring::new(8).unwrap());
        let (_f, fd) = temp_file(&[0u8; 8192]);
        let mut buf = IoBuf::new(4096);
        buf.fill(0x5a);
        let (res, op) =
            block_on(&ring, ring.submit(Op::Write { fd: fd.clone(), offset: 4096, buf, at: 0, len: 4096, fua: false }));
        assert_eq!(res, 4096);
        drop(op);
        let (res, op) =
            block_on(&ring, ring.submit(Op::Read { fd, offset: 4096, buf: IoBuf::new(4096), at: 0, len: 4096 }));
        assert_eq!(res, 4096);
        assert!(op.into_buf().unwrap().iter().all(|&b| b == 0x5a));
        assert_eq!(ring.inflight(), 0);
    }

    #[test]
    fn callbacks_receive_the_buffer_back() {
        struct Cb(RefCell<Vec<(u64, i32, usize)>>);
        impl OpCallback for Cb {
            fn op_done(&self, tag: u64, res: i32, op: Op) {
                self.0.borrow_mut().push((tag, res, op.into_buf().map_or(0, |b| b.len())));
            }
        }
        let ring = Rc::new(Ring::new(4).unwrap());
        let (_f, fd) = temp_file(&[1u8; 65536]);
        let cb = Rc::new(Cb(RefCell::new(Vec::new())));
        // More operations than SQ slots: the backlog must carry the rest.
        for i in 0..16u64 {
            ring.submit_with(
                Op::Read { fd: fd.clone(), offset: i * 4096, buf: IoBuf::new(4096), at: 0, len: 4096 },
                cb.clone(),
                i,
            );
        }
        while cb.0.borrow().len() < 16 {
            ring.enter(Some(Some(Duration::from_millis(100))));
            ring.reap();
        }
        let mut got = cb.0.borrow().clone();
        got.sort();
        assert_eq!(got, (0..16).map(|i| (i, 4096, 4096)).collect::<Vec<_>>());
    }

    #[test]
    fn writev_sends_slices_in_order() {
        use std::io::Read as _;
        let ring = Rc::new(Ring::new(4).unwrap());
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd: SharedFd = Arc::new(OwnedFd::from(b));
        let bufs = vec![IoBuf::from_slice(b"hello, "), IoBuf::from_slice(b"xxworld!yy")];
        let segs = vec![(0, 0, 7), (1, 2, 6)];
        let (res, op) = block_on(&ring, ring.submit(Op::Writev { fd, bufs, segs, iov: Vec::new() }));
        assert_eq!(res, 13);
        assert_eq!(op.into_bufs().len(), 2, "the buffers come back");
        let mut got = [0u8; 13];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, world!");
    }

    #[test]
    fn errors_arrive_as_completions() {
        let ring = Rc::new(Ring::new(4).unwrap());
        // A read on a write-only pipe end fails with EBADF.
        let (r, w) = nix::unistd::pipe().unwrap();
        let (res, _) = block_on(
            &ring,
            ring.submit(Op::Read { fd: Arc::new(w), offset: u64::MAX, buf: IoBuf::new(8), at: 0, len: 8 }),
        );
        assert_eq!(res, -libc::EBADF);
        drop(r);
    }

    #[test]
    fn abandoned_read_keeps_buffer_until_completion() {
        // A read on an empty pipe never completes by itself. Dropping its
        // future must neither free the buffer nor lose track of the entry:
        // the entry stays in the table (abandoned) until the cancel's CQE.
        let ring = Rc::new(Ring::new(4).unwrap());
        let (r, w) = nix::unistd::pipe().unwrap();
        let fut = ring.submit(Op::Read { fd: Arc::new(r), offset: u64::MAX, buf: IoBuf::new(4096), at: 0, len: 4096 });
        ring.enter(None);
        drop(fut);
        assert_eq!(ring.inflight(), 1, "abandoned op must stay in flight until its CQE");
        for _ in 0..50 {
            ring.enter(Some(Some(Duration::from_millis(20))));
            ring.reap();
            if ring.inflight() == 0 {
                break;
            }
        }
        assert_eq!(ring.inflight(), 0, "cancelled op must be released at its CQE");
        drop(w);
    }

    #[test]
    fn a_late_cancel_never_hits_the_next_operation_under_the_same_key() {
        // A cancel that did not fit in the submission queue waits in the
        // backlog; meanwhile its target completes and its slab key goes to
        // a new read, which is pushed before the cancel. The cancel must
        // not reach the new read.
        let ring = Rc::new(Ring::new(2).unwrap());
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, w2) = nix::unistd::pipe().unwrap();
        let a = ring.submit(Op::Read { fd: Arc::new(r1), offset: u64::MAX, buf: IoBuf::new(8), at: 0, len: 8 });
        ring.enter(None);
        // Two nops fill the queue, two more wait behind them.
        let nops: Vec<OpFuture> = (0..4).map(|_| ring.submit(Op::Nop)).collect();
        a.cancel();
        nix::unistd::write(&w1, b"x").unwrap();
        let mut a = std::pin::pin!(a);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let done = loop {
            ring.enter(Some(Some(Duration::from_millis(100))));
            ring.reap();
            if let Poll::Ready((res, _)) = a.as_mut().poll(&mut cx) {
                break res;
            }
        };
        assert!(done == 1 || done == -libc::ECANCELED, "{done}");
        // The freed key serves a new read on an empty pipe.
        let b = ring.submit(Op::Read { fd: Arc::new(r2), offset: u64::MAX, buf: IoBuf::new(8), at: 0, len: 8 });
        for _ in 0..5 {
            ring.enter(Some(Some(Duration::from_millis(20))));
            ring.reap();
        }
        nix::unistd::write(&w2, b"y").unwrap();
        let (res, _) = block_on(&ring, b);
        assert_eq!(res, 1, "the new read completed with its data, not cancelled");
        drop(nops);
        drop((w1, w2));
    }
}
