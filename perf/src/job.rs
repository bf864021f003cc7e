//! One job: a closed loop of requests on one reactor.
//!
//! The job keeps `queue_depth` requests in flight. Each queue slot owns one
//! buffer, allocated when the job starts; a completion resubmits from the
//! same slot at once, inside the callback, then records its latency. There
//! is no task and no allocation per request: an [`Io`] is a value, a
//! [`Done`] is an `Rc` clone and a tag (the slot index).
//!
//! ```text
//!   start ─▶ [prefill: write the slice once] ─▶ warm-up ─▶ measured window ─▶ drain ─▶ report
//!                                               (not counted)  (counted)    (no resubmit)
//! ```
//!
//! A timed poller per job publishes the p99 each second, off the I/O path.
//! The reactor drops it when it shuts down, which tells the job to stop
//! resubmitting: a daemon quitting mid-run does not wait on a job that
//! would otherwise keep its io_uring busy.
//!
//! `verify` alternates per slot: write a fresh pattern at an offset of the
//! slot's own stripe (blocks `slot, slot + qd, slot + 2·qd, ...` of the
//! slice), then read it back and check every byte. Stripes are disjoint, so
//! no two requests of a job ever overlap.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use bdev::{BlockChannel, Claim, Done, Io, IoDone, IoError, IoFlags, IoKind, Node};
use hdrhistogram::Histogram;
use reactor::{IoBuf, PollStatus, PollerId};

use crate::error::PerfError;
use crate::offsets::Offsets;
use crate::options::{PerfOptions, Slice};
use crate::pattern;
use crate::progress::{P99_PUBLISH_INTERVAL, Phase, Progress};
use crate::rng::SplitMix64;
use crate::workload::Workload;

/// Significant decimal digits the latency histograms keep (0.1 % resolution).
pub const HISTOGRAM_SIGFIGS: u8 = 3;
/// Largest latency a histogram holds; slower requests are recorded as this.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// Byte written by prefill and by write workloads: non-zero, so a node
/// with `detect-zeroes` does not turn the writes into write-zeroes.
const FILL_BYTE: u8 = 0xa5;

/// An empty latency histogram with the bounds every job uses (so they merge
/// without resizing).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, HISTOGRAM_SIGFIGS).expect("constant histogram bounds are valid")
}

/// What a job reports when it finishes.
pub(crate) type JobReport = (usize, Result<JobOutcome, PerfError>);

/// Everything a job needs, sent to its reactor.
pub(crate) struct JobSetup {
    pub index: usize,
    pub node: Arc<Node>,
    pub opts: PerfOptions,
    pub slice: Slice,
    pub seed: u64,
    pub progress: Arc<Progress>,
    pub stop: Arc<AtomicBool>,
    /// Keeps the node in use until the last job of the run finishes.
    pub claim: Arc<Claim>,
    pub report: Sender<JobReport>,
}

/// The measured window of one job.
pub(crate) struct JobOutcome {
    pub runtime: Duration,
    pub ios: u64,
    pub bytes: u64,
    pub failures: u64,
    pub latency_sum_ns: u64,
    pub latency_min_ns: u64,
    pub latency_max_ns: u64,
    pub histogram: Histogram<u64>,
    pub first_error: Option<IoError>,
    pub first_mismatch: Option<u64>,
}

/// Starts the job on the calling reactor; it reports through `setup.report`.
pub(crate) fn start(setup: JobSetup) {
    let ch = match setup.node.channel() {
        Ok(ch) => ch,
        Err(e) => {
            setup.progress.set_phase(Phase::Finished);
            let _ = setup.report.send((setup.index, Err(e.into())));
            return;
        }
    };
    let opts = &setup.opts;
    let qd = opts.queue_depth as usize;
    let buffered = opts.workload.has_data() || opts.prefill;
    let slots = (0..qd)
        .map(|_| {
            let buf = buffered.then(|| {
                let mut b = IoBuf::new(opts.io_size as usize);
                b.fill(FILL_BYTE);
                b
            });
            Slot { submitted: Instant::now(), offset: 0, key: 0, buf, readback: false }
        })
        .collect();
    let now = Instant::now();
    let reactor_alive = Rc::new(Cell::new(true));
    let job = Rc::new_cyclic(|me| Job {
        me: me.clone(),
        ch,
        workload: opts.workload,
        io_size: opts.io_size,
        slice: setup.slice,
        qd: u64::from(opts.queue_depth),
        read_percent: u64::from(opts.read_percent.unwrap_or(0)),
        stop_on_error: opts.stop_on_error,
        seed: setup.seed,
        warmup: opts.warmup,
        duration: opts.duration,
        offsets: Cell::new(Offsets::new(setup.slice, opts.io_size, opts.workload.is_random(), setup.seed)),
        // A stream of its own, so the mix does not shift the offsets.
        mix: Cell::new(SplitMix64::new(crate::rng::mix(setup.seed))),
        prefill_next: Cell::new(0),
        generation: Cell::new(0),
        slots: RefCell::new(slots),
        state: Cell::new(State::Prefill),
        inflight: Cell::new(0),
        window_start: Cell::new(now),
        window_end: Cell::new(now),
        stopped_at: Cell::new(None),
        reactor_alive: Rc::clone(&reactor_alive),
        poller: Cell::new(None),
        measuring: Cell::new(false),
        counted: Cell::new(Counts::default()),
        live: Cell::new(LiveCounts::default()),
        histogram: RefCell::new(new_histogram()),
        first_error: Cell::new(None),
        first_mismatch: Cell::new(None),
        progress: setup.progress,
        stop: setup.stop,
        finish: RefCell::new(Some(Finish { index: setup.index, report: setup.report, claim: setup.claim })),
    });
    let weak = Rc::downgrade(&job);
    let alive = AliveGuard(reactor_alive);
    let poller = reactor::current().register_timed_poller(
        &format!("perf-job-{}", setup.index),
        P99_PUBLISH_INTERVAL,
        move || {
            // Owned by this closure: dropped with the poller.
            let _alive = &alive;
            if let Some(job) = weak.upgrade() {
                job.publish_p99();
            }
            PollStatus::Idle
        },
    );
    job.poller.set(Some(poller));
    if opts.prefill {
        job.progress.set_phase(Phase::Prefill);
        for slot in 0..qd {
            job.submit_prefill(slot, Instant::now());
        }
    } else {
        job.begin_run(now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Prefill,
    Running,
    /// No more submissions; finishes when the last request is back.
    Draining,
}

/// Counters of a job (kept in a `Cell`: `Copy`, updated by value).
#[derive(Debug, Clone, Copy)]
struct Counts {
    ios: u64,
    bytes: u64,
    failures: u64,
    latency_sum_ns: u64,
    latency_min_ns: u64,
    latency_max_ns: u64,
}

impl Default for Counts {
    fn default() -> Counts {
        Counts { ios: 0, bytes: 0, failures: 0, latency_sum_ns: 0, latency_min_ns: u64::MAX, latency_max_ns: 0 }
    }
}

impl Counts {
    fn success(&mut self, bytes: u64, latency_ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.latency_sum_ns = self.latency_sum_ns.saturating_add(latency_ns);
        self.latency_min_ns = self.latency_min_ns.min(latency_ns);
        self.latency_max_ns = self.latency_max_ns.max(latency_ns);
    }
}

/// What the live view needs: no latency, it reads the p99 separately.
#[derive(Debug, Clone, Copy, Default)]
struct LiveCounts {
    ios: u64,
    bytes: u64,
    failures: u64,
}

/// A queue slot: one request in flight at a time.
struct Slot {
    /// When the request in flight was submitted.
    submitted: Instant,
    /// Verify: offset and pattern key of the slot's last write.
    offset: u64,
    key: u64,
    /// The slot's buffer while no request holds it.
    buf: Option<IoBuf>,
    /// Verify: the last request was a write that succeeded; read it back next.
    readback: bool,
}

/// Why a request counts as failed.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Io(IoError),
    /// Verify read back other bytes than written; the first wrong byte's offset.
    Mismatch(u64),
}

/// Owned by the job's poller: dropped when the reactor shuts down (or the
/// job unregisters the poller), which clears the flag the job watches.
struct AliveGuard(Rc<Cell<bool>>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Where the result goes, taken once when the job finishes.
struct Finish {
    index: usize,
    report: Sender<JobReport>,
    claim: Arc<Claim>,
}

struct Job {
    me: Weak<Job>,
    ch: BlockChannel,
    workload: Workload,
    io_size: u64,
    slice: Slice,
    qd: u64,
    read_percent: u64,
    stop_on_error: bool,
    seed: u64,
    warmup: Duration,
    duration: Duration,
    offsets: Cell<Offsets>,
    /// Draws reads versus writes of rw and randrw.
    mix: Cell<SplitMix64>,
    /// Next block prefill writes.
    prefill_next: Cell<u64>,
    /// Verify: writes issued so far (each gets its own pattern key).
    generation: Cell<u64>,
    slots: RefCell<Vec<Slot>>,
    state: Cell<State>,
    inflight: Cell<u32>,
    /// Completions in `window_start..window_end` are counted.
    window_start: Cell<Instant>,
    window_end: Cell<Instant>,
    /// When the job stopped resubmitting.
    stopped_at: Cell<Option<Instant>>,
    /// False once the job's poller is gone: the reactor is shutting down.
    reactor_alive: Rc<Cell<bool>>,
    poller: Cell<Option<PollerId>>,
    /// The first counted completion has been published as `Measuring`.
    measuring: Cell<bool>,
    counted: Cell<Counts>,
    /// Every completion (prefill and warm-up too), for the live view.
    live: Cell<LiveCounts>,
    histogram: RefCell<Histogram<u64>>,
    first_error: Cell<Option<IoError>>,
    first_mismatch: Cell<Option<u64>>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    finish: RefCell<Option<Finish>>,
}

impl Job {
    /// Starts the warm-up and the measured window now, and fills the queue.
    fn begin_run(&self, now: Instant) {
        let start = now + self.warmup;
        self.window_start.set(start);
        self.window_end.set(start + self.duration);
        self.state.set(State::Running);
        self.progress.set_phase(if self.warmup.is_zero() { Phase::Measuring } else { Phase::WarmUp });
        for slot in 0..self.qd as usize {
            self.submit_next(slot, Instant::now());
        }
    }

    /// Prefill: the slot writes the next block of the slice; false when the
    /// whole slice has been handed out.
    fn submit_prefill(&self, slot: usize, now: Instant) -> bool {
        let block = self.prefill_next.get();
        if block >= self.slice.blocks {
            return false;
        }
        self.prefill_next.set(block + 1);
        let buf = self.take_buf(slot);
        self.submit(slot, Io::write(self.slice.start + block * self.io_size, buf, IoFlags::NONE), now);
        true
    }

    /// The slot's next request of the workload. `now` is the clock reading
    /// of the completion that freed the slot: one clock read per request,
    /// the largest cost of the loop on a fast device. The request goes out
    /// right after it, before any bookkeeping, so the stamp leads the
    /// submit by only the few nanoseconds of picking an offset.
    fn submit_next(&self, slot: usize, now: Instant) {
        let io = match self.workload {
            Workload::Read | Workload::RandRead => Io::read(self.next_offset(), self.take_buf(slot)),
            Workload::Write | Workload::RandWrite => Io::write(self.next_offset(), self.take_buf(slot), IoFlags::NONE),
            Workload::Rw | Workload::RandRw => {
                let offset = self.next_offset();
                let mut mix = self.mix.get();
                let read = mix.below(100) < self.read_percent;
                self.mix.set(mix);
                let buf = self.take_buf(slot);
                if read { Io::read(offset, buf) } else { Io::write(offset, buf, IoFlags::NONE) }
            }
            Workload::Verify => {
                let io = self.verify_io(slot);
                // Filling 4 KiB of pattern takes far longer than a clock
                // read: stamp after it.
                return self.submit(slot, io, Instant::now());
            }
            Workload::WriteZeroes => Io::write_zeroes(self.next_offset(), self.io_size, IoFlags::NONE),
            Workload::Unmap => Io::discard(self.next_offset(), self.io_size),
            Workload::Flush => Io::flush(),
        };
        self.submit(slot, io, now);
    }

    /// Verify: read back the slot's last write, or write a fresh pattern
    /// at a new offset of the slot's stripe.
    fn verify_io(&self, slot: usize) -> Io {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot];
        let mut buf = s.buf.take().expect("an idle slot holds its buffer");
        if s.readback {
            s.readback = false;
            // The slot's stripe kept every other request off this block
            // since the write.
            return Io::read(s.offset, buf);
        }
        let mut offsets = self.offsets.get();
        let offset = offsets.next_in_stripe(slot as u64, self.qd);
        self.offsets.set(offsets);
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        s.key = pattern::key(self.seed, generation);
        s.offset = offset;
        pattern::fill(&mut buf, offset, s.key);
        Io::write(offset, buf, IoFlags::NONE)
    }

    fn take_buf(&self, slot: usize) -> IoBuf {
        self.slots.borrow_mut()[slot].buf.take().expect("an idle slot holds its buffer")
    }

    fn next_offset(&self) -> u64 {
        let mut offsets = self.offsets.get();
        let offset = offsets.next();
        self.offsets.set(offsets);
        offset
    }

    /// Submits `io` from `slot`; its latency counts from `stamp`.
    fn submit(&self, slot: usize, io: Io, stamp: Instant) {
        let me: Rc<dyn IoDone> = self.me.upgrade().expect("a job that submits is alive");
        self.inflight.set(self.inflight.get() + 1);
        self.slots.borrow_mut()[slot].submitted = stamp;
        self.ch.submit(io, Done::new(me, slot as u64));
    }

    /// Stops resubmitting; the job finishes when the queue is empty.
    fn drain(&self, now: Instant) {
        if self.state.get() != State::Draining {
            self.state.set(State::Draining);
            self.stopped_at.set(Some(now));
        }
    }

    /// Counts a completion; `running` is the job's state when it arrived.
    fn account(&self, now: Instant, running: bool, io: &Io, latency_ns: u64, result: Result<(), Failure>) {
        let counted = running && now >= self.window_start.get() && now < self.window_end.get();
        let mut live = self.live.get();
        match result {
            Ok(()) => {
                live.ios += 1;
                live.bytes += io.len;
            }
            Err(_) => live.failures += 1,
        }
        self.live.set(live);
        self.progress.set_counts(live.ios, live.bytes, live.failures);
        if let Err(f) = result {
            match f {
                Failure::Io(e) if self.first_error.get().is_none() => self.first_error.set(Some(e)),
                Failure::Mismatch(at) if self.first_mismatch.get().is_none() => self.first_mismatch.set(Some(at)),
                _ => {}
            }
        }
        if !counted {
            return;
        }
        if !self.measuring.replace(true) {
            self.progress.set_phase(Phase::Measuring);
        }
        let mut c = self.counted.get();
        match result {
            Ok(()) => {
                c.success(io.len, latency_ns);
                self.histogram.borrow_mut().saturating_record(latency_ns);
            }
            Err(_) => c.failures += 1,
        }
        self.counted.set(c);
    }

    /// Publishes the p99 of the counted requests so far (a histogram scan).
    fn publish_p99(&self) {
        let h = self.histogram.borrow();
        if !h.is_empty() {
            self.progress.set_p99_ns(h.value_at_quantile(0.99));
        }
    }

    /// Sends the result and lets go of the node.
    fn finish(&self) {
        let Some(fin) = self.finish.borrow_mut().take() else {
            return;
        };
        let (start, end) = (self.window_start.get(), self.window_end.get());
        let stopped = self.stopped_at.get().unwrap_or(end).min(end);
        let c = self.counted.get();
        self.publish_p99();
        if let Some(id) = self.poller.take()
            && self.reactor_alive.get()
        {
            reactor::current().unregister_poller(id);
        }
        let histogram = self.histogram.borrow().clone();
        let outcome = JobOutcome {
            runtime: stopped.saturating_duration_since(start),
            ios: c.ios,
            bytes: c.bytes,
            failures: c.failures,
            latency_sum_ns: c.latency_sum_ns,
            latency_min_ns: if c.ios == 0 { 0 } else { c.latency_min_ns },
            latency_max_ns: c.latency_max_ns,
            histogram,
            first_error: self.first_error.get(),
            first_mismatch: self.first_mismatch.get(),
        };
        self.progress.set_phase(Phase::Finished);
        drop(fin.claim);
        // The receiver is gone when nobody waits for the run any more.
        let _ = fin.report.send((fin.index, Ok(outcome)));
    }
}

impl IoDone for Job {
    fn io_done(&self, tag: u64, mut io: Io, res: Result<(), IoError>) {
        let now = Instant::now();
        let slot = tag as usize;
        self.inflight.set(self.inflight.get() - 1);
        let (latency_ns, result) = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[slot];
            let latency_ns = u64::try_from(now.saturating_duration_since(s.submitted).as_nanos()).unwrap_or(u64::MAX);
            s.buf = io.buf.take();
            let result = match res {
                Err(e) => Err(Failure::Io(e)),
                Ok(()) if self.workload == Workload::Verify && self.state.get() != State::Prefill => match io.kind {
                    IoKind::Read => {
                        let buf = s.buf.as_deref().expect("a read returns its buffer");
                        pattern::check(buf, io.offset, s.key).map_err(Failure::Mismatch)
                    }
                    _ => {
                        s.readback = true;
                        Ok(())
                    }
                },
                Ok(()) => Ok(()),
            };
            (latency_ns, result)
        };
        let stop =
            self.stop.load(Ordering::Relaxed) || (result.is_err() && self.stop_on_error) || !self.reactor_alive.get();
        // Resubmit first, count after: the slot's next request is not held
        // back by our bookkeeping.
        let state = self.state.get();
        match state {
            State::Prefill if stop => self.drain(now),
            State::Prefill => {
                if !self.submit_prefill(slot, now) && self.inflight.get() == 0 {
                    self.begin_run(now);
                }
            }
            State::Running if stop || now >= self.window_end.get() => self.drain(now),
            State::Running => self.submit_next(slot, now),
            State::Draining => {}
        }
        self.account(now, state == State::Running, &io, latency_ns, result);
        if self.state.get() == State::Draining && self.inflight.get() == 0 {
            self.finish();
        }
    }
}
