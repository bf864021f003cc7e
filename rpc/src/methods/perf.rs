//! `perf_start` / `perf_results`: bdevperf's `perform_tests`, split in two
//! so the control thread never waits for a run.
//!
//! `perf_start` checks the parameters, starts one job per chosen reactor and
//! answers `{"id": N}` at once. `perf_results` answers `{"status":
//! "running", ...progress}` until the run ends, then `{"status": "finished",
//! "node": ..., "jobs": [...], "total": {...}}` (or `{"status": "failed",
//! "error": ...}`), as often as asked, until the next `perf_start` replaces
//! the run. One run at a time: the numbers of two runs sharing the cores
//! would mean nothing.

use std::sync::Mutex;
use std::time::Duration;

use perf::{PerfError, PerfOptions, PerfRun, Report, Workload};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::control::{Control, bdev_error};
use crate::error::RpcError;
use crate::registry::decode;

/// The latest run. Runs live beside the control state rather than in it:
/// they belong to no node and need nothing at shutdown (their jobs end
/// with the reactors).
static LATEST: Mutex<Option<Latest>> = Mutex::new(None);

struct Latest {
    id: u64,
    state: RunState,
}

enum RunState {
    Running(PerfRun),
    Finished(Result<Report, String>),
}

impl Latest {
    /// Collects the report if every job has finished.
    fn settle(&mut self) {
        if let RunState::Running(run) = &mut self.state
            && run.is_finished()
        {
            let RunState::Running(run) = std::mem::replace(&mut self.state, RunState::Finished(Err(String::new())))
            else {
                unreachable!("checked above")
            };
            self.state = RunState::Finished(run.wait().map_err(|e| e.to_string()));
        }
    }
}

fn latest() -> std::sync::MutexGuard<'static, Option<Latest>> {
    LATEST.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartParams {
    #[serde(rename = "node-name")]
    node_name: String,
    workload: String,
    queue_depth: u32,
    io_size: u64,
    /// Measured time; fractions allowed.
    time_in_sec: f64,
    /// Reads in percent (rw, randrw).
    #[serde(default)]
    rw_percentage: Option<u8>,
    /// Cores whose reactors run a job each; default every reactor.
    #[serde(default)]
    cpumask: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    warmup_time_in_sec: Option<f64>,
    #[serde(default)]
    prefill: Option<bool>,
    #[serde(default)]
    shared_range: Option<bool>,
    #[serde(default)]
    stop_on_error: Option<bool>,
}

fn seconds(name: &str, s: f64) -> Result<Duration, RpcError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| RpcError::invalid_params(format!("Invalid value for '{name}': {s} is not a number of seconds")))
}

fn perf_error(e: PerfError) -> RpcError {
    match e {
        PerfError::Invalid(msg) => RpcError::invalid_params(msg),
        PerfError::Bdev(e) => bdev_error(e),
        e @ PerfError::ReactorGone(_) => RpcError::internal(e.to_string()),
    }
}

/// `perf_start`: starts a run and answers its id without waiting for it.
pub(super) fn perf_start(ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: StartParams = decode(params)?;
    let workload: Workload =
        p.workload.parse().map_err(|e: perf::UnknownWorkload| RpcError::invalid_params(e.to_string()))?;
    let mut opts = PerfOptions::new(workload, p.queue_depth, p.io_size, seconds("time_in_sec", p.time_in_sec)?);
    opts.read_percent = p.rw_percentage;
    opts.warmup = seconds("warmup_time_in_sec", p.warmup_time_in_sec.unwrap_or(0.0))?;
    opts.offset = p.offset.unwrap_or(0);
    opts.size = p.size;
    opts.seed = p.seed.unwrap_or(0);
    opts.prefill = p.prefill.unwrap_or(false);
    opts.shared_range = p.shared_range.unwrap_or(false);
    opts.stop_on_error = p.stop_on_error.unwrap_or(false);
    let reactors = match &p.cpumask {
        None => ctl.reactors.clone(),
        Some(mask) => {
            let cores = reactor::cpuset::parse_cpumask(mask).map_err(|e| RpcError::invalid_params(e.to_string()))?;
            let mut chosen = Vec::with_capacity(cores.len());
            for core in cores {
                let h = ctl.reactors.iter().find(|h| h.core() == Some(core)).ok_or_else(|| {
                    RpcError::invalid_params(format!("cpumask '{mask}': no reactor runs on core {core}"))
                })?;
                chosen.push(h.clone());
            }
            chosen
        }
    };
    let node = ctl.graph.get(&p.node_name).map_err(bdev_error)?;
    let mut slot = latest();
    if let Some(l) = slot.as_mut() {
        l.settle();
        if matches!(l.state, RunState::Running(_)) {
            return Err(RpcError::busy(format!("perf run {} is still running", l.id)));
        }
    }
    let run = perf::start(&node, &reactors, &opts).map_err(perf_error)?;
    let id = slot.as_ref().map_or(1, |l| l.id + 1);
    *slot = Some(Latest { id, state: RunState::Running(run) });
    Ok(json!({"id": id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultsParams {
    id: u64,
    /// Add the merged latency histogram as `histogram_ns`: `[value_ns, count]` pairs.
    #[serde(default)]
    histogram: Option<bool>,
}

/// `perf_results`: the run's progress, or its results once it finished.
pub(super) fn perf_results(_ctl: &mut Control, params: Option<Value>) -> Result<Value, RpcError> {
    let p: ResultsParams = decode(params)?;
    let mut slot = latest();
    let l = match slot.as_mut() {
        Some(l) if l.id == p.id => l,
        _ => return Err(RpcError::not_found(format!("No perf run with id {}", p.id))),
    };
    l.settle();
    match &mut l.state {
        RunState::Running(run) => {
            let progress = run.progress();
            let sum = |f: fn(&perf::ProgressSnapshot) -> u64| progress.iter().map(f).sum::<u64>();
            let phase = progress.iter().map(|s| s.phase).min().unwrap_or(perf::Phase::Finished);
            let p99_ns = progress.iter().map(|s| s.p99_ns).max().unwrap_or(0);
            Ok(json!({
                "status": "running",
                "phase": phase,
                "elapsed_s": run.elapsed().as_secs_f64(),
                "ios": sum(|s| s.ios),
                "bytes": sum(|s| s.bytes),
                "failures": sum(|s| s.failures),
                "p99_us": p99_ns as f64 / 1000.0,
            }))
        }
        RunState::Finished(Ok(report)) => {
            let mut v = serde_json::to_value(&*report).map_err(|e| RpcError::internal(e.to_string()))?;
            v["status"] = json!("finished");
            if p.histogram == Some(true)
                && let Some(h) = &report.histogram
            {
                v["histogram_ns"] = json!(perf::histogram_buckets(h));
            }
            Ok(v)
        }
        RunState::Finished(Err(msg)) => Ok(json!({"status": "failed", "error": msg})),
    }
}
