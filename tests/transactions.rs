//! Transactions and external snapshots: actions that take effect at one
//! instant or not at all; overlays put on running disks; grouped backups
//! that fail as one. Answers and events are compared with
//! qemu-storage-daemon's; consistency across disks is checked with a
//! client whose writes alternate between them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::nbd_client::NbdClient;
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, Qmp, run};

const MIB: u64 = 1 << 20;

fn qcow2(d: &Daemon, name: &str, size: &str) -> PathBuf {
    let p = d.path(name);
    support::qcow2_image(&p, size, None);
    p
}

fn ok(r: Reply) {
    assert!(matches!(r, Reply::Return(_)), "{r:?}");
}

/// The named nodes (auto-named ones differ in numbering): name, read-only
/// flag and bitmap names.
fn nodes(q: &mut Peer) -> Reply {
    let Reply::Return(all) = q.execute("query-named-block-nodes", json!({"flat": true})) else {
        panic!("query failed")
    };
    let mut out: Vec<Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap().starts_with('#'))
        .map(|n| {
            let bitmaps: Vec<Value> = n["dirty-bitmaps"]
                .as_array()
                .map(|b| b.iter().map(|b| b["name"].clone()).collect())
                .unwrap_or_default();
            json!([n["node-name"], n["ro"], bitmaps])
        })
        .collect();
    out.sort_by_key(|v| v[0].as_str().unwrap().to_string());
    Reply::Return(Value::Array(out))
}

/// Job events, without timestamps.
fn job_events(q: &Peer) -> Vec<Value> {
    q.events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" || e["event"].as_str().unwrap().starts_with("BLOCK_JOB_"))
        .map(|e| json!([e["event"], e["data"]["id"].as_str().or(e["data"]["device"].as_str()), e["data"]["status"]]))
        .collect()
}

#[test]
fn transactions_and_snapshots_answer_as_qemu_storage_daemon_does() {
    let d = Daemon::start();
    let mut transcripts = Vec::new();
    for who in ["qsd", "spindle"] {
        let img = |n: &str| qcow2(&d, &format!("{who}-{n}.qcow2"), "16M");
        let (disk, tgt, ov) = (img("disk"), img("tgt"), img("ov"));
        let raw = d.path(&format!("{who}-r.raw"));
        support::sparse_file(&raw, 16 * MIB);
        let s1 = d.path(&format!("{who}-s1.qcow2"));
        let qsd;
        let mut q = if who == "qsd" {
            qsd = Some(Qsd::start(d.dir.path()));
            Peer::negotiated(&qsd.as_ref().unwrap().qmp)
        } else {
            qsd = None;
            Peer::negotiated(&d.qmp)
        };
        let file = |p: &Path| json!({"driver": "file", "filename": p});
        ok(q.execute("blockdev-add", json!({"driver": "qcow2", "node-name": "disk", "file": file(&disk)})));
        ok(q.execute("blockdev-add", json!({"driver": "qcow2", "node-name": "tgt", "file": file(&tgt)})));
        ok(q.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "ov", "backing": null, "file": file(&ov)}),
        ));
        ok(q.execute("blockdev-add", json!({"driver": "raw", "node-name": "raw", "file": file(&raw)})));
        let nbd = d.path(&format!("{who}-nbd.sock"));
        ok(q.execute("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd}}})));
        ok(q.execute("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true})));

        let bitmap_add =
            |node: &str, name: &str| json!({"type": "block-dirty-bitmap-add", "data": {"node": node, "name": name}});
        let backup = json!({"type": "blockdev-backup",
                            "data": {"job-id": "j", "device": "disk", "target": "tgt", "sync": "full", "speed": 1}});
        let abort = json!({"type": "abort", "data": {}});
        let script: Vec<(&str, Value)> = vec![
            ("transaction", json!({"actions": []})),
            ("transaction", json!({"actions": [abort]})),
            ("transaction", json!({"actions": [{"type": "abort"}]})),
            ("transaction", json!({"actions": [{"data": {}}]})),
            ("transaction", json!({"actions": {}})),
            ("transaction", json!({})),
            ("transaction", json!({"actions": [{"type": "bogus", "data": {}}]})),
            ("transaction", json!({"actions": [{"type": "abort", "data": {"x": 1}}]})),
            ("transaction", json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"name": "b0"}}]})),
            (
                "transaction",
                json!({"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": 5}}]}),
            ),
            ("transaction", json!({"actions": [bitmap_add("disk", "b0"), abort]})),
            (
                "transaction",
                json!({"actions": [bitmap_add("disk", "b0")], "properties": {"completion-mode": "grouped"}}),
            ),
            ("transaction", json!({"actions": [backup], "properties": {"completion-mode": "bogus"}})),
            ("transaction", json!({"actions": [], "properties": {"completion-mode": "grouped", "x": 1}})),
            // The backup is set up, then undone: created, aborting, concluded, null.
            ("transaction", json!({"actions": [backup, abort]})),
            ("transaction", json!({"actions": [bitmap_add("disk", "b0"), bitmap_add("disk", "b0")]})),
            ("blockdev-snapshot", json!({"node": "disk"})),
            ("blockdev-snapshot", json!({"node": "disk", "overlay": "raw"})),
            ("blockdev-snapshot", json!({"node": "disk", "overlay": "disk"})),
            ("blockdev-snapshot", json!({"node": "nope", "overlay": "ov"})),
            ("blockdev-snapshot", json!({"node": "disk", "overlay": "nope"})),
            ("block-export-add", json!({"type": "nbd", "id": "o", "node-name": "ov"})),
            ("blockdev-snapshot", json!({"node": "disk", "overlay": "ov"})),
            ("block-export-del", json!({"id": "o"})),
            ("blockdev-snapshot-sync", json!({"node-name": "disk", "snapshot-file": s1})),
            ("blockdev-snapshot-sync", json!({"node-name": "disk", "snapshot-file": s1, "snapshot-node-name": "disk"})),
            ("blockdev-snapshot-sync", json!({"node-name": "nope", "snapshot-file": s1, "snapshot-node-name": "s1"})),
            ("blockdev-snapshot-sync", json!({"snapshot-file": s1})),
            (
                "transaction",
                json!({"actions": [bitmap_add("disk", "b0"),
                                   {"type": "blockdev-snapshot", "data": {"node": "disk", "overlay": "ov"}}]}),
            ),
            ("blockdev-snapshot", json!({"node": "disk", "overlay": "ov"})),
            ("blockdev-snapshot-sync", json!({"node-name": "disk", "snapshot-file": s1, "snapshot-node-name": "s1"})),
            (
                "blockdev-snapshot-sync",
                json!({"node-name": "ov", "snapshot-file": s1, "snapshot-node-name": "s1", "format": "raw"}),
            ),
            ("blockdev-snapshot-sync", json!({"node-name": "ov", "snapshot-file": s1, "snapshot-node-name": "s1"})),
            (
                "transaction",
                json!({"actions": [{"type": "block-dirty-bitmap-remove", "data": {"node": "disk", "name": "b0"}},
                                   {"type": "block-dirty-bitmap-remove", "data": {"node": "disk", "name": "b0"}}]}),
            ),
            (
                "transaction",
                json!({"actions": [{"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
                                   {"type": "block-dirty-bitmap-clear", "data": {"node": "disk", "name": "b0"}},
                                   bitmap_add("s1", "b1"), abort]}),
            ),
        ];
        let mut t: Vec<(String, Reply)> = Vec::new();
        for (i, (cmd, args)) in script.into_iter().enumerate() {
            t.push((format!("{i}: {cmd} {args}"), q.execute(cmd, args)));
            if i == 10 || i == 14 {
                t.push((format!("{i}: nodes"), nodes(&mut q)));
            }
        }
        t.push(("nodes at the end".into(), nodes(&mut q)));
        // Let the aborted job's events arrive.
        q.wait_event(Duration::from_secs(5), |e| e["data"]["status"] == "null");
        t.push(("job events".into(), Reply::Return(Value::Array(job_events(&q)))));
        drop(qsd);
        transcripts.push(t);
    }
    let (qsd, spindle) = (&transcripts[0], &transcripts[1]);
    for ((what, a), (_, b)) in qsd.iter().zip(spindle) {
        assert_eq!(b, a, "{what}: Spindle answered differently from qemu-storage-daemon");
    }
}

/// A client that writes a counter to offset 0 of disk `a`, then of disk
/// `b`, one write at a time: at any instant, `a` holds n and `b` holds n or
/// n - 1.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Writer {
    fn start(sock: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, sock) = (Arc::clone(&stop), sock.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut a = NbdClient::connect(&sock, "a").unwrap();
            let mut b = NbdClient::connect(&sock, "b").unwrap();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let block: Vec<u8> = n.to_le_bytes().repeat(512);
                for c in [&mut a, &mut b] {
                    c.send_write(n, 0, &block, false).unwrap();
                    assert_eq!(c.recv_reply().unwrap().error, 0);
                }
            }
            n
        });
        Writer { stop, thread }
    }

    /// Lets it write at least `writes` more pairs.
    fn run_for(&self, sock: &Path, writes: u64) {
        let mut c = NbdClient::connect(sock, "a").unwrap();
        let start = counter(&c.read(0, 8).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        while counter(&c.read(0, 8).unwrap()) < start + writes {
            assert!(Instant::now() < deadline, "the writer does not progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn counter(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// The counter at offset 0 of an image file.
fn counter_in(img: &Path, dir: &Path) -> u64 {
    let raw = dir.join(format!("{}.raw", img.file_name().unwrap().to_string_lossy()));
    run(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(img).arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    counter(&bytes)
}

#[test]
fn two_disks_are_snapshotted_and_backed_up_at_one_instant() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let (a, b) = (qcow2(&d, "a.qcow2", "16M"), qcow2(&d, "b.qcow2", "16M"));
    for (node, p) in [("a", &a), ("b", &b)] {
        d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}}));
    }
    let sock = d.path("nbd.sock");
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": sock}}}));
    for node in ["a", "b"] {
        d.ok("block-export-add", json!({"type": "nbd", "id": node, "node-name": node, "writable": true}));
    }
    let w = Writer::start(&sock);
    w.run_for(&sock, 200);
    // Both snapshots at one instant: each old top holds the counter as it
    // was then, a's equal to b's or one ahead.
    let (sa, sb) = (d.path("a-s.qcow2"), d.path("b-s.qcow2"));
    d.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "a", "snapshot-file": sa, "snapshot-node-name": "sa"}},
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "b", "snapshot-file": sb, "snapshot-node-name": "sb"}},
        ]}),
    );
    w.run_for(&sock, 200);
    // Then two backups of the overlays, set up at one instant.
    let (ta, tb) = (qcow2(&d, "ta.qcow2", "16M"), qcow2(&d, "tb.qcow2", "16M"));
    for (node, p) in [("ta", &ta), ("tb", &tb)] {
        d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}}));
    }
    d.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "ba", "device": "sa", "target": "ta", "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "bb", "device": "sb", "target": "tb", "sync": "full"}},
        ]}),
    );
    w.run_for(&sock, 200);
    for _ in 0..2 {
        let ev = q.event("BLOCK_JOB_COMPLETED");
        assert!(ev["data"].get("error").is_none(), "{ev}");
    }
    let last = w.stop();

    let (na, nb) = (counter_in(&a, d.dir.path()), counter_in(&b, d.dir.path()));
    assert!(na >= 200 && (na == nb || na == nb + 1), "snapshot: a holds {na}, b holds {nb}");
    let (ka, kb) = (counter_in(&ta, d.dir.path()), counter_in(&tb, d.dir.path()));
    assert!(ka > na && (ka == kb || ka == kb + 1), "backup: a holds {ka}, b holds {kb} (snapshot at {na})");
    // The overlays took every write after the snapshot; the old tops are
    // read-only backing files now.
    assert_eq!(counter_in(&sa, d.dir.path()), last);
    assert_eq!(counter_in(&sb, d.dir.path()), last);
    let all = d.ok("query-named-block-nodes", json!({}));
    for n in all.as_array().unwrap() {
        if n["node-name"] == "a" || n["node-name"] == "b" {
            assert_eq!(n["ro"], true, "{n}");
        }
    }
    let info = run(Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&sa));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], a.to_str().unwrap(), "{info}");
}

/// Two incremental backups in one transaction; `b`'s target fails from
/// 8 MiB on. Returns the job events and the bitmaps' counts afterwards.
fn failing_pair(q: &mut Peer, d: &Daemon, who: &str, mode: &str) -> (Vec<Value>, Reply) {
    let file = |p: &Path| json!({"driver": "file", "filename": p});
    let mut imgs = Vec::new();
    for n in ["a", "b", "ta"] {
        imgs.push(qcow2(d, &format!("{who}-{mode}-{n}.qcow2"), "16M"));
    }
    for (node, p) in [("a", &imgs[0]), ("b", &imgs[1]), ("ta", &imgs[2])] {
        ok(q.execute("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": file(p)})));
    }
    let bad = d.path(&format!("{who}-{mode}-bad.img"));
    support::sparse_file(&bad, 16 * MIB);
    // QEMU's raw driver reports its writes to blkdebug below it.
    ok(q.execute(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tb",
               "file": {"driver": "blkdebug",
                        "inject-error": [{"event": "write_aio", "errno": 5, "sector": 16384, "once": false}],
                        "image": file(&bad)}}),
    ));
    let nbd = d.path(&format!("{who}-{mode}-nbd.sock"));
    ok(q.execute("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd}}})));
    for node in ["a", "b"] {
        ok(q.execute("block-dirty-bitmap-add", json!({"node": node, "name": "m"})));
        ok(q.execute("block-export-add", json!({"type": "nbd", "id": node, "node-name": node, "writable": true})));
        let uri = format!("nbd+unix:///{node}?socket={}", nbd.display());
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 8M 1M"]).arg(uri));
        ok(q.execute("block-export-del", json!({"id": node})));
    }
    ok(q.execute("nbd-server-stop", json!({})));
    q.events.clear();
    ok(q.execute(
        "transaction",
        json!({"actions": [
            // a's copy is slow: still running when b's fails.
            {"type": "blockdev-backup", "data": {"job-id": "ja", "device": "a", "target": "ta", "sync": "incremental",
                                                 "bitmap": "m", "speed": 65536}},
            {"type": "blockdev-backup", "data": {"job-id": "jb", "device": "b", "target": "tb", "sync": "incremental",
                                                 "bitmap": "m", "x-perf": {"max-chunk": 1048576}}},
        ], "properties": {"completion-mode": mode}}),
    ));
    if mode == "individual" {
        // b fails alone; a goes on and is let finish.
        assert!(q.wait_event(Duration::from_secs(30), |e| e["event"] == "BLOCK_JOB_COMPLETED"
            && e["data"]["device"] == "jb"));
        ok(q.execute("block-job-set-speed", json!({"device": "ja", "speed": 0})));
    }
    for id in ["ja", "jb"] {
        assert!(
            q.wait_event(Duration::from_secs(60), |e| e["event"] == "JOB_STATUS_CHANGE"
                && e["data"]["id"] == id
                && e["data"]["status"] == "null"),
            "{who} {mode}: job {id} did not end: {:?}",
            q.events
        );
    }
    // Per job, in order (the two jobs' events interleave by timing), without
    // the pauses QEMU's drains cause on the way.
    let mut events = Vec::new();
    for id in ["ja", "jb"] {
        let mut mine: Vec<Value> = q
            .events
            .iter()
            .filter(|e| e["data"]["id"] == id || e["data"]["device"] == id)
            .filter(|e| e["data"]["status"] != "paused")
            .map(|e| json!([e["event"], e["data"]["status"], e["data"].get("error").is_some()]))
            .collect();
        mine.dedup();
        events.push(json!([id, mine]));
    }
    let Reply::Return(all) = q.execute("query-named-block-nodes", json!({})) else { panic!() };
    let mut counts: Vec<Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "a" || n["node-name"] == "b")
        .map(|n| json!([n["node-name"], n["dirty-bitmaps"][0]["count"]]))
        .collect();
    counts.sort_by_key(|c| c[0].as_str().unwrap().to_string());
    for node in ["a", "b", "ta", "tb"] {
        ok(q.execute("blockdev-del", json!({"node-name": node})));
    }
    (events, Reply::Return(Value::Array(counts)))
}

#[test]
fn grouped_backups_fail_together_and_keep_their_bitmaps() {
    let d = Daemon::start();
    let mut results = Vec::new();
    for who in ["qsd", "spindle"] {
        let qsd;
        let mut q = if who == "qsd" {
            qsd = Some(Qsd::start(d.dir.path()));
            Peer::negotiated(&qsd.as_ref().unwrap().qmp)
        } else {
            qsd = None;
            Peer::negotiated(&d.qmp)
        };
        let mut r = Vec::new();
        for mode in ["grouped", "individual"] {
            r.push(failing_pair(&mut q, &d, who, mode));
        }
        drop(qsd);
        results.push(r);
    }
    for (i, mode) in ["grouped", "individual"].iter().enumerate() {
        assert_eq!(results[1][i], results[0][i], "{mode}: Spindle differs from qemu-storage-daemon");
    }
    // And what that means: grouped, a is cancelled and both bitmaps keep
    // their 2 MiB; individual, a succeeds and its bitmap is emptied.
    assert_eq!(results[1][0].1, Reply::Return(json!([["a", 2 * MIB], ["b", 2 * MIB]])));
    assert_eq!(results[1][1].1, Reply::Return(json!([["a", 0], ["b", 2 * MIB]])));
}
