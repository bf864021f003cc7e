//! The NBD export server.
//!
//! ```text
//!  listener (TCP or Unix) ── accept loop: a task on the main reactor
//!        │ each connection goes to the next reactor, round robin
//!        ▼
//!  connection task: negotiate.rs (fixed newstyle handshake)
//!        ▼
//!  transmit.rs: reader → node channel (callback completions)
//!               → replies queue → writer (batched vectored sends)
//! ```
//!
//! Exports are registered by the control plane in [`Exports`]; a
//! connection looks its export up by name during the handshake. Each
//! connection is bounded in requests and bytes in flight.
//!
//! Block status answers the metadata contexts the client selected:
//! `base:allocation` and, when the export publishes them,
//! `qemu:allocation-depth` (from the same block-status query) and
//! `qemu:dirty-bitmap:NAME` (from the bitmap's bits, which an
//! [`ExportedBitmap`] keeps busy while the export lives).

mod negotiate;
mod transmit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bdev::{Backend, Bitmap};
use reactor::{Handle, SharedFd};

/// Connections one server accepts at once when no limit is given.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// A client has this long to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long stopping waits for connections to finish their requests.
const STOP_WAIT_MAX: Duration = Duration::from_secs(10);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Control-plane failures of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: ListenAddr, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// One export: a backend served under a name. The backend's claim keeps
/// its node from being deleted (and, if writable, from being written
/// exclusively by someone else); a job may move it to another node.
pub struct Export {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub backend: Arc<Backend>,
    pub writable: bool,
    /// Where connections are served when the exported node has no home of
    /// its own (the export's `iothread`); None: where they were accepted.
    pub reactor: Option<Handle>,
    /// Published as `qemu:dirty-bitmap:NAME` contexts, in this order.
    pub bitmaps: Vec<ExportedBitmap>,
    /// Publishes the `qemu:allocation-depth` context.
    pub allocation_depth: bool,
}

impl Export {
    pub fn new(id: String, name: String, description: Option<String>, backend: Arc<Backend>, writable: bool) -> Export {
        Export { id, name, description, backend, writable, reactor: None, bitmaps: Vec::new(), allocation_depth: false }
    }
}

/// A dirty bitmap an export publishes. It is busy for as long as the
/// export exists (the last connection to a deleted export may outlive the
/// command that deleted it), so commands can neither change nor remove it
/// while clients read it.
pub struct ExportedBitmap {
    bitmap: Arc<Bitmap>,
}

impl ExportedBitmap {
    /// Marks `bitmap` busy; the caller has checked that it was free.
    pub fn new(bitmap: Arc<Bitmap>) -> ExportedBitmap {
        bitmap.set_busy(true);
        ExportedBitmap { bitmap }
    }

    pub fn bitmap(&self) -> &Arc<Bitmap> {
        &self.bitmap
    }

    /// `qemu:dirty-bitmap:NAME`.
    pub fn context_name(&self) -> String {
        format!("{}{}", crate::consts::DIRTY_BITMAP_PREFIX, self.bitmap.name().unwrap_or_default())
    }
}

impl Drop for ExportedBitmap {
    fn drop(&mut self) {
        self.bitmap.set_busy(false);
    }
}

/// Exports by name, shared with connection tasks.
#[derive(Default)]
pub struct Exports {
    by_name: RwLock<HashMap<String, Arc<Export>>>,
}

impl Exports {
    pub fn new() -> Exports {
        Exports::default()
    }

    pub fn insert(&self, export: Arc<Export>) {
        self.by_name.write().unwrap_or_else(|e| e.into_inner()).insert(export.name.clone(), export);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.by_name.write().unwrap_or_else(|e| e.into_inner()).remove(name)
    }

    /// The export a client asks for; an empty name is the default export
    /// (the one named "", or the only one).
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned().or_else(|| match (name.is_empty(), map.len()) {
            (true, 1) => map.values().next().cloned(),
            _ => None,
        })
    }

    /// Every export, sorted by name (NBD_OPT_LIST).
    pub fn all(&self) -> Vec<Arc<Export>> {
        let mut v: Vec<_> = self.by_name.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// A live connection, for shutting it down from the control plane.
struct ConnEntry {
    fd: SharedFd,
    export: Option<String>,
}

/// State shared by the accept loop, connections and the control plane.
struct Shared {
    stopping: AtomicBool,
    connections_max: usize,
    reactors: Vec<Handle>,
    next_reactor: AtomicUsize,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    exports: Arc<Exports>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a connection from the table when its task ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl ConnGuard {
    fn set_export(&self, export: &str) {
        if let Some(e) = self.shared.lock().get_mut(&self.id) {
            e.export = Some(export.to_string());
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.lock().remove(&self.id);
    }
}

/// A running NBD server.
pub struct NbdServer {
    addr: ListenAddr,
    local_port: Option<u16>,
    listener: SharedFd,
    shared: Arc<Shared>,
}

impl NbdServer {
    /// Listens on `addr` and accepts connections on the first reactor,
    /// spreading them over all `reactors`.
    pub fn start(
        addr: ListenAddr,
        connections_max: usize,
        reactors: Vec<Handle>,
        exports: Arc<Exports>,
    ) -> Result<NbdServer, ServerError> {
        assert!(!reactors.is_empty(), "an NBD server needs a reactor");
        let bind_err = |source| ServerError::Bind { addr: addr.clone(), source };
        let mut local_port = None;
        let fd: OwnedFd = match &addr {
            ListenAddr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a).map_err(bind_err)?;
                local_port = l.local_addr().ok().map(|a| a.port());
                l.into()
            }
            ListenAddr::Unix(p) => {
                if p.exists() {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(bind_err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "a server is listening there",
                        )));
                    }
                    std::fs::remove_file(p).map_err(bind_err)?;
                }
                std::os::unix::net::UnixListener::bind(p).map_err(bind_err)?.into()
            }
        };
        let listener: SharedFd = Arc::new(fd);
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            connections_max: connections_max.max(1),
            reactors,
            next_reactor: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            exports,
        });
        let (l, s) = (Arc::clone(&listener), Arc::clone(&shared));
        shared.reactors[0].send(move || {
            reactor::spawn_local(accept_loop(l, s));
        });
        tracing::info!(%addr, "NBD server listening");
        Ok(NbdServer { addr, local_port, listener, shared })
    }

    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The TCP port actually bound (useful with port 0).
    pub fn local_port(&self) -> Option<u16> {
        self.local_port
    }

    /// Live connections (to any export, or still negotiating).
    pub fn connections(&self) -> usize {
        self.shared.lock().len()
    }

    /// Live connections to the export named `name`.
    pub fn export_connections(&self, name: &str) -> usize {
        self.shared.lock().values().filter(|c| c.export.as_deref() == Some(name)).count()
    }

    /// Cuts every connection to export `name` and waits (bounded) until
    /// their in-flight requests are done.
    pub fn disconnect_export(&self, name: &str) {
        self.disconnect(|c| c.export.as_deref() == Some(name));
    }

    fn disconnect(&self, which: impl Fn(&ConnEntry) -> bool) {
        let ids: Vec<u64> = {
            let conns = self.shared.lock();
            for c in conns.values().filter(|c| which(c)) {
                let _ = nix::sys::socket::shutdown(c.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
            conns.iter().filter(|(_, c)| which(c)).map(|(&id, _)| id).collect()
        };
        let deadline = Instant::now() + STOP_WAIT_MAX;
        while ids.iter().any(|id| self.shared.lock().contains_key(id)) {
            if Instant::now() > deadline {
                tracing::error!("NBD connections did not finish within {STOP_WAIT_MAX:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops accepting, cuts every connection (after their in-flight
    /// requests finish) and removes a Unix socket file.
    pub fn stop(self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wakes the pending accept, which then sees `stopping`.
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        self.disconnect(|_| true);
        if let ListenAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!(addr = %self.addr, "NBD server stopped");
    }
}

async fn accept_loop(listener: SharedFd, shared: Arc<Shared>) {
    let ring = std::rc::Rc::clone(reactor::current().ring());
    loop {
        let accepted = reactor::accept(&ring, &listener).await;
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let fd = match accepted {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                reactor::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        let fd: SharedFd = Arc::new(fd);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = shared.lock();
            if conns.len() >= shared.connections_max {
                tracing::warn!(max = shared.connections_max, "NBD connection refused: too many connections");
                continue;
            }
            conns.insert(id, ConnEntry { fd: Arc::clone(&fd), export: None });
        }
        let n = shared.next_reactor.fetch_add(1, Ordering::Relaxed) % shared.reactors.len();
        let s = Arc::clone(&shared);
        shared.reactors[n].send(move || {
            reactor::spawn_local(serve_connection(fd, ConnGuard { shared: s, id }));
        });
    }
}

async fn serve_connection(fd: SharedFd, guard: ConnGuard) {
    let mut sock = crate::sock::Sock::new(fd);
    let exports = Arc::clone(&guard.shared.exports);
    let session = match reactor::timeout(HANDSHAKE_TIMEOUT, negotiate::negotiate(&mut sock, &exports)).await {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(conn = guard.id, error = %e, "NBD handshake ended");
            return;
        }
        Err(_) => {
            tracing::warn!(conn = guard.id, "NBD handshake timed out");
            return;
        }
    };
    guard.set_export(&session.export.name);
    tracing::debug!(conn = guard.id, export = %session.export.name, "NBD client connected");
    // Requests are served where the exported node lives: a format driver's
    // state is on its home reactor, and serving elsewhere would send every
    // request there and back. A node without a home is served where the
    // export was placed, else where the connection was accepted.
    if let Some(home) = session.export.backend.root().home().or_else(|| session.export.reactor.clone())
        && !home.is_current()
    {
        let parts = sock.into_parts();
        home.send(move || {
            reactor::spawn_local(transmit_phase(crate::sock::Sock::from_parts(parts), session, guard));
        });
        return;
    }
    transmit_phase(sock, session, guard).await;
}

async fn transmit_phase(sock: crate::sock::Sock, session: negotiate::Session, guard: ConnGuard) {
    if let Err(e) = transmit::serve(sock, session).await {
        tracing::debug!(conn = guard.id, error = %e, "NBD connection ended");
    }
}
