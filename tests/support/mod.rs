//! Shared by the integration tests: start the real `spindle` binary in a
//! temporary directory, talk to it over its sockets, stop it by PID.

#![allow(dead_code)]

pub mod nbd_client;
pub mod qsd;
pub mod rng;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rpc::client::{Client, ClientError};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_spindle");
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon, killed (by its PID) if the test forgets to stop it.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub rpc: PathBuf,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// A daemon with a JSON-RPC and a QMP socket in a fresh directory.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let d = Daemon::spawn_in(dir, extra);
        let mut d = d;
        d.wait_ready();
        d
    }

    /// Starts without waiting for the sockets (for start-up failure tests).
    pub fn spawn_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let rpc = dir.path().join("rpc.sock");
        let qmp = dir.path().join("qmp.sock");
        let log = dir.path().join("daemon.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--rpc-socket").arg(&rpc).arg("--qmp-socket").arg(&qmp).arg("--log-level").arg("debug");
        cmd.args(extra).current_dir(dir.path()).stdin(Stdio::null()).stdout(logf.try_clone().unwrap()).stderr(logf);
        let child = cmd.spawn().expect("starting spindle");
        Daemon { child: Some(child), dir, rpc, qmp, log }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("spindle exited during start ({status}):\n{}", self.log_text());
            }
            if UnixStream::connect(&self.rpc).is_ok() && UnixStream::connect(&self.qmp).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "spindle did not open its sockets:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.rpc, Duration::from_secs(30)).expect("connecting to the JSON-RPC socket")
    }

    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let params = if params.is_null() { None } else { Some(params) };
        self.client().call(method, params)
    }

    /// Calls and expects success.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params).unwrap_or_else(|e| panic!("{method} failed: {e}\n{}", self.log_text()))
    }

    /// Calls and expects an error; returns (code, message, data).
    pub fn err(&self, method: &str, params: Value) -> (i64, String, Option<Value>) {
        match self.call(method, params) {
            Err(ClientError::Rpc { code, message, data }) => (code, message, data),
            other => panic!("{method}: expected an RPC error, got {other:?}"),
        }
    }

    pub fn debug_io(&self, node: &str, command: &str) -> Result<Value, ClientError> {
        self.call("x-debug-io", json!({"node-name": node, "command": command}))
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon already reaped");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "spindle did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop with SIGTERM; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.shutdown()
    }

    /// Graceful stop that keeps the directory (to inspect its files).
    pub fn shutdown(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit();
        assert!(status.success(), "spindle stopped with {status}:\n{}", self.log_text());
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw QMP session: line-oriented JSON, events collected on the side.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut q = Qmp { reader: BufReader::new(stream), writer, greeting: Value::Null, events: Vec::new() };
        q.greeting = q.read_value();
        q
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        assert_eq!(q.execute("qmp_capabilities", None), json!({"return": {}}));
        q
    }

    pub fn read_value(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).expect("reading QMP");
            assert!(n > 0, "QMP connection closed");
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"));
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads until a non-event value arrives (events are kept in `events`).
    pub fn response(&mut self) -> Value {
        loop {
            let v = self.read_value();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let mut req = json!({"execute": cmd});
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.send_raw(format!("{req}\n").as_bytes());
        self.response()
    }

    /// Waits for an event by name.
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read_value();
            if v["event"] == name {
                return v;
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// Runs a command, failing the test with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// qemu-io on a raw image file. Reads share the image (`-r -U`), so they
/// run next to a daemon that has it open; Spindle takes no image locks.
pub fn qemu_io(image: &Path, command: &str) -> String {
    let mut cmd = Command::new("qemu-io");
    if command.starts_with("read") {
        cmd.args(["-r", "-U"]);
    }
    run(cmd.args(["-f", "raw", "-c", command]).arg(image))
}

/// `qemu-img create -f qcow2 PATH SIZE`, over `backing` (a qcow2) if given.
pub fn qcow2_image(path: &Path, size: &str, backing: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    run(cmd.arg(path).arg(size));
}

/// Creates a zero-filled sparse file.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Waits until no process holds QEMU-style image locks on the regular
/// files in `dir`. After a SIGKILL the kernel releases a process's locks
/// with its last reference to each file, and io_uring requests still in
/// flight at the kill hold such references a little longer than the
/// process lives.
pub fn wait_unlocked_dir(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() || path.is_symlink() {
            continue;
        }
        while locked(&path) {
            assert!(Instant::now() < deadline, "{} stays locked after its daemon died", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// True when another open file description holds one of QEMU's lock bytes.
fn locked(path: &Path) -> bool {
    use nix::fcntl::{FcntlArg, fcntl};
    let Ok(f) = std::fs::File::open(path) else { return false };
    (100..104).chain(200..204).any(|start| {
        let mut fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: start,
            l_len: 1,
            l_pid: 0,
        };
        fcntl(&f, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok() && fl.l_type != libc::F_UNLCK as libc::c_short
    })
}
