//! `spindle perf`: a bdevperf-style latency benchmark.
//!
//! In-process (`--device JSON` or `--config FILE`): start polling reactors
//! on the cores of `--cpumask`, open the node, run one job per core, print
//! a live line each second (on a terminal), then bdevperf's table (or
//! `--json`), close the node, stop. Against a daemon (`--socket PATH`):
//! the same run through `perf_start` / `perf_results`.
//!
//! Exit status: 0 when every request succeeded, 1 when a request failed
//! (the results are printed all the same) or the run could not happen,
//! 2 on bad options.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
// `::perf` is the engine crate; this module shares its name.
use ::perf::{PerfError, PerfOptions, Phase, Report, Stats, Workload};
use reactor::{PollMode, ReactorOptions, Reactors};
use rpc::EventBus;
use rpc::client::{Client, ClientError};
use rpc::control::Control;
use serde_json::{Value, json};

/// Node name of a `--device` that names none.
const DEFAULT_NODE_NAME: &str = "perf0";
/// How often the live line is printed.
const LIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How often `--socket` asks the daemon whether the run finished.
const RESULTS_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How soon a ^C is noticed while a run goes on in this process.
const INTERRUPT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long one RPC to the daemon may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct PerfArgs {
    /// Requests each job keeps in flight.
    #[arg(short = 'q', long)]
    queue_depth: u32,
    /// Bytes per request: 4096, 4k, 1M.
    #[arg(short = 'o', long, value_parser = parse_size)]
    io_size: u64,
    /// read, write, randread, randwrite, rw, randrw, verify, write_zeroes, unmap, flush.
    #[arg(short = 'w', long)]
    workload: Workload,
    /// Reads in percent of all requests (rw and randrw; required there).
    #[arg(short = 'M', long = "rw-mix", value_name = "READ_PERCENT")]
    rw_mix: Option<u8>,
    /// Seconds of measured I/O (fractions allowed).
    #[arg(short = 't', long = "time", value_name = "SECONDS", value_parser = parse_seconds)]
    time: Duration,
    /// Seconds of I/O before the measured time; not counted.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, default_value = "0")]
    warmup: Duration,
    /// Cores to run one job each on: a hex mask (0x3) or a list ([0,2-3]).
    /// Default: the first available core (in-process), every reactor (--socket).
    #[arg(long, short = 'm')]
    cpumask: Option<String>,
    /// Start of the range the run touches (bytes; 4k, 1M allowed).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Length of the range (default: to the end of the node). Jobs split it.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seed of the random offsets and read/write mix.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write each job's slice once before the run, so reads touch written data.
    #[arg(long)]
    prefill: bool,
    /// Every job covers the whole range instead of its own slice.
    #[arg(long)]
    shared_range: bool,
    /// End a job at its first failed request instead of counting and going on.
    #[arg(long)]
    stop_on_error: bool,
    /// The device: one blockdev-add options object (node-name defaults to "perf0").
    #[arg(long, value_name = "JSON", group = "target")]
    device: Option<String>,
    /// Nodes to open: a JSON list of {"method": "blockdev-add", "params": ...}, as `serve --config` takes.
    #[arg(long, value_name = "FILE", group = "target")]
    config: Option<PathBuf>,
    /// Run inside the daemon listening on this JSON-RPC socket.
    #[arg(long, short = 's', value_name = "PATH", group = "target", requires = "node")]
    socket: Option<PathBuf>,
    /// The node to run on (--config: default the last one added; --socket: required).
    #[arg(long, conflicts_with = "device")]
    node: Option<String>,
    /// Print the results as JSON (nothing else goes to stdout).
    #[arg(long)]
    json: bool,
    /// Write the merged latency histogram here (HdrHistogram percentile distribution, µs).
    #[arg(long, value_name = "FILE")]
    histogram: Option<PathBuf>,
    /// Log filter for messages on stderr.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

/// A failure, and the exit status it deserves.
enum Failure {
    Usage(String),
    Run(String),
}

impl From<PerfError> for Failure {
    fn from(e: PerfError) -> Failure {
        match e {
            PerfError::Invalid(msg) => Failure::Usage(msg),
            e => Failure::Run(e.to_string()),
        }
    }
}

/// `4096`, `4k`, `1M`, `2G`, `4KiB`: bytes, binary multiples.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is not a size (4096, 4k, 1M)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{text}' is not a size (4096, 4k, 1M)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size '{text}' is too large"))
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let s: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(s).map_err(|_| format!("'{text}' is not a number of seconds"))
}

pub fn run(args: PerfArgs) -> ExitCode {
    if let Err(e) = crate::serve::init_logging(&args.log_level) {
        eprintln!("spindle perf: {e}");
        return ExitCode::from(2);
    }
    let result = if args.socket.is_some() { run_remote(&args) } else { run_local(&args) };
    let report = match result {
        Ok(r) => r,
        Err(Failure::Usage(msg)) => {
            eprintln!("spindle perf: {msg}");
            return ExitCode::from(2);
        }
        Err(Failure::Run(msg)) => {
            eprintln!("spindle perf: {msg}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(msg) = output(&args, &report) {
        eprintln!("spindle perf: {msg}");
        return ExitCode::FAILURE;
    }
    let failed = report.failures() > 0
        || report.jobs.iter().any(|j| j.first_error.is_some() || j.first_mismatch_offset.is_some());
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn perf_options(args: &PerfArgs) -> PerfOptions {
    let mut o = PerfOptions::new(args.workload, args.queue_depth, args.io_size, args.time);
    o.read_percent = args.rw_mix;
    o.warmup = args.warmup;
    o.offset = args.offset;
    o.size = args.size;
    o.seed = args.seed;
    o.prefill = args.prefill;
    o.shared_range = args.shared_range;
    o.stop_on_error = args.stop_on_error;
    o
}

/// Whether to print the live line: on a terminal, unless stdout is for JSON.
fn live_output(args: &PerfArgs) -> bool {
    !args.json && std::io::stdout().is_terminal()
}

fn print_live(elapsed: Duration, phase: Phase, iops: f64, mib_s: f64, fail_s: f64, p99_us: f64) {
    let phase = match phase {
        Phase::Starting => "starting",
        Phase::Prefill => "prefill",
        Phase::WarmUp => "warm-up",
        Phase::Measuring | Phase::Finished => "measuring",
    };
    println!(
        "{:>7.1} s  {phase:<9} {iops:>12.2} IOPS {mib_s:>10.2} MiB/s {fail_s:>9.2} fail/s   p99 {p99_us:>10.2} us",
        elapsed.as_secs_f64()
    );
}

/// Runs in this process: own reactors, own graph.
fn run_local(args: &PerfArgs) -> Result<Report, Failure> {
    let cores = match &args.cpumask {
        Some(mask) => reactor::cpuset::parse_cpumask(mask).map_err(|e| Failure::Usage(e.to_string()))?,
        // bdevperf's default mask is one core.
        None => {
            reactor::cpuset::allowed_cores().map_err(|e| Failure::Run(e.to_string()))?.into_iter().take(1).collect()
        }
    };
    // Polling, like bdevperf: the reactors measure the device, not wake-ups.
    let options = ReactorOptions { poll_mode: PollMode::Poll, ..Default::default() };
    let mut reactors = Reactors::start(&cores, true, options).map_err(|e| Failure::Run(e.to_string()))?;
    let registry = rpc::methods::registry();
    let mut ctl = Control::new(reactors.handles().to_vec(), Arc::new(EventBus::new()), crate::serve::server_info());
    let result = (|| {
        let node_name = open_nodes(args, &mut ctl, &registry)?;
        let node = ctl.graph.get(&node_name).map_err(|e| Failure::Run(e.to_string()))?;
        let mut run = ::perf::start(&node, reactors.handles(), &perf_options(args))?;
        drop(node);
        let interrupted = watch_interrupt()?;
        let live = live_output(args);
        let mut next_tick = Instant::now() + LIVE_INTERVAL;
        let mut stopping = false;
        while !run.wait_timeout(next_tick.saturating_duration_since(Instant::now()).min(INTERRUPT_POLL_INTERVAL)) {
            if !stopping && interrupted.load(Ordering::Relaxed) {
                // Like bdevperf on ^C: end the jobs, report what was measured.
                run.stop();
                stopping = true;
            }
            if Instant::now() >= next_tick {
                next_tick += LIVE_INTERVAL;
                let s = run.sample();
                if live {
                    print_live(s.elapsed, s.phase, s.iops, s.mib_s, s.fail_s, s.p99_us);
                }
            }
        }
        run.wait().map_err(Failure::from)
    })();
    ctl.stop_nbd();
    ctl.graph.close_all();
    reactors.stop();
    result
}

/// First ^C stops the run (results still print); a second one exits at once.
fn watch_interrupt() -> Result<Arc<AtomicBool>, Failure> {
    let flag = Arc::new(AtomicBool::new(false));
    let install = || -> std::io::Result<()> {
        signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&flag))?;
        Ok(())
    };
    install().map_err(|e| Failure::Run(format!("installing the SIGINT handler failed: {e}")))?;
    Ok(flag)
}

/// Opens `--device` or the nodes of `--config`; returns the node to run on.
fn open_nodes(args: &PerfArgs, ctl: &mut Control, registry: &rpc::Registry<Control>) -> Result<String, Failure> {
    if let Some(text) = &args.device {
        let mut opts: Value =
            serde_json::from_str(text).map_err(|e| Failure::Usage(format!("--device is not valid JSON: {e}")))?;
        let Some(map) = opts.as_object_mut() else {
            return Err(Failure::Usage("--device must be a JSON object of blockdev-add options".into()));
        };
        let name = match map.get("node-name") {
            None => {
                map.insert("node-name".into(), json!(DEFAULT_NODE_NAME));
                DEFAULT_NODE_NAME.to_string()
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Failure::Usage("--device: 'node-name' must be a string".into())),
        };
        registry
            .call(ctl, "blockdev-add", Some(opts))
            .map_err(|e| Failure::Run(format!("cannot open the device: {e}")))?;
        return Ok(name);
    }
    let Some(path) = &args.config else {
        return Err(Failure::Usage("give the device: --device JSON, --config FILE or --socket PATH".into()));
    };
    let last = replay_config(path, ctl, registry)?;
    match (&args.node, last) {
        (Some(n), _) => Ok(n.clone()),
        (None, Some(last)) => Ok(last),
        (None, None) => Err(Failure::Usage(format!("config '{}' adds no node", path.display()))),
    }
}

/// Runs a configuration file's entries as `serve --config` does; returns
/// the name of the last node added.
fn replay_config(path: &Path, ctl: &mut Control, registry: &rpc::Registry<Control>) -> Result<Option<String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read config '{}': {e}", path.display())))?;
    let entries: Vec<Value> = match serde_json::from_str(&text) {
        Ok(Value::Array(a)) => a,
        Ok(_) => {
            return Err(Failure::Usage(format!(
                "config '{}' must be a JSON list of {{\"method\", \"params\"}} objects",
                path.display()
            )));
        }
        Err(e) => return Err(Failure::Usage(format!("config '{}' is not valid JSON: {e}", path.display()))),
    };
    let mut last = None;
    for (i, entry) in entries.iter().enumerate() {
        let n = i + 1;
        let Some(method) = entry.get("method").and_then(Value::as_str) else {
            return Err(Failure::Usage(format!("config entry {n}: 'method' must be a string")));
        };
        let params = entry.get("params").cloned();
        if method == "blockdev-add" {
            last = params.as_ref().and_then(|p| p.get("node-name")).and_then(Value::as_str).map(str::to_string);
        }
        registry.call(ctl, method, params).map_err(|e| Failure::Run(format!("config entry {n} ({method}): {e}")))?;
    }
    Ok(last)
}

/// Runs inside a daemon through `perf_start` and `perf_results`.
fn run_remote(args: &PerfArgs) -> Result<Report, Failure> {
    let socket = args.socket.as_deref().expect("run_remote needs --socket");
    let node = args.node.as_deref().expect("clap requires --node with --socket");
    let connect = || Client::connect(socket, RPC_TIMEOUT).map_err(|e| Failure::Run(e.to_string()));
    let mut client = connect()?;
    let mut params = json!({
        "node-name": node,
        "workload": args.workload.name(),
        "queue_depth": args.queue_depth,
        "io_size": args.io_size,
        "time_in_sec": args.time.as_secs_f64(),
        "offset": args.offset,
        "seed": args.seed,
        "prefill": args.prefill,
        "shared_range": args.shared_range,
        "stop_on_error": args.stop_on_error,
    });
    if !args.warmup.is_zero() {
        params["warmup_time_in_sec"] = json!(args.warmup.as_secs_f64());
    }
    if let Some(p) = args.rw_mix {
        params["rw_percentage"] = json!(p);
    }
    if let Some(m) = &args.cpumask {
        params["cpumask"] = json!(m);
    }
    if let Some(s) = args.size {
        params["size"] = json!(s);
    }
    let started = client.call("perf_start", Some(params)).map_err(|e| match e {
        // The daemon refused the options: a usage error, worded by the daemon.
        ClientError::Rpc { code: -32602, message, .. } => Failure::Usage(message),
        e => Failure::Run(format!("perf_start: {e}")),
    })?;
    let id = started
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| Failure::Run(format!("perf_start answered {started}")))?;
    let live = live_output(args);
    let mut last: Option<(Instant, u64, u64, u64)> = None;
    let mut next_tick = Instant::now() + LIVE_INTERVAL;
    let query = json!({"id": id, "histogram": args.histogram.is_some()});
    loop {
        let v =
            client.call("perf_results", Some(query.clone())).map_err(|e| Failure::Run(format!("perf_results: {e}")))?;
        match v.get("status").and_then(Value::as_str) {
            Some("finished") => {
                let mut report: Report = serde_json::from_value(v.clone())
                    .map_err(|e| Failure::Run(format!("perf_results answered an unreadable report: {e}")))?;
                if let Some(b) = v.get("histogram_ns") {
                    let buckets: Vec<[u64; 2]> = serde_json::from_value(b.clone())
                        .map_err(|e| Failure::Run(format!("perf_results answered an unreadable histogram: {e}")))?;
                    report.histogram = Some(::perf::histogram_from_buckets(&buckets));
                }
                return Ok(report);
            }
            Some("failed") => {
                let msg = v.get("error").and_then(Value::as_str).unwrap_or("the run failed");
                return Err(Failure::Run(msg.to_string()));
            }
            Some("running") => {}
            _ => return Err(Failure::Run(format!("perf_results answered {v}"))),
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick += LIVE_INTERVAL;
            let get = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (ios, bytes, failures) = (get("ios"), get("bytes"), get("failures"));
            if live && let Some((then, ios0, bytes0, fail0)) = last {
                let secs = now.duration_since(then).as_secs_f64().max(f64::MIN_POSITIVE);
                let phase = serde_json::from_value(v["phase"].clone()).unwrap_or(Phase::Measuring);
                print_live(
                    Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0)),
                    phase,
                    ios.saturating_sub(ios0) as f64 / secs,
                    bytes.saturating_sub(bytes0) as f64 / (1u64 << 20) as f64 / secs,
                    failures.saturating_sub(fail0) as f64 / secs,
                    v["p99_us"].as_f64().unwrap_or(0.0),
                );
            }
            last = Some((now, ios, bytes, failures));
        }
        std::thread::sleep(RESULTS_POLL_INTERVAL);
    }
}

/// Prints the report (table or JSON) and writes the histogram file.
fn output(args: &PerfArgs, report: &Report) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        serde_json::to_string_pretty(report).map_err(|e| e.to_string())? + "\n"
    } else {
        format_table(report)
    };
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| format!("writing the results: {e}"))?;
    if let Some(path) = &args.histogram {
        let h = report.histogram.as_ref().ok_or("the results carry no histogram")?;
        let mut text = Vec::new();
        ::perf::write_percentile_distribution(h, &mut text).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing '{}': {e}", path.display()))?;
    }
    Ok(())
}

/// Width of the job-describing columns (job, core, workload, depth, I/O size).
const TABLE_KEY_WIDTH: usize = 40;
/// Width of the rate columns (runtime, IOPS, MiB/s, Fail/s).
const TABLE_RATE_WIDTH: usize = 45;
/// Width of each latency column.
const TABLE_LATENCY_WIDTH: usize = 10;
const TABLE_LATENCY_COLUMNS: [&str; 8] = ["avg", "min", "max", "p50", "p90", "p99", "p99.9", "p99.99"];

/// bdevperf's table: one row per job, then the total; latency in µs.
pub fn format_table(r: &Report) -> String {
    use std::fmt::Write as _;
    fn key(s: &mut String, job: &str, core: &str, workload: &str, depth: &str, io_size: &str) {
        let _ = write!(s, "{job:<6}{core:>5}  {workload:<12} {depth:>5} {io_size:>8}");
    }
    fn stats(s: &mut String, st: &Stats) {
        let l = &st.latency_us;
        let _ = write!(s, " {:>10.2} {:>12.2} {:>10.2} {:>9.2}", st.runtime_s, st.iops, st.mib_s, st.fail_s);
        for v in [l.avg, l.min, l.max, l.p50, l.p90, l.p99, l.p99_9, l.p99_99] {
            let _ = write!(s, " {v:>w$.2}", w = TABLE_LATENCY_WIDTH - 1);
        }
        s.push('\n');
    }
    let latency_width = TABLE_LATENCY_WIDTH * TABLE_LATENCY_COLUMNS.len();
    let mut s = String::new();
    let _ = writeln!(s, "Node: {}", r.node);
    let title = format!("{:w$}{:^latency_width$}", "", "Latency(us)", w = TABLE_KEY_WIDTH + TABLE_RATE_WIDTH);
    let _ = writeln!(s, "{}", title.trim_end());
    let mut header = String::new();
    key(&mut header, "Job", "Core", "Workload", "Depth", "IO size");
    let _ = write!(header, " {:>10} {:>12} {:>10} {:>9}", "runtime(s)", "IOPS", "MiB/s", "Fail/s");
    for c in TABLE_LATENCY_COLUMNS {
        let _ = write!(header, " {c:>w$}", w = TABLE_LATENCY_WIDTH - 1);
    }
    let _ = writeln!(s, "{header}");
    for j in &r.jobs {
        let core = j.core.map_or("-".to_string(), |c| c.to_string());
        key(&mut s, &j.job.to_string(), &core, j.workload.name(), &j.queue_depth.to_string(), &j.io_size.to_string());
        stats(&mut s, &j.stats);
    }
    let _ = writeln!(s, "{}", "=".repeat(header.len()));
    key(&mut s, "Total", "", "", "", "");
    stats(&mut s, &r.total);
    for j in &r.jobs {
        if let Some(e) = &j.first_error {
            let _ = writeln!(s, "job {}: {} failed requests; first error: {e}", j.job, j.stats.failures);
        }
        if let Some(off) = j.first_mismatch_offset {
            let _ = writeln!(s, "job {}: verify read back wrong data; first wrong byte at offset {off}", j.job);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn table_has_a_row_per_job_and_a_total() {
        let job = |i: usize| ::perf::JobResult {
            job: i,
            core: Some(i),
            workload: Workload::RandRead,
            queue_depth: 32,
            io_size: 4096,
            offset: 0,
            size: 1 << 20,
            stats: Stats { runtime_s: 1.0, ios: 100, iops: 100.0, ..Default::default() },
            first_error: (i == 1).then(|| "Input/output error".to_string()),
            first_mismatch_offset: None,
        };
        let r = Report {
            node: "n0".into(),
            jobs: vec![job(0), job(1)],
            total: Stats { runtime_s: 1.0, ios: 200, iops: 200.0, ..Default::default() },
            histogram: None,
        };
        let t = format_table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "Node: n0");
        assert!(lines[1].contains("Latency(us)"));
        for col in ["Core", "Workload", "Depth", "IO size", "runtime(s)", "IOPS", "MiB/s", "Fail/s", "p99.99"] {
            assert!(lines[2].contains(col), "{col} missing: {}", lines[2]);
        }
        assert!(
            lines[3].starts_with("0         0  randread        32     4096       1.00       100.00"),
            "{}",
            lines[3]
        );
        assert!(lines[5].starts_with("====="));
        assert!(lines[6].starts_with("Total") && lines[6].contains("200.00"));
        assert_eq!(lines[7], "job 1: 0 failed requests; first error: Input/output error");
        // Every data row lines up with the header.
        assert_eq!(lines[2].len(), lines[3].len());
        assert_eq!(lines[3].len(), lines[6].len());
    }
}
