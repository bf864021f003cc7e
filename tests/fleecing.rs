//! Fleecing, QEMU 10's way: a copy-before-write filter put in front of an
//! exported disk in one transaction, a snapshot-access node over it,
//! exported read-only; a client reads the point in time while the guest
//! goes on writing. Checked with qemu-img against a copy of the disk taken
//! at that point.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::{Daemon, run};

const MIB: u64 = 1 << 20;

fn qcow2(d: &Daemon, name: &str, size: &str) -> PathBuf {
    let p = d.path(name);
    support::qcow2_image(&p, size, None);
    p
}

fn qio(target: &str, fmt: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    if cmds.iter().all(|c| c.starts_with("read")) {
        c.args(["-r", "-U"]);
    }
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(target))
}

fn uri(d: &Daemon, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display())
}

/// A disk with data, exported writable as `disk`; a temporary qcow2 for
/// the old data.
fn setup(d: &Daemon) -> (PathBuf, PathBuf) {
    let disk = qcow2(d, "disk.qcow2", "16M");
    qio(disk.to_str().unwrap(), "qcow2", &["write -P 0x11 0 8M", "write -z 8M 4M", "write -P 0x12 12M 4M"]);
    let at_start = d.path("at-start.qcow2");
    std::fs::copy(&disk, &at_start).unwrap();
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}}));
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "disk", "name": "disk", "writable": true}));
    let tmp = qcow2(d, "tmp.qcow2", "16M");
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tmp", "backing": "disk",
               "file": {"driver": "file", "filename": tmp}}),
    );
    (disk, at_start)
}

fn fleece(d: &Daemon, cbw: Value) {
    d.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-add", "data": cbw},
            {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "e", "new-child": "cbw"}},
        ]}),
    );
    d.ok("blockdev-add", json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "f", "node-name": "acc", "name": "fleece"}));
}

fn teardown(d: &Daemon) {
    d.ok("block-export-del", json!({"id": "f"}));
    // The export's requests drain before the node goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.call("blockdev-del", json!({"node-name": "acc"})).is_err() {
        assert!(std::time::Instant::now() < deadline, "snapshot-access stays in use");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.ok("x-blockdev-replace", json!({"parent-type": "export", "export-id": "e", "new-child": "disk"}));
    d.ok("blockdev-del", json!({"node-name": "cbw"}));
    d.ok("blockdev-del", json!({"node-name": "tmp"}));
}

#[test]
fn a_fleecing_export_reads_the_point_in_time_while_the_guest_writes() {
    let d = Daemon::start();
    let (disk, at_start) = setup(&d);
    fleece(&d, json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"}));
    // The guest writes over data, zeroes and the boundary between, while a
    // client reads the fleece.
    let guest = {
        let u = uri(&d, "disk");
        std::thread::spawn(move || {
            qio(&u, "raw", &["write -P 0x21 1M 2M", "write -P 0x22 7M 2M", "write -z 12M 1M", "discard 14M 1M"]);
            qio(&u, "raw", &["write -P 0x23 0 64k", "write -P 0x24 15M 1M"]);
        })
    };
    let copy = d.path("fleece.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", "-f", "raw"]).arg(uri(&d, "fleece")).arg(&copy));
    guest.join().unwrap();
    // Read again after all the writes: the same point in time.
    let again = d.path("fleece-again.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw", "-f", "raw"]).arg(uri(&d, "fleece")).arg(&again));
    for c in [&copy, &again] {
        run(Command::new("qemu-img").args(["compare", "-U", "-f", "raw", "-F", "qcow2"]).arg(c).arg(&at_start));
    }
    // The block status of the fleece: the zeroes of the point in time.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(uri(&d, "fleece")));
    let map: Value = serde_json::from_str(&map).unwrap();
    assert!(
        map.as_array().unwrap().iter().any(|e| e["zero"] == true && e["start"].as_u64().unwrap() >= 8 * MIB),
        "{map}"
    );
    teardown(&d);
    // The guest's writes are all on the disk.
    qio(
        disk.to_str().unwrap(),
        "qcow2",
        &["read -P 0x23 0 64k", "read -P 0x21 1M 2M", "read -P 0x22 7M 2M", "read -P 0x24 15M 1M"],
    );
    run(Command::new("qemu-img").args(["check", "-U"]).arg(&disk));
}

#[test]
fn the_filter_keeps_other_writers_out_and_refuses_what_would_lose_data() {
    let d = Daemon::start();
    let _ = setup(&d);
    // snapshot-access reads only a copy-before-write filter.
    let (_, msg, _) = d.err("blockdev-add", json!({"driver": "snapshot-access", "node-name": "x", "file": "disk"}));
    assert!(msg.contains("is not a copy-before-write filter"), "{msg}");
    // Sizes must match.
    let small = qcow2(&d, "small.qcow2", "8M");
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "small", "file": {"driver": "file", "filename": small}}),
    );
    let (_, msg, _) = d.err(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "c2", "file": "disk", "target": "small"}),
    );
    assert!(msg.contains("sizes differ"), "{msg}");
    fleece(&d, json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"}));
    // A second writer on the disk would bypass the filter: refused.
    let (_, msg, _) = d
        .err("block-export-add", json!({"type": "nbd", "id": "w", "node-name": "disk", "name": "w", "writable": true}));
    assert!(msg.contains("Conflicts with use by") || msg.contains("permission"), "{msg}");
    // An export cannot be pointed at another disk.
    let other = qcow2(&d, "other.qcow2", "16M");
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other", "file": {"driver": "file", "filename": other}}),
    );
    let (_, msg, _) =
        d.err("x-blockdev-replace", json!({"parent-type": "export", "export-id": "e", "new-child": "other"}));
    assert!(msg.contains("neither a filter above"), "{msg}");
    let (_, msg, _) =
        d.err("x-blockdev-replace", json!({"parent-type": "export", "export-id": "nope", "new-child": "cbw"}));
    assert_eq!(msg, "Export 'nope' is not found");
    // A failed transaction leaves nothing behind: the node it added goes.
    let (_, msg, _) = d.err(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-add", "data": {"driver": "copy-before-write", "node-name": "c3", "file": "other", "target": "tmp"}},
            {"type": "abort", "data": {}},
        ]}),
    );
    assert_eq!(msg, "Transaction aborted using Abort action");
    assert!(d.call("blockdev-del", json!({"node-name": "c3"})).is_err(), "c3 was removed with the transaction");
    teardown(&d);
}

/// A target whose writes fail: what a failed copy before a write does.
fn failing_target(d: &Daemon) {
    let bad = d.path("bad.img");
    support::sparse_file(&bad, 16 * MIB);
    d.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "badt",
               "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5}],
                        "image": {"driver": "file", "filename": bad}}}),
    );
}

#[test]
fn on_cbw_error_breaks_the_guest_write_or_the_snapshot() {
    for (mode, guest_fails) in [("break-guest-write", true), ("break-snapshot", false)] {
        let d = Daemon::start();
        let _ = setup(&d);
        failing_target(&d);
        fleece(
            &d,
            json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "badt",
                   "on-cbw-error": mode}),
        );
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x31 0 64k"])
            .arg(uri(&d, "disk"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(text.contains("failed"), guest_fails, "{mode}: {text}");
        let read = Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 4M 64k"])
            .arg(uri(&d, "fleece"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&read.stdout).to_string() + &String::from_utf8_lossy(&read.stderr);
        // The point in time holds, or is gone as a whole.
        assert_eq!(text.contains("failed"), !guest_fails, "{mode}: {text}");
    }
}

#[test]
fn a_pull_backup_copies_the_dirty_extents_of_the_fleece_as_the_docs_give_it() {
    use std::os::unix::fs::FileExt;
    // docs/nbd.md, "Pull backups": the full copy, then one transaction for
    // the fleecing point and the bitmaps, the dirty extents pulled while
    // the guest writes.
    let d = Daemon::start();
    let (_, _) = setup(&d);
    d.ok("block-dirty-bitmap-add", json!({"node": "disk", "name": "b0"}));
    let copy = d.path("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(uri(&d, "disk")).arg(&copy));
    qio(&uri(&d, "disk"), "raw", &["write -P 0x41 1M 64k", "write -P 0x42 5M 3M", "write -z 13M 1M"]);
    d.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-add", "data": {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"}},
            {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "e", "new-child": "cbw"}},
        ]}),
    );
    let point = d.path("point.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(uri(&d, "disk")).arg(&point));
    d.ok("blockdev-add", json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}));
    d.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "f", "node-name": "acc", "name": "fleece", "bitmaps": [{"node": "disk", "name": "b0"}]}),
    );
    // The guest goes on, over dirty and clean ranges.
    qio(&uri(&d, "disk"), "raw", &["write -P 0x51 5M 1M", "write -P 0x52 10M 1M"]);
    let map = run(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:b0", "--json"]).arg(uri(&d, "fleece")));
    let map: Value = serde_json::from_str(&map).unwrap();
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, [(MIB, 64 << 10), (5 * MIB, 3 * MIB), (13 * MIB, MIB)], "{map}");
    let mut client = support::nbd_client::NbdClient::connect(&d.path("nbd.sock"), "fleece").unwrap();
    let out = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    for &(offset, len) in &dirty {
        let data = client.read(offset, len as u32).unwrap();
        out.write_all_at(&data, offset).unwrap();
    }
    drop(out);
    client.disconnect().unwrap();
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&copy).arg(&point));
    teardown(&d);
    d.ok("block-dirty-bitmap-remove", json!({"node": "disk", "name": "b0"}));
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let disk = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "disk").unwrap();
    assert!(disk["dirty-bitmaps"][0]["count"].as_u64().unwrap() >= 2 * MIB, "b1 has the writes after the point");
}
