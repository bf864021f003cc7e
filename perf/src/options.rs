//! What a run does, and how its range is split between jobs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::PerfError;
use crate::workload::Workload;

/// Deepest queue a job may keep.
pub const QUEUE_DEPTH_MAX: u32 = 65536;
/// Memory one job may pin in I/O buffers (queue depth × I/O size).
pub const JOB_BUFFER_BYTES_MAX: u64 = 1 << 30;
/// Longest run (warm-up included): keeps every deadline representable.
pub const RUN_TIME_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// The settings of a run; every job of the run shares them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfOptions {
    pub workload: Workload,
    /// Requests each job keeps in flight.
    pub queue_depth: u32,
    /// Bytes per request.
    pub io_size: u64,
    /// Reads in percent of all requests; rw and randrw only (and required there).
    pub read_percent: Option<u8>,
    /// How long I/O is measured, after the warm-up.
    pub duration: Duration,
    /// I/O completing during this time is not counted.
    pub warmup: Duration,
    /// Start of the range the run touches.
    pub offset: u64,
    /// Length of the range; `None` runs to the end of the node.
    pub size: Option<u64>,
    /// Seeds the offsets and mixes; each job derives its own stream.
    pub seed: u64,
    /// Every job covers the whole range instead of its own slice.
    pub shared_range: bool,
    /// Each job writes its whole slice once, sequentially, before the
    /// warm-up starts (so reads touch written data).
    pub prefill: bool,
    /// A failed request ends the job instead of being counted and skipped.
    pub stop_on_error: bool,
}

impl PerfOptions {
    /// A run of `workload` at `queue_depth` with `io_size` requests for
    /// `duration`, over the whole node, without warm-up.
    pub fn new(workload: Workload, queue_depth: u32, io_size: u64, duration: Duration) -> PerfOptions {
        PerfOptions {
            workload,
            queue_depth,
            io_size,
            read_percent: None,
            duration,
            warmup: Duration::ZERO,
            offset: 0,
            size: None,
            seed: 0,
            shared_range: false,
            prefill: false,
            stop_on_error: false,
        }
    }
}

/// What a job is given of the node: its slice and how many whole requests fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slice {
    /// Device offset of the slice.
    pub start: u64,
    /// Requests of `io_size` that fit in the slice; offsets are
    /// `start + k * io_size` for `k < blocks`.
    pub blocks: u64,
}

/// The node facts the plan depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
}

fn invalid(msg: impl Into<String>) -> PerfError {
    PerfError::Invalid(msg.into())
}

/// Checks `opts` against the node and splits the range between `jobs` jobs.
pub(crate) fn plan(opts: &PerfOptions, target: Target, jobs: usize) -> Result<Vec<Slice>, PerfError> {
    if jobs == 0 {
        return Err(invalid("no reactor to run a job on"));
    }
    let w = opts.workload;
    if opts.queue_depth == 0 || opts.queue_depth > QUEUE_DEPTH_MAX {
        return Err(invalid(format!("queue depth {} must be from 1 to {QUEUE_DEPTH_MAX}", opts.queue_depth)));
    }
    let block = u64::from(target.block_size);
    if opts.io_size == 0 || opts.io_size > bdev::IO_BYTES_MAX {
        return Err(invalid(format!("I/O size {} must be from 1 to {} bytes", opts.io_size, bdev::IO_BYTES_MAX)));
    }
    if !opts.io_size.is_multiple_of(block) {
        return Err(invalid(format!("I/O size {} is not a multiple of the node's block size {block}", opts.io_size)));
    }
    if w.has_data() && u64::from(opts.queue_depth) * opts.io_size > JOB_BUFFER_BYTES_MAX {
        return Err(invalid(format!(
            "queue depth {} × I/O size {} needs more than {JOB_BUFFER_BYTES_MAX} bytes of buffers per job",
            opts.queue_depth, opts.io_size
        )));
    }
    match (w.needs_mix(), opts.read_percent) {
        (true, None) => return Err(invalid(format!("workload {w} needs a read percentage (rw mix)"))),
        (true, Some(p)) if p > 100 => return Err(invalid(format!("read percentage {p} is above 100"))),
        (false, Some(_)) => return Err(invalid(format!("a read percentage applies to rw and randrw, not {w}"))),
        _ => {}
    }
    if opts.duration.is_zero() {
        return Err(invalid("the run time must be above zero"));
    }
    if opts.duration.saturating_add(opts.warmup) > RUN_TIME_MAX {
        return Err(invalid(format!("run time plus warm-up exceeds {} s", RUN_TIME_MAX.as_secs())));
    }
    if (w.writes() || opts.prefill) && target.read_only {
        return Err(invalid(format!("workload {w} writes, but the node is read-only")));
    }
    if w == Workload::Verify && opts.shared_range {
        return Err(invalid("verify needs each job on its own slice (no shared range)"));
    }
    if !opts.offset.is_multiple_of(block) {
        return Err(invalid(format!("offset {} is not a multiple of the node's block size {block}", opts.offset)));
    }
    if opts.offset >= target.size {
        return Err(invalid(format!("offset {} is not below the node's size {}", opts.offset, target.size)));
    }
    let size = opts.size.unwrap_or(target.size - opts.offset);
    if size == 0 || opts.offset.checked_add(size).is_none_or(|end| end > target.size) {
        return Err(invalid(format!(
            "range of {size} bytes at offset {} does not fit the node's {} bytes",
            opts.offset, target.size
        )));
    }
    let blocks_total = size / opts.io_size;
    let blocks = if opts.shared_range { blocks_total } else { blocks_total / jobs as u64 };
    // Verify gives each queue slot its own stripe of the slice, so no two
    // requests of a job ever overlap: every slot needs at least one block.
    let need = if w == Workload::Verify { u64::from(opts.queue_depth) } else { 1 };
    if blocks < need {
        let per = if opts.shared_range { "the range" } else { "each job's slice of the range" };
        return Err(invalid(format!(
            "{per} holds {blocks} requests of {} bytes; {w} at queue depth {} needs at least {need}",
            opts.io_size, opts.queue_depth
        )));
    }
    Ok((0..jobs as u64)
        .map(|i| Slice {
            start: if opts.shared_range { opts.offset } else { opts.offset + i * blocks * opts.io_size },
            blocks,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: Target = Target { size: 1 << 20, block_size: 512, read_only: false };

    fn opts(w: Workload) -> PerfOptions {
        PerfOptions::new(w, 4, 4096, Duration::from_secs(1))
    }

    fn err(o: &PerfOptions, t: Target, jobs: usize) -> String {
        plan(o, t, jobs).unwrap_err().to_string()
    }

    #[test]
    fn splits_the_range_between_jobs() {
        let s = plan(&opts(Workload::RandRead), NODE, 2).unwrap();
        assert_eq!(s, [Slice { start: 0, blocks: 128 }, Slice { start: 512 << 10, blocks: 128 }]);
        let mut o = opts(Workload::Read);
        o.offset = 4096;
        o.size = Some(3 * 4096 + 100);
        assert_eq!(plan(&o, NODE, 1).unwrap(), [Slice { start: 4096, blocks: 3 }]);
        o.shared_range = true;
        assert_eq!(plan(&o, NODE, 2).unwrap(), [Slice { start: 4096, blocks: 3 }, Slice { start: 4096, blocks: 3 }]);
    }

    #[test]
    fn refuses_bad_options_with_a_reason() {
        let mut o = opts(Workload::RandRead);
        o.queue_depth = 0;
        assert!(err(&o, NODE, 1).contains("queue depth 0"));
        let mut o = opts(Workload::RandRead);
        o.io_size = 1000;
        assert!(err(&o, NODE, 1).contains("block size 512"));
        assert!(err(&opts(Workload::RandRw), NODE, 1).contains("read percentage"));
        let mut o = opts(Workload::Read);
        o.read_percent = Some(50);
        assert!(err(&o, NODE, 1).contains("rw and randrw"));
        let mut o = opts(Workload::Rw);
        o.read_percent = Some(101);
        assert!(err(&o, NODE, 1).contains("above 100"));
        let ro = Target { read_only: true, ..NODE };
        assert!(err(&opts(Workload::Write), ro, 1).contains("read-only"));
        plan(&opts(Workload::RandRead), ro, 1).unwrap();
        let mut o = opts(Workload::Read);
        o.offset = 1 << 20;
        assert!(err(&o, NODE, 1).contains("not below"));
        o.offset = 0;
        o.size = Some((1 << 20) + 512);
        assert!(err(&o, NODE, 1).contains("does not fit"));
        let mut o = opts(Workload::Read);
        o.duration = Duration::ZERO;
        assert!(err(&o, NODE, 1).contains("above zero"));
        assert!(err(&opts(Workload::Read), NODE, 0).contains("no reactor"));
    }

    #[test]
    fn verify_needs_a_stripe_per_slot() {
        let mut o = opts(Workload::Verify);
        o.queue_depth = 64;
        o.size = Some(64 * 4096);
        plan(&o, NODE, 1).unwrap();
        assert!(err(&o, NODE, 2).contains("needs at least 64"));
        o.shared_range = true;
        assert!(err(&o, NODE, 1).contains("own slice"));
    }
}
