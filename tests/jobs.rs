//! Block jobs end to end: mirror, commit and stream on qcow2 chains made by
//! qemu-img, with clients writing over NBD meanwhile; results checked with
//! qemu-img compare/check/info and qemu-io pattern reads. Modelled on the
//! cases of QEMU's iotests 030 (stream), 040 (commit) and 041 (mirror).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Daemon, Qmp, run};

const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands on a qcow2 image (reads share it with the daemon).
fn qio(img: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    if cmds.iter().all(|c| c.starts_with("read")) {
        c.args(["-r", "-U"]);
    }
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(img));
    assert!(
        !out.contains("fail") && !out.contains("error") && !out.contains("Pattern verification"),
        "{cmds:?}: {out}"
    );
    out
}

/// qemu-io on the daemon's NBD export `name`.
fn nbd_io(d: &Daemon, name: &str, cmds: &[&str]) -> String {
    let uri = format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display());
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    assert!(
        !out.contains("fail") && !out.contains("error") && !out.contains("Pattern verification"),
        "{cmds:?}: {out}"
    );
    out
}

fn create(d: &Daemon, name: &str, size: &str, backing: Option<&Path>) -> PathBuf {
    let p = d.path(name);
    support::qcow2_image(&p, size, backing);
    p
}

fn add_qcow2(d: &Daemon, node: &str, path: &Path) {
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node,
        "file": {"driver": "file", "filename": path}}),
    );
}

fn nbd_start(d: &Daemon) {
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
}

fn export(d: &Daemon, id: &str, node: &str) {
    d.ok("block-export-add", json!({"type": "nbd", "id": id, "node-name": node, "name": id, "writable": true}));
}

/// Removes an export once its clients are gone. A client that has just
/// disconnected may not have been noticed by the server yet, and a safe
/// `block-export-del` refuses an export in use (as QEMU's does): retry.
fn unexport(d: &Daemon, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match d.call("block-export-del", json!({"id": id})) {
            Ok(_) => return,
            Err(e) if e.to_string().contains("still in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("block-export-del {id}: {e}\n{}", d.log_text()),
        }
    }
}

/// The statuses of JOB_STATUS_CHANGE events for `id`, in order.
fn statuses(events: &[Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect()
}

/// Reads events until `name` (for job `id`) arrives; returns every event
/// read on the way, that one included.
fn until(q: &mut Qmp, name: &str, id: &str) -> Vec<Value> {
    let mut seen = std::mem::take(&mut q.events);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) =
            seen.iter().position(|e| e["event"] == name && (e["data"]["device"] == id || e["data"]["id"] == id))
        {
            q.events = seen.split_off(i + 1);
            return seen;
        }
        assert!(Instant::now() < deadline, "no {name} for {id}; saw {seen:?}");
        seen.push(q.read_value());
    }
}

fn exec_ok(q: &mut Qmp, cmd: &str, args: Value) {
    let r = q.execute(cmd, Some(args));
    assert_eq!(r.get("return"), Some(&json!({})), "{cmd}: {r}");
}

fn exec_err(q: &mut Qmp, cmd: &str, args: Value) -> String {
    let r = q.execute(cmd, Some(args));
    r["error"]["desc"].as_str().unwrap_or_else(|| panic!("{cmd} should fail: {r}")).to_string()
}

#[test]
fn mirror_full_converges_pivots_an_nbd_user_and_matches_qemu_img_compare() {
    let d = Daemon::start();
    let src = create(&d, "src.qcow2", "64M", None);
    qio(&src, &["write -P 0x11 0 8M", "write -P 0x22 32M 4M", "write -z 40M 1M"]);
    let tgt = create(&d, "tgt.qcow2", "64M", None);
    add_qcow2(&d, "src", &src);
    add_qcow2(&d, "tgt", &tgt);
    nbd_start(&d);
    export(&d, "disk", "src");
    let mut q = Qmp::negotiated(&d.qmp);

    exec_ok(&mut q, "blockdev-mirror", json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}));
    let before = until(&mut q, "BLOCK_JOB_READY", "m0");
    let ready = before.last().unwrap();
    assert_eq!(ready["data"]["type"], "mirror");
    assert_eq!(ready["data"]["len"], ready["data"]["offset"]);
    // The job is READY and keeps the target in sync with new writes.
    nbd_io(&d, "disk", &["write -P 0x33 4M 1M", "write -P 0x44 60M 64k"]);
    let jobs = d.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    assert_eq!(jobs[0]["status"], "ready");
    assert_eq!(d.ok("query-jobs", json!({}))[0]["type"], "mirror");
    // The target is now in use by the job: not deletable, not exportable writable.
    let (_, msg, _) = d.err("blockdev-del", json!({"node-name": "tgt"}));
    assert!(msg.contains("in use"), "{msg}");
    let (_, msg, _) =
        d.err("block-export-add", json!({"type": "nbd", "id": "t", "node-name": "tgt", "writable": true}));
    assert!(msg.contains("tgt"), "{msg}");

    exec_ok(&mut q, "job-complete", json!({"id": "m0"}));
    let mut events = before;
    events.extend(until(&mut q, "BLOCK_JOB_COMPLETED", "m0"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m0"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m0"));
    assert_eq!(statuses(&events, "m0"), ["created", "running", "ready", "waiting", "pending", "concluded", "null"]);
    assert!(d.ok("query-jobs", json!({})).as_array().unwrap().is_empty());
    // The export now serves the target: a write lands there, not in the source.
    let exports = d.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "tgt", "{exports}");
    nbd_io(&d, "disk", &["write -P 0x55 16M 1M", "read -P 0x33 4M 1M", "read -P 0x11 0 4M"]);
    unexport(&d, "disk");
    d.ok("blockdev-del", json!({"node-name": "tgt"}));
    d.ok("blockdev-del", json!({"node-name": "src"}));
    qemu_img(&["check", "-q", tgt.to_str().unwrap()]);
    qemu_img(&["check", "-q", src.to_str().unwrap()]);
    qio(&tgt, &["read -P 0x11 0 4M", "read -P 0x33 4M 1M", "read -P 0x11 5M 3M", "read -P 0x55 16M 1M"]);
    qio(&tgt, &["read -P 0x22 32M 4M", "read -P 0 40M 1M", "read -P 0x44 60M 64k"]);
    qio(&src, &["read -P 0 16M 1M"]);
    // Apart from the write after the pivot, both are the same disk.
    qio(&src, &["write -P 0x55 16M 1M"]);
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    d.stop();
}

/// base ← mid ← top, each layer holding its own pattern, added as named
/// nodes (base and mid read-only, as backing files are).
fn chain3(d: &Daemon) -> (PathBuf, PathBuf, PathBuf) {
    let base = create(d, "base.qcow2", "16M", None);
    qio(&base, &["write -P 0x11 0 16M"]);
    let mid = create(d, "mid.qcow2", "16M", Some(&base));
    qio(&mid, &["write -P 0x22 1M 1M", "write -z 6M 1M"]);
    let top = create(d, "top.qcow2", "16M", Some(&mid));
    qio(&top, &["write -P 0x33 2M 1M"]);
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
        "file": {"driver": "file", "filename": base, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
        "file": {"driver": "file", "filename": mid, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
        "file": {"driver": "file", "filename": top}}),
    );
    (base, mid, top)
}

/// What `qemu-img info --backing-chain` lists, as file names.
fn backing_chain(img: &Path) -> Vec<String> {
    let out = qemu_img(&["info", "--output=json", "--backing-chain", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().map(|i| i["filename"].as_str().unwrap().to_string()).collect()
}

fn node_names(d: &Daemon) -> Vec<String> {
    d.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn intermediate_commit_merges_mid_into_base_and_repoints_top() {
    let mut d = Daemon::start();
    let (base, _mid, top) = chain3(&d);
    nbd_start(&d);
    export(&d, "disk", "top");
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(&mut q, "block-commit", json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base"}));
    // A client keeps writing to the active layer meanwhile.
    nbd_io(&d, "disk", &["write -P 0x44 3M 64k", "read -P 0x22 1M 1M"]);
    let events = until(&mut q, "BLOCK_JOB_COMPLETED", "c0");
    let completed = events.last().unwrap();
    assert_eq!(completed["data"]["type"], "commit");
    assert!(completed["data"].get("error").is_none(), "{completed}");
    assert_eq!(completed["data"]["len"], json!(16 * MIB));
    let mut events = events;
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "c0"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "c0"));
    assert_eq!(statuses(&events, "c0"), ["created", "running", "waiting", "pending", "concluded", "null"]);
    nbd_io(&d, "disk", &["read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M", "read -P 0x44 3M 64k"]);
    nbd_io(&d, "disk", &["read -P 0 6M 1M", "read -P 0x11 7M 9M"]);
    d.shutdown();
    assert_eq!(backing_chain(&top), [top.to_str().unwrap(), base.to_str().unwrap()]);
    qemu_img(&["check", "-q", base.to_str().unwrap()]);
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    qio(&base, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x11 2M 4M", "read -P 0 6M 1M"]);
    qio(&top, &["read -P 0x33 2M 1M", "read -P 0x22 1M 1M", "read -P 0x44 3M 64k"]);
}

#[test]
fn active_commit_is_ready_then_pivots_the_export_to_base() {
    let mut d = Daemon::start();
    let (base, mid, top) = chain3(&d);
    nbd_start(&d);
    export(&d, "disk", "top");
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(&mut q, "block-commit", json!({"job-id": "c1", "device": "top"}));
    let events = until(&mut q, "BLOCK_JOB_READY", "c1");
    assert_eq!(events.last().unwrap()["data"]["type"], "commit");
    nbd_io(&d, "disk", &["write -P 0x55 8M 1M"]);
    // Completing a job that is not ready, or an unknown one, fails clearly.
    assert_eq!(exec_err(&mut q, "job-complete", json!({"id": "nope"})), "Job not found");
    let r = q.execute("block-job-complete", Some(json!({"device": "nope"})));
    assert_eq!(r["error"]["class"], "DeviceNotActive", "{r}");
    exec_ok(&mut q, "block-job-complete", json!({"device": "c1"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "c1");
    let exports = d.ok("query-block-exports", json!({}));
    let root = exports[0]["node-name"].as_str().unwrap().to_string();
    assert_ne!(root, "top", "the export moved to the base: {exports}");
    nbd_io(&d, "disk", &["write -P 0x66 9M 1M", "read -P 0x33 2M 1M", "read -P 0x22 1M 1M", "read -P 0x55 8M 1M"]);
    unexport(&d, "disk");
    d.shutdown();
    qemu_img(&["check", "-q", base.to_str().unwrap()]);
    qio(&base, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M", "read -P 0x11 3M 3M"]);
    qio(&base, &["read -P 0 6M 1M", "read -P 0x55 8M 1M", "read -P 0x66 9M 1M"]);
    // The committed layers are left as they were.
    qio(&mid, &["read -P 0x22 1M 1M"]);
    qio(&top, &["read -P 0x33 2M 1M"]);
}

#[test]
fn stream_pulls_the_chain_into_top_under_client_writes() {
    let mut d = Daemon::start();
    let (base, _mid, top) = chain3(&d);
    nbd_start(&d);
    export(&d, "disk", "top");
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(&mut q, "block-stream", json!({"job-id": "s0", "device": "top", "base-node": "base"}));
    nbd_io(&d, "disk", &["write -P 0x77 1M 64k"]);
    let events = until(&mut q, "BLOCK_JOB_COMPLETED", "s0");
    assert!(events.last().unwrap()["data"].get("error").is_none());
    nbd_io(&d, "disk", &["read -P 0x77 1M 64k", "read -P 0x22 1088k 960k", "read -P 0x33 2M 1M", "read -P 0x11 0 1M"]);
    // Now without a base: everything comes up and the backing goes.
    exec_ok(&mut q, "block-stream", json!({"job-id": "s1", "device": "top"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "s1");
    assert!(!node_names(&d).is_empty());
    d.shutdown();
    assert_eq!(backing_chain(&top), [top.to_str().unwrap()]);
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    qio(&top, &["read -P 0x11 0 1M", "read -P 0x77 1M 64k", "read -P 0x22 1088k 960k", "read -P 0x33 2M 1M"]);
    qio(&top, &["read -P 0x11 3M 3M", "read -P 0 6M 1M", "read -P 0x11 7M 9M"]);
    qio(&base, &["read -P 0x11 0 16M"]);
}

/// A source with 32 MiB of data and an empty target of the same size, the
/// source exported writable as "disk".
fn mirror_pair(d: &Daemon) -> (PathBuf, PathBuf) {
    let src = create(d, "src.qcow2", "32M", None);
    qio(&src, &["write -P 0x5a 0 32M"]);
    let tgt = create(d, "tgt.qcow2", "32M", None);
    add_qcow2(d, "src", &src);
    add_qcow2(d, "tgt", &tgt);
    nbd_start(d);
    export(d, "disk", "src");
    (src, tgt)
}

/// A mirror slow enough to act on mid-way: 1 MiB/s, 1 MiB in flight.
fn slow_mirror(q: &mut Qmp, id: &str) {
    exec_ok(
        q,
        "blockdev-mirror",
        json!({"job-id": id, "device": "src", "target": "tgt", "sync": "full", "speed": MIB, "buf-size": MIB}),
    );
}

fn block_job(d: &Daemon, id: &str) -> Value {
    let jobs = d.ok("query-block-jobs", json!({}));
    jobs.as_array().unwrap().iter().find(|j| j["device"] == id).cloned().unwrap_or(Value::Null)
}

#[test]
fn cancelling_a_mirror_midway_keeps_the_source_in_use_and_untouched() {
    let mut d = Daemon::start();
    let (src, tgt) = mirror_pair(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    slow_mirror(&mut q, "m1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while block_job(&d, "m1")["offset"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the mirror makes no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let job = block_job(&d, "m1");
    assert!(job["offset"].as_u64().unwrap() < job["len"].as_u64().unwrap(), "{job}");
    assert_eq!(job["speed"], json!(MIB));
    nbd_io(&d, "disk", &["write -P 0x61 8M 64k"]);
    exec_ok(&mut q, "job-cancel", json!({"id": "m1"}));
    let mut events = until(&mut q, "BLOCK_JOB_CANCELLED", "m1");
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m1"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m1"));
    assert_eq!(statuses(&events, "m1"), ["created", "running", "aborting", "concluded", "null"]);
    assert_eq!(d.ok("query-block-exports", json!({}))[0]["node-name"], "src");
    nbd_io(&d, "disk", &["write -P 0x62 9M 64k", "read -P 0x61 8M 64k", "read -P 0x5a 0 8M"]);
    // The target is free again.
    d.ok("blockdev-del", json!({"node-name": "tgt"}));
    unexport(&d, "disk");
    d.shutdown();
    qemu_img(&["check", "-q", src.to_str().unwrap()]);
    qemu_img(&["check", "-q", tgt.to_str().unwrap()]);
    qio(&src, &["read -P 0x5a 0 8M", "read -P 0x61 8M 64k", "read -P 0x62 9M 64k", "read -P 0x5a 10M 22M"]);
}

#[test]
fn pause_resume_speed_and_a_soft_cancel_after_ready() {
    let mut d = Daemon::start();
    let (src, tgt) = mirror_pair(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    slow_mirror(&mut q, "m2");
    exec_ok(&mut q, "block-job-pause", json!({"device": "m2"}));
    let events = until(&mut q, "JOB_STATUS_CHANGE", "m2");
    let events: Vec<_> = events.into_iter().chain(until(&mut q, "JOB_STATUS_CHANGE", "m2")).collect();
    let events: Vec<_> = events.into_iter().chain(until(&mut q, "JOB_STATUS_CHANGE", "m2")).collect();
    assert_eq!(statuses(&events, "m2"), ["created", "running", "paused"]);
    let job = block_job(&d, "m2");
    assert_eq!(
        (job["paused"].clone(), job["status"].clone(), job["busy"].clone()),
        (json!(true), json!("paused"), json!(false))
    );
    assert_eq!(exec_err(&mut q, "job-pause", json!({"id": "m2"})), "Job is already paused");
    assert_eq!(
        exec_err(&mut q, "job-complete", json!({"id": "m2"})),
        "Job 'm2' in state 'paused' cannot accept command verb 'complete'"
    );
    assert_eq!(
        exec_err(&mut q, "job-finalize", json!({"id": "m2"})),
        "Job 'm2' in state 'paused' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        exec_err(&mut q, "block-job-cancel", json!({"device": "m2"})),
        "The block job for device 'm2' is currently paused"
    );
    assert_eq!(
        exec_err(&mut q, "block-job-set-speed", json!({"device": "m2", "speed": -1})),
        "Parameter 'speed' expects a non-negative value"
    );
    exec_ok(&mut q, "job-resume", json!({"id": "m2"}));
    let events = until(&mut q, "JOB_STATUS_CHANGE", "m2");
    assert_eq!(statuses(&events, "m2"), ["running"]);
    assert_eq!(exec_err(&mut q, "job-resume", json!({"id": "m2"})), "Can't resume a job that was not paused");
    // Lifting the limit lets it finish the copy.
    exec_ok(&mut q, "block-job-set-speed", json!({"device": "m2", "speed": 0}));
    until(&mut q, "BLOCK_JOB_READY", "m2");
    assert_eq!(block_job(&d, "m2")["speed"], json!(0));
    nbd_io(&d, "disk", &["write -P 0x63 1M 64k"]);
    // Soft cancel of a ready mirror: it finishes without pivoting.
    exec_ok(&mut q, "block-job-cancel", json!({"device": "m2"}));
    let mut events = until(&mut q, "BLOCK_JOB_COMPLETED", "m2");
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m2"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "m2"));
    assert_eq!(
        statuses(&events, "m2"),
        ["standby", "ready", "waiting", "pending", "concluded", "null"].map(String::from)[2..]
    );
    assert!(q.events.iter().all(|e| e["event"] != "BLOCK_JOB_CANCELLED"));
    assert_eq!(d.ok("query-block-exports", json!({}))[0]["node-name"], "src");
    unexport(&d, "disk");
    d.shutdown();
    // The target is a copy of the source as of the cancel.
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    qio(&tgt, &["read -P 0x63 1M 64k"]);
}

/// A job paused when the daemon stops is cancelled like any other: it
/// resumes, aborts and concludes, and the daemon exits cleanly (a
/// paused job used to refuse paused -> aborting and stay stuck).
#[test]
fn paused_and_standby_jobs_end_at_shutdown() {
    let mut d = Daemon::start();
    let _ = mirror_pair(&d);
    let small = create(&d, "small.qcow2", "1M", None);
    let small_tgt = create(&d, "small-tgt.qcow2", "1M", None);
    add_qcow2(&d, "small", &small);
    add_qcow2(&d, "small-tgt", &small_tgt);
    let mut q = Qmp::negotiated(&d.qmp);
    slow_mirror(&mut q, "p1");
    exec_ok(&mut q, "job-pause", json!({"id": "p1"}));
    exec_ok(
        &mut q,
        "blockdev-mirror",
        json!({"job-id": "p2", "device": "small", "target": "small-tgt", "sync": "full"}),
    );
    until(&mut q, "BLOCK_JOB_READY", "p2");
    exec_ok(&mut q, "job-pause", json!({"id": "p2"}));
    for (id, status) in [("p1", "paused"), ("p2", "standby")] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while block_job(&d, id)["status"] != status {
            assert!(Instant::now() < deadline, "{id} never became {status}");
            let _ = until(&mut q, "JOB_STATUS_CHANGE", id);
        }
    }
    d.shutdown();
    let log = d.log_text();
    assert!(!log.contains("illegal job status transition"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
}

#[test]
fn auto_finalize_and_auto_dismiss_off_wait_for_the_user() {
    let d = Daemon::start();
    chain3(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(
        &mut q,
        "block-stream",
        json!({"job-id": "s2", "device": "top", "base-node": "base", "auto-finalize": false, "auto-dismiss": false}),
    );
    let events = until(&mut q, "BLOCK_JOB_PENDING", "s2");
    assert_eq!(events.last().unwrap()["data"], json!({"type": "stream", "id": "s2"}));
    assert_eq!(d.ok("query-jobs", json!({}))[0]["status"], "pending");
    assert_eq!(
        exec_err(&mut q, "job-dismiss", json!({"id": "s2"})),
        "Job 's2' in state 'pending' cannot accept command verb 'dismiss'"
    );
    // The chain is unchanged until finalize.
    let top = d.ok("query-named-block-nodes", json!({}));
    let top = top.as_array().unwrap().iter().find(|n| n["node-name"] == "top").unwrap().clone();
    assert_eq!(
        top["children"].as_array().unwrap().iter().find(|c| c["child"] == "backing").unwrap()["node-name"],
        "mid"
    );
    exec_ok(&mut q, "job-finalize", json!({"id": "s2"}));
    let mut events = until(&mut q, "BLOCK_JOB_COMPLETED", "s2");
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "s2"));
    assert_eq!(statuses(&events, "s2"), ["concluded"]);
    let jobs = d.ok("query-jobs", json!({}));
    assert_eq!(
        jobs,
        json!([{"id": "s2", "type": "stream", "status": "concluded",
        "current-progress": 16 * MIB, "total-progress": 16 * MIB}])
    );
    // A concluded job keeps its id until dismissed.
    assert_eq!(
        exec_err(&mut q, "block-stream", json!({"job-id": "s2", "device": "top"})),
        "Job ID 's2' already in use"
    );
    exec_ok(&mut q, "job-dismiss", json!({"id": "s2"}));
    let events = until(&mut q, "JOB_STATUS_CHANGE", "s2");
    assert_eq!(statuses(&events, "s2"), ["null"]);
    assert_eq!(d.ok("query-jobs", json!({})), json!([]));
    d.stop();
}

#[test]
fn bad_job_arguments_get_qemus_errors_and_change_nothing() {
    let d = Daemon::start();
    let _ = mirror_pair(&d);
    let small = create(&d, "small.qcow2", "1M", None);
    add_qcow2(&d, "small", &small);
    let mut q = Qmp::negotiated(&d.qmp);
    let m = |extra: Value| {
        let mut a = json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    let mut no_id = m(json!({}));
    no_id.as_object_mut().unwrap().remove("job-id");
    assert_eq!(exec_err(&mut q, "blockdev-mirror", no_id), "An explicit job ID is required");
    assert_eq!(exec_err(&mut q, "blockdev-mirror", m(json!({"job-id": "1x"}))), "Invalid job ID '1x'");
    assert_eq!(
        exec_err(&mut q, "blockdev-mirror", m(json!({"granularity": 3000}))),
        "Parameter 'granularity' expects a power of 2"
    );
    assert_eq!(
        exec_err(&mut q, "blockdev-mirror", m(json!({"target": "small"}))),
        "Source and target image have different sizes"
    );
    assert_eq!(exec_err(&mut q, "blockdev-mirror", m(json!({"target": "src"}))), "Can't mirror node into itself");
    assert!(exec_err(&mut q, "blockdev-mirror", m(json!({"sync": "sideways"}))).contains("sync"));
    assert!(exec_err(&mut q, "blockdev-mirror", m(json!({"target": "nope"}))).contains("nope"));
    assert_eq!(
        exec_err(&mut q, "blockdev-mirror", m(json!({"speed": -5}))),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(exec_err(&mut q, "job-pause", json!({"id": "m"})), "Job not found");
    let r = q.execute("block-job-pause", Some(json!({"device": "m"})));
    assert_eq!(
        (r["error"]["class"].as_str(), r["error"]["desc"].as_str()),
        (Some("DeviceNotActive"), Some("Block job 'm' not found"))
    );
    // A node in use by a job cannot start another one.
    slow_mirror(&mut q, "busy");
    // As in QEMU, the source is behind the job's filter now, no root any more.
    assert_eq!(
        exec_err(
            &mut q,
            "blockdev-mirror",
            json!({"job-id": "m3", "device": "src", "target": "small", "sync": "full"})
        ),
        "Need a root block node"
    );
    assert_eq!(
        exec_err(&mut q, "block-stream", json!({"job-id": "s3", "device": "tgt"})),
        "Node 'tgt' is busy: block device is in use by block job: mirror"
    );
    assert_eq!(
        exec_err(&mut q, "block-stream", json!({"job-id": "busy", "device": "small"})),
        "Job ID 'busy' already in use"
    );
    exec_ok(&mut q, "job-cancel", json!({"id": "busy"}));
    until(&mut q, "BLOCK_JOB_CANCELLED", "busy");
    // Nothing was left behind: no jobs, no filter nodes.
    assert_eq!(d.ok("query-jobs", json!({})), json!([]));
    let mut names = node_names(&d);
    names.retain(|n| !n.starts_with('#'));
    names.sort();
    assert_eq!(names, ["small", "src", "tgt"]);
    assert!(d.ok("query-named-block-nodes", json!({})).as_array().unwrap().iter().all(|n| n["drv"] != "mirror_top"));
    d.stop();
}

/// A mirror pair whose target sits under a blkdebug node ("dbg") that
/// fails the first target write with `errno` (every write if not `once`).
fn failing_target(d: &Daemon, errno: i32, once: bool) -> (PathBuf, PathBuf) {
    let src = create(d, "src.qcow2", "8M", None);
    qio(&src, &["write -P 0x5a 0 8M"]);
    let tgt = create(d, "tgt.qcow2", "8M", None);
    add_qcow2(d, "src", &src);
    add_qcow2(d, "tgt", &tgt);
    d.ok("blockdev-add", json!({"driver": "blkdebug", "node-name": "dbg", "image": "tgt"}));
    d.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "dbg",
        "inject-error": [{"event": "write_aio", "errno": errno, "once": once}]}),
    );
    nbd_start(d);
    export(d, "disk", "src");
    (src, tgt)
}

fn mirror_to_dbg(q: &mut Qmp, id: &str, policy: &str) {
    exec_ok(
        q,
        "blockdev-mirror",
        json!({"job-id": id, "device": "src", "target": "dbg", "sync": "full",
        "on-target-error": policy}),
    );
}

#[test]
fn on_target_error_stop_pauses_with_the_error_and_resume_retries() {
    for (errno, policy, io_status) in [(5, "stop", "failed"), (28, "enospc", "nospace")] {
        let mut d = Daemon::start();
        let (src, tgt) = failing_target(&d, errno, true);
        let mut q = Qmp::negotiated(&d.qmp);
        mirror_to_dbg(&mut q, "e1", policy);
        let events = until(&mut q, "BLOCK_JOB_ERROR", "e1");
        assert_eq!(events.last().unwrap()["data"], json!({"device": "e1", "operation": "write", "action": "stop"}));
        let events = until(&mut q, "JOB_STATUS_CHANGE", "e1");
        assert_eq!(statuses(&events, "e1"), ["paused"], "{policy}");
        let job = block_job(&d, "e1");
        assert_eq!((job["io-status"].as_str(), job["paused"].as_bool()), (Some(io_status), Some(true)), "{job}");
        exec_ok(&mut q, "block-job-resume", json!({"device": "e1"}));
        until(&mut q, "BLOCK_JOB_READY", "e1");
        assert_eq!(block_job(&d, "e1")["io-status"], "ok");
        exec_ok(&mut q, "job-complete", json!({"id": "e1"}));
        until(&mut q, "BLOCK_JOB_COMPLETED", "e1");
        unexport(&d, "disk");
        d.shutdown();
        qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    }
}

#[test]
fn on_target_error_ignore_retries_and_report_fails_the_job() {
    let mut d = Daemon::start();
    let (src, tgt) = failing_target(&d, 5, true);
    let mut q = Qmp::negotiated(&d.qmp);
    mirror_to_dbg(&mut q, "e2", "ignore");
    let events = until(&mut q, "BLOCK_JOB_ERROR", "e2");
    assert_eq!(events.last().unwrap()["data"]["action"], "ignore");
    until(&mut q, "BLOCK_JOB_READY", "e2");
    exec_ok(&mut q, "job-complete", json!({"id": "e2"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "e2");
    unexport(&d, "disk");
    d.shutdown();
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);

    let d = Daemon::start();
    failing_target(&d, 5, false);
    let mut q = Qmp::negotiated(&d.qmp);
    mirror_to_dbg(&mut q, "e3", "report");
    let events = until(&mut q, "BLOCK_JOB_ERROR", "e3");
    assert_eq!(events.last().unwrap()["data"]["action"], "report");
    let mut events = until(&mut q, "BLOCK_JOB_COMPLETED", "e3");
    assert_eq!(events.last().unwrap()["data"]["error"], "Input/output error");
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "e3"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "e3"));
    let st = statuses(&events, "e3");
    assert_eq!(st[st.len() - 3..], ["aborting", "concluded", "null"]);
    assert_eq!(d.ok("query-block-exports", json!({}))[0]["node-name"], "src");
    nbd_io(&d, "disk", &["read -P 0x5a 0 8M"]);
    d.stop();
}

/// base (0x11 throughout) <- mid <- top, all qcow2 nodes, with mid's file
/// behind a blkdebug node `mid-dbg` for injecting errors; returns base and top.
fn chain_with_debug_mid(d: &Daemon, size: &str, mid_writes: &[&str]) -> (PathBuf, PathBuf) {
    let base = create(d, "base.qcow2", size, None);
    qio(&base, &[&format!("write -P 0x11 0 {size}")]);
    let mid = create(d, "mid.qcow2", size, Some(&base));
    qio(&mid, mid_writes);
    let top = create(d, "top.qcow2", size, Some(&mid));
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
        "file": {"driver": "file", "filename": base, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "mid-dbg", "read-only": true,
        "image": {"driver": "file", "filename": mid, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "mid", "read-only": true, "backing": "base",
        "file": "mid-dbg"}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": "mid",
        "file": {"driver": "file", "filename": top}}),
    );
    (base, top)
}

#[test]
fn stream_with_on_error_ignore_carries_on_then_fails_keeping_the_backing() {
    let mut d = Daemon::start();
    let (_base, top) = chain_with_debug_mid(&d, "4M", &["write -P 0x22 0 1M", "write -P 0x23 2M 1M"]);
    // Reads of mid's first data cluster fail (the data starts after its metadata).
    let map = d.ok("x-block-status", json!({"node-name": "mid"}));
    let host = map.as_array().unwrap().iter().find(|e| e["data"] == true).unwrap()["offset"].as_u64().unwrap();
    d.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "mid-dbg",
        "inject-error": [{"event": "read_aio", "sector": host / 512, "once": false}]}),
    );
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(
        &mut q,
        "block-stream",
        json!({"job-id": "s4", "device": "top", "base-node": "base", "on-error": "ignore"}),
    );
    let events = until(&mut q, "BLOCK_JOB_COMPLETED", "s4");
    let errors: Vec<_> = events.iter().filter(|e| e["event"] == "BLOCK_JOB_ERROR").collect();
    assert!(!errors.is_empty() && errors.iter().all(|e| e["data"]["action"] == "ignore"), "{events:?}");
    assert_eq!(events.last().unwrap()["data"]["error"], "Input/output error");
    let top_node = d.ok("query-named-block-nodes", json!({}));
    let top_node = top_node.as_array().unwrap().iter().find(|n| n["node-name"] == "top").unwrap().clone();
    assert_eq!(
        top_node["children"].as_array().unwrap().iter().find(|c| c["child"] == "backing").unwrap()["node-name"],
        "mid"
    );
    d.shutdown();
    // It carried on past the error: the second range came up into top.
    let map = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
    let map: Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .unwrap()["depth"]
            .clone()
    };
    assert_eq!(at(2 * MIB), json!(0), "{map}");
    assert_eq!(at(0), json!(1), "the failed range stayed in mid: {map}");
    assert_eq!(backing_chain(&top).len(), 3);
}

/// `on-error: stop` in the jobs that copy several ranges at once: a read
/// of the middle layer fails once, the job pauses with the error (the other
/// copies in flight end first), and resuming copies the failed range again.
#[test]
fn commit_and_stream_with_on_error_stop_pause_and_retry_the_failed_range() {
    for job in ["block-commit", "block-stream"] {
        let mut d = Daemon::start();
        let (base, top) = chain_with_debug_mid(&d, "16M", &["write -P 0x22 0 12M"]);
        // A data cluster of mid in the middle of its data fails once.
        let map = d.ok("x-block-status", json!({"node-name": "mid"}));
        let data = map.as_array().unwrap().iter().find(|e| e["data"] == true).unwrap().clone();
        let host = data["offset"].as_u64().unwrap() + 5 * MIB;
        d.ok(
            "x-blkdebug-set-rules",
            json!({"node-name": "mid-dbg",
            "inject-error": [{"event": "read_aio", "sector": host / 512, "once": true}]}),
        );
        let mut q = Qmp::negotiated(&d.qmp);
        let args = if job == "block-commit" {
            json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base", "on-error": "stop"})
        } else {
            json!({"job-id": "j", "device": "top", "base-node": "base", "on-error": "stop"})
        };
        exec_ok(&mut q, job, args);
        let events = until(&mut q, "BLOCK_JOB_ERROR", "j");
        assert_eq!(events.last().unwrap()["data"], json!({"device": "j", "operation": "read", "action": "stop"}));
        let events = until(&mut q, "JOB_STATUS_CHANGE", "j");
        assert_eq!(statuses(&events, "j"), ["paused"], "{job}");
        let paused = block_job(&d, "j");
        assert_eq!(paused["io-status"], "failed", "{paused}");
        // Paused means paused: no copy moves any more.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(block_job(&d, "j")["offset"], paused["offset"], "{job}");
        exec_ok(&mut q, "block-job-resume", json!({"device": "j"}));
        let events = until(&mut q, "BLOCK_JOB_COMPLETED", "j");
        assert!(events.last().unwrap()["data"].get("error").is_none(), "{events:?}");
        d.shutdown();
        let (img, chain) = if job == "block-commit" { (&base, 2) } else { (&top, 2) };
        qio(img, &["read -P 0x22 0 12M", "read -P 0x11 12M 4M"]);
        assert_eq!(backing_chain(&top).len(), chain, "{job}");
        qemu_img(&["check", "-q", img.to_str().unwrap()]);
    }
}

#[test]
fn qemus_python_qmp_client_runs_a_mirror_a_commit_and_a_stream() {
    let mut d = Daemon::start();
    let src = create(&d, "src.qcow2", "8M", None);
    qio(&src, &["write -P 0x1 0 8M"]);
    let tgt = create(&d, "tgt.qcow2", "8M", None);
    let base = create(&d, "base.qcow2", "8M", None);
    qio(&base, &["write -P 0x2 0 8M"]);
    let mid = create(&d, "mid.qcow2", "8M", Some(&base));
    qio(&mid, &["write -P 0x3 1M 1M"]);
    let top = create(&d, "top.qcow2", "8M", Some(&mid));
    qio(&top, &["write -P 0x4 2M 1M"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/qmp_jobs.py");
    let out = run(Command::new("python3").arg(script).arg(&d.qmp).arg(d.dir.path()));
    assert!(out.contains("OK"), "{out}");
    d.shutdown();
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    assert_eq!(backing_chain(&top), [top.to_str().unwrap()]);
    qio(&top, &["read -P 0x2 0 1M", "read -P 0x3 1M 1M", "read -P 0x4 2M 1M", "read -P 0x2 3M 5M"]);
}

/// Expected final byte per 64 KiB block after `writes` (offset, pattern).
fn writer_cmds(n: usize, size: u64, seed: u64) -> (Vec<String>, std::collections::BTreeMap<u64, u8>) {
    let mut cmds = Vec::new();
    let mut last = std::collections::BTreeMap::new();
    let blocks = size / (64 << 10);
    let mut x = seed;
    for i in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let block = (x >> 33) % blocks;
        let pat = (i % 200 + 20) as u8;
        cmds.push(format!("write -P {pat} {} 64k", block * (64 << 10)));
        last.insert(block, pat);
    }
    (cmds, last)
}

#[test]
fn mirrors_converge_under_a_writer_and_pivot_its_live_connection() {
    for mode in ["background", "write-blocking"] {
        let mut d = Daemon::start();
        let (_src, tgt) = mirror_pair(&d);
        let mut q = Qmp::negotiated(&d.qmp);
        // One NBD connection writes throughout the job and across the pivot.
        let (cmds, last) = writer_cmds(1500, 32 * MIB, mode.len() as u64);
        let uri = format!("nbd+unix:///disk?socket={}", d.path("nbd.sock").display());
        let writer = std::thread::spawn(move || {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "raw"]);
            for cmd in &cmds {
                c.args(["-c", cmd]);
            }
            let out = c.arg(uri).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && !text.contains("fail"), "{text}");
        });
        exec_ok(
            &mut q,
            "blockdev-mirror",
            json!({"job-id": "w", "device": "src", "target": "tgt", "sync": "full",
            "copy-mode": mode}),
        );
        until(&mut q, "BLOCK_JOB_READY", "w");
        let job = block_job(&d, "w");
        assert_eq!(job["actively-synced"], json!(mode == "write-blocking"), "{job}");
        exec_ok(&mut q, "job-complete", json!({"id": "w"}));
        until(&mut q, "BLOCK_JOB_COMPLETED", "w");
        writer.join().unwrap();
        assert_eq!(d.ok("query-block-exports", json!({}))[0]["node-name"], "tgt");
        unexport(&d, "disk");
        d.shutdown();
        // Every write reached the target, whether before, during or after the pivot.
        let mut reads = Vec::new();
        for (block, pat) in &last {
            reads.push(format!("read -P {pat} {} 64k", block * (64 << 10)));
        }
        let refs: Vec<&str> = reads.iter().map(String::as_str).collect();
        qio(&tgt, &refs);
        qemu_img(&["check", "-q", tgt.to_str().unwrap()]);
    }
}

fn map_depths(img: &Path) -> Vec<(u64, u64, i64, bool)> {
    let out = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_i64().unwrap(),
                e["data"] == true,
            )
        })
        .collect()
}

#[test]
fn drive_mirror_creates_targets_for_each_sync_mode() {
    let mut d = Daemon::start();
    let base = create(&d, "base.qcow2", "8M", None);
    qio(&base, &["write -P 0x11 0 8M"]);
    let top = create(&d, "top.qcow2", "8M", Some(&base));
    qio(&top, &["write -P 0x22 2M 1M"]);
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}}));
    nbd_start(&d);
    export(&d, "disk", "top");
    let mut q = Qmp::negotiated(&d.qmp);

    // sync=top: a new qcow2 on the same backing file, holding top's data only.
    let t1 = d.path("top-copy.qcow2");
    exec_ok(
        &mut q,
        "drive-mirror",
        json!({"job-id": "d1", "device": "top", "target": t1, "sync": "top",
        "node-name": "copy", "format": "qcow2"}),
    );
    let events = until(&mut q, "BLOCK_JOB_READY", "d1");
    assert_eq!(events.last().unwrap()["data"]["len"], json!(MIB), "only top's data is copied");
    exec_ok(&mut q, "block-job-cancel", json!({"device": "d1"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "d1");
    // Without a pivot nothing uses the target the job opened: it is closed (as in QEMU).
    assert!(!node_names(&d).contains(&"copy".to_string()));

    // sync=full into a raw file; cancel first removes what the job opened.
    let t2 = d.path("full.raw");
    exec_ok(
        &mut q,
        "drive-mirror",
        json!({"job-id": "d2", "device": "top", "target": t2, "sync": "full",
        "format": "raw", "speed": MIB, "buf-size": MIB}),
    );
    exec_ok(&mut q, "job-cancel", json!({"id": "d2"}));
    until(&mut q, "BLOCK_JOB_CANCELLED", "d2");
    assert!(d.ok("query-named-block-nodes", json!({})).as_array().unwrap().iter().all(|n| n["drv"] != "raw"));
    exec_ok(
        &mut q,
        "drive-mirror",
        json!({"job-id": "d3", "device": "top", "target": t2, "sync": "full", "format": "raw"}),
    );
    until(&mut q, "BLOCK_JOB_READY", "d3");
    exec_ok(&mut q, "job-complete", json!({"id": "d3"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "d3");
    let root = d.ok("query-block-exports", json!({}))[0]["node-name"].as_str().unwrap().to_string();
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let node = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == root.as_str()).unwrap();
    assert_eq!(node["drv"], "raw", "the export now serves the raw copy: {node}");

    // sync=none from the raw copy: a new qcow2 backed by it, holding only new writes.
    let t3 = d.path("delta.qcow2");
    exec_ok(
        &mut q,
        "drive-mirror",
        json!({"job-id": "d4", "device": root, "target": t3, "sync": "none",
        "format": "qcow2"}),
    );
    until(&mut q, "BLOCK_JOB_READY", "d4");
    nbd_io(&d, "disk", &["write -P 0x33 5M 64k"]);
    exec_ok(&mut q, "job-complete", json!({"id": "d4"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "d4");
    nbd_io(&d, "disk", &["read -P 0x33 5M 64k", "read -P 0x22 2M 1M", "read -P 0x11 0 2M"]);
    unexport(&d, "disk");
    d.shutdown();

    assert_eq!(backing_chain(&t1), [t1.to_str().unwrap(), base.to_str().unwrap()]);
    let m = map_depths(&t1);
    assert!(m.iter().any(|&(s, l, depth, _)| s == 2 * MIB && l == MIB && depth == 0), "{m:?}");
    assert!(m.iter().filter(|e| e.2 == 0).all(|&(s, l, _, _)| s == 2 * MIB && l == MIB), "only top's data: {m:?}");
    qio(&t1, &["read -P 0x11 0 2M", "read -P 0x22 2M 1M", "read -P 0x11 3M 5M"]);
    run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x11 0 2M", "-c", "read -P 0x22 2M 1M"])
        .arg(&t2));
    assert_eq!(backing_chain(&t3), [t3.to_str().unwrap(), t2.to_str().unwrap()]);
    let m = map_depths(&t3);
    assert!(m.iter().filter(|e| e.2 == 0).all(|&(s, l, _, _)| s == 5 * MIB && l == 64 << 10), "{m:?}");
    qio(&t3, &["read -P 0x33 5M 64k"]);
    qemu_img(&["check", "-q", t1.to_str().unwrap()]);
    qemu_img(&["check", "-q", t3.to_str().unwrap()]);
}

#[test]
fn a_forced_cancel_after_ready_leaves_a_consistent_target() {
    let mut d = Daemon::start();
    let (src, tgt) = mirror_pair(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(&mut q, "blockdev-mirror", json!({"job-id": "f", "device": "src", "target": "tgt", "sync": "full"}));
    until(&mut q, "BLOCK_JOB_READY", "f");
    nbd_io(&d, "disk", &["write -P 0x71 3M 192k", "write -z 7M 64k"]);
    exec_ok(&mut q, "job-cancel", json!({"id": "f"}));
    let mut events = until(&mut q, "BLOCK_JOB_CANCELLED", "f");
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "f"));
    events.extend(until(&mut q, "JOB_STATUS_CHANGE", "f"));
    assert_eq!(statuses(&events, "f"), ["aborting", "concluded", "null"]);
    // The source stays in use; the target is a copy as of the cancel.
    assert_eq!(d.ok("query-block-exports", json!({}))[0]["node-name"], "src");
    unexport(&d, "disk");
    d.shutdown();
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
}

/// base ← l1 ← l2 ← top, each holding its own 1 MiB.
fn chain4(d: &Daemon) -> [PathBuf; 4] {
    let base = create(d, "base.qcow2", "8M", None);
    qio(&base, &["write -P 0x10 0 8M"]);
    let l1 = create(d, "l1.qcow2", "8M", Some(&base));
    qio(&l1, &["write -P 0x11 1M 1M"]);
    let l2 = create(d, "l2.qcow2", "8M", Some(&l1));
    qio(&l2, &["write -P 0x12 2M 1M", "write -P 0x12 1536k 64k"]);
    let top = create(d, "top.qcow2", "8M", Some(&l2));
    qio(&top, &["write -P 0x13 3M 1M"]);
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}}));
    [base, l1, l2, top]
}

#[test]
fn commit_through_a_four_layer_chain_writes_the_backing_file_name_given() {
    let mut d = Daemon::start();
    let [base, l1, _l2, top] = chain4(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    // Layers opened from the headers are named by file name, as QEMU allows.
    exec_ok(
        &mut q,
        "block-commit",
        json!({"job-id": "c4", "device": "top", "top": d.path("l2.qcow2"),
        "base": base, "backing-file": "base.qcow2"}),
    );
    until(&mut q, "BLOCK_JOB_COMPLETED", "c4");
    d.shutdown();
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", top.to_str().unwrap()])).unwrap();
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(backing_chain(&top), [top.to_str().unwrap(), base.to_str().unwrap()]);
    qio(&top, &["read -P 0x10 0 1M", "read -P 0x11 1M 512k", "read -P 0x12 1536k 64k", "read -P 0x11 1600k 448k"]);
    qio(&top, &["read -P 0x12 2M 1M", "read -P 0x13 3M 1M", "read -P 0x10 4M 4M"]);
    qemu_img(&["check", "-q", base.to_str().unwrap()]);
    // l1 itself was not changed.
    qio(&l1, &["read -P 0x11 1M 1M"]);
}

#[test]
fn a_cancelled_commit_or_stream_leaves_the_chain_as_it_was() {
    let mut d = Daemon::start();
    let [base, _l1, _l2, top] = chain4(&d);
    let mut q = Qmp::negotiated(&d.qmp);
    for (cmd, args) in [
        (
            "block-commit",
            json!({"job-id": "x", "device": "top", "top": d.path("l2.qcow2"), "speed": 1, "on-error": "report"}),
        ),
        ("block-stream", json!({"job-id": "x", "device": "top", "speed": 1})),
    ] {
        exec_ok(&mut q, cmd, args);
        exec_ok(&mut q, "job-cancel", json!({"id": "x"}));
        let events = until(&mut q, "BLOCK_JOB_CANCELLED", "x");
        assert!(events.iter().all(|e| e["event"] != "BLOCK_JOB_COMPLETED"), "{cmd}: {events:?}");
        until(&mut q, "JOB_STATUS_CHANGE", "x");
        until(&mut q, "JOB_STATUS_CHANGE", "x");
    }
    d.shutdown();
    assert_eq!(backing_chain(&top).len(), 4);
    qio(&top, &["read -P 0x10 0 1M", "read -P 0x11 1M 512k", "read -P 0x12 2M 1M", "read -P 0x13 3M 1M"]);
    qemu_img(&["check", "-q", base.to_str().unwrap()]);
    qemu_img(&["check", "-q", top.to_str().unwrap()]);
}

#[test]
fn source_read_errors_follow_on_source_error_and_commit_retries_with_ignore() {
    let mut d = Daemon::start();
    let src = create(&d, "src.qcow2", "8M", None);
    qio(&src, &["write -P 0x3c 0 8M"]);
    let tgt = create(&d, "tgt.qcow2", "8M", None);
    add_qcow2(&d, "src", &src);
    d.ok("blockdev-add", json!({"driver": "blkdebug", "node-name": "sdbg", "image": "src"}));
    add_qcow2(&d, "tgt", &tgt);
    d.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "sdbg",
        "inject-error": [{"event": "read_aio", "errno": 5, "once": true}]}),
    );
    let mut q = Qmp::negotiated(&d.qmp);
    exec_ok(
        &mut q,
        "blockdev-mirror",
        json!({"job-id": "se", "device": "sdbg", "target": "tgt", "sync": "full",
        "on-source-error": "ignore"}),
    );
    let events = until(&mut q, "BLOCK_JOB_ERROR", "se");
    assert_eq!(events.last().unwrap()["data"], json!({"device": "se", "operation": "read", "action": "ignore"}));
    until(&mut q, "BLOCK_JOB_READY", "se");
    exec_ok(&mut q, "job-complete", json!({"id": "se"}));
    until(&mut q, "BLOCK_JOB_COMPLETED", "se");

    // An intermediate commit whose base fails a write once: `ignore` retries it.
    let base = create(&d, "cbase.qcow2", "4M", None);
    let mid = create(&d, "cmid.qcow2", "4M", Some(&base));
    qio(&mid, &["write -P 0x4d 0 4M"]);
    let top = create(&d, "ctop.qcow2", "4M", Some(&mid));
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "cbase",
        "file": {"driver": "blkdebug", "node-name": "bdbg", "image": {"driver": "file", "filename": base}}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "cmid", "read-only": true, "backing": "cbase",
        "file": {"driver": "file", "filename": mid, "read-only": true}}),
    );
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ctop", "backing": "cmid",
        "file": {"driver": "file", "filename": top}}),
    );
    d.ok(
        "x-blkdebug-set-rules",
        json!({"node-name": "bdbg",
        "inject-error": [{"event": "write_aio", "errno": 5, "once": true}]}),
    );
    exec_ok(
        &mut q,
        "block-commit",
        json!({"job-id": "ce", "device": "ctop", "top-node": "cmid", "base-node": "cbase",
        "on-error": "ignore"}),
    );
    let events = until(&mut q, "BLOCK_JOB_COMPLETED", "ce");
    let errors: Vec<_> = events.iter().filter(|e| e["event"] == "BLOCK_JOB_ERROR").collect();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0]["data"], json!({"device": "ce", "operation": "write", "action": "ignore"}));
    assert!(events.last().unwrap()["data"].get("error").is_none(), "{events:?}");
    d.shutdown();
    qemu_img(&["compare", "-q", src.to_str().unwrap(), tgt.to_str().unwrap()]);
    qio(&base, &["read -P 0x4d 0 4M"]);
    // A metadata write that failed may leave a leaked cluster, never corruption.
    let check = Command::new("qemu-img").args(["check", "-q", base.to_str().unwrap()]).status().unwrap();
    assert!(matches!(check.code(), Some(0 | 3)), "qemu-img check: {check}");
}

/// sync=none into a new qcow2, whose backing (the source) is attached only
/// at the pivot: client writes of part of a cluster during the job must not
/// leave zeroes in the rest of that cluster, in either copy mode.
#[test]
fn sync_none_drive_mirror_keeps_the_rest_of_partly_written_clusters() {
    for mode in ["background", "write-blocking"] {
        let mut d = Daemon::start();
        let img = create(&d, "src.qcow2", "4M", None);
        qio(&img, &["write -P 0x22 0 4M"]);
        d.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": img}}),
        );
        nbd_start(&d);
        export(&d, "disk", "src");
        let mut q = Qmp::negotiated(&d.qmp);
        let delta = d.path("delta.qcow2");
        exec_ok(
            &mut q,
            "drive-mirror",
            json!({"job-id": "n1", "device": "src", "target": delta, "sync": "none", "format": "qcow2",
            "copy-mode": mode}),
        );
        until(&mut q, "BLOCK_JOB_READY", "n1");
        // 4 KiB in the middle of the cluster at 1 MiB (64 KiB clusters).
        nbd_io(&d, "disk", &["write -P 0x44 1056k 4k"]);
        exec_ok(&mut q, "job-complete", json!({"id": "n1"}));
        until(&mut q, "BLOCK_JOB_COMPLETED", "n1");
        nbd_io(&d, "disk", &["read -P 0x22 1M 32k", "read -P 0x44 1056k 4k", "read -P 0x22 1060k 60k"]);
        unexport(&d, "disk");
        d.shutdown();
        qio(&delta, &["read -P 0x22 1M 32k", "read -P 0x44 1056k 4k", "read -P 0x22 1060k 60k"]);
    }
}
