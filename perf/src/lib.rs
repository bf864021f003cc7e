//! bdevperf-style workloads on Spindle's reactors: the engine behind
//! `spindle perf` and the `perf_start` / `perf_results` commands.
//!
//! ```text
//!   caller thread                     reactor A            reactor B
//!   start(node, [A, B], opts) ──send──▶ job 0 ◀─┐        ──▶ job 1 ◀─┐
//!     │                                  │ submit │ io_done   │        │
//!     │                                  └────────┘           └────────┘
//!     │ sample(): Progress atomics ◀──── relaxed stores per completion
//!     └ wait(): mpsc ◀─────────────────── JobOutcome (histogram, counters)
//!                  └─▶ Report (per job + total, serde) ─▶ table / JSON / .hgrm
//! ```
//!
//! - [`workload`]: the I/O patterns ([`Workload`]).
//! - [`options`]: what a run does ([`PerfOptions`]) and the range split.
//! - `job`: one closed loop of callbacks per reactor, no task or
//!   allocation per request.
//! - [`progress`]: live counters a job publishes ([`Progress`]).
//! - [`run`]: starting jobs and collecting results ([`start`], [`PerfRun`]).
//! - [`report`]: results ([`Report`]) and the histogram text format.
//! - `offsets`, [`rng`], [`pattern`]: where requests go, the generator, verify's data.

#![forbid(unsafe_code)]

pub mod error;
mod job;
mod offsets;
pub mod options;
pub mod pattern;
pub mod progress;
pub mod report;
pub mod rng;
pub mod run;
pub mod workload;

pub use error::PerfError;
pub use job::{HISTOGRAM_SIGFIGS, LATENCY_NS_MAX, new_histogram};
pub use options::{JOB_BUFFER_BYTES_MAX, PerfOptions, QUEUE_DEPTH_MAX, RUN_TIME_MAX};
pub use progress::{Phase, Progress, ProgressSnapshot};
pub use report::{
    JobResult, Latency, Report, Stats, histogram_buckets, histogram_from_buckets, write_percentile_distribution,
};
pub use run::{LiveSample, PerfRun, start};
pub use workload::{UnknownWorkload, Workload};
