//! `spindle perf`: in-process runs on null-co and malloc, verify, bad
//! options, a failed open, a --config file, and the same run inside a
//! daemon through perf_start / perf_results. Counts only, never timings.

mod support;

use std::process::{Command, Output};

use serde_json::{Value, json};
use support::{BIN, Daemon};

fn perf(args: &[&str]) -> Output {
    Command::new(BIN).arg("perf").args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Runs `spindle perf ... --json`, expects success, returns the parsed results.
fn perf_json(args: &[&str]) -> Value {
    let out = perf(&[args, &["--json"]].concat());
    assert!(out.status.success(), "spindle perf {args:?} failed ({}):\n{}", out.status, stderr(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// What every finished result must satisfy.
fn check_results(v: &Value, jobs: usize) {
    let list = v["jobs"].as_array().unwrap();
    assert_eq!(list.len(), jobs, "{v:#}");
    let total = &v["total"];
    assert!(total["iops"].as_f64().unwrap() > 0.0, "{v:#}");
    assert!(total["ios"].as_u64().unwrap() > 0);
    assert_eq!(total["failures"], 0, "{v:#}");
    let sum: u64 = list.iter().map(|j| j["ios"].as_u64().unwrap()).sum();
    assert_eq!(total["ios"].as_u64().unwrap(), sum);
    let l = &total["latency_us"];
    let p = |k: &str| l[k].as_f64().unwrap();
    assert!(p("min") <= p("p50") && p("p50") <= p("p99") && p("p99") <= p("p99_99"), "{l}");
}

#[test]
fn null_randread_prints_json() {
    let v = perf_json(&["--device", r#"{"driver":"null-co"}"#, "-q", "8", "-o", "4k", "-w", "randread", "-t", "1"]);
    check_results(&v, 1);
    assert_eq!(v["node"], "perf0");
    assert_eq!(v["jobs"][0]["workload"], "randread");
    assert_eq!(v["jobs"][0]["io_size"], 4096);
    assert_eq!(v["jobs"][0]["queue_depth"], 8);
}

#[test]
fn verify_on_malloc_has_no_failures_and_writes_a_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let hgrm = dir.path().join("lat.hgrm");
    let device = r#"{"driver":"malloc","node-name":"m0","size":16777216}"#;
    let args = ["--device", device, "-q", "16", "-o", "4k", "-w", "verify", "-t", "0.5", "--cpumask", "0x1"];
    let v = perf_json(&[&args[..], &["--histogram", hgrm.to_str().unwrap()]].concat());
    check_results(&v, 1);
    assert_eq!(v["node"], "m0");
    assert!(v["jobs"][0]["first_mismatch_offset"].is_null());
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"), "{text}");
    assert!(text.contains("#[Mean    =") && text.contains("#[Max     ="));
    assert!(text.contains(&format!("Total count    = {:>12}]", v["total"]["ios"].as_u64().unwrap())), "{text}");
}

#[test]
fn the_table_is_the_default_output() {
    let out = perf(&["--device", r#"{"driver":"null-co"}"#, "-q", "4", "-o", "512", "-w", "read", "-t", "0.3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Latency(us)") && text.contains("p99.99"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("Total")), "{text}");
    // Not a terminal: no live lines, the table comes alone.
    assert!(!text.contains("measuring"), "{text}");
}

#[test]
fn bad_options_exit_non_zero_with_a_message() {
    let null = r#"{"driver":"null-co"}"#;
    let out = perf(&["--device", null, "-q", "8", "-o", "4k", "-w", "randomread", "-t", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("'randomread'") && err.contains("randread"), "{err}");
    assert!(out.stdout.is_empty());
    // The engine refuses what clap cannot see: a mix without its percentage.
    let out = perf(&["--device", null, "-q", "8", "-o", "4k", "-w", "randrw", "-t", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("read percentage"), "{}", stderr(&out));
    let out = perf(&["--device", null, "-q", "8", "-o", "4x", "-w", "read", "-t", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a size"), "{}", stderr(&out));
    let out = perf(&["-q", "8", "-o", "4k", "-w", "read", "-t", "1"]);
    assert_eq!(out.status.code(), Some(2), "no device given");
}

#[test]
fn a_device_that_does_not_open_is_a_clear_error() {
    let out = perf(&[
        "--device",
        r#"{"driver":"file","filename":"/nonexistent/disk.img"}"#,
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot open the device") && err.contains("/nonexistent/disk.img"), "{err}");
}

#[test]
fn config_file_picks_the_last_node() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodes.json");
    let entries = json!([
        {"method": "blockdev-add", "params": {"driver": "null-co", "node-name": "first"}},
        {"method": "blockdev-add", "params": {"driver": "malloc", "node-name": "second", "size": 8388608}},
    ]);
    std::fs::write(&cfg, entries.to_string()).unwrap();
    let base = ["--config", cfg.to_str().unwrap(), "-q", "4", "-o", "4k", "-w", "randwrite", "-t", "0.3"];
    let v = perf_json(&base);
    check_results(&v, 1);
    assert_eq!(v["node"], "second");
    let v = perf_json(&[&base[..], &["--node", "first"]].concat());
    assert_eq!(v["node"], "first");
}

#[test]
fn runs_inside_a_daemon() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m0", "size": 16 << 20}));
    let hgrm = d.path("remote.hgrm");
    let sock = d.rpc.to_str().unwrap();
    let v = perf_json(&[
        "--socket",
        sock,
        "--node",
        "m0",
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "1",
        "--histogram",
        hgrm.to_str().unwrap(),
    ]);
    let reactors = d.ok("framework_get_reactors", json!(null))["reactors"].as_array().unwrap().len();
    check_results(&v, reactors);
    assert_eq!(v["node"], "m0");
    assert!(v.get("status").is_none() && v.get("histogram_ns").is_none(), "only the report is printed");
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.contains(&format!("Total count    = {:>12}]", v["total"]["ios"].as_u64().unwrap())), "{text}");

    // The finished run can be fetched again, by the id perf_start gave (the first run: 1).
    let again = d.ok("perf_results", json!({"id": 1}));
    assert_eq!(again["status"], "finished");
    assert_eq!(again["total"]["ios"], v["total"]["ios"]);
    let (code, msg, _) = d.err("perf_results", json!({"id": 99}));
    assert_eq!((code, msg.as_str()), (-19, "No perf run with id 99"));

    // perf_start answers at once; the node is busy until the run ends.
    let started = d.ok(
        "perf_start",
        json!({"node-name": "m0", "workload": "verify", "queue_depth": 4, "io_size": 4096, "time_in_sec": 0.5, "cpumask": "0x1"}),
    );
    let id = started["id"].as_u64().unwrap();
    assert_eq!(id, 2);
    let (code, _, _) = d.err(
        "perf_start",
        json!({"node-name": "m0", "workload": "read", "queue_depth": 1, "io_size": 4096, "time_in_sec": 1}),
    );
    assert_eq!(code, -16, "one run at a time");
    let (code, msg, _) = d.err("blockdev-del", json!({"node-name": "m0"}));
    assert_eq!(code, -16, "{msg}");
    let done = loop {
        let r = d.ok("perf_results", json!({"id": id}));
        if r["status"] != "running" {
            break r;
        }
        assert!(r["ios"].is_u64() && r["phase"].is_string(), "{r}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(done["status"], "finished", "{done}");
    check_results(&done, 1);
    assert_eq!(d.err("perf_results", json!({"id": 1})).0, -19, "the older run is gone");
    d.ok("blockdev-del", json!({"node-name": "m0"}));

    // Bad parameters are refused in the project's words.
    let (code, msg, _) = d.err(
        "perf_start",
        json!({"node-name": "m0", "workload": "read", "queue_depth": 1, "io_size": 4096, "time_in_sec": 1}),
    );
    assert_eq!(code, -19, "{msg}");
    // A missing member is named before an unexpected one, as QEMU does.
    let (code, msg, _) = d.err("perf_start", json!({"node-name": "m0", "workload": "read", "bogus": 1}));
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'queue_depth' is missing"));
    let (code, msg, _) = d.err(
        "perf_start",
        json!({"node-name": "m0", "workload": "read", "queue_depth": 1, "io_size": 4096, "time_in_sec": 1, "bogus": 1}),
    );
    assert_eq!((code, msg.as_str()), (-32602, "Parameter 'bogus' is unexpected"));
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn quitting_mid_run_ends_the_jobs() {
    let d = Daemon::start();
    let img = d.path("disk.img");
    support::sparse_file(&img, 16 << 20);
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "f0", "filename": img}));
    d.ok(
        "perf_start",
        json!({"node-name": "f0", "workload": "randread", "queue_depth": 8, "io_size": 4096, "time_in_sec": 600}),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(d.ok("perf_results", json!({"id": 1}))["status"], "running");
    d.ok("quit", json!(null));
    let mut d = d;
    assert_eq!(d.wait_exit().code(), Some(0));
    // The jobs saw their reactors go and stopped resubmitting.
    let log = d.log_text();
    assert!(!log.contains("still in flight"), "{log}");
}
