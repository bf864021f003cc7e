//! What a running job publishes for other threads.
//!
//! One writer (the job, on its reactor) and occasional readers (a CLI
//! printing once a second, an RPC). Counters are plain relaxed stores —
//! no locked instruction per I/O — and the cache line is the job's own, so
//! a reader costs the job one miss per sample. The p99 comes from the job's
//! histogram, recomputed by a timed poller every [`P99_PUBLISH_INTERVAL`].

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a job's poller recomputes the p99 it publishes (a histogram scan).
pub const P99_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Sent to its reactor, not running yet.
    Starting,
    /// Writing its slice once before the measured run.
    Prefill,
    /// Running; completions are not counted yet.
    WarmUp,
    /// Running and counted.
    Measuring,
    /// Done; its result is on the way.
    Finished,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Prefill,
            2 => Phase::WarmUp,
            3 => Phase::Measuring,
            _ => Phase::Finished,
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }
}

/// A job's live counters. Aligned to a cache line so jobs on different
/// cores never share one.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Successful requests completed in every phase (prefill and warm-up too).
    ios: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
    /// p99 latency of the counted requests so far, in nanoseconds.
    p99_ns: AtomicU64,
}

/// A reading of a job's [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub phase: Phase,
    pub ios: u64,
    pub bytes: u64,
    pub failures: u64,
    pub p99_ns: u64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            phase: Phase::from_u8(self.phase.load(Ordering::Acquire)),
            ios: self.ios.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            p99_ns: self.p99_ns.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        // Release: a reader that sees Finished also sees the final counters.
        self.phase.store(phase.to_u8(), Ordering::Release);
    }

    /// Stores the job's running totals (single writer: no read-modify-write).
    pub(crate) fn set_counts(&self, ios: u64, bytes: u64, failures: u64) {
        self.ios.store(ios, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.failures.store(failures, Ordering::Relaxed);
    }

    pub(crate) fn set_p99_ns(&self, ns: u64) {
        self.p99_ns.store(ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_survive_the_atomic() {
        let p = Progress::default();
        assert_eq!(p.snapshot().phase, Phase::Starting);
        for ph in [Phase::Prefill, Phase::WarmUp, Phase::Measuring, Phase::Finished] {
            p.set_phase(ph);
            assert_eq!(p.snapshot().phase, ph);
        }
        p.set_counts(3, 4, 5);
        p.set_p99_ns(6);
        let s = p.snapshot();
        assert_eq!((s.ios, s.bytes, s.failures, s.p99_ns), (3, 4, 5, 6));
        assert_eq!(std::mem::align_of::<Progress>(), 64);
    }
}
