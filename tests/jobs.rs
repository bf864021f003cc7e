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
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let b;
    if let Some(back) = backing {
        b = back.to_str().unwrap().to_string();
        args.extend(["-b", &b, "-F", "qcow2"]);
    }
    let ps = p.to_str().unwrap().to_string();
    args.push(&ps);
    args.push(size);
    qemu_img(&args);
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
    d.ok("block-export-del", json!({"id": "disk"}));
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
    d.ok("block-export-del", json!({"id": "disk"}));
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
