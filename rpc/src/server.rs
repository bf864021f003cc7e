//! Unix-socket listeners for both protocols.
//!
//! Per connection a reader thread parses requests and runs them through the
//! [`Dispatcher`] (blocking until the answer), and a writer thread sends
//! answers and events. Answers pass through a bounded queue: a client that
//! stops reading first stalls its own writer (until the write timeout closes
//! it), then its own reader — never anyone else.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use serde_json::Value;

use crate::error::RpcError;
use crate::event::{EventBus, Subscription};
use crate::framing::{Frame, Framer, REQUEST_BYTES_MAX};
use crate::qmp::{ServerInfo, Session};
use crate::{jsonrpc, qmp};

/// Executes commands for the transports. The daemon's implementation
/// forwards to its control thread and blocks until the answer.
pub trait Dispatcher: Send + Sync + 'static {
    /// `params` is None when absent or null.
    fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError>;
}

/// Answers queued per connection before its reader waits for the writer.
const REPLY_QUEUE_MAX: usize = 64;
/// Bytes read from a socket at once.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// A client that does not take an answer within this time is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// At shutdown, how long pending answers and events may take to leave.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default cap on connections per socket.
pub const CONNECTIONS_MAX_DEFAULT: usize = 64;
/// With every slot taken, a connection that has not sent a byte for this
/// long gives its slot to a new one: silent clients cannot lock the
/// control plane.
const SILENT_EVICT_AFTER: Duration = Duration::from_secs(10);

/// Which protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    JsonRpc,
    Qmp,
}

impl Proto {
    fn index(self) -> usize {
        match self {
            Proto::JsonRpc => 0,
            Proto::Qmp => 1,
        }
    }

    /// Line terminator: QEMU ends QMP lines with CRLF.
    fn eol(self) -> &'static [u8] {
        match self {
            Proto::JsonRpc => b"\n",
            Proto::Qmp => b"\r\n",
        }
    }
}

/// What the server listens on.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub jsonrpc_socket: Option<PathBuf>,
    pub qmp_socket: Option<PathBuf>,
    pub info: ServerInfo,
    /// Connections each socket accepts at once.
    pub connections_max: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotSocket(PathBuf),
    #[error("binding socket {path} failed: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("starting a server thread failed: {0}")]
    Thread(std::io::Error),
}

enum Outgoing {
    Line(Vec<u8>),
    /// The answer to `qmp_capabilities`: events may follow it, not precede it.
    LineThenEvents(Vec<u8>),
    /// Send what is queued, then close.
    Close,
}

struct Conn {
    stream: UnixStream,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    proto: Proto,
    since: std::time::Instant,
    /// The client has sent something.
    spoke: Arc<AtomicBool>,
}

struct Shared {
    dispatcher: Arc<dyn Dispatcher>,
    events: Arc<EventBus>,
    info: ServerInfo,
    connections_max: usize,
    stopping: AtomicBool,
    active: [AtomicUsize; 2],
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
}

struct Listener {
    path: PathBuf,
    /// Device and inode of the socket file we created: at shutdown it is
    /// removed only if nobody replaced it meanwhile.
    identity: (u64, u64),
    listener: UnixListener,
    thread: Option<JoinHandle<()>>,
}

/// The running listeners and their connections.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
}

impl Server {
    pub fn start(
        cfg: ServerConfig,
        dispatcher: Arc<dyn Dispatcher>,
        events: Arc<EventBus>,
    ) -> Result<Server, ServerError> {
        let shared = Arc::new(Shared {
            dispatcher,
            events,
            info: cfg.info,
            connections_max: cfg.connections_max.max(1),
            stopping: AtomicBool::new(false),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let mut server = Server { shared, listeners: Vec::new() };
        for (path, proto) in [(cfg.jsonrpc_socket, Proto::JsonRpc), (cfg.qmp_socket, Proto::Qmp)] {
            let Some(path) = path else { continue };
            let listener = bind_private(&path)?;
            let identity = std::fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).unwrap_or_default();
            let accept = listener.try_clone().map_err(|source| ServerError::Bind { path: path.clone(), source })?;
            let shared = Arc::clone(&server.shared);
            let thread = std::thread::Builder::new()
                .name(format!("accept-{proto:?}").to_lowercase())
                .spawn(move || accept_loop(&shared, &accept, proto))
                .map_err(ServerError::Thread)?;
            server.listeners.push(Listener { path, identity, listener, thread: Some(thread) });
        }
        Ok(server)
    }

    /// Stops accepting, lets queued answers and events go out (briefly),
    /// closes every connection, removes the socket files. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for l in &mut self.listeners {
            // Wakes the blocked accept(2).
            let _ = nix::sys::socket::shutdown(l.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            let ours = std::fs::symlink_metadata(&l.path).is_ok_and(|m| (m.dev(), m.ino()) == l.identity);
            if ours {
                let _ = std::fs::remove_file(&l.path);
            }
        }
        let table = std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        let mut conns: Vec<Conn> = table.into_values().collect();
        // Stop reading: no new commands. Answers and events already queued
        // may still go out for a moment.
        for c in &conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        for c in &mut conns {
            if let Some(t) = c.reader.take() {
                let _ = t.join();
            }
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_WRITE_TIMEOUT;
        while conns.iter().any(|c| c.writer.as_ref().is_some_and(|w| !w.is_finished()))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Writers still stuck on a client that does not read are cut off.
        for mut c in conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            if let Some(t) = c.writer.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds a socket that is never reachable with wider permissions than 0600:
/// bound under a temporary name, restricted, then renamed into place.
fn bind_private(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
            // Nobody listens: a stale socket from a daemon that died.
            Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
        },
        Ok(_) => return Err(ServerError::NotSocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    // Bind inside a fresh directory only we can enter, restrict the socket,
    // then move it into place: nobody can connect while it is wider than 0600.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "socket".into());
    let private = path.with_file_name(format!(".{name}.{}.d", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(bind_err)?;
    let tmp = private.join("s");
    let placed = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    placed.map_err(bind_err)
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, proto: Proto) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        match conn {
            Ok(stream) => start_connection(shared, stream, proto),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn start_connection(shared: &Arc<Shared>, stream: UnixStream, proto: Proto) {
    let active = &shared.active[proto.index()];
    if active.fetch_add(1, Ordering::AcqRel) >= shared.connections_max && !evict_silent(shared, proto) {
        active.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(?proto, max = shared.connections_max, "connection refused: too many connections");
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(id, ?proto, "client connected");
    // The table stays locked until the connection is registered, so a
    // reader that finishes at once cannot try to unregister it first.
    let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    let started = (|| -> std::io::Result<Conn> {
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let (tx, rx) = bounded(REPLY_QUEUE_MAX);
        let hook_stream = stream.try_clone()?;
        let sub = shared.events.subscribe_with_hook(Box::new(move || {
            let _ = hook_stream.shutdown(std::net::Shutdown::Both);
        }));
        let w_stream = stream.try_clone()?;
        let info = shared.info.clone();
        let writer = std::thread::Builder::new()
            .name(format!("rpc-write-{id}"))
            .spawn(move || writer_loop(w_stream, rx, sub, proto, &info))?;
        let r_stream = stream.try_clone()?;
        let r_shared = Arc::clone(shared);
        let spoke = Arc::new(AtomicBool::new(false));
        let r_spoke = Arc::clone(&spoke);
        let reader = std::thread::Builder::new().name(format!("rpc-read-{id}")).spawn(move || {
            reader_loop(&r_stream, &tx, proto, r_shared.dispatcher.as_ref(), &r_spoke);
            drop(tx);
            r_shared.active[proto.index()].fetch_sub(1, Ordering::AcqRel);
            r_shared.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            tracing::debug!(id, "client disconnected");
        })?;
        Ok(Conn { stream, reader: Some(reader), writer: Some(writer), proto, since: std::time::Instant::now(), spoke })
    })();
    match started {
        Ok(conn) => {
            conns.insert(id, conn);
        }
        Err(e) => {
            tracing::error!(error = %e, "starting connection threads failed");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn line(proto: Proto, v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.extend_from_slice(proto.eol());
    bytes
}

/// Every slot of `proto` is taken: closes the longest-connected client that
/// has sent nothing for [`SILENT_EVICT_AFTER`], if there is one, so the new
/// connection can have its slot (the count drops when its reader ends).
fn evict_silent(shared: &Shared, proto: Proto) -> bool {
    let conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    let victim = conns
        .iter()
        .filter(|(_, c)| c.proto == proto && !c.spoke.load(Ordering::Acquire))
        .filter(|(_, c)| c.since.elapsed() >= SILENT_EVICT_AFTER)
        .min_by_key(|(_, c)| c.since);
    let Some((id, conn)) = victim else {
        return false;
    };
    tracing::warn!(?proto, id, "all connections taken: closing one that never sent anything");
    // Marked, so the same connection is not chosen twice before it ends.
    conn.spoke.store(true, Ordering::Release);
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    true
}

fn reader_loop(
    mut stream: &UnixStream,
    tx: &Sender<Outgoing>,
    proto: Proto,
    dispatcher: &dyn Dispatcher,
    spoke: &AtomicBool,
) {
    let mut framer = Framer::new();
    let mut session = Session::default();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    // QMP after a syntax error: input is dropped up to the next newline.
    let mut skipping = false;
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        spoke.store(true, Ordering::Release);
        let mut data = &chunk[..n];
        if skipping {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    data = &data[i + 1..];
                    skipping = false;
                }
                None => continue,
            }
        }
        framer.push(data);
        loop {
            let out = match (framer.next_frame(), proto) {
                (Frame::Incomplete, _) => break,
                (Frame::Value(v), Proto::JsonRpc) => {
                    jsonrpc::handle_value(dispatcher, v).map(|r| Outgoing::Line(line(proto, &r)))
                }
                (Frame::Value(v), Proto::Qmp) => {
                    let was = session.negotiated();
                    let reply = line(proto, &session.handle(dispatcher, v));
                    Some(if !was && session.negotiated() {
                        Outgoing::LineThenEvents(reply)
                    } else {
                        Outgoing::Line(reply)
                    })
                }
                (Frame::Syntax(msg), Proto::JsonRpc) => {
                    tracing::warn!(error = %msg, "JSON-RPC parse error; closing the connection");
                    let _ = tx.send(Outgoing::Line(line(proto, &jsonrpc::parse_error_reply(&msg))));
                    let _ = tx.send(Outgoing::Close);
                    return;
                }
                (Frame::Syntax(msg), Proto::Qmp) => {
                    tracing::warn!(error = %msg, "QMP parse error");
                    skipping = !framer.skip_line();
                    Some(Outgoing::Line(line(proto, &qmp::parse_error(&msg))))
                }
                (Frame::TooLarge, _) => {
                    let msg = format!("request exceeds {REQUEST_BYTES_MAX} bytes");
                    tracing::warn!("{msg}; closing the connection");
                    let reply = match proto {
                        Proto::JsonRpc => jsonrpc::parse_error_reply(&msg),
                        Proto::Qmp => qmp::error_reply(&RpcError::parse_error(msg)),
                    };
                    let _ = tx.send(Outgoing::Line(line(proto, &reply)));
                    let _ = tx.send(Outgoing::Close);
                    return;
                }
            };
            if let Some(out) = out
                && tx.send(out).is_err()
            {
                return;
            }
        }
    }
}

fn writer_loop(mut stream: UnixStream, rx: Receiver<Outgoing>, sub: Subscription, proto: Proto, info: &ServerInfo) {
    // QMP clients get events only once the answer to qmp_capabilities is out.
    let mut negotiated = proto == Proto::JsonRpc;
    let event_line = |e: &crate::event::Event| match proto {
        Proto::JsonRpc => line(proto, &jsonrpc::event_notification(e)),
        Proto::Qmp => line(proto, &qmp::event_message(e)),
    };
    let mut ok = proto != Proto::Qmp || stream.write_all(&line(proto, &qmp::greeting(info))).is_ok();
    while ok {
        select! {
            recv(rx) -> msg => match msg {
                Ok(Outgoing::Line(bytes)) => ok = stream.write_all(&bytes).is_ok(),
                Ok(Outgoing::LineThenEvents(bytes)) => {
                    ok = stream.write_all(&bytes).is_ok();
                    negotiated = true;
                }
                Ok(Outgoing::Close) => break,
                Err(_) => {
                    // The reader is gone (client closed or shutdown): send the
                    // events already queued, then stop.
                    while let Ok(e) = sub.rx.try_recv() {
                        if negotiated && stream.write_all(&event_line(&e)).is_err() {
                            break;
                        }
                    }
                    break;
                }
            },
            recv(sub.rx) -> ev => match ev {
                Ok(e) => {
                    if negotiated {
                        ok = stream.write_all(&event_line(&e)).is_ok();
                    }
                }
                // The bus dropped us: we fell behind on events.
                Err(_) => break,
            },
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
