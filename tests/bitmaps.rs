//! Dirty bitmaps belong to nodes: every write path marks them, on
//! whichever reactor serves it, and the commands behave as QEMU's. The
//! same script runs against qemu-storage-daemon and Spindle; replies, the
//! bitmaps' descriptions and their SHA-256 (QEMU's in-memory layout) must
//! be equal.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, run};

/// A session with either daemon, with an NBD server on `nbd`.
fn script_setup(q: &mut Peer, img: &Path, nbd: &Path) {
    let ok = |r: Reply| assert!(matches!(r, Reply::Return(_)), "{r:?}");
    ok(q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "a", "discard": "unmap", "file": {"driver": "file", "filename": img}}),
    ));
    ok(q.execute("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd}}})));
    ok(q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "a", "name": "a", "writable": true}),
    ));
}

/// Commands whose replies are compared.
fn commands() -> Vec<(&'static str, Value)> {
    vec![
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "b0"})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "fine", "granularity": 4096})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "off", "disabled": true})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "b0"})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": ""})),
        ("block-dirty-bitmap-add", json!({"node": "nope", "name": "x"})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "g", "granularity": 1000})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "g", "granularity": 256})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "g", "granularity": 4294967296u64})),
        ("block-dirty-bitmap-add", json!({"node": "a", "name": "x".repeat(1024)})),
        ("block-dirty-bitmap-remove", json!({"node": "a", "name": "nope"})),
        ("block-dirty-bitmap-clear", json!({"node": "a", "name": "nope"})),
        ("block-dirty-bitmap-enable", json!({"node": "a", "name": "nope"})),
        ("block-dirty-bitmap-merge", json!({"node": "a", "target": "nope", "bitmaps": ["b0"]})),
        ("block-dirty-bitmap-merge", json!({"node": "a", "target": "off", "bitmaps": ["nope"]})),
    ]
}

/// Writes through the export: data, write-zeroes, discard.
fn guest_writes(nbd: &Path) {
    let uri = format!("nbd+unix:///a?socket={}", nbd.display());
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -P 2 1048676 10",
            "-c",
            "write -z 8M 256k",
            "-c",
            "write -P 3 16M 1M",
            "-c",
            "discard 16M 128k",
            "-c",
            "write -P 4 67043328 65536",
        ])
        .arg(&uri));
}

fn describe_bitmaps(q: &mut Peer) -> Value {
    let Reply::Return(nodes) = q.execute("query-named-block-nodes", json!({})) else { panic!("query failed") };
    nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "a").unwrap()["dirty-bitmaps"].clone()
}

fn sha(q: &mut Peer, name: &str) -> Reply {
    q.execute("x-debug-block-dirty-bitmap-sha256", json!({"node": "a", "name": name}))
}

#[test]
fn bitmaps_record_and_answer_as_qemu_storage_daemons_do() {
    let d = Daemon::start();
    let mut transcripts = Vec::new();
    for who in ["qsd", "spindle"] {
        let img = d.path(&format!("{who}.qcow2"));
        support::qcow2_image(&img, "64M", None);
        let nbd = d.path(&format!("{who}-nbd.sock"));
        let qsd;
        let mut q = if who == "qsd" {
            qsd = Some(Qsd::start(d.dir.path()));
            Peer::negotiated(&qsd.as_ref().unwrap().qmp)
        } else {
            qsd = None;
            Peer::negotiated(&d.qmp)
        };
        script_setup(&mut q, &img, &nbd);
        let mut t: Vec<(String, Reply)> = Vec::new();
        for (cmd, args) in commands() {
            t.push((format!("{cmd} {args}"), q.execute(cmd, args)));
        }
        t.push(("sha256 empty".into(), sha(&mut q, "b0")));
        guest_writes(&nbd);
        for name in ["b0", "fine", "off"] {
            t.push((format!("sha256 {name}"), sha(&mut q, name)));
        }
        t.push(("bitmaps after writes".into(), Reply::Return(describe_bitmaps(&mut q))));
        // Merge, enable, clear, remove.
        for (cmd, args) in [
            ("block-dirty-bitmap-merge", json!({"node": "a", "target": "off", "bitmaps": ["fine"]})),
            ("block-dirty-bitmap-enable", json!({"node": "a", "name": "off"})),
            ("block-dirty-bitmap-clear", json!({"node": "a", "name": "b0"})),
            ("block-dirty-bitmap-disable", json!({"node": "a", "name": "fine"})),
        ] {
            t.push((format!("{cmd} {args}"), q.execute(cmd, args)));
        }
        guest_writes(&nbd);
        for name in ["b0", "fine", "off"] {
            t.push((format!("sha256 {name} again"), sha(&mut q, name)));
        }
        t.push(("bitmaps at the end".into(), Reply::Return(describe_bitmaps(&mut q))));
        t.push(("remove".into(), q.execute("block-dirty-bitmap-remove", json!({"node": "a", "name": "off"}))));
        t.push(("bitmaps left".into(), Reply::Return(describe_bitmaps(&mut q))));
        drop(qsd);
        transcripts.push(t);
    }
    let (qsd, spindle) = (&transcripts[0], &transcripts[1]);
    for ((what, a), (_, b)) in qsd.iter().zip(spindle) {
        assert_eq!(b, a, "{what}: Spindle answered differently from qemu-storage-daemon");
    }
    // The scripts did something: the bitmaps caught the writes.
    let caught = |r: &Reply| match r {
        Reply::Return(v) => v.as_array().unwrap().iter().filter(|b| b["count"].as_u64().unwrap() > 0).count(),
        _ => 0,
    };
    let after = qsd.iter().find(|(w, _)| w == "bitmaps after writes").unwrap();
    assert_eq!(caught(&after.1), 2, "{:?}", after.1);
}

#[test]
fn writes_on_every_reactor_mark_the_nodes_bitmaps() {
    // A qcow2 node lives on one reactor; a raw file node serves every
    // reactor directly. Clients on both reactors write; nothing is missed.
    let d = Daemon::start();
    let img = d.path("r.img");
    support::sparse_file(&img, 64 << 20);
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": img}}));
    d.ok("block-dirty-bitmap-add", json!({"node": "r", "name": "b", "granularity": 65536}));
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "r", "writable": true}));
    let uri = format!("nbd+unix:///r?socket={}", d.path("nbd.sock").display());
    // Several connections: they are spread over the reactors as accepted.
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let cmds: Vec<String> =
                    (0..64u64).map(|k| format!("write -P 9 {} 512", ((k * 4 + i) * 65536) + 100)).collect();
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw"]);
                for cmd in &cmds {
                    c.args(["-c", cmd]);
                }
                run(c.arg(&uri));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let r = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "r").unwrap();
    assert_eq!(r["dirty-bitmaps"][0]["count"], 256 * 65536, "{r}");
}

#[test]
fn a_bitmap_on_a_mirrors_source_sees_the_writes_that_pass_the_filter() {
    let d = Daemon::start();
    let src = d.path("src.qcow2");
    let tgt = d.path("tgt.qcow2");
    support::qcow2_image(&src, "64M", None);
    support::qcow2_image(&tgt, "64M", None);
    for (node, p) in [("src", &src), ("tgt", &tgt)] {
        d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}}));
    }
    d.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b0"}));
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}));
    // Slow enough to be running while the client writes.
    d.ok("blockdev-mirror", json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full", "speed": 1}));
    let uri = format!("nbd+unix:///src?socket={}", d.path("nbd.sock").display());
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 64k", "-c", "write -z 1M 128k"]).arg(&uri));
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "src").unwrap();
    assert_eq!(
        n["dirty-bitmaps"],
        json!([{"name": "b0", "recording": true, "persistent": false, "busy": false,
        "granularity": 65536, "count": 196608}]),
        "only the user's bitmap is listed, and it saw both writes"
    );
    d.ok("job-cancel", json!({"id": "m"}));
}
