//! NBD metadata contexts for pull backups: `qemu:dirty-bitmap:NAME` and
//! `qemu:allocation-depth` beside `base:allocation`. The same session runs
//! against qemu-storage-daemon and Spindle, over the same images with the
//! same writes, and what libnbd's nbdinfo, qemu-img and a client written
//! here see must be equal; then a pull backup through a fleecing export.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::nbd_client::NbdClient;
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, Qmp, run};

const MIB: u64 = 1 << 20;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_META_CONTEXT: u32 = 4;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_REQ_ONE: u16 = 1 << 3;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CHUNK_BLOCK_STATUS: u16 = 5;
const REPLY_FLAG_DONE: u16 = 1;

/// The extents of one context in a block status reply: (length, flags).
type Extents = Vec<(u32, u32)>;

/// A client of what the contexts need: structured replies, context lists
/// and selections, `NBD_CMD_BLOCK_STATUS` with its chunks.
struct MetaClient {
    s: UnixStream,
    cookie: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

impl MetaClient {
    fn connect(sock: &Path) -> MetaClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = MetaClient { s, cookie: 0 };
        let mut greeting = [0u8; 18];
        c.s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        c.s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        let replies = c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "structured replies");
        c
    }

    /// Sends an option; returns its replies up to the ACK or an error.
    fn option(&mut self, code: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let head = [b"IHAVEOPT".as_slice(), &code.to_be_bytes(), &(data.len() as u32).to_be_bytes()].concat();
        self.s.write_all(&[head.as_slice(), data].concat()).unwrap();
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            let kind = be32(&h[12..]);
            let mut d = vec![0u8; be32(&h[16..]) as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = kind == REP_ACK || kind & (1 << 31) != 0;
            replies.push((kind, d));
            if last {
                return replies;
            }
        }
    }

    /// LIST (`set` false) or SET: the contexts answered, or the error type.
    fn meta(&mut self, set: bool, export: &str, queries: &[&str]) -> Result<Vec<(u32, String)>, u32> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let code = if set { OPT_SET_META_CONTEXT } else { OPT_LIST_META_CONTEXT };
        let mut contexts = Vec::new();
        for (kind, data) in self.option(code, &d) {
            match kind {
                REP_META_CONTEXT => contexts.push((be32(&data), String::from_utf8(data[4..].to_vec()).unwrap())),
                REP_ACK => {}
                err => return Err(err),
            }
        }
        Ok(contexts)
    }

    /// The names alone (ids differ between servers).
    fn list(&mut self, export: &str, queries: &[&str]) -> Result<Vec<String>, u32> {
        self.meta(false, export, queries).map(|c| c.into_iter().map(|(_, n)| n).collect())
    }

    fn go(&mut self, export: &str) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let replies = self.option(OPT_GO, &d);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "GO {export}");
    }

    /// One block status request: the chunks as (context id, extents), or
    /// the NBD error.
    fn block_status(&mut self, offset: u64, len: u32, flags: u16) -> Result<Vec<(u32, Extents)>, u32> {
        self.cookie += 1;
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&r).unwrap();
        let mut chunks = Vec::new();
        let mut error = None;
        loop {
            let mut magic = [0u8; 4];
            self.s.read_exact(&mut magic).unwrap();
            if be32(&magic) == SIMPLE_REPLY_MAGIC {
                let mut rest = [0u8; 12];
                self.s.read_exact(&mut rest).unwrap();
                return Err(be32(&rest));
            }
            assert_eq!(be32(&magic), STRUCTURED_REPLY_MAGIC);
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h).unwrap();
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), self.cookie);
            let mut payload = vec![0u8; be32(&h[12..]) as usize];
            self.s.read_exact(&mut payload).unwrap();
            match kind {
                CHUNK_BLOCK_STATUS => {
                    let extents = payload[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
                    chunks.push((be32(&payload), extents));
                }
                k if k & (1 << 15) != 0 => error = Some(be32(&payload)),
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return error.map_or(Ok(chunks), Err);
            }
        }
    }
}

/// base.qcow2 with data at 4M and 10M, top.qcow2 over it.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("base.qcow2");
    support::qcow2_image(&base, "64M", None);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 5 4M 1M", "-c", "write -P 6 10M 64k"]).arg(&base));
    support::qcow2_image(&dir.join("top.qcow2"), "64M", Some(&base));
}

/// One daemon's side of the comparison: everything is written down with
/// its directory as `DIR`.
struct Session<'a> {
    q: Peer,
    dir: &'a Path,
    seen: Vec<String>,
}

impl Session<'_> {
    fn text(&self, s: &str) -> String {
        s.replace(&self.dir.display().to_string(), "DIR")
    }

    fn note(&mut self, what: String) {
        let t = self.text(&what);
        self.seen.push(t);
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Reply {
        let r = self.q.execute(cmd, args.clone());
        self.note(format!("{cmd} {args} -> {r:?}"));
        r
    }

    fn ok(&mut self, cmd: &str, args: Value) {
        let r = self.exec(cmd, args);
        assert!(matches!(r, Reply::Return(_)), "{cmd}: {r:?}");
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.dir.join("nbd.sock").display())
    }

    fn tool(&mut self, cmd: &mut Command) {
        let out = cmd.output().unwrap();
        let text = format!("{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        self.note(text);
    }

    /// The bitmaps of `top` and `base` as query-named-block-nodes shows them.
    fn bitmaps(&mut self) {
        let Reply::Return(nodes) = self.q.execute("query-named-block-nodes", json!({})) else { panic!("query failed") };
        for name in ["top", "base"] {
            let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == name).unwrap();
            self.note(format!("{name}: {}", n["dirty-bitmaps"]));
        }
    }
}

/// The session both daemons get; returns what was seen.
fn contexts_session(q: Peer, dir: &Path) -> Vec<String> {
    let mut s = Session { q, dir, seen: Vec::new() };
    let file = |name: &str| json!({"driver": "file", "filename": dir.join(name)});
    s.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true, "file": file("base.qcow2")}),
    );
    s.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "top", "backing": "base", "file": file("top.qcow2")}));
    // A filter over the chain, and a raw node (not a filter: it ends a chain).
    s.ok("blockdev-add", json!({"driver": "blkdebug", "node-name": "dbg", "image": "top"}));
    s.ok("blockdev-add", json!({"driver": "raw", "node-name": "rawtop", "file": "top"}));
    s.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}));
    s.ok("block-dirty-bitmap-add", json!({"node": "top", "name": "b0"}));
    s.ok("block-dirty-bitmap-add", json!({"node": "top", "name": "fine", "granularity": 4096}));
    s.ok("block-dirty-bitmap-add", json!({"node": "top", "name": "off", "disabled": true}));
    s.ok("block-dirty-bitmap-add", json!({"node": "base", "name": "inbase_on"}));

    // What an export accepts and refuses; each export made here goes again.
    for args in [
        json!({"bitmaps": ["nope"]}),
        json!({"bitmaps": ["b0"]}),
        json!({"bitmaps": ["b0"], "writable": true}),
        json!({"bitmaps": [{"node": "top", "name": "b0"}]}),
        json!({"bitmaps": ["inbase_on"]}),
        json!({"bitmaps": ["off", "off"], "allocation-depth": true}),
        json!({"bitmaps": []}),
        json!({"bitmaps": ["inbase_on", "b0"], "node-name": "dbg", "writable": true}),
        json!({"bitmaps": ["b0"], "node-name": "rawtop", "writable": true}),
        json!({"bitmaps": [{"node": "nope", "name": "b0"}]}),
        json!({"bitmaps": [{"node": "top", "name": "nope"}]}),
        json!({"bitmaps": [{"node": "base", "name": "b0"}]}),
        json!({"bitmaps": [{"node": "top"}]}),
        json!({"bitmaps": [{"name": "b0"}]}),
        json!({"bitmaps": [{"node": 1, "name": "b0"}]}),
        json!({"bitmaps": [{"node": "top", "name": "b0", "x": 1}]}),
        json!({"bitmaps": ["off", 3]}),
        json!({"bitmaps": "off"}),
        json!({"bitmaps": null}),
        json!({"allocation-depth": "yes"}),
        json!({"allocation-depth": null}),
    ] {
        let mut a = json!({"type": "nbd", "id": "e", "node-name": "top"});
        a.as_object_mut().unwrap().extend(args.as_object().unwrap().clone());
        if matches!(s.exec("block-export-add", a), Reply::Return(_)) {
            s.q.execute("block-export-del", json!({"id": "e"}));
        }
    }
    // The older command's one `bitmap`.
    for bitmap in ["b0", "off", "nope"] {
        let r = s.exec("nbd-server-add", json!({"device": "top", "name": "legacy", "bitmap": bitmap}));
        if matches!(r, Reply::Return(_)) {
            s.ok("nbd-server-remove", json!({"name": "legacy"}));
        }
    }
    s.bitmaps();

    // The exports read below; their bitmaps are busy.
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w", "name": "w", "node-name": "top", "writable": true, "allocation-depth": true,
               "bitmaps": ["b0", "fine"]}),
    );
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "name": "ro", "node-name": "top", "bitmaps": ["inbase_on", {"node": "top", "name": "off"}]}),
    );
    for (cmd, args) in [
        ("block-dirty-bitmap-remove", json!({"node": "top", "name": "b0"})),
        ("block-dirty-bitmap-clear", json!({"node": "top", "name": "fine"})),
        ("block-dirty-bitmap-enable", json!({"node": "top", "name": "off"})),
        ("block-dirty-bitmap-disable", json!({"node": "top", "name": "b0"})),
        ("block-dirty-bitmap-remove", json!({"node": "base", "name": "inbase_on"})),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "name": "e", "node-name": "top", "writable": true, "bitmaps": ["b0"]}),
        ),
    ] {
        s.exec(cmd, args);
    }
    s.bitmaps();

    let w = s.uri("w");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 100k 10", "-c", "write -P 2 1M 200k", "-c", "write -z 20M 1M"])
        .args(["-c", "write -P 3 10M 4k", "-c", "write -P 4 67104768 4096"])
        .arg(&w));
    for context in ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine"] {
        s.tool(Command::new("nbdinfo").arg(format!("--map={context}")).arg(&w));
    }
    // Layers as QEMU counts them: a filter is one, a raw node ends the walk.
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "d", "name": "d", "node-name": "dbg", "allocation-depth": true}),
    );
    s.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "r", "name": "r", "node-name": "rawtop", "allocation-depth": true}),
    );
    for export in ["d", "r"] {
        let uri = s.uri(export);
        s.tool(Command::new("nbdinfo").arg("--map=qemu:allocation-depth").arg(&uri));
    }
    let ro = s.uri("ro");
    for context in ["qemu:dirty-bitmap:inbase_on", "qemu:dirty-bitmap:off"] {
        s.tool(Command::new("nbdinfo").arg(format!("--map={context}")).arg(&ro));
    }
    // QEMU's client reads a chosen context as if it were base:allocation:
    // its bit 0 (dirty) reads as a hole, so dirty ranges show as data: false.
    for context in ["qemu:dirty-bitmap:fine", "qemu:allocation-depth"] {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},export=w,x-dirty-bitmap={context}",
            dir.join("nbd.sock").display()
        );
        s.tool(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]));
    }

    // Lists and selections, then block status of several contexts at once.
    let sock = dir.join("nbd.sock");
    let mut c = MetaClient::connect(&sock);
    for (export, queries) in [
        ("w", vec![]),
        ("w", vec!["qemu:"]),
        ("w", vec!["qemu:dirty-bitmap:"]),
        ("w", vec!["base:"]),
        ("w", vec!["qemu:allocation-depth", "nope:x", "qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:off"]),
        ("ro", vec![]),
        ("ro", vec!["qemu:allocation-depth"]),
        ("nope", vec![]),
    ] {
        let got = c.list(export, &queries);
        s.note(format!("LIST {export} {queries:?} -> {got:?}"));
    }
    let set = c.meta(
        true,
        "w",
        &["qemu:dirty-bitmap:fine", "base:allocation", "qemu:", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"],
    );
    let set = set.unwrap();
    s.note(format!("SET -> {:?}", set.iter().map(|(_, n)| n).collect::<Vec<_>>()));
    c.go("w");
    let name = |id: u32| set.iter().find(|(i, _)| *i == id).map(|(_, n)| n.clone()).unwrap_or_default();
    for (offset, len, flags) in [
        (0, 64 * MIB as u32, 0),
        (MIB + 10, 100 << 10, 0),
        (0, 64 * MIB as u32, FLAG_REQ_ONE),
        (100 << 10, 4 << 20, FLAG_REQ_ONE),
    ] {
        let got = c
            .block_status(offset, len, flags)
            .map(|chunks| chunks.into_iter().map(|(id, extents)| (name(id), extents)).collect::<Vec<_>>());
        s.note(format!("BLOCK_STATUS {offset} {len} {flags} -> {got:?}"));
    }
    // Nothing selected: block status is refused.
    let mut none = MetaClient::connect(&sock);
    let sel = none.meta(true, "w", &["qemu:dirty-bitmap:", "nope"]);
    none.go("w");
    let got = none.block_status(0, 4096, 0);
    s.note(format!("SET nothing {sel:?}, BLOCK_STATUS -> {got:?}"));
    drop((c, none));

    // The bitmaps are free again once their export is gone.
    s.ok("block-export-del", json!({"id": "w", "mode": "hard"}));
    s.bitmaps();
    s.ok("nbd-server-stop", json!({}));
    s.bitmaps();
    s.ok("block-dirty-bitmap-remove", json!({"node": "top", "name": "b0"}));
    s.seen
}

#[test]
fn contexts_and_their_refusals_match_qemu_storage_daemon() {
    let d = Daemon::start();
    let mut seen = Vec::new();
    for who in ["qsd", "spindle"] {
        let dir = d.path(who);
        images(&dir);
        let qsd;
        let q = if who == "qsd" {
            qsd = Some(Qsd::start(&dir));
            Peer::negotiated(&qsd.as_ref().unwrap().qmp)
        } else {
            qsd = None;
            Peer::negotiated(&d.qmp)
        };
        seen.push(contexts_session(q, &dir));
        drop(qsd);
    }
    let (qsd, spindle) = (&seen[0], &seen[1]);
    for (a, b) in qsd.iter().zip(spindle) {
        assert_eq!(a, b, "qemu-storage-daemon (left) and Spindle (right) differ");
    }
    assert_eq!(qsd.len(), spindle.len());
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

fn qio(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    assert!(!out.contains("fail"), "{cmds:?}: {out}");
}

fn bitmap(d: &Daemon, node: &str, name: &str) -> Value {
    let nodes = d.ok("query-named-block-nodes", json!({}));
    let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap();
    n["dirty-bitmaps"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap().clone()
}

/// Whether two raw images hold the same bytes.
fn same(a: &Path, b: &str) -> bool {
    let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(a).arg(b).output().unwrap();
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stderr));
    out.status.success()
}

#[test]
fn a_pull_backup_reads_the_dirty_extents_of_a_fleecing_export() {
    let d = Daemon::start();
    let mut q = Qmp::negotiated(&d.qmp);
    let src = d.path("src.qcow2");
    support::qcow2_image(&src, "32M", None);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 32M"]).arg(&src));
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": src}}));
    let sock = d.path("nbd.sock");
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": sock}}}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "src", "node-name": "src", "writable": true}));
    let src_uri = format!("nbd+unix:///src?socket={}", sock.display());
    let fleece_uri = format!("nbd+unix:///fleece?socket={}", sock.display());

    // The full backup, and the bitmap that starts with it (nothing is
    // written between the two).
    d.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b0"}));
    let copy = d.path("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &src_uri]).arg(&copy));
    qio(&src_uri, &["write -P 0x21 1M 64k", "write -P 0x22 5M 3M", "write -z 12M 1M", "write -P 0x23 31M 4k"]);

    // The fleecing point is the backup job's start: from then on an overlay
    // over the disk keeps what the disk is about to lose. b1 starts before
    // it and b0 stops after it, so a write in between lands in both: b0
    // may mark a range the fleecing export still shows unchanged (copied
    // for nothing, harmlessly), but neither misses a write.
    let fleece = d.path("fleece.qcow2");
    support::qcow2_image(&fleece, "32M", Some(&src));
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece", "backing": "src",
               "file": {"driver": "file", "filename": fleece}}),
    );
    d.ok("block-dirty-bitmap-add", json!({"node": "src", "name": "b1"}));
    d.ok("blockdev-backup", json!({"job-id": "fl", "device": "src", "target": "fleece", "sync": "none"}));
    let point = d.path("point.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &src_uri]).arg(&point));
    qio(&src_uri, &["write -P 0x24 24M 64k"]);
    d.ok("block-dirty-bitmap-disable", json!({"node": "src", "name": "b0"}));
    // A recording bitmap of the written disk cannot back a read-only export.
    let (_, msg, _) =
        d.err("block-export-add", json!({"type": "nbd", "id": "fleece", "node-name": "fleece", "bitmaps": ["b1"]}));
    assert_eq!(msg, "Enabled bitmap 'b1' incompatible with readonly export");
    // b0 is found below the overlay, on its backing file.
    d.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "fleece", "node-name": "fleece", "bitmaps": ["b0"], "allocation-depth": true}),
    );
    assert_eq!(bitmap(&d, "src", "b0")["busy"], true);
    // Bitmaps live in memory only: a saved configuration brings the export
    // back without them (none would exist to find), with its other contexts.
    let config = d.ok("save_config", json!({}));
    let saved = config.as_array().unwrap().iter().find(|c| c["params"]["id"] == "fleece").unwrap();
    assert_eq!(saved["params"]["allocation-depth"], true, "{saved}");
    assert!(saved["params"].get("bitmaps").is_none(), "{saved}");

    // The disk keeps changing: over dirty ranges, clean ones, and across.
    qio(&src_uri, &["write -P 0x31 5M 1M", "write -P 0x32 20M 2M", "write -P 0x33 1056k 64k"]);
    let map = run(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:b0", "--json", &fleece_uri]));
    let map: Value = serde_json::from_str(&map).unwrap();
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let k64 = 64 << 10;
    assert_eq!(dirty, [(MIB, k64), (5 * MIB, 3 * MIB), (12 * MIB, MIB), (24 * MIB, k64), (31 * MIB, k64)], "{map}");
    assert_eq!(bitmap(&d, "src", "b0")["count"], 4 * MIB + 3 * k64, "b0 stopped when it was disabled");

    // The client reads only the dirty extents and applies them to its copy.
    let mut client = NbdClient::connect(&sock, "fleece").unwrap();
    let out = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    let mut pulled = 0;
    for (i, &(offset, len)) in dirty.iter().enumerate() {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(4 * MIB);
            let data = client.read(at, n as u32).unwrap();
            out.write_all_at(&data, at).unwrap();
            at += n;
            pulled += n;
        }
        if i == 0 {
            qio(&src_uri, &["write -P 0x34 5M 4M"]);
        }
    }
    drop(out);
    client.disconnect().unwrap();
    assert_eq!(pulled, 4 * MIB + 3 * k64);
    assert!(same(&copy, point.to_str().unwrap()), "the copy is the disk at the fleecing point");
    assert!(!same(&copy, &src_uri), "the disk moved on");
    assert!(bitmap(&d, "src", "b1")["count"].as_u64().unwrap() > 0, "b1 saw the writes after the point");

    // The export gone, b0 is free; the overlay goes with the job.
    d.ok("block-export-del", json!({"id": "fleece"}));
    assert_eq!(bitmap(&d, "src", "b0")["busy"], false);
    d.ok("job-cancel", json!({"id": "fl"}));
    wait_end(&mut q, "fl");
    d.ok("blockdev-del", json!({"node-name": "fleece"}));
    d.ok("block-dirty-bitmap-remove", json!({"node": "src", "name": "b0"}));
}
