//! The NBD export server against real clients — qemu-img, qemu-io,
//! libnbd's nbdinfo and nbdcopy — and against hostile ones written here
//! with Spindle's own codec.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Daemon, Qmp, run, sparse_file};

fn uri(d: &Daemon, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", d.path("nbd.sock").display())
}

fn start_server(d: &Daemon) {
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
}

fn export(d: &Daemon, id: &str, node: &str, writable: bool) {
    d.ok("block-export-add", json!({"type": "nbd", "id": id, "node-name": node, "name": id, "writable": writable}));
}

/// qemu-io on an NBD URI; returns combined output and success.
fn nbd_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed") && !text.contains("error"), text)
}

fn qcow2(d: &Daemon, name: &str, size: &str) -> std::path::PathBuf {
    let p = d.path(name);
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&p).arg(size));
    p
}

#[test]
fn qemu_tools_read_and_write_raw_and_qcow2_exports() {
    let d = Daemon::start();
    start_server(&d);
    let raw = d.path("disk.raw");
    sparse_file(&raw, 32 << 20);
    let q = qcow2(&d, "disk.qcow2", "32M");
    d.ok("blockdev-add", json!({"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": raw}}));
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": q}}));
    export(&d, "r", "r", true);
    export(&d, "q", "q", true);
    for name in ["r", "q"] {
        let u = uri(&d, name);
        let info = run(Command::new("qemu-img").args(["info", "-f", "raw", &u]));
        assert!(info.contains("virtual size: 32 MiB"), "{info}");
        let (ok, out) =
            nbd_io(&u, &["write -P 0x31 0 1M", "write -P 0x32 5000 3", "write -z 2M 1M", "write -P 0x33 30M 2M"]);
        assert!(ok, "{out}");
        let (ok, out) = nbd_io(
            &u,
            &[
                "read -P 0x31 0 5000",
                "read -P 0x32 5000 3",
                "read -P 0x31 5003 1043573",
                "read -P 0 2M 1M",
                "read -P 0x33 30M 2M",
            ],
        );
        assert!(ok, "{out}");
        // The daemon sees what the client wrote.
        d.debug_io(name, "read -P 0x33 30M 2M").unwrap();
    }
    // qemu-img convert out of an export, compare against it.
    let copy = d.path("copy.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri(&d, "q")]).arg(&copy));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri(&d, "q")]).arg(&copy));
    d.ok("block-export-del", json!({"id": "q"}));
    d.ok("blockdev-del", json!({"node-name": "q"}));
    let chk = Command::new("qemu-img").args(["check"]).arg(&q).output().unwrap();
    assert!(chk.status.success(), "{}", String::from_utf8_lossy(&chk.stdout));
}

#[test]
fn read_only_exports_refuse_writes() {
    let d = Daemon::start();
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 4 << 20}));
    d.debug_io("m", "write -P 0x44 0 1M").unwrap();
    export(&d, "ro", "m", false);
    let u = uri(&d, "ro");
    let out = run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x44 0 1M", &u]));
    assert!(!out.contains("failed"), "{out}");
    let (ok, out) = nbd_io(&u, &["write -P 1 0 4k"]);
    assert!(!ok, "a write to a read-only export must fail: {out}");
    let info = run(Command::new("nbdinfo").arg(&u));
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    d.debug_io("m", "read -P 0x44 0 1M").unwrap();
}

#[test]
fn block_status_over_nbd_matches_the_local_answer() {
    let d = Daemon::start();
    start_server(&d);
    let q = qcow2(&d, "bs.qcow2", "16M");
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 3M 1M", "-c", "write -P 2 8M 64k"])
        .arg(&q));
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "read-only": true, "file": {"driver": "file", "filename": q}}),
    );
    export(&d, "q", "q", false);
    // (start, length, zero, data) per merged extent.
    let runs = |v: &Value| -> Vec<(u64, u64, bool, bool)> {
        let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
        for e in v.as_array().unwrap() {
            let (s, l, z, dt) =
                (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["zero"] == true, e["data"] == true);
            match out.last_mut() {
                Some(last) if last.2 == z && last.3 == dt && last.0 + last.1 == s => last.1 += l,
                _ => out.push((s, l, z, dt)),
            }
        }
        out
    };
    let local = runs(&d.ok("x-block-status", json!({"node-name": "q"})));
    let over_nbd: Value =
        serde_json::from_str(&run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri(&d, "q")])))
            .unwrap();
    assert_eq!(runs(&over_nbd), local);
    // nbdinfo --map: offset, length, type (0 data, 3 hole+zero, 2 zero).
    let map = run(Command::new("nbdinfo").args(["--map", &uri(&d, "q")]));
    let nbd_runs: Vec<(u64, u64, bool, bool)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let t: u32 = f[2].parse().unwrap();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), t & 2 != 0, t & 1 == 0)
        })
        .collect();
    let mut merged: Vec<(u64, u64, bool, bool)> = Vec::new();
    for r in nbd_runs {
        match merged.last_mut() {
            Some(last) if last.2 == r.2 && last.3 == r.3 => last.1 += r.1,
            _ => merged.push(r),
        }
    }
    assert_eq!(merged, local, "nbdinfo --map:\n{map}");
}

#[test]
fn nbdcopy_round_trip() {
    let d = Daemon::start();
    start_server(&d);
    let src = d.path("src.raw");
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 8 << 20}));
    export(&d, "m", "m", true);
    run(Command::new("nbdcopy").arg(&src).arg(uri(&d, "m")));
    let back = d.path("back.raw");
    run(Command::new("nbdcopy").arg(uri(&d, "m")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "nbdcopy round trip changed the data");
}

#[test]
fn many_clients_write_disjoint_ranges() {
    let d = Daemon::start();
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 64 << 20}));
    export(&d, "m", "m", true);
    let u = uri(&d, "m");
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            let u = u.clone();
            std::thread::spawn(move || {
                let cmds: Vec<String> =
                    (0..16u64).map(|k| format!("write -P {} {} 16k", 0x10 + i, (i << 22) + k * 16384)).collect();
                let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                nbd_io(&u, &refs)
            })
        })
        .collect();
    for c in clients {
        let (ok, out) = c.join().unwrap();
        assert!(ok, "{out}");
    }
    for i in 0..16u64 {
        d.debug_io("m", &format!("read -P {} {} 256k", 0x10 + i, i << 22)).unwrap();
    }
}

#[test]
fn export_commands_follow_qemu() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    let (_, msg, _) = d.err("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "m"}));
    assert_eq!(msg, "NBD server not running");
    start_server(&d);
    let (_, msg, _) =
        d.err("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("other.sock")}}}));
    assert_eq!(msg, "NBD server already running");
    export(&d, "e", "m", true);
    let (code, msg, _) = d.err("block-export-add", json!({"type": "nbd", "id": "e", "node-name": "m"}));
    assert_eq!((code, msg.as_str()), (-17, "Block export id 'e' is already in use"));
    let (_, msg, _) = d.err("block-export-add", json!({"type": "nbd", "id": "e2", "node-name": "m", "name": "e"}));
    assert_eq!(msg, "NBD server already has export named 'e'");
    let (code, msg, _) = d.err("block-export-add", json!({"type": "nbd", "id": "e3", "node-name": "nope"}));
    assert_eq!((code, msg.as_str()), (-19, "Cannot find device='' nor node-name='nope'"));
    let (_, msg, _) = d.err("block-export-add", json!({"type": "vhost-user-blk", "id": "e4", "node-name": "m"}));
    assert!(msg.contains("does not accept value 'vhost-user-blk'"), "{msg}");
    let (code, msg, _) = d.err("blockdev-del", json!({"node-name": "m"}));
    assert_eq!(code, -16, "{msg}");
    assert!(msg.contains("export 'e'"), "{msg}");
    assert_eq!(
        d.ok("query-block-exports", Value::Null),
        json!([{"type": "nbd", "id": "e", "node-name": "m", "shutting-down": false}])
    );
    let mut q = Qmp::negotiated(&d.qmp);
    assert_eq!(q.execute("block-export-del", Some(json!({"id": "e"}))), json!({"return": {}}));
    assert_eq!(q.event("BLOCK_EXPORT_DELETED")["data"], json!({"id": "e"}));
    let (_, msg, _) = d.err("block-export-del", json!({"id": "e"}));
    assert_eq!(msg, "Export 'e' is not found");
    d.ok("blockdev-del", json!({"node-name": "m"}));
    d.ok("nbd-server-stop", Value::Null);
    let (_, msg, _) = d.err("nbd-server-stop", Value::Null);
    assert_eq!(msg, "NBD server not running");
}

#[test]
fn safe_delete_refuses_while_a_client_is_connected_and_hard_cuts_it() {
    let d = Daemon::start();
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    export(&d, "e", "m", true);
    let mut client = RawClient::connect(&d.path("nbd.sock"));
    client.go("e");
    let (code, msg, _) = d.err("block-export-del", json!({"id": "e"}));
    assert_eq!((code, msg.as_str()), (-16, "export 'e' still in use"));
    d.ok("block-export-del", json!({"id": "e", "mode": "hard"}));
    assert!(client.closed(), "a hard delete cuts the client off");
    d.ok("blockdev-del", json!({"node-name": "m"}));
}

#[test]
fn save_config_and_command_line_start_the_server() {
    let d = Daemon::start();
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    let sock = tempfile::tempdir().unwrap();
    let nbd_sock = sock.path().join("n.sock");
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}}));
    export(&d, "e", "m", true);
    let cfg = d.ok("save_config", Value::Null);
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["blockdev-add", "nbd-server-start", "block-export-add"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
    assert!(d.stop().success());
    let d2 = Daemon::start_in(dir, &["--config", "cfg.json"]);
    let (ok, out) =
        nbd_io(&format!("nbd+unix:///e?socket={}", nbd_sock.display()), &["write -P 7 0 4k", "read -P 7 0 4k"]);
    assert!(ok, "{out}");
    assert!(d2.stop().success());
    // QSD-style command line.
    let img = sock.path().join("cl.raw");
    sparse_file(&img, 1 << 20);
    let nbd2 = sock.path().join("n2.sock");
    let d3 = Daemon::start_with(&[
        "--blockdev",
        &format!("driver=raw,node-name=disk,file.driver=file,file.filename={}", img.display()),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", nbd2.display()),
        "--export",
        "type=nbd,id=exp,node-name=disk,name=disk,writable=on",
    ]);
    let (ok, out) =
        nbd_io(&format!("nbd+unix:///disk?socket={}", nbd2.display()), &["write -P 9 0 4k", "read -P 9 0 4k"]);
    assert!(ok, "{out}");
    assert!(d3.stop().success());
}

/// A minimal NBD client over a Unix socket, built on Spindle's codec,
/// for sending what well-behaved clients never send.
struct RawClient {
    s: UnixStream,
}

impl RawClient {
    fn connect(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RawClient { s };
        let mut greeting = [0u8; 18];
        c.s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        c.s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        c
    }

    fn option(&mut self, code: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut req = b"IHAVEOPT".to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        req.extend_from_slice(&(data.len() as u32).to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req).unwrap();
        self.reply()
    }

    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (kind, data)
    }

    /// NBD_OPT_GO with simple replies; panics unless the export opens.
    fn go(&mut self, name: &str) -> u64 {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.s
            .write_all(
                &[b"IHAVEOPT".as_slice(), &7u32.to_be_bytes(), &(data.len() as u32).to_be_bytes(), &data].concat(),
            )
            .unwrap();
        let mut size = 0;
        loop {
            let (kind, d) = self.reply();
            match kind {
                1 => return size,
                3 if u16::from_be_bytes([d[0], d[1]]) == 0 => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
                3 => {}
                other => panic!("GO failed: reply type {other:#x}: {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn protocol_errors_get_errors_or_a_closed_connection() {
    let d = Daemon::start();
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 1 << 20}));
    export(&d, "e", "m", true);
    export(&d, "ro", "m", false);
    let sock = d.path("nbd.sock");
    // Unknown options are refused and the handshake carries on.
    let mut c = RawClient::connect(&sock);
    assert_eq!(c.option(0x7777, b"").0, 0x8000_0001, "ERR_UNSUP");
    assert_eq!(c.option(6, b"\x00\x00\x00\x04nope\x00\x00").0, 0x8000_0006, "INFO of an unknown export: ERR_UNKNOWN");
    assert_eq!(c.option(6, b"\x00\x00\x00").0, 0x8000_0003, "a malformed INFO: ERR_INVALID");
    assert_eq!(c.option(10, b"").0, 0x8000_0003, "meta contexts need structured replies first");
    let (kind, data) = c.option(3, b"");
    assert_eq!(kind, 2, "LIST answers SERVER replies");
    assert!(data.len() >= 4);
    // One SERVER reply per export, then ACK.
    assert_eq!(c.reply().0, 2);
    assert_eq!(c.reply().0, 1);
    // An option above the size limit is skipped and refused.
    let big = vec![0u8; 70_000];
    assert_eq!(c.option(6, &big).0, 0x8000_0009, "ERR_TOO_BIG");
    assert_eq!(c.go("e"), 1 << 20);
    // Out of range and unknown commands: EINVAL/ENOSPC, connection stays.
    c.request(0, 1, (1 << 20) - 512, 1024, &[]);
    assert_eq!(c.simple_reply(), (22, 1));
    c.request(1, 2, 1 << 20, 512, &[0u8; 512]);
    assert_eq!(c.simple_reply(), (28, 2));
    c.request(99, 3, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (22, 3));
    c.request(0, 4, 0, 512, &[]);
    let (err, cookie) = c.simple_reply();
    assert_eq!((err, cookie), (0, 4));
    let mut data = [0u8; 512];
    c.s.read_exact(&mut data).unwrap();
    // A write larger than the maximum payload ends the connection.
    c.request(1, 5, 0, 64 << 20, &[]);
    assert!(c.closed());
    // Writes to a read-only export: EPERM, the payload is consumed.
    let mut r = RawClient::connect(&sock);
    r.go("ro");
    r.request(1, 6, 0, 4096, &[0xee; 4096]);
    assert_eq!(r.simple_reply(), (1, 6));
    r.request(4, 7, 0, 4096, &[]);
    assert_eq!(r.simple_reply(), (1, 7));
    // Bad request magic: the connection is closed.
    r.s.write_all(&[0u8; 28]).unwrap();
    assert!(r.closed());
    // A bad greeting answer (client flags with unknown bits).
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // EXPORT_NAME of an unknown export closes (the protocol has no error reply for it).
    let mut e = RawClient::connect(&sock);
    e.s.write_all(&[b"IHAVEOPT".as_slice(), &1u32.to_be_bytes(), &4u32.to_be_bytes(), b"nope"].concat()).unwrap();
    assert!(e.closed());
    // Everyone else is fine.
    let (ok, out) = nbd_io(&uri(&d, "e"), &["write -P 3 0 4k", "read -P 3 0 4k"]);
    assert!(ok, "{out}");
}

#[test]
fn half_sent_requests_abrupt_disconnects_and_clients_that_never_read() {
    let d = Daemon::start();
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 64 << 20}));
    export(&d, "e", "m", true);
    let sock = d.path("nbd.sock");
    for _ in 0..10 {
        let mut c = RawClient::connect(&sock);
        c.go("e");
        // Half a header, then gone.
        c.s.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
        drop(c);
        // Half a write payload, then gone.
        let mut c = RawClient::connect(&sock);
        c.go("e");
        c.request(1, 1, 0, 65536, &[1u8; 1000]);
        drop(c);
        // Gone during the handshake.
        let c = UnixStream::connect(&sock).unwrap();
        drop(c);
    }
    // A client that floods 1 MiB reads and never reads a reply: the server
    // stops taking its requests once its in-flight budget is used.
    let mut hog = RawClient::connect(&sock);
    hog.go("e");
    hog.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0;
    for i in 0..10_000u64 {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(&i.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&(1u32 << 20).to_be_bytes());
        if hog.s.write_all(&r).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent < 10_000, "the server must stop reading from a client that does not read");
    let (ok, out) = nbd_io(&uri(&d, "e"), &["write -P 5 1M 64k", "read -P 5 1M 64k"]);
    assert!(ok, "another client is served meanwhile: {out}");
    drop(hog);
    d.ok("query-version", Value::Null);
    // Once the hog is gone the export can be deleted safely.
    std::thread::sleep(Duration::from_millis(200));
    d.ok("block-export-del", json!({"id": "e"}));
}

/// Starts qemu-nbd serving `image` on a Unix socket; killed on drop.
struct QemuNbd {
    child: std::process::Child,
}

impl QemuNbd {
    fn start(image: &Path, fmt: &str, sock: &Path, extra: &[&str]) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-f", fmt, "-k"])
            .arg(sock)
            .args(["-x", "disk", "--persistent", "--shared=8"])
            .args(extra)
            .arg(image)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if UnixStream::connect(sock).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nbd_node(d: &Daemon, name: &str, sock: &Path, extra: Value) {
    let mut opts =
        json!({"driver": "nbd", "node-name": name, "export": "disk", "server": {"type": "unix", "path": sock}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            opts[k] = v;
        }
    }
    d.ok("blockdev-add", opts);
}

#[test]
fn the_nbd_driver_reads_and_writes_a_qemu_nbd_export() {
    let d = Daemon::start();
    let img = d.path("remote.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("64M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x61 0 1M", "-c", "write -z 8M 1M"]).arg(&img));
    let sock = d.path("qnbd.sock");
    let server = QemuNbd::start(&img, "qcow2", &sock, &[]);
    nbd_node(&d, "remote", &sock, json!({}));
    let nodes = d.ok("query-named-block-nodes", Value::Null);
    assert_eq!(nodes[0]["image"]["virtual-size"], 64 << 20);
    d.debug_io("remote", "read -P 0x61 0 1M").unwrap();
    // Larger than one NBD request of qemu-nbd's: split into parts.
    d.debug_io("remote", "write -P 0x62 16M 40M").unwrap();
    d.debug_io("remote", "read -P 0x62 16M 40M").unwrap();
    d.debug_io("remote", "write -P 0x63 1000 3000").unwrap();
    d.debug_io("remote", "write -z 2M 1M").unwrap();
    d.debug_io("remote", "read -P 0 2M 1M").unwrap();
    d.debug_io("remote", "flush").unwrap();
    let m = d.ok("x-block-status", json!({"node-name": "remote", "offset": 8 << 20, "length": 1 << 20}));
    assert_eq!(m[0]["zero"], true, "{m}");
    // As a backing file: a local overlay reads through to the remote export.
    let overlay = d.path("overlay.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&overlay).arg("64M"));
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "ov", "backing": "remote", "file": {"driver": "file", "filename": overlay}}));
    d.debug_io("ov", "write -P 0x64 2M 4k").unwrap();
    d.debug_io("ov", "read -P 0x61 0 1000").unwrap();
    d.debug_io("ov", "read -P 0x64 2M 4k").unwrap();
    let m = d.ok("x-block-status", json!({"node-name": "ov", "length": 1 << 20}));
    assert_eq!((m[0]["depth"].as_u64(), m[0]["data"].as_bool()), (Some(1), Some(true)), "{m}");
    d.ok("blockdev-del", json!({"node-name": "ov"}));
    d.ok("blockdev-del", json!({"node-name": "remote"}));
    drop(server);
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0x62 16M 40M",
            "-c",
            "read -P 0x63 1000 3000",
            "-c",
            "read -P 0x61 0 1000",
        ])
        .arg(&img));
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn the_nbd_driver_talks_to_qemu_storage_daemon_and_to_spindle() {
    let d = Daemon::start();
    // qemu-storage-daemon exporting a RAM-less null device with zeroes.
    let qsd_sock = d.path("qsd-nbd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .args(["--blockdev", "driver=null-co,node-name=n0,size=16777216,read-zeroes=on"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", qsd_sock.display()))
        .args(["--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on"])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if UnixStream::connect(&qsd_sock).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    nbd_node(&d, "qsd", &qsd_sock, json!({}));
    d.debug_io("qsd", "write -P 1 0 1M").unwrap();
    d.debug_io("qsd", "read -P 0 0 1M").unwrap();
    d.ok("blockdev-del", json!({"node-name": "qsd"}));
    let _ = qsd.kill();
    let _ = qsd.wait();
    // Spindle exporting to itself over NBD.
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "m", "size": 8 << 20}));
    d.ok("block-export-add", json!({"type": "nbd", "id": "disk", "node-name": "m", "name": "disk", "writable": true}));
    nbd_node(&d, "loop", &d.path("nbd.sock"), json!({}));
    d.debug_io("loop", "write -P 0x55 0 4M").unwrap();
    d.debug_io("m", "read -P 0x55 0 4M").unwrap();
    d.ok("blockdev-del", json!({"node-name": "loop"}));
}

#[test]
fn the_nbd_driver_fails_cleanly_and_reconnects() {
    let d = Daemon::start();
    let img = d.path("r.raw");
    sparse_file(&img, 16 << 20);
    let sock = d.path("rc.sock");
    // Nobody listens yet: open fails with a clear error.
    let (_, msg, _) = d.err(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "r", "export": "disk", "server": {"type": "unix", "path": sock}}),
    );
    assert!(msg.contains("Could not connect to NBD server"), "{msg}");
    let server = QemuNbd::start(&img, "raw", &sock, &[]);
    nbd_node(&d, "r", &sock, json!({"reconnect-delay": 10}));
    d.debug_io("r", "write -P 0x21 0 64k").unwrap();
    drop(server);
    // The server is gone: requests wait up to reconnect-delay; bring it back.
    let img2 = img.clone();
    let sock2 = sock.clone();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        QemuNbd::start(&img2, "raw", &sock2, &[])
    });
    let r = d.debug_io("r", "read -P 0x21 0 64k");
    let server = restart.join().unwrap();
    // The first request after the loss may fail (it was in flight); the next ones succeed.
    if r.is_err() {
        d.debug_io("r", "read -P 0x21 0 64k").unwrap();
    }
    d.debug_io("r", "write -P 0x22 64k 64k").unwrap();
    drop(server);
    // Without reconnect-delay, requests fail at once while the server is away.
    std::thread::sleep(Duration::from_millis(300));
    d.ok("blockdev-del", json!({"node-name": "r"}));
    let server = QemuNbd::start(&img, "raw", &sock, &[]);
    nbd_node(&d, "r0", &sock, json!({}));
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.debug_io("r0", "read 0 4k").is_err(), "no server, no delay: an error, not a hang");
    d.ok("blockdev-del", json!({"node-name": "r0"}));
    d.ok("query-version", Value::Null);
}

#[test]
fn connections_to_a_qcow2_export_are_served_on_the_image_home_reactor() {
    let d = Daemon::start_with(&["--cpumask", "0x3", "--no-pin"]);
    start_server(&d);
    let q = qcow2(&d, "home.qcow2", "8M");
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": q}}));
    export(&d, "q", "q", true);
    let msgs = |d: &Daemon| {
        let r = d.ok("framework_get_reactors", json!({}));
        r["reactors"].as_array().unwrap().iter().map(|x| x["msgs"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let cmds: Vec<String> = (0..500).map(|i| format!("read {} 4k", (i % 2048) * 4096)).collect();
    // Connections are accepted round-robin over the reactors; each one must
    // still not send its requests across reactors one by one.
    for _ in 0..2 {
        let before = msgs(&d);
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in &cmds {
            c.args(["-c", cmd]);
        }
        run(c.arg(uri(&d, "q")));
        let after = msgs(&d);
        let crossed: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        assert!(crossed < 200, "500 reads sent {crossed} messages between reactors");
    }
    d.stop();
}

#[test]
fn a_mirror_reaches_another_host_through_the_nbd_driver() {
    let mut d = Daemon::start();
    let src = qcow2(&d, "src.qcow2", "16M");
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x6e 0 12M", "-c", "write -z 12M 1M"]).arg(&src));
    let tgt = d.path("remote.raw");
    sparse_file(&tgt, 16 << 20);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xff 12M 4M"]).arg(&tgt));
    let sock = d.path("remote.sock");
    let server = QemuNbd::start(&tgt, "raw", &sock, &[]);
    d.ok("blockdev-add", json!({"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": src}}));
    nbd_node(&d, "remote", &sock, json!({}));
    let mut q = Qmp::negotiated(&d.qmp);
    let r =
        q.execute("blockdev-mirror", Some(json!({"job-id": "m", "device": "src", "target": "remote", "sync": "full"})));
    assert_eq!(r["return"], json!({}), "{r}");
    q.event("BLOCK_JOB_READY");
    assert_eq!(q.execute("job-complete", Some(json!({"id": "m"})))["return"], json!({}));
    let done = q.event("BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    d.ok("blockdev-del", json!({"node-name": "remote"}));
    d.ok("blockdev-del", json!({"node-name": "src"}));
    d.shutdown();
    drop(server);
    // Zeroes included: what read 0xff on the remote now reads as the source does.
    run(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "raw"]).arg(&src).arg(&tgt));
}

#[test]
fn a_null_device_never_returns_another_clients_data() {
    let d = Daemon::start_with(&["--cpumask", "0x1"]);
    start_server(&d);
    d.ok("blockdev-add", json!({"driver": "malloc", "node-name": "secret", "size": 16 << 20}));
    d.ok("blockdev-add", json!({"driver": "null-co", "node-name": "null", "size": 16 << 20}));
    export(&d, "secret", "secret", true);
    export(&d, "null", "null", true);
    for size in ["4k", "64k", "1M"] {
        // One client's data passes through the server's buffers...
        let (ok, text) = nbd_io(&uri(&d, "secret"), &[&format!("write -P 0xab 0 {size}"), &format!("read 0 {size}")]);
        assert!(ok, "{text}");
        // ...and a read of a device that writes nothing into them must not show it.
        let (ok, text) = nbd_io(&uri(&d, "null"), &[&format!("read -P 0 0 {size}")]);
        assert!(ok, "{size}: {text}");
    }
}
