//! The engine on real nodes: a graph over two reactors, short runs, counts
//! and report consistency (never timings), verify against a device that
//! corrupts what it returns, failures counted or fatal on request.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::{
    Bdev, BdevError, BdevInfo, BlockStatus, Channel, Done, Graph, Io, IoError, IoKind, LocalBoxFuture, Node, OpenCtx,
    OptReader,
};
use perf::{PerfError, PerfOptions, Phase, Report, Workload};
use reactor::{PollMode, ReactorOptions, Reactors};
use serde_json::{Value, json};

/// Long enough for thousands of requests, short enough for a test suite.
const RUN_TIME: Duration = Duration::from_millis(300);
const IO_SIZE: u64 = 4096;
const NODE_BYTES: u64 = 8 << 20;

struct Env {
    graph: Graph,
    reactors: Reactors,
}

impl Env {
    fn new() -> Env {
        let cores = reactor::cpuset::allowed_cores().unwrap();
        let cores: Vec<usize> = cores.iter().copied().cycle().take(2).collect();
        let reactors =
            Reactors::start(&cores, false, ReactorOptions { poll_mode: PollMode::Adaptive, ..Default::default() })
                .unwrap();
        let mut graph = Graph::new(reactors.handles().to_vec());
        graph.register_driver("flaky", flaky_open);
        Env { graph, reactors }
    }

    fn add(&mut self, opts: Value) -> Arc<Node> {
        self.graph.add(opts).unwrap_or_else(|e| panic!("blockdev-add failed: {e}"))
    }

    fn run(&self, node: &Arc<Node>, opts: &PerfOptions) -> Report {
        perf::start(node, self.reactors.handles(), opts).unwrap().wait().unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.graph.close_all();
    }
}

fn opts(workload: Workload, queue_depth: u32) -> PerfOptions {
    PerfOptions::new(workload, queue_depth, IO_SIZE, RUN_TIME)
}

/// Checks what must hold for any report of `jobs` jobs over `size` bytes from 0.
fn check_consistent(r: &Report, jobs: usize, size: u64) {
    assert_eq!(r.jobs.len(), jobs);
    let t = &r.total;
    assert!(t.ios > 0, "no I/O counted: {r:?}");
    assert_eq!(t.ios, r.jobs.iter().map(|j| j.stats.ios).sum::<u64>());
    assert_eq!(t.bytes, r.jobs.iter().map(|j| j.stats.bytes).sum::<u64>());
    assert_eq!(t.failures, r.jobs.iter().map(|j| j.stats.failures).sum::<u64>());
    let iops: f64 = r.jobs.iter().map(|j| j.stats.iops).sum();
    assert!((t.iops - iops).abs() <= iops * 1e-9);
    for (i, j) in r.jobs.iter().enumerate() {
        let s = &j.stats;
        assert_eq!(j.job, i);
        assert!(s.ios > 0, "job {i} counted nothing");
        assert!(s.runtime_s > 0.0 && s.runtime_s <= RUN_TIME.as_secs_f64() + 1e-9, "runtime {}", s.runtime_s);
        assert!((s.iops - s.ios as f64 / s.runtime_s).abs() < 1e-6 * s.iops);
        let l = &s.latency_us;
        assert!(l.min > 0.0 && l.min <= l.avg && l.avg <= l.max, "{l:?}");
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p99_9 && l.p99_9 <= l.p99_99, "{l:?}");
        // Percentiles are bucket tops: at most 0.1 % above the true maximum.
        assert!(l.p99_99 <= l.max * 1.001 + 0.001, "{l:?}");
        // Jobs split the range: job i's slice follows job i-1's.
        assert_eq!(j.offset, i as u64 * (size / jobs as u64));
        assert_eq!(j.size, size / jobs as u64);
    }
    let h = r.histogram.as_ref().expect("a report carries its merged histogram");
    assert_eq!(h.len(), t.ios);
}

#[test]
fn randread_on_null_and_malloc() {
    let mut env = Env::new();
    let null = env.add(json!({"driver": "null-co", "node-name": "n0", "size": NODE_BYTES}));
    let malloc = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES}));
    for node in [&null, &malloc] {
        let r = env.run(node, &opts(Workload::RandRead, 8));
        check_consistent(&r, 2, NODE_BYTES);
        assert_eq!(r.node, node.name());
        assert_eq!(r.total.failures, 0);
        assert_eq!(r.total.bytes, r.total.ios * IO_SIZE);
        let mut text = Vec::new();
        perf::write_percentile_distribution(r.histogram.as_ref().unwrap(), &mut text).unwrap();
        assert!(String::from_utf8(text).unwrap().contains(&format!("Total count    = {:>12}]", r.total.ios)));
    }
}

#[test]
fn every_workload_runs_without_failures() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES}));
    for w in Workload::ALL {
        let mut o = opts(w, 4);
        o.duration = Duration::from_millis(100);
        if w.needs_mix() {
            o.read_percent = Some(70);
        }
        let r = env.run(&m, &o);
        check_consistent(&r, 2, NODE_BYTES);
        assert_eq!(r.total.failures, 0, "{w}: {:?}", r.jobs[0].first_error);
        assert!(r.jobs.iter().all(|j| j.workload == w));
    }
}

#[test]
fn warmup_and_prefill_then_measure() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES}));
    let mut o = opts(Workload::RandRead, 16);
    o.prefill = true;
    o.warmup = Duration::from_millis(100);
    o.seed = 42;
    let mut run = perf::start(&m, env.reactors.handles(), &o).unwrap();
    assert_eq!(run.job_count(), 2);
    while !run.wait_timeout(Duration::from_millis(50)) {
        let s = run.sample();
        assert!(s.iops >= 0.0 && s.fail_s == 0.0);
    }
    assert!(run.progress().iter().all(|p| p.phase == Phase::Finished && p.ios > 0 && p.p99_ns > 0));
    let r = run.wait().unwrap();
    check_consistent(&r, 2, NODE_BYTES);
    // Prefill wrote the fill byte everywhere: nothing reads as zero any more.
    let (ch_node, handle) = (Arc::clone(&m), env.reactors.handles()[0].clone());
    let first = handle
        .run(move || async move { ch_node.channel().unwrap().read(NODE_BYTES - 4096, 4096).await.unwrap() })
        .wait()
        .unwrap();
    assert!(first.iter().all(|&b| b != 0), "the last block was prefilled");
}

#[test]
fn verify_passes_on_malloc() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES}));
    let r = env.run(&m, &opts(Workload::Verify, 16));
    check_consistent(&r, 2, NODE_BYTES);
    assert_eq!(r.total.failures, 0);
    assert!(r.jobs.iter().all(|j| j.first_mismatch_offset.is_none() && j.first_error.is_none()));
}

#[test]
fn verify_reports_corruption() {
    let mut env = Env::new();
    // Every 50th read comes back with one byte flipped.
    let node = env.add(json!({"driver": "flaky", "node-name": "x0", "size": NODE_BYTES, "corrupt-every": 50}));
    let r = env.run(&node, &opts(Workload::Verify, 8));
    assert!(r.total.failures > 0, "corruption went unnoticed: {r:?}");
    let bad = r.jobs.iter().find_map(|j| j.first_mismatch_offset.map(|off| (j, off))).expect("a mismatch offset");
    let (job, off) = bad;
    assert!(off >= job.offset && off < job.offset + job.size, "mismatch at {off} outside job {}", job.job);
    // The flaky device flips byte 100 of the request.
    assert_eq!(off % IO_SIZE, 100);
    assert!(r.jobs.iter().all(|j| j.first_error.is_none()));
}

#[test]
fn failures_are_counted_or_stop_the_job() {
    let mut env = Env::new();
    let node = env.add(json!({"driver": "flaky", "node-name": "x0", "size": NODE_BYTES, "fail-every": 10}));
    let r = env.run(&node, &opts(Workload::RandRead, 4));
    check_consistent(&r, 2, NODE_BYTES);
    assert!(r.total.failures > 0);
    // About one in ten fails; the rest goes on.
    assert!(r.total.ios > 5 * r.total.failures, "{:?}", r.total);
    assert_eq!(r.jobs[0].first_error.as_deref(), Some("Input/output error"));
    let mut o = opts(Workload::RandRead, 4);
    o.stop_on_error = true;
    o.duration = Duration::from_secs(60);
    let r = env.run(&node, &o);
    // Stopped well before the minute: the first failure ended each job.
    assert!(r.jobs.iter().all(|j| j.stats.failures >= 1 && j.stats.runtime_s < 30.0), "{r:?}");
}

#[test]
fn the_node_stays_claimed_while_a_run_lasts() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES}));
    let mut o = opts(Workload::RandWrite, 4);
    o.duration = Duration::from_secs(60);
    let run = perf::start(&m, env.reactors.handles(), &o).unwrap();
    let err = env.graph.remove("m0").unwrap_err();
    assert!(matches!(err, BdevError::InUse { .. }), "{err}");
    run.stop();
    let r = run.wait().unwrap();
    assert!(r.total.runtime_s < 30.0, "stop() ends the run early");
    assert!(m.holders().is_empty(), "the claim goes with the last job: {:?}", m.holders());
    drop(m);
    env.graph.remove("m0").unwrap();
}

#[test]
fn bad_options_fail_before_any_job_starts() {
    let mut env = Env::new();
    let m = env.add(json!({"driver": "malloc", "node-name": "m0", "size": NODE_BYTES, "read-only": true}));
    let err = perf::start(&m, env.reactors.handles(), &opts(Workload::Write, 4)).err().unwrap();
    assert!(matches!(err, PerfError::Invalid(_)) && err.to_string().contains("read-only"), "{err}");
    let mut o = opts(Workload::RandRead, 4);
    o.io_size = 100;
    assert!(perf::start(&m, env.reactors.handles(), &o).err().unwrap().to_string().contains("block size"));
    assert!(m.holders().is_empty());
}

// ---- a test device: RAM that corrupts or fails some requests on purpose ----

struct FlakyBdev {
    data: Mutex<Vec<u8>>,
    corrupt_every: u64,
    fail_every: u64,
    reads: AtomicU64,
}

fn flaky_open(_ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let size = opts.u64_req("size")?;
    let corrupt_every = opts.u64_opt("corrupt-every")?.unwrap_or(0);
    let fail_every = opts.u64_opt("fail-every")?.unwrap_or(0);
    opts.finish()?;
    Ok(Arc::new(FlakyBdev {
        data: Mutex::new(vec![0; size as usize]),
        corrupt_every,
        fail_every,
        reads: AtomicU64::new(0),
    }))
}

impl Bdev for FlakyBdev {
    fn driver(&self) -> &'static str {
        "flaky"
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_only(&self) -> bool {
        false
    }
    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        Ok(Rc::new(FlakyChannel(self)))
    }
    fn info(&self) -> BdevInfo {
        BdevInfo { filename: "flaky".into(), direct: false, no_flush: false, actual_size: None, format_specific: None }
    }
}

struct FlakyChannel(Arc<FlakyBdev>);

impl Channel for FlakyChannel {
    fn submit(&self, mut io: Io, done: Done) {
        let b = &self.0;
        let (off, len) = (io.offset as usize, io.len as usize);
        let res = match io.kind {
            IoKind::Read => {
                let n = b.reads.fetch_add(1, Ordering::Relaxed) + 1;
                let buf = io.buf_mut();
                buf.copy_from_slice(&b.data.lock().unwrap()[off..off + len]);
                if b.corrupt_every > 0 && n.is_multiple_of(b.corrupt_every) {
                    buf[100] ^= 0xff;
                }
                if b.fail_every > 0 && n.is_multiple_of(b.fail_every) { Err(IoError::Io) } else { Ok(()) }
            }
            IoKind::Write => {
                b.data.lock().unwrap()[off..off + len].copy_from_slice(io.buf.as_deref().unwrap());
                Ok(())
            }
            IoKind::WriteZeroes | IoKind::Discard => {
                b.data.lock().unwrap()[off..off + len].fill(0);
                Ok(())
            }
            IoKind::Flush => Ok(()),
        };
        done.complete_later(io, res);
    }

    fn block_status(&self, _offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        Box::pin(async move { Ok(BlockStatus::data(len, None)) })
    }
}
