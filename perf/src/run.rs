//! Starting a run's jobs on their reactors, watching them, collecting the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use bdev::{Access, Node};
use reactor::Handle;

use crate::error::PerfError;
use crate::job::{self, JobOutcome, JobReport, JobSetup};
use crate::options::{PerfOptions, Slice, Target, plan};
use crate::progress::{Phase, Progress, ProgressSnapshot};
use crate::report::{JobShape, Report};
use crate::rng::SplitMix64;

/// Name under which a run claims its node (shown when someone tries to delete it).
const CLAIM_HOLDER: &str = "perf";
const BYTES_PER_MIB: f64 = (1u64 << 20) as f64;

/// One job of a running run, as the caller sees it.
struct JobView {
    core: Option<usize>,
    slice: Slice,
    progress: Arc<Progress>,
}

/// A run in progress: its jobs run on their reactors while the caller
/// samples progress, and [`PerfRun::wait`] collects the report.
pub struct PerfRun {
    node: String,
    opts: PerfOptions,
    jobs: Vec<JobView>,
    rx: Receiver<JobReport>,
    outcomes: Vec<Option<Result<JobOutcome, PerfError>>>,
    pending: usize,
    stop: Arc<AtomicBool>,
    started: Instant,
    last_sample: (Instant, Totals),
}

/// Sums of the jobs' live counters.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    ios: u64,
    bytes: u64,
    failures: u64,
}

/// Rates since the previous sample, for a live display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveSample {
    /// Since the run started.
    pub elapsed: Duration,
    /// The least advanced job's phase.
    pub phase: Phase,
    pub iops: f64,
    pub mib_s: f64,
    pub fail_s: f64,
    /// The worst job's p99 of its counted requests so far (refreshed each second), µs.
    pub p99_us: f64,
}

/// Starts one job per reactor in `reactors` on `node`, all with `opts`.
/// Returns at once: the jobs start when their reactors pick them up. The
/// node stays claimed (so it cannot be deleted) until the last job ends.
/// Callable from any thread.
pub fn start(node: &Arc<Node>, reactors: &[Handle], opts: &PerfOptions) -> Result<PerfRun, PerfError> {
    let policy = node.policy();
    let target = Target { size: policy.size, block_size: policy.block_size, read_only: policy.read_only };
    let slices = plan(opts, target, reactors.len())?;
    let access = if opts.workload.writes() || opts.prefill { Access::Write } else { Access::Read };
    let claim = Arc::new(node.claim(CLAIM_HOLDER, access)?);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    // Each job draws its own stream from the run's seed.
    let mut seeds = SplitMix64::new(opts.seed);
    let mut jobs = Vec::with_capacity(reactors.len());
    for (index, (handle, slice)) in reactors.iter().zip(slices).enumerate() {
        let progress = Arc::new(Progress::default());
        let setup = JobSetup {
            index,
            node: Arc::clone(node),
            opts: opts.clone(),
            slice,
            seed: seeds.next_u64(),
            progress: Arc::clone(&progress),
            stop: Arc::clone(&stop),
            claim: Arc::clone(&claim),
            report: tx.clone(),
        };
        handle.send(move || job::start(setup));
        jobs.push(JobView { core: handle.core(), slice, progress });
    }
    let n = jobs.len();
    let now = Instant::now();
    Ok(PerfRun {
        node: node.name().to_string(),
        opts: opts.clone(),
        jobs,
        rx,
        outcomes: (0..n).map(|_| None).collect(),
        pending: n,
        stop,
        started: now,
        last_sample: (now, Totals::default()),
    })
}

impl PerfRun {
    pub fn options(&self) -> &PerfOptions {
        &self.opts
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Since the run was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Asks every job to stop now; their results cover the time they ran.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Each job's live counters.
    pub fn progress(&self) -> Vec<ProgressSnapshot> {
        self.jobs.iter().map(|j| j.progress.snapshot()).collect()
    }

    /// Rates since the previous call (or since the start).
    pub fn sample(&mut self) -> LiveSample {
        let now = Instant::now();
        let snaps = self.progress();
        let t = snaps.iter().fold(Totals::default(), |t, s| Totals {
            ios: t.ios + s.ios,
            bytes: t.bytes + s.bytes,
            failures: t.failures + s.failures,
        });
        let (then, prev) = std::mem::replace(&mut self.last_sample, (now, t));
        let secs = now.duration_since(then).as_secs_f64().max(f64::MIN_POSITIVE);
        LiveSample {
            elapsed: now.duration_since(self.started),
            phase: snaps.iter().map(|s| s.phase).min().unwrap_or(Phase::Finished),
            iops: (t.ios - prev.ios) as f64 / secs,
            mib_s: (t.bytes - prev.bytes) as f64 / BYTES_PER_MIB / secs,
            fail_s: (t.failures - prev.failures) as f64 / secs,
            p99_us: snaps.iter().map(|s| s.p99_ns).max().unwrap_or(0) as f64 / 1000.0,
        }
    }

    /// True once every job has reported (never blocks).
    pub fn is_finished(&mut self) -> bool {
        while self.pending > 0 {
            match self.rx.try_recv() {
                Ok(r) => self.take(r),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => self.pending = 0,
            }
        }
        true
    }

    /// Waits up to `timeout` for the run to finish; true when it has.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.pending > 0 {
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => self.take(r),
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => self.pending = 0,
            }
        }
        true
    }

    fn take(&mut self, (index, outcome): JobReport) {
        if let Some(slot) = self.outcomes.get_mut(index)
            && slot.is_none()
        {
            *slot = Some(outcome);
            self.pending -= 1;
        }
    }

    /// Waits for every job and builds the report. The first job that failed
    /// to start (or whose reactor went away) makes the run fail.
    pub fn wait(mut self) -> Result<Report, PerfError> {
        while self.pending > 0 {
            match self.rx.recv() {
                Ok(r) => self.take(r),
                Err(_) => self.pending = 0,
            }
        }
        let mut rows = Vec::with_capacity(self.jobs.len());
        for (index, (view, outcome)) in self.jobs.iter().zip(self.outcomes).enumerate() {
            let outcome = outcome.ok_or(PerfError::ReactorGone(index))??;
            let shape = JobShape {
                core: view.core,
                workload: self.opts.workload,
                queue_depth: self.opts.queue_depth,
                io_size: self.opts.io_size,
                offset: view.slice.start,
                size: view.slice.blocks * self.opts.io_size,
            };
            rows.push((shape, outcome));
        }
        Ok(Report::build(&self.node, rows))
    }
}
