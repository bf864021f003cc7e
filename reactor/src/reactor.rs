//! The reactor: one thread, one loop, one io_uring.
//!
//! A tick, in order:
//!
//! 1. retry messages this reactor could not deliver earlier (its outbox);
//! 2. run up to [`MSGS_PER_TICK_MAX`] messages from the inbox;
//! 3. run deferred callbacks (completions that must not run inside submit);
//! 4. poll ready tasks;
//! 5. run active pollers, then timed pollers and timers that came due;
//! 6. submit queued SQEs with one `io_uring_enter` (entering also when the
//!    kernel flags deferred completion work), reap completions.
//!
//! When nothing was busy for `idle_spin` (adaptive mode), the reactor sleeps
//! in `io_uring_enter` waiting for one completion: an armed read on its
//! eventfd turns messages from other threads into completions, and the wait
//! times out at the next timer deadline. Senders write the eventfd only when
//! the target announced it is going to sleep, so cross-core messages to a
//! busy reactor cost no syscall.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::executor::{Executor, spawn_local};
use crate::poller::{PollStatus, PollerId, PollerInfo, Pollers};
use crate::reply::{Reply, reply};
use crate::timer::Timers;
use crate::uring::{Ring, SharedFd};

/// Messages a reactor runs per tick at most.
pub const MSGS_PER_TICK_MAX: usize = 256;
/// Slots in each reactor's inbox.
pub const INBOX_CAPACITY: usize = 65536;
/// Submission queue entries of each reactor's ring.
pub const RING_ENTRIES: u32 = 1024;
/// How long shutdown waits for in-flight kernel operations.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(5);

/// A message: a closure run on the target reactor.
pub type Msg = Box<dyn FnOnce() + Send>;

/// How a reactor waits when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PollMode {
    /// Spin while busy and for `idle_spin` after, then sleep until woken.
    #[default]
    Adaptive,
    /// Spin forever (lowest latency, one full core per reactor).
    Poll,
    /// Sleep as soon as a tick finds nothing to do.
    Interrupt,
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adaptive" => Ok(PollMode::Adaptive),
            "poll" => Ok(PollMode::Poll),
            "interrupt" => Ok(PollMode::Interrupt),
            other => Err(format!("poll mode '{other}' is not one of adaptive, poll, interrupt")),
        }
    }
}

impl std::fmt::Display for PollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PollMode::Adaptive => "adaptive",
            PollMode::Poll => "poll",
            PollMode::Interrupt => "interrupt",
        })
    }
}

/// How a reactor polls.
#[derive(Debug, Clone, Copy)]
pub struct ReactorOptions {
    pub poll_mode: PollMode,
    /// Adaptive mode: idle time spent spinning before sleeping.
    pub idle_spin: Duration,
    pub ring_entries: u32,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            poll_mode: PollMode::Adaptive,
            idle_spin: Duration::from_micros(50),
            ring_entries: RING_ENTRIES,
        }
    }
}

/// Counters a reactor publishes for other threads.
#[derive(Debug, Default)]
struct Stats {
    ticks: AtomicU64,
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    sleeps: AtomicU64,
    msgs: AtomicU64,
}

/// A snapshot of a reactor's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReactorStats {
    pub ticks: u64,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub sleeps: u64,
    pub msgs: u64,
}

static NEXT_REACTOR_ID: AtomicUsize = AtomicUsize::new(0);

/// The part of a reactor other threads reach.
pub(crate) struct Shared {
    pub(crate) id: usize,
    core: Option<usize>,
    /// The reactor thread's id (the kernel's, as `query-iothreads` shows it).
    thread_id: i32,
    inbox: ArrayQueue<Msg>,
    sleeping: AtomicBool,
    eventfd: SharedFd,
    stop: AtomicBool,
    stats: Stats,
}

impl Shared {
    /// Delivers a message from any thread.
    pub(crate) fn post(self: &Arc<Self>, msg: Msg) {
        match self.inbox.push(msg) {
            Ok(()) => {
                self.notify();
                if self.stop.load(Ordering::Acquire) {
                    // The reactor is gone or going: nothing will run this,
                    // so drop it now and let any reply it carries cancel.
                    while self.inbox.pop().is_some() {}
                }
            }
            Err(msg) => match try_current() {
                // A reactor never blocks: keep it in its outbox and retry every tick.
                Some(r) => r.outbox.borrow_mut().push_back((Arc::clone(self), msg)),
                None => self.post_blocking(msg),
            },
        }
    }

    fn post_blocking(&self, mut msg: Msg) {
        loop {
            if self.stop.load(Ordering::Acquire) {
                // Nobody will take it (or make room): drop it, cancelling any reply.
                return;
            }
            self.notify();
            std::thread::sleep(Duration::from_micros(50));
            match self.inbox.push(msg) {
                Ok(()) => return self.notify(),
                Err(m) => msg = m,
            }
        }
    }

    /// Wakes the reactor if it announced it is going to sleep.
    fn notify(&self) {
        // Pairs with the fence in Reactor::sleep: either we see `sleeping`,
        // or the reactor sees our message before it blocks.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            self.kick();
        }
    }

    fn kick(&self) {
        match nix::unistd::write(self.eventfd.as_fd(), &1u64.to_ne_bytes()) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => tracing::error!(error = %e, reactor = self.id, "eventfd write failed"),
        }
    }
}

/// A handle to a reactor, usable from any thread.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("id", &self.shared.id).field("core", &self.shared.core).finish()
    }
}

impl Handle {
    /// Process-wide unique id of the reactor.
    pub fn id(&self) -> usize {
        self.shared.id
    }

    /// The core the reactor is pinned to, if any.
    pub fn core(&self) -> Option<usize> {
        self.shared.core
    }

    /// The kernel's id of the reactor's thread.
    pub fn thread_id(&self) -> i32 {
        self.shared.thread_id
    }

    /// True when called on this reactor's own thread (while it is current).
    pub fn is_current(&self) -> bool {
        try_current_id() == Some(self.shared.id)
    }

    /// Runs `f` on the reactor (always later, never inline).
    pub fn send(&self, f: impl FnOnce() + Send + 'static) {
        self.shared.post(Box::new(f));
    }

    /// Runs `f` on the reactor and returns its result through a reply.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Reply<R> {
        let (tx, rx) = reply();
        self.send(move || tx.send(f()));
        rx
    }

    /// Builds a future on the reactor with `f`, runs it as a task there and
    /// returns its output through a reply: the cross-reactor "send and await".
    pub fn run<F, Fut>(&self, f: F) -> Reply<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = reply();
        self.send(move || {
            let fut = f();
            spawn_local(async move { tx.send(fut.await) });
        });
        rx
    }

    /// Asks the reactor to stop; its loop ends after dropping its tasks and
    /// draining in-flight kernel operations.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.sleeping.store(false, Ordering::Release);
        self.shared.kick();
    }

    pub fn stats(&self) -> ReactorStats {
        let s = &self.shared.stats;
        ReactorStats {
            ticks: s.ticks.load(Ordering::Relaxed),
            busy_ns: s.busy_ns.load(Ordering::Relaxed),
            idle_ns: s.idle_ns.load(Ordering::Relaxed),
            sleeps: s.sleeps.load(Ordering::Relaxed),
            msgs: s.msgs.load(Ordering::Relaxed),
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
    static CURRENT_ID: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The reactor running on this thread. Panics off a reactor thread.
pub fn current() -> Rc<Reactor> {
    try_current().expect("not on a reactor thread")
}

/// The reactor running on this thread, if any.
pub fn try_current() -> Option<Rc<Reactor>> {
    CURRENT.with(|c| c.borrow().clone())
}

pub(crate) fn try_current_id() -> Option<usize> {
    let id = CURRENT_ID.with(Cell::get);
    (id != usize::MAX).then_some(id)
}

/// Makes a reactor current on this thread until dropped.
pub struct EnterGuard {
    prev: Option<Rc<Reactor>>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let prev = self.prev.take();
        let prev_id = prev.as_ref().map_or(usize::MAX, |r| r.shared.id);
        CURRENT.with(|c| *c.borrow_mut() = prev);
        CURRENT_ID.with(|c| c.set(prev_id));
    }
}

/// A reactor: owned by one thread, reached from others through its [`Handle`].
pub struct Reactor {
    shared: Arc<Shared>,
    ring: Rc<Ring>,
    executor: Executor,
    pollers: Pollers,
    timers: Timers,
    deferred: RefCell<VecDeque<Box<dyn FnOnce()>>>,
    outbox: RefCell<VecDeque<(Arc<Shared>, Msg)>>,
    options: ReactorOptions,
    last_busy: Cell<Instant>,
    last_tick: Cell<Instant>,
    last_tick_busy: Cell<bool>,
}

impl Reactor {
    /// Creates a reactor on the calling thread (its ring belongs to this thread).
    pub fn new(core: Option<usize>, options: ReactorOptions) -> std::io::Result<Rc<Reactor>> {
        let ring = Rc::new(Ring::new(options.ring_entries)?);
        let efd: std::os::fd::OwnedFd =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(std::io::Error::from)?
                .into();
        let shared = Arc::new(Shared {
            id: NEXT_REACTOR_ID.fetch_add(1, Ordering::Relaxed),
            core,
            thread_id: nix::unistd::gettid().as_raw(),
            inbox: ArrayQueue::new(INBOX_CAPACITY),
            sleeping: AtomicBool::new(false),
            eventfd: Arc::new(efd),
            stop: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let now = Instant::now();
        Ok(Rc::new(Reactor {
            shared,
            ring,
            executor: Executor::default(),
            pollers: Pollers::default(),
            timers: Timers::default(),
            deferred: RefCell::new(VecDeque::new()),
            outbox: RefCell::new(VecDeque::new()),
            options,
            last_busy: Cell::new(now),
            last_tick: Cell::new(now),
            last_tick_busy: Cell::new(false),
        }))
    }

    pub fn handle(&self) -> Handle {
        Handle { shared: Arc::clone(&self.shared) }
    }

    pub fn id(&self) -> usize {
        self.shared.id
    }

    pub fn core(&self) -> Option<usize> {
        self.shared.core
    }

    /// This reactor's io_uring.
    pub fn ring(&self) -> &Rc<Ring> {
        &self.ring
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn executor(&self) -> &Executor {
        &self.executor
    }

    pub(crate) fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Makes this reactor current on the calling thread.
    pub fn enter(self: &Rc<Self>) -> EnterGuard {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(Rc::clone(self)));
        CURRENT_ID.with(|c| c.set(self.shared.id));
        EnterGuard { prev }
    }

    /// Runs `f` on this reactor at the start of the next tick; the way
    /// synchronous drivers complete without re-entering their caller.
    pub fn defer(&self, f: impl FnOnce() + 'static) {
        self.deferred.borrow_mut().push_back(Box::new(f));
    }

    /// Registers a poller run on every tick.
    pub fn register_poller(&self, name: &str, f: impl FnMut() -> PollStatus + 'static) -> PollerId {
        self.pollers.register(name, None, Box::new(f))
    }

    /// Registers a poller run every `period`.
    pub fn register_timed_poller(
        &self,
        name: &str,
        period: Duration,
        f: impl FnMut() -> PollStatus + 'static,
    ) -> PollerId {
        self.pollers.register(name, Some(period), Box::new(f))
    }

    /// Unregisters a poller (safe from inside the poller itself).
    pub fn unregister_poller(&self, id: PollerId) {
        self.pollers.unregister(id);
    }

    pub fn pollers(&self) -> Vec<PollerInfo> {
        self.pollers.info()
    }

    /// Live tasks on this reactor.
    pub fn task_count(&self) -> usize {
        self.executor.len()
    }

    /// One tick of the loop; returns true if anything did work.
    /// Must run with this reactor current (see [`Reactor::enter`]).
    pub fn poll_once(&self) -> bool {
        // One clock read per tick: it stamps timers and closes the
        // accounting of the previous tick.
        let now = Instant::now();
        self.account(now);
        let mut busy = self.flush_outbox();
        busy |= self.run_messages();
        busy |= self.run_deferred();
        busy |= self.executor.run_ready();
        busy |= self.pollers.run_active();
        busy |= self.pollers.run_timed(now);
        busy |= self.timers.fire(now);
        self.ring.enter(None);
        busy |= self.ring.reap() > 0;
        self.last_tick_busy.set(busy);
        if busy {
            self.last_busy.set(now);
        }
        busy
    }

    /// Charges the time since the previous tick started to busy or idle.
    fn account(&self, now: Instant) {
        let spent = now.duration_since(self.last_tick.get()).as_nanos() as u64;
        self.last_tick.set(now);
        let stats = &self.shared.stats;
        stats.ticks.fetch_add(1, Ordering::Relaxed);
        let counter = if self.last_tick_busy.get() { &stats.busy_ns } else { &stats.idle_ns };
        counter.fetch_add(spent, Ordering::Relaxed);
    }

    fn flush_outbox(&self) -> bool {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() {
            return false;
        }
        let n = outbox.len();
        for _ in 0..n {
            let Some((target, msg)) = outbox.pop_front() else {
                break;
            };
            match target.inbox.push(msg) {
                Ok(()) => target.notify(),
                Err(msg) => outbox.push_back((target, msg)),
            }
        }
        true
    }

    fn run_messages(&self) -> bool {
        let mut n = 0;
        while n < MSGS_PER_TICK_MAX {
            let Some(msg) = self.shared.inbox.pop() else {
                break;
            };
            msg();
            n += 1;
        }
        if n > 0 {
            self.shared.stats.msgs.fetch_add(n as u64, Ordering::Relaxed);
        }
        n > 0
    }

    fn run_deferred(&self) -> bool {
        // Only what was queued before this tick: callbacks that defer again
        // run next tick, so the loop cannot spin inside this step.
        let n = self.deferred.borrow().len();
        for _ in 0..n {
            let Some(f) = self.deferred.borrow_mut().pop_front() else {
                break;
            };
            f();
        }
        n > 0
    }

    fn has_local_work(&self) -> bool {
        !self.shared.inbox.is_empty()
            || self.executor.has_ready()
            || !self.deferred.borrow().is_empty()
            || !self.outbox.borrow().is_empty()
            || self.ring.has_pending_submissions()
            || self.shared.stop.load(Ordering::Acquire)
    }

    fn next_deadline(&self) -> Option<Instant> {
        match (self.timers.next_deadline(), self.pollers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Blocks until a completion, a message or the next deadline.
    fn sleep(&self) {
        self.ring.arm_wakeup(&self.shared.eventfd);
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in Shared::notify (see there).
        fence(Ordering::SeqCst);
        if self.has_local_work() {
            self.shared.sleeping.store(false, Ordering::Relaxed);
            return;
        }
        let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
        self.shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        self.ring.enter(Some(timeout));
        self.shared.sleeping.store(false, Ordering::Relaxed);
    }

    fn idle_long_enough(&self) -> bool {
        match self.options.poll_mode {
            PollMode::Poll => false,
            PollMode::Interrupt => true,
            PollMode::Adaptive => self.last_busy.get().elapsed() >= self.options.idle_spin,
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Runs the loop until [`Handle::stop`], then shuts down.
    pub fn run(self: &Rc<Self>) {
        let _guard = self.enter();
        while !self.stopping() {
            if self.poll_once() {
                continue;
            }
            if self.idle_long_enough() {
                self.sleep();
            } else {
                std::hint::spin_loop();
            }
        }
        self.shutdown();
    }

    /// Runs the loop on this thread until `fut` completes (tests, tools).
    pub fn block_on<F: Future + 'static>(self: &Rc<Self>, fut: F) -> F::Output
    where
        F::Output: 'static,
    {
        let _guard = self.enter();
        let handle = spawn_local(fut);
        loop {
            if handle.is_finished() {
                break;
            }
            if !self.poll_once() && !handle.is_finished() && self.idle_long_enough() {
                self.sleep();
            }
        }
        let mut handle = std::pin::pin!(handle);
        let waker = std::task::Waker::noop();
        match handle.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => unreachable!("finished task without output"),
        }
    }

    /// Drops tasks and pollers, then waits (bounded) for the kernel to give
    /// back every in-flight operation.
    fn shutdown(&self) {
        self.executor.clear();
        self.pollers.clear();
        self.deferred.borrow_mut().clear();
        while self.shared.inbox.pop().is_some() {}
        let deadline = Instant::now() + SHUTDOWN_DRAIN_MAX;
        self.shared.kick();
        while self.ring.inflight() > 0 && Instant::now() < deadline {
            self.ring.enter(Some(Some(Duration::from_millis(10))));
            self.ring.reap();
            // Tasks dropped above may have left futures' completions to wake nobody.
            while self.shared.inbox.pop().is_some() {}
            self.shared.kick();
        }
        if self.ring.inflight() > 0 {
            tracing::error!(
                reactor = self.id(),
                inflight = self.ring.inflight(),
                "reactor stopped with I/O still in flight"
            );
        }
    }
}

/// Runs `f` on the current reactor at the start of its next tick.
pub fn defer(f: impl FnOnce() + 'static) {
    current().defer(f);
}
