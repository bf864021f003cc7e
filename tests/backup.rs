//! Backup: copies of a running disk as it was when the job started, full,
//! top, none and incremental with dirty bitmaps, checked with QEMU's tools;
//! bitmap modes on success and failure; argument errors as
//! qemu-storage-daemon gives them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, Qmp, run};

const MIB: u64 = 1 << 20;

fn qcow2(d: &Daemon, name: &str, size: &str, backing: Option<&Path>) -> PathBuf {
    let p = d.path(name);
    support::qcow2_image(&p, size, backing);
    p
}

fn qio(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    if cmds.iter().all(|c| c.starts_with("read")) {
        c.args(["-r", "-U"]);
    }
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(img));
    assert!(!out.contains("fail") && !out.contains("Pattern verification"), "{cmds:?}: {out}");
}

fn add(d: &Daemon, node: &str, p: &Path) {
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": p}}));
}

fn export(d: &Daemon, node: &str) -> String {
    if d.call("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}})).is_err() {
        // Already running.
    }
    d.ok("block-export-add", json!({"type": "nbd", "id": node, "node-name": node, "writable": true}));
    format!("nbd+unix:///{node}?socket={}", d.path("nbd.sock").display())
}

/// Waits for the job's end; returns its BLOCK_JOB_* event.
fn wait_end(q: &mut Qmp, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = q.read_value();
        if (ev["event"] == "BLOCK_JOB_COMPLETED" || ev["event"] == "BLOCK_JOB_CANCELLED") && ev["data"]["device"] == id
        {
            return ev;
        }
        assert!(Instant::now() < deadline, "job {id} did not end");
    }
}

fn bitmap_count(d: &Daemon, node: &str, name: &str) -> u64 {
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap();
    n["dirty-bitmaps"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap()["count"].as_u64().unwrap()
}

fn compare(a: &Path, b: &Path) {
    run(Command::new("qemu-img").args(["compare", "-U"]).arg(a).arg(b));
}

#[test]
fn a_full_backup_holds_the_disk_as_it_was_when_the_job_started() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let src = qcow2(&d, "src.qcow2", "64M", None);
    qio(&src, "qcow2", &["write -P 0x11 0 32M", "write -z 32M 8M", "write -P 0x12 48M 4M"]);
    let snapshot = d.path("snapshot.qcow2");
    std::fs::copy(&src, &snapshot).unwrap();
    let tgt = qcow2(&d, "tgt.qcow2", "64M", None);
    add(&d, "src", &src);
    add(&d, "tgt", &tgt);
    let uri = export(&d, "src");
    // Slow, so the client's writes land on ranges not copied yet.
    d.ok("blockdev-backup", json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 4 * MIB}));
    qio(
        Path::new(&uri),
        "raw",
        &["write -P 0x21 0 16M", "write -P 0x22 33M 1M", "write -z 48M 1M", "write -P 0x23 60M 64k"],
    );
    d.ok("block-job-set-speed", json!({"device": "b", "speed": 0}));
    let ev = wait_end(&mut q, "b");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert_eq!(ev["data"]["offset"], ev["data"]["len"]);
    d.ok("blockdev-del", json!({"node-name": "tgt"}));
    compare(&snapshot, &tgt);
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&tgt));
    qio(&src, "qcow2", &["read -P 0x21 0 16M", "read -P 0x22 33M 1M", "read -P 0 48M 1M", "read -P 0x23 60M 64k"]);
}

#[test]
fn incremental_backups_chain_up_to_the_disk_at_each_point() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let src = qcow2(&d, "src.qcow2", "64M", None);
    qio(&src, "qcow2", &["write -P 0x11 0 64M"]);
    add(&d, "src", &src);
    let uri = export(&d, "src");
    // Full backup with a bitmap that starts at the same instant (nothing
    // is written between the two commands here).
    d.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "inc"}));
    let full = qcow2(&d, "full.qcow2", "64M", None);
    add(&d, "full", &full);
    d.ok("blockdev-backup", json!({"job-id": "b0", "device": "src", "target": "full", "sync": "full"}));
    assert!(wait_end(&mut q, "b0")["data"].get("error").is_none());
    d.ok("blockdev-del", json!({"node-name": "full"}));
    let mut prev = full;
    for (i, cmds) in [
        vec!["write -P 0x21 1M 64k", "write -P 0x22 20M 3M"],
        vec!["write -P 0x31 20M 1M", "write -z 40M 1M", "write -P 0x32 63M 4k"],
    ]
    .iter()
    .enumerate()
    {
        qio(Path::new(&uri), "raw", cmds);
        let dirty = bitmap_count(&d, "src", "inc");
        assert!(dirty > 0, "the bitmap saw the writes");
        // The point to back up: the disk now.
        let point = d.path(&format!("point{i}.raw"));
        run(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&src).arg(&point));
        let inc = qcow2(&d, &format!("inc{i}.qcow2"), "64M", Some(&prev));
        d.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "inc", "backing": null,
                   "file": {"driver": "file", "filename": inc}}),
        );
        d.ok(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "inc", "sync": "incremental", "bitmap": "inc"}),
        );
        // Writes during the incremental land in the next one, not this one.
        qio(Path::new(&uri), "raw", &["write -P 0x41 5M 64k"]);
        let ev = wait_end(&mut q, "b");
        assert!(ev["data"].get("error").is_none(), "{ev}");
        assert!(ev["data"]["len"].as_u64().unwrap() <= dirty + 64 * 1024, "only the dirty part was copied: {ev}");
        assert_eq!(bitmap_count(&d, "src", "inc"), 65536, "only the write made during the job is left");
        d.ok("blockdev-del", json!({"node-name": "inc"}));
        // The incremental over the previous ones reads as the disk did.
        run(Command::new("qemu-img").args(["compare", "-U", "-f", "qcow2", "-F", "raw"]).arg(&inc).arg(&point));
        prev = inc;
    }
}

#[test]
fn bitmap_modes_decide_what_a_failed_or_finished_backup_leaves() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let src = qcow2(&d, "src.qcow2", "16M", None);
    add(&d, "src", &src);
    let uri = export(&d, "src");
    d.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "m"}));
    qio(Path::new(&uri), "raw", &["write -P 1 0 1M", "write -P 2 8M 1M"]);
    assert_eq!(bitmap_count(&d, "src", "m"), 2 * MIB);
    // A target whose writes fail from 8 MiB on: the first MiB copies, the
    // second does not.
    let bad = d.path("bad.img");
    support::sparse_file(&bad, 16 * MIB);
    for (mode, left) in [("on-success", 2 * MIB), ("always", MIB), ("never", 2 * MIB)] {
        d.ok(
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "t",
                   "inject-error": [{"event": "write_aio", "errno": 5, "sector": 16384, "once": false}],
                   "image": {"driver": "raw", "file": {"driver": "file", "filename": bad}}}),
        );
        d.ok(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "t", "sync": "bitmap", "bitmap": "m",
                   "bitmap-mode": mode, "x-perf": {"max-chunk": 1048576}}),
        );
        let ev = wait_end(&mut q, "b");
        assert!(ev["data"]["error"].is_string(), "{mode}: the backup fails: {ev}");
        assert_eq!(bitmap_count(&d, "src", "m"), left, "{mode}");
        d.ok("blockdev-del", json!({"node-name": "t"}));
        // Back to both ranges dirty for the next mode.
        qio(Path::new(&uri), "raw", &["write -P 1 0 1M"]);
    }
    // A successful one with on-success empties it; with never it keeps it.
    let good = qcow2(&d, "good.qcow2", "16M", None);
    add(&d, "good", &good);
    d.ok("blockdev-backup", json!({"job-id": "b", "device": "src", "target": "good", "sync": "bitmap", "bitmap": "m", "bitmap-mode": "never"}));
    assert!(wait_end(&mut q, "b")["data"].get("error").is_none());
    assert_eq!(bitmap_count(&d, "src", "m"), 2 * MIB);
    d.ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "good", "sync": "incremental", "bitmap": "m"}),
    );
    assert!(wait_end(&mut q, "b")["data"].get("error").is_none());
    assert_eq!(bitmap_count(&d, "src", "m"), 0);
}

#[test]
fn sync_none_keeps_old_data_for_an_overlay_and_sync_top_copies_the_top_layer() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let base = qcow2(&d, "base.qcow2", "16M", None);
    qio(&base, "qcow2", &["write -P 0x11 0 16M"]);
    let src = qcow2(&d, "src.qcow2", "16M", Some(&base));
    qio(&src, "qcow2", &["write -P 0x22 4M 4M"]);
    add(&d, "src", &src);
    let uri = export(&d, "src");
    // sync=none: the target overlay gets what the disk is about to lose.
    let fleece = d.path("fleece.qcow2");
    d.ok("drive-backup", json!({"job-id": "n", "device": "src", "target": fleece, "sync": "none", "format": "qcow2"}));
    qio(Path::new(&uri), "raw", &["write -P 0x33 0 1M", "write -P 0x44 4M 1M"]);
    d.ok("job-cancel", json!({"id": "n"}));
    wait_end(&mut q, "n");
    qio(&fleece, "qcow2", &["read -P 0x11 0 1M", "read -P 0x22 4M 1M", "read -P 0x11 1M 3M"]);
    // sync=top: only the top layer's data, over the same backing file.
    let top = d.path("top.qcow2");
    d.ok("drive-backup", json!({"job-id": "t", "device": "src", "target": top, "sync": "top", "format": "qcow2"}));
    let ev = wait_end(&mut q, "t");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    let map = run(Command::new("qemu-img").args(["map", "-U", "--output=json"]).arg(&top));
    let map: Value = serde_json::from_str(&map).unwrap();
    let own: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, 5 * MIB, "the top layer's 4 MiB and the 1 MiB written over the base: {map}");
    qio(&top, "qcow2", &["read -P 0x33 0 1M", "read -P 0x44 4M 1M", "read -P 0x22 5M 3M", "read -P 0x11 8M 8M"]);
}

/// A raw file of `mib` MiB that compresses about tenfold (lines of text
/// naming their place), with 4 MiB of noise and 4 MiB of zeroes at its
/// end; returns the bytes of data that are not zeroes.
fn compressible_raw(path: &Path, mib: u64) -> u64 {
    let text_end = (mib - 8) * MIB;
    let mut data = Vec::with_capacity((mib * MIB) as usize);
    let mut line = 0u64;
    while (data.len() as u64) < text_end {
        data.extend_from_slice(format!("{line:>12} a line of text that compresses well enough\n").as_bytes());
        line += 1;
    }
    data.truncate(text_end as usize);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while (data.len() as u64) < text_end + 4 * MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.resize((mib * MIB) as usize, 0);
    std::fs::write(path, &data).unwrap();
    text_end + 4 * MIB
}

/// Clusters `qemu-img map` reports compressed, in bytes.
fn compressed_bytes(img: &Path) -> u64 {
    let map = run(Command::new("qemu-img").args(["map", "-U", "--output=json"]).arg(img));
    let map: Value = serde_json::from_str(&map).unwrap();
    map.as_array().unwrap().iter().filter(|e| e["compressed"] == true).map(|e| e["length"].as_u64().unwrap()).sum()
}

/// A compressed backup of a disk a client writes meanwhile, into `target`
/// (a node for blockdev-backup, a new file for drive-backup): it holds the
/// disk as it was at the start, is much smaller than the data, mostly
/// compressed clusters, and passes `qemu-img check`.
fn compressed_backup(drive: bool) {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let raw = d.path("src.raw");
    let data = compressible_raw(&raw, 32);
    let src = d.path("src.qcow2");
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&src));
    let snapshot = d.path("snapshot.qcow2");
    std::fs::copy(&src, &snapshot).unwrap();
    add(&d, "src", &src);
    let uri = export(&d, "src");
    let tgt = d.path("tgt.qcow2");
    // Slow, so the client's writes land on ranges not copied yet.
    if drive {
        d.ok(
            "drive-backup",
            json!({"job-id": "b", "device": "src", "target": tgt, "format": "qcow2", "sync": "full",
                   "compress": true, "speed": 8 * MIB}),
        );
    } else {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd"])
            .arg(&tgt)
            .arg("32M"));
        add(&d, "tgt", &tgt);
        d.ok(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "compress": true,
                   "speed": 8 * MIB}),
        );
    }
    qio(
        Path::new(&uri),
        "raw",
        &["write -P 0x21 0 4M", "write -P 0x22 25M 1M", "write -z 12M 1M", "write -P 0x23 29M 64k"],
    );
    d.ok("block-job-set-speed", json!({"device": "b", "speed": 0}));
    let ev = wait_end(&mut q, "b");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    if !drive {
        d.ok("blockdev-del", json!({"node-name": "tgt"}));
    }
    compare(&snapshot, &tgt);
    // Clean, and how far the image reaches (the file itself may have been
    // grown ahead of the allocator).
    let check = run(Command::new("qemu-img").args(["check", "--output=json"]).arg(&tgt));
    let check: Value = serde_json::from_str(&check).unwrap();
    let size = check["image-end-offset"].as_u64().unwrap();
    assert!(size < data / 2, "the target holds {size} bytes for {data} bytes of data: {check}");
    let compressed = compressed_bytes(&tgt);
    assert!(compressed >= 20 * MIB, "{compressed} bytes of compressed clusters");
    qio(&src, "qcow2", &["read -P 0x21 0 4M", "read -P 0x22 25M 1M", "read -P 0 12M 1M", "read -P 0x23 29M 64k"]);
}

#[test]
fn a_compressed_blockdev_backup_holds_the_disk_at_its_start_in_less_room() {
    compressed_backup(false);
}

#[test]
fn a_compressed_drive_backup_holds_the_disk_at_its_start_in_less_room() {
    compressed_backup(true);
}

/// 64 KiB clusters of five kinds, in turn: text, noise, half text and
/// half noise, noise of 16 byte values, zeroes (a hole).
fn mixed_raw(path: &Path, clusters: u64) {
    let cs = 64 * 1024usize;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut data = Vec::with_capacity(clusters as usize * cs);
    for c in 0..clusters as usize {
        let mut cluster: Vec<u8> = match c % 5 {
            0 | 2 => {
                (0..).map(|l| format!("cluster {c:6} line {l:5}: some text\n")).take(cs / 24).collect::<String>().into()
            }
            1 => (0..cs / 8).flat_map(|_| noise().to_le_bytes()).collect(),
            3 => (0..cs / 8).flat_map(|_| noise().to_le_bytes()).map(|b| b & 0x0f).collect(),
            _ => vec![0; cs],
        };
        cluster.resize(cs, b' ');
        if c % 5 == 2 {
            for b in &mut cluster[cs / 2..] {
                *b = noise() as u8;
            }
        }
        data.extend_from_slice(&cluster);
    }
    // Zeroes as holes: block status finds them, as convert's zero
    // detection does.
    let f = std::fs::File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (c, cluster) in data.chunks(cs).enumerate() {
        if c % 5 != 4 {
            std::os::unix::fs::FileExt::write_all_at(&f, cluster, (c * cs) as u64).unwrap();
        }
    }
}

/// Guest clusters `qemu-img map` reports compressed.
fn compressed_clusters(img: &Path, cluster: u64) -> Vec<u64> {
    let map = run(Command::new("qemu-img").args(["map", "-U", "--output=json"]).arg(img));
    let map: Value = serde_json::from_str(&map).unwrap();
    let mut out = Vec::new();
    for e in map.as_array().unwrap().iter().filter(|e| e["compressed"] == true) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        out.extend(start / cluster..(start + len) / cluster);
    }
    out
}

fn image_end(img: &Path) -> u64 {
    let check = run(Command::new("qemu-img").args(["check", "--output=json"]).arg(img));
    serde_json::from_str::<Value>(&check).unwrap()["image-end-offset"].as_u64().unwrap()
}

/// `qemu-img convert -c` is the oracle: a compressed backup of the same
/// data compresses the same clusters, reads the same, and takes about
/// the same room (zlib and zstd images).
#[test]
fn a_compressed_backup_compresses_what_qemu_img_convert_c_compresses() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let raw = d.path("mixed.raw");
    mixed_raw(&raw, 100);
    let theirs = |kind: &str| d.path(&format!("qemu-{kind}.qcow2"));
    for kind in ["zlib", "zstd"] {
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &format!("compression_type={kind}")])
            .arg(&raw)
            .arg(theirs(kind)));
    }
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "src", "file": {"driver": "file", "filename": raw}}));
    for kind in ["zlib", "zstd"] {
        let opt = format!("compression_type={kind}");
        let ours = d.path(&format!("spindle-{kind}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &opt])
            .arg(&ours)
            .arg((100 * 65536).to_string()));
        add(&d, "tgt", &ours);
        d.ok(
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "compress": true}),
        );
        let ev = wait_end(&mut q, "b");
        assert!(ev["data"].get("error").is_none(), "{ev}");
        d.ok("blockdev-del", json!({"node-name": "tgt"}));
        run(Command::new("qemu-img").args(["compare", "-q", "-U", "-f", "raw", "-F", "qcow2"]).arg(&raw).arg(&ours));
        let (want, got) = (compressed_clusters(&theirs(kind), 65536), compressed_clusters(&ours, 65536));
        assert_eq!(got, want, "{kind}: the clusters compressed");
        assert_eq!(want.len(), 60, "{kind}: text, half text and 4-bit noise compress; noise and zeroes do not");
        let (a, b) = (image_end(&ours), image_end(&theirs(kind)));
        assert!(a * 10 <= b * 11, "{kind}: {a} bytes where qemu-img convert -c takes {b}");
    }
}

#[test]
fn argument_errors_are_qemu_storage_daemons() {
    let d = Daemon::start();
    let mut answers = Vec::new();
    for who in ["qsd", "spindle"] {
        let a = qcow2(&d, &format!("{who}-a.qcow2"), "64M", None);
        let t = qcow2(&d, &format!("{who}-t.qcow2"), "64M", None);
        let s = qcow2(&d, &format!("{who}-s.qcow2"), "32M", None);
        let qsd;
        let mut q = if who == "qsd" {
            qsd = Some(Qsd::start(d.dir.path()));
            Peer::negotiated(&qsd.as_ref().unwrap().qmp)
        } else {
            qsd = None;
            Peer::negotiated(&d.qmp)
        };
        for (n, p) in [("a", &a), ("t", &t), ("s", &s)] {
            let r = q.execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": n, "file": {"driver": "file", "filename": p}}),
            );
            assert_eq!(r, Reply::Return(json!({})));
        }
        let raw = d.path(&format!("{who}-r.raw"));
        support::sparse_file(&raw, 64 * MIB);
        for added in [
            json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": raw}}),
            json!({"driver": "file", "node-name": "rf", "filename": raw}),
        ] {
            assert_eq!(q.execute("blockdev-add", added), Reply::Return(json!({})));
        }
        assert_eq!(q.execute("block-dirty-bitmap-add", json!({"node": "a", "name": "b0"})), Reply::Return(json!({})));
        let base = json!({"job-id": "j", "device": "a", "target": "t"});
        let with = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        let mut got = Vec::new();
        for args in [
            with(json!({"sync": "incremental"})),
            with(json!({"sync": "bitmap"})),
            with(json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"})),
            with(json!({"sync": "full", "bitmap": "b0"})),
            with(json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"})),
            with(json!({"sync": "full", "bitmap": "nope", "bitmap-mode": "always"})),
            with(json!({"sync": "full", "bitmap-mode": "always"})),
            with(json!({"sync": "full", "target": "s"})),
            with(json!({"sync": "full", "target": "a"})),
            with(json!({"sync": "full", "target": "nope"})),
            with(json!({"sync": "full", "device": "nope"})),
            with(json!({"sync": "full", "x-perf": {"max-chunk": 1000}})),
            with(json!({"sync": "full", "speed": -1})),
            with(json!({"sync": "bogus"})),
            with(json!({"sync": "full", "target": "r", "compress": true})),
            with(json!({"sync": "full", "target": "rf", "compress": true})),
            with(json!({"sync": "full", "target": "a", "compress": true})),
            with(json!({"sync": "full", "target": "r", "compress": true, "x-perf": {"max-chunk": 1000}})),
            with(json!({"sync": "full", "target": "s", "compress": true})),
            with(json!({"sync": "full", "compress": "yes"})),
        ] {
            got.push((args.clone(), q.execute("blockdev-backup", args)));
        }
        // drive-backup into a new raw file: created, then refused.
        let args = json!({"job-id": "j", "device": "a", "target": d.path(&format!("{who}-new.raw")),
                          "format": "raw", "sync": "full", "compress": true});
        let answer = q.execute("drive-backup", args);
        got.push((json!({"drive-backup": "raw, compress"}), answer));
        drop(qsd);
        answers.push(got);
    }
    for ((args, a), (_, b)) in answers[0].iter().zip(&answers[1]) {
        assert_eq!(b, a, "blockdev-backup {args}");
    }
}

#[test]
fn a_backup_ends_only_after_the_copies_client_writes_started() {
    // The target's data writes take 300 ms; zero clusters are metadata
    // only and fast. A client write to the last cluster starts a copy
    // before write; the job is then let run to the end at full speed and
    // finds that cluster taken. It must wait for that copy before it
    // flushes the target and reports.
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let src = qcow2(&d, "src.qcow2", "2M", None);
    qio(&src, "qcow2", &["write -P 0x5a 1984k 64k"]);
    add(&d, "src", &src);
    let uri = export(&d, "src");
    let tgt = qcow2(&d, "tgt.qcow2", "2M", None);
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "tgt",
               "file": {"driver": "delay", "write-latency-ns": 300_000_000u64,
                        "file": {"driver": "file", "filename": tgt}}}),
    );
    d.ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full", "speed": 65536,
               "x-perf": {"max-chunk": 65536}}),
    );
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || qio(Path::new(&uri), "raw", &["write -P 0x77 1984k 64k"]))
    };
    std::thread::sleep(Duration::from_millis(100));
    d.ok("block-job-set-speed", json!({"device": "b", "speed": 0}));
    let ev = wait_end(&mut q, "b");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    // Read at once: the job's end covers the client's copy.
    qio(&tgt, "qcow2", &["read -P 0x5a 1984k 64k", "read -P 0 0 1984k"]);
    writer.join().unwrap();
}

#[test]
fn a_nightly_backup_walk_through_as_the_docs_give_it() {
    // docs/jobs.md, "A nightly incremental backup, step by step", with the
    // command-line client, while a guest writes between the nights.
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let disk = qcow2(&d, "disk.qcow2", "32M", None);
    qio(&disk, "qcow2", &["write -P 0x10 0 32M"]);
    add(&d, "disk", &disk);
    let uri = export(&d, "disk");
    let cli = |args: &[&str]| {
        let out = Command::new(support::BIN).arg("rpc").arg("-s").arg(&d.rpc).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let night = |i: usize| d.path(&format!("night{i}.qcow2"));
    let snapshot = |i: usize| {
        let p = d.path(&format!("disk-at-night{i}.raw"));
        run(Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(&disk).arg(&p));
        p
    };
    let n0 = night(0);
    let actions = json!({"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "nightly"}},
        {"type": "drive-backup", "data": {"job-id": "night0", "device": "disk", "sync": "full",
                                          "target": n0, "format": "qcow2"}}]});
    let at0 = snapshot(0);
    cli(&["transaction", &actions.to_string()]);
    // The guest writes during the full backup: they belong to night 1.
    qio(Path::new(&uri), "raw", &["write -P 0x11 4M 1M"]);
    assert!(wait_end(&mut q, "night0")["data"].get("error").is_none());
    let mut points = vec![at0];
    for i in 1..=2 {
        let cmds = [format!("write -P 0x{i}2 {}M 2M", 8 * i), format!("write -z {}M 1M", 20 + i)];
        qio(Path::new(&uri), "raw", &cmds.iter().map(String::as_str).collect::<Vec<_>>());
        let at = snapshot(i);
        let (prev, this) = (night(i - 1), night(i));
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&prev).arg(&this));
        let target = format!("target={}", this.display());
        cli(&[
            "drive-backup",
            &format!("job-id=night{i}"),
            "device=disk",
            "sync=incremental",
            "bitmap=nightly",
            &target,
            "format=qcow2",
            "mode=existing",
        ]);
        qio(Path::new(&uri), "raw", &["write -P 0x7f 30M 64k"]);
        assert!(wait_end(&mut q, &format!("night{i}"))["data"].get("error").is_none());
        points.push(at);
    }
    // Restore each night by flattening its chain.
    for (i, at) in points.iter().enumerate() {
        let restored = d.path(&format!("restored{i}.qcow2"));
        run(Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(night(i)).arg(&restored));
        run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&restored).arg(at));
    }
}

#[test]
fn qemu_s_python_client_drives_a_full_and_an_incremental_backup() {
    let d = Daemon::start();
    let disk = qcow2(&d, "disk.qcow2", "16M", None);
    qio(&disk, "qcow2", &["write -P 0x11 0 16M"]);
    let full = qcow2(&d, "full.qcow2", "16M", None);
    let inc = qcow2(&d, "inc.qcow2", "16M", Some(&full));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/qmp_backup.py");
    let out = run(Command::new("python3").arg(script).arg(&d.qmp).arg(d.dir.path()));
    assert!(out.contains("OK"), "{out}");
    d.ok("blockdev-del", json!({"node-name": "disk"}));
    // The incremental over the full reads as the disk does.
    compare(&inc, &disk);
    qio(&inc, "qcow2", &["read -P 0x22 1M 64k"]);
}
