//! Placement: node graphs, their jobs and their NBD connections spread
//! over the reactors; iothread objects name reactors, and nodes and
//! exports can be put on them, as QEMU puts them on iothreads.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::{Daemon, run};

fn qcow2(d: &Daemon, name: &str, backing: Option<&Path>) -> PathBuf {
    let p = d.path(name);
    support::qcow2_image(&p, "64M", backing);
    p
}

fn add(d: &Daemon, node: &str, p: &Path) {
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}}));
}

fn reactors(d: &Daemon) -> Vec<Value> {
    d.ok("framework_get_reactors", json!({}))["reactors"].as_array().unwrap().clone()
}

/// The index of the reactor `node` lives on.
fn home_of(d: &Daemon, node: &str) -> usize {
    let rs = reactors(d);
    rs.iter()
        .position(|r| r["nodes"].as_array().unwrap().iter().any(|n| n == node))
        .unwrap_or_else(|| panic!("{node} lives nowhere: {rs:?}"))
}

fn two_reactors(d: &Daemon) -> bool {
    let n = reactors(d).len();
    if n < 2 {
        eprintln!("one reactor only: nothing to spread over");
    }
    n >= 2
}

fn wait_jobs_gone(d: &Daemon) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.ok("query-jobs", json!({})) != json!([]) {
        assert!(std::time::Instant::now() < deadline, "jobs did not end");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn images_spread_over_the_reactors_and_chains_stay_together() {
    let d = Daemon::start();
    if !two_reactors(&d) {
        return;
    }
    let base = qcow2(&d, "base.qcow2", None);
    let top = qcow2(&d, "top.qcow2", Some(&base));
    let other = qcow2(&d, "other.qcow2", None);
    add(&d, "top", &top);
    add(&d, "other", &other);
    let base_node = d
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "qcow2" && n["file"] == base.to_str().unwrap())
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .unwrap();
    assert_eq!(home_of(&d, "top"), home_of(&d, &base_node), "a chain lives on one reactor");
    assert_ne!(home_of(&d, "top"), home_of(&d, "other"), "the next image goes to the other reactor");
    let r = &reactors(&d)[0];
    assert!(r["busy_fraction"].as_f64().is_some_and(|f| (0.0..=1.0).contains(&f)), "{r}");
}

#[test]
fn a_mirror_between_reactors_runs_on_its_sources_home_and_pivots() {
    let d = Daemon::start();
    if !two_reactors(&d) {
        return;
    }
    let src = qcow2(&d, "src.qcow2", None);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 8M"]).arg(&src));
    let tgt = qcow2(&d, "tgt.qcow2", None);
    add(&d, "src", &src);
    add(&d, "tgt", &tgt);
    let (hs, ht) = (home_of(&d, "src"), home_of(&d, "tgt"));
    assert_ne!(hs, ht);
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}));
    d.ok(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full", "auto-finalize": false}),
    );
    let jobs_on: Vec<Value> = reactors(&d).iter().map(|r| r["jobs"].clone()).collect();
    assert_eq!(jobs_on[hs], json!(["m"]), "{jobs_on:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.ok("query-jobs", json!({}))[0]["status"] != "ready" {
        assert!(std::time::Instant::now() < deadline, "the mirror did not become ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.ok("job-complete", json!({"id": "m"}));
    while d.ok("query-jobs", json!({}))[0]["status"] != "pending" {
        assert!(std::time::Instant::now() < deadline, "the mirror did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.ok("job-finalize", json!({"id": "m"}));
    wait_jobs_gone(&d);
    // The export now writes the target, on the target's reactor.
    let uri = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x6b 4M 64k"]).arg(&uri));
    d.ok("block-export-del", json!({"id": "e"}));
    d.ok("blockdev-del", json!({"node-name": "tgt"}));
    run(Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 4M", "-c", "read -P 0x6b 4M 64k"])
        .arg(&tgt));
}

#[test]
fn iothreads_name_reactors_and_nodes_move_to_them() {
    let d = Daemon::start();
    let multi = two_reactors(&d);
    let last = reactors(&d).len() - 1;
    d.ok("object-add", json!({"qom-type": "iothread", "id": "io0", "x-reactor": 0}));
    d.ok("object-add", json!({"qom-type": "iothread", "id": "io1", "x-reactor": last, "poll-max-ns": 0}));
    let threads = d.ok("query-iothreads", json!({}));
    assert_eq!(threads.as_array().unwrap().len(), 2);
    assert_eq!(threads[1]["poll-max-ns"], 0);
    assert!(threads[0]["thread-id"].as_i64().unwrap() > 0);
    if multi {
        assert_ne!(threads[0]["thread-id"], threads[1]["thread-id"]);
    }
    assert_eq!(
        d.ok("query-objects", json!({})),
        json!([{"id": "io0", "qom-type": "iothread"}, {"id": "io1", "qom-type": "iothread"}])
    );
    // QEMU's refusals.
    assert_eq!(
        d.err("object-add", json!({"qom-type": "iothread", "id": "io0"})).1,
        "attempt to add duplicate property 'io0' to object (type 'container')"
    );
    assert_eq!(
        d.err("object-add", json!({"qom-type": "iothread", "id": "1x"})).1,
        "Parameter 'id' expects an identifier"
    );
    assert_eq!(
        d.err("object-add", json!({"qom-type": "nosuch", "id": "x"})).1,
        "Parameter 'qom-type' does not accept value 'nosuch'"
    );
    assert_eq!(
        d.err("object-add", json!({"qom-type": "iothread", "id": "x", "poll-max-ns": -1})).1,
        "poll-max-ns value must be in range [0, 9223372036854775807]"
    );
    assert_eq!(
        d.err("object-add", json!({"qom-type": "iothread", "id": "x", "bogus": 1})).1,
        "Parameter 'bogus' is unexpected"
    );

    // A chain moves as a whole; its data and metadata survive the move.
    let base = qcow2(&d, "base.qcow2", None);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"]).arg(&base));
    let top = qcow2(&d, "top.qcow2", Some(&base));
    add(&d, "top", &top);
    d.debug_io("top", "write -P 0x22 1M 1M").unwrap();
    d.ok("x-blockdev-set-iothread", json!({"node-name": "top", "iothread": "io1"}));
    assert_eq!(home_of(&d, "top"), last);
    d.debug_io("top", "read -P 0x11 0 1M").unwrap();
    d.debug_io("top", "read -P 0x22 1M 1M").unwrap();
    d.debug_io("top", "write -P 0x33 2M 1M").unwrap();
    d.ok("x-blockdev-set-iothread", json!({"node-name": "top", "iothread": null}));
    assert_eq!(home_of(&d, "top"), 0);
    d.debug_io("top", "read -P 0x33 2M 1M").unwrap();
    assert_eq!(
        d.err("x-blockdev-set-iothread", json!({"node-name": "top", "iothread": "nope"})).1,
        "Cannot find iothread nope"
    );
    let children = d.ok("query-named-block-nodes", json!({}));
    let file_child =
        children.as_array().unwrap().iter().find(|n| n["drv"] == "file" && n["file"] == top.to_str().unwrap()).unwrap()
            ["node-name"]
            .clone();
    let e = d.err("x-blockdev-set-iothread", json!({"node-name": file_child, "iothread": "io0"})).1;
    assert!(e.contains("is a child of node 'top'"), "{e}");

    // Users pin a node: QEMU's refusal, and Spindle's even with force.
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "top", "writable": true, "iothread": "io1"}),
    );
    assert_eq!(home_of(&d, "top"), last, "the export's iothread moved the node");
    assert_eq!(
        d.err("x-blockdev-set-iothread", json!({"node-name": "top", "iothread": "io0"})).1,
        "Node top is associated with a BlockBackend and could be in use (use force=true to override this check)"
    );
    let e = d.err("x-blockdev-set-iothread", json!({"node-name": "top", "iothread": "io0", "force": true})).1;
    assert!(e.contains("in use by export 'e'"), "{e}");
    let uri = format!("nbd+unix:///top?socket={}", d.path("nbd.sock").display());
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x33 2M 1M", "-c", "write -P 0x44 3M 64k"])
        .arg(&uri));
    assert_eq!(
        d.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "name": "t2", "node-name": "top", "iothread": "nope"})
        )
        .1,
        "iothread \"nope\" not found"
    );
    assert_eq!(d.err("object-del", json!({"id": "io1"})).1, "object 'io1' is in use, can not be deleted");
    assert_eq!(d.err("object-del", json!({"id": "nope"})).1, "object 'nope' not found");

    // save_config replays objects and placements.
    let cfg = d.ok("save_config", json!({}));
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|c| c["method"].as_str().unwrap()).collect();
    assert_eq!(&methods[..2], ["object-add", "object-add"], "{methods:?}");
    assert!(methods.contains(&"x-blockdev-set-iothread"), "{methods:?}");
    let saved = d.path("saved.json");
    d.ok("save_config", json!({"filename": saved}));
    let mut d = d;
    d.shutdown();
    let d2 = Daemon::start_with(&["--config", saved.to_str().unwrap()]);
    assert_eq!(home_of(&d2, "top"), last, "the placement is replayed");
    d2.ok("block-export-del", json!({"id": "e"}));
    d2.ok("object-del", json!({"id": "io0"}));
    drop(d2);
    support::wait_unlocked_dir(d.dir.path());
    qemu_check(&top);
}

fn qemu_check(img: &Path) {
    run(Command::new("qemu-img").args(["check", "-q", "-U"]).arg(img));
}
