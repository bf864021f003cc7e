//! QEMU's own storage daemon as an oracle: the tests that compare Spindle
//! with qemu-storage-daemon start both, send each the same input over QMP
//! and compare what comes back. [`Peer`] is a QMP session that never
//! panics on what the server does (closes, stays silent), so a transcript
//! can show the difference instead of stopping at it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running qemu-storage-daemon with a QMP monitor on a Unix socket,
/// killed by its PID when dropped.
pub struct Qsd {
    child: Child,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Qsd {
    /// Starts one in `dir` (its socket and log live there).
    pub fn start(dir: &Path) -> Qsd {
        let qmp = dir.join("qsd-qmp.sock");
        let log = dir.join("qsd.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=c0", qmp.display()))
            .args(["--monitor", "chardev=c0"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("starting qemu-storage-daemon (is QEMU installed?)");
        let mut q = Qsd { child, qmp, log };
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&q.qmp).is_err() {
            if let Some(status) = q.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited during start ({status}):\n{}", q.log_text());
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID, nothing broader.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_timeout_or_interrupt(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// A command's answer, as compared between the daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Return(Value),
    Error {
        class: String,
        desc: String,
    },
    /// No answer: the connection closed or nothing came in time.
    Lost(String),
}

impl Reply {
    pub fn from_value(v: &Value) -> Reply {
        match (v.get("return"), v.get("error")) {
            (Some(r), _) => Reply::Return(r.clone()),
            (None, Some(e)) => Reply::Error {
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            },
            _ => Reply::Lost(format!("not an answer: {v}")),
        }
    }

    /// The error text, or None.
    pub fn desc(&self) -> Option<&str> {
        match self {
            Reply::Error { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// One QMP session: answers in order, events kept aside.
pub struct Peer {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Events received and not yet taken.
    pub events: Vec<Value>,
    closed: bool,
}

impl Peer {
    /// Connects to `path`, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> Peer {
        let stream = UnixStream::connect(path).unwrap();
        let mut p = Peer { stream, buf: Vec::new(), events: Vec::new(), closed: false };
        let deadline = Instant::now() + START_TIMEOUT;
        let greeting = p.next_value(deadline).expect("a QMP greeting");
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        assert_eq!(p.execute("qmp_capabilities", json!({})), Reply::Return(json!({})));
        p
    }

    /// The next JSON line, or None when the connection closed or
    /// `deadline` passed.
    fn next_value(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return Some(
                    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad QMP line {text:?}: {e}")),
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.closed || left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout_or_interrupt(&e) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Sends raw bytes (a broken client's input).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).is_err() {
            self.closed = true;
        }
    }

    /// The next answer (events on the way are kept), within `within`.
    pub fn reply_within(&mut self, within: Duration) -> Reply {
        let deadline = Instant::now() + within;
        loop {
            match self.next_value(deadline) {
                Some(v) if v.get("event").is_some() => self.events.push(v),
                Some(v) => return Reply::from_value(&v),
                None if self.closed => return Reply::Lost("connection closed".into()),
                None => return Reply::Lost(format!("no answer within {within:?}")),
            }
        }
    }

    pub fn reply(&mut self) -> Reply {
        self.reply_within(Duration::from_secs(30))
    }

    pub fn execute(&mut self, cmd: &str, args: Value) -> Reply {
        let mut req = json!({"execute": cmd});
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            req["arguments"] = args;
        }
        self.send_raw(format!("{req}\n").as_bytes());
        self.reply()
    }

    /// Reads events until one satisfies `pred` (true) or `within` passes
    /// (false); every event read stays in `events`.
    pub fn wait_event(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.events.iter().any(&pred) {
                return true;
            }
            match self.next_value(deadline) {
                Some(v) if v.get("event").is_some() => self.events.push(v),
                Some(v) => panic!("an answer nobody asked for: {v}"),
                None => return false,
            }
        }
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
