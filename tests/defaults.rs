//! Safe defaults: private control sockets whatever the umask, an NBD
//! server that listens only where it is told, read-only nodes that refuse
//! writes in the device layer, and where relative paths in commands lead.
//! See docs/reliability.md, "Safe defaults".

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BIN, Daemon, run};

/// A daemon started through `sh -c 'umask U; exec spindle serve ARGS'` in a
/// fresh directory (its working directory); stopped by its PID.
struct Umasked {
    child: Child,
    dir: tempfile::TempDir,
}

impl Umasked {
    fn start(umask: &str, args: &[&str], wait_for: &[&str]) -> Umasked {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" serve \"$@\""))
            .arg(BIN)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Umasked { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !wait_for.iter().all(|s| UnixStream::connect(d.path(s)).is_ok()) {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("spindle exited ({status}):\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "sockets {wait_for:?} never appeared:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    fn mode(&self, name: &str) -> u32 {
        let meta = std::fs::metadata(self.path(name)).unwrap();
        assert!(meta.file_type().is_socket(), "{name} is a socket");
        meta.permissions().mode() & 0o777
    }
}

impl Drop for Umasked {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn control_sockets_are_0600_whatever_the_umask_and_the_nbd_socket_follows_it() {
    for umask in ["000", "022", "077"] {
        let d = Umasked::start(
            umask,
            &[
                "--rpc-socket",
                "rpc.sock",
                "--qmp-socket",
                "qmp.sock",
                "--nbd-server",
                "addr.type=unix,addr.path=nbd.sock",
            ],
            &["rpc.sock", "qmp.sock", "nbd.sock"],
        );
        assert_eq!(d.mode("rpc.sock"), 0o600, "JSON-RPC socket under umask {umask}");
        assert_eq!(d.mode("qmp.sock"), 0o600, "QMP socket under umask {umask}");
        // The NBD socket is bound as QEMU binds it: its mode is what the
        // umask leaves, never more.
        let allowed = 0o777 & !u32::from_str_radix(umask, 8).unwrap();
        let nbd = d.mode("nbd.sock");
        assert_eq!(nbd & !allowed, 0, "NBD socket mode {nbd:o} under umask {umask}");
    }
}

#[test]
fn by_default_one_private_json_rpc_socket_in_the_working_directory_and_nothing_else() {
    let d = Umasked::start("000", &[], &["spindle.sock"]);
    assert_eq!(d.mode("spindle.sock"), 0o600);
    let mut names: Vec<String> =
        std::fs::read_dir(d.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["daemon.log", "spindle.sock"], "no QMP socket and no NBD server unless asked for");
    // Nothing listens on TCP: no NBD server runs until one is started.
    let listening = tcp_listeners();
    let pid_sockets = socket_inodes(d.child.id());
    assert!(
        listening.iter().all(|(_, _, inode)| !pid_sockets.contains(inode)),
        "the daemon listens on no TCP port by default: {listening:?}"
    );
}

/// Listening TCP sockets (IPv4 and IPv6): (local address as hex, port, inode).
fn tcp_listeners() -> Vec<(String, u16, u64)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let (addr, port) = f[1].split_once(':').unwrap();
            out.push((addr.to_string(), u16::from_str_radix(port, 16).unwrap(), f[9].parse().unwrap()));
        }
    }
    out
}

/// Socket inodes of a process's open files.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// True for 127.0.0.0/8 and ::1 as /proc/net/tcp{,6} print them.
fn is_loopback_hex(addr: &str) -> bool {
    match addr.len() {
        8 => addr.ends_with("7F"),
        32 => {
            addr == "00000000000000000000000001000000"
                || addr.ends_with("0100007F") && addr.starts_with("0000000000000000FFFF0000")
        }
        _ => false,
    }
}

#[test]
fn the_nbd_server_needs_an_address_and_listens_only_there() {
    let d = Daemon::start();
    let (_, msg, _) = d.err("nbd-server-start", json!({}));
    assert_eq!(msg, "Parameter 'addr' is missing");
    // The same on the command line: the daemon refuses to start.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--rpc-socket", "r.sock", "--nbd-server", "max-connections=4"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "--nbd-server without an address must not start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("addr"), "{}", String::from_utf8_lossy(&out.stderr));
    // Told 127.0.0.1 or localhost: it listens on loopback only.
    for host in ["127.0.0.1", "localhost"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        d.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": host, "port": port.to_string()}}}));
        let ours = socket_inodes(d.pid() as u32);
        let bound: Vec<_> = tcp_listeners().into_iter().filter(|(_, _, inode)| ours.contains(inode)).collect();
        assert_eq!(bound.len(), 1, "{host}: one listening socket: {bound:?}");
        let (addr, p, _) = &bound[0];
        assert_eq!(*p, port);
        assert!(is_loopback_hex(addr), "{host}: listening on {addr}, not loopback");
        d.ok("nbd-server-stop", Value::Null);
    }
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn read_only_nodes_refuse_writes_in_the_device_layer() {
    let d = Daemon::start();
    let raw = d.path("ro.raw");
    std::fs::write(&raw, vec![0x5a; 1 << 20]).unwrap();
    let qcow = d.path("ro.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow).arg("1M"));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5b 0 64k"]).arg(&qcow));
    let (raw_before, qcow_before) = (file_bytes(&raw), file_bytes(&qcow));
    d.ok("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": d.path("nbd.sock")}}}));
    d.ok("blockdev-add", json!({"driver": "file", "node-name": "rf", "filename": raw, "read-only": true}));
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "rq", "read-only": true, "file": {"driver": "file", "filename": qcow}}),
    );
    for (node, byte) in [("rf", 0x5a), ("rq", 0x5b)] {
        for cmd in ["write -P 1 0 4k", "write -z 0 4k", "discard 0 4k"] {
            match d.debug_io(node, cmd) {
                Err(rpc::client::ClientError::Rpc { message, .. }) => {
                    assert!(message.ends_with("failed: Device is read-only"), "{node}: '{cmd}': {message}")
                }
                other => panic!("{node}: '{cmd}' on a read-only node must fail: {other:?}"),
            }
        }
        d.debug_io(node, &format!("read -P {byte} 0 4k")).unwrap();
        d.debug_io(node, "flush").unwrap();
        // A writable export of a read-only node is refused; a read-only one
        // is fine.
        let (_, msg, _) = d.err(
            "block-export-add",
            json!({"type": "nbd", "id": format!("{node}-w"), "node-name": node, "writable": true}),
        );
        assert_eq!(msg, format!("Node '{node}' is read-only; export '{node}-w' needs write access"));
    }
    d.ok("blockdev-del", json!({"node-name": "rf"}));
    d.ok("blockdev-del", json!({"node-name": "rq"}));
    assert!(file_bytes(&raw) == raw_before, "the raw file is unchanged");
    assert!(file_bytes(&qcow) == qcow_before, "the qcow2 image is unchanged, header included");
}

fn qemu_img_info(image: &Path) -> Value {
    let out = run(Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(image));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn relative_paths_resolve_against_the_working_directory_and_backing_names_against_the_image() {
    // The daemon runs in d.dir: that is its working directory.
    let d = Daemon::start();
    let imgs = d.path("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let qemu_img = |args: &[&str]| run(Command::new("qemu-img").args(args).current_dir(d.dir.path()));
    qemu_img(&["create", "-q", "-f", "qcow2", "imgs/base.qcow2", "4M"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 64k"]).arg(imgs.join("base.qcow2")));
    // The header names "base.qcow2": relative to imgs/, where top lives.
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "imgs/top.qcow2"]);
    // A decoy of the same name in the working directory.
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x99 0 64k"]).arg(d.path("base.qcow2")));

    // `filename` relative: to the daemon's working directory.
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "imgs/top.qcow2"}}),
    );
    // The header's backing name: relative to the image's directory (not the decoy).
    d.debug_io("top", "read -P 0x11 0 64k").unwrap();
    let nodes = d.ok("query-named-block-nodes", Value::Null);
    let files: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["file"].as_str()).collect();
    assert!(files.contains(&"imgs/top.qcow2") && files.contains(&"imgs/base.qcow2"), "{files:?}");

    // `backing` given as options: its filename is relative to the working
    // directory like any other, so here it is the decoy.
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "imgs/other.qcow2"]);
    d.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "other", "file": {"driver": "file", "filename": "imgs/other.qcow2"},
               "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}}}),
    );
    d.debug_io("other", "read -P 0x99 0 64k").unwrap();
    d.ok("blockdev-del", json!({"node-name": "other"}));

    // drive-mirror `target` relative: created in the working directory.
    // With sync "top" the new image's backing name is the backing node's
    // file name exactly as the daemon holds it ("imgs/base.qcow2", relative
    // to the working directory), written verbatim as QEMU does; it then
    // resolves against the target's directory, which is right here because
    // the target is in the working directory itself.
    d.ok(
        "drive-mirror",
        json!({"job-id": "m", "device": "top", "target": "mirror.qcow2", "format": "qcow2", "sync": "top"}),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.ok("query-jobs", Value::Null)[0]["status"] != "ready" {
        assert!(Instant::now() < deadline, "the mirror never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.ok("job-cancel", json!({"id": "m"}));
    let info = qemu_img_info(&d.path("mirror.qcow2"));
    assert_eq!(info["backing-filename"], "imgs/base.qcow2", "{info}");
    assert_eq!(info["full-backing-filename"], d.path("imgs/base.qcow2").to_str().unwrap(), "{info}");
}
