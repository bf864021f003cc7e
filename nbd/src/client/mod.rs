//! `nbd`: a node backed by an export on an NBD server — QEMU's `nbd`
//! driver options (`server`, `export`, `reconnect-delay`, `open-timer`).
//!
//! ```json
//! {"driver": "nbd", "node-name": "remote", "export": "disk0",
//!  "server": {"type": "inet", "host": "127.0.0.1", "port": "10810"}}
//! ```
//!
//! The connection lives on the node's home reactor (other reactors
//! forward to it). When it breaks, requests in flight fail, a helper
//! thread reconnects (every second, for as long as the node exists) and
//! requests arriving meanwhile wait up to `reconnect-delay` seconds
//! (default 0: they fail at once), as in QEMU.

mod conn;
pub mod handshake;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bdev::forward::ForwardChannel;
use bdev::{Bdev, BdevError, BdevInfo, BlockStatus, Channel, Done, Io, IoError, LocalBoxFuture, OpenCtx, OptReader};
use reactor::Handle;
use serde_json::Value;

use self::conn::ClientConn;
use self::handshake::{Negotiated, Target, connect_and_negotiate};

/// Pause between reconnection attempts.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static NODES: RefCell<HashMap<u64, Rc<ClientNode>>> = RefCell::new(HashMap::new());
}

fn node(id: u64) -> Option<Rc<ClientNode>> {
    NODES.with(|m| m.borrow().get(&id).cloned())
}

/// QEMU's SocketAddress for the `server` option.
fn parse_server(v: Value) -> Result<Target, BdevError> {
    let bad = |m: &str| BdevError::invalid(format!("Invalid parameter 'server': {m}"));
    let mut o = OptReader::new(v).map_err(|_| bad("expected an object"))?;
    let target = match o.str_req("type")?.as_str() {
        "inet" => {
            let host = o.str_req("host")?;
            let port = match o.take("port") {
                Some(Value::String(p)) => p.parse::<u16>().map_err(|_| bad(&format!("'{p}' is not a port")))?,
                Some(Value::Number(n)) => {
                    n.as_u64().and_then(|n| u16::try_from(n).ok()).ok_or_else(|| bad("bad port"))?
                }
                Some(_) => return Err(bad("port must be a string")),
                None => return Err(o.missing("port")),
            };
            for k in ["numeric", "to", "ipv4", "ipv6", "keep-alive"] {
                o.take(k);
            }
            Target::Tcp { host, port }
        }
        "unix" => {
            let path = o.str_req("path")?;
            o.bool_opt("abstract")?;
            o.bool_opt("tight")?;
            Target::Unix(path.into())
        }
        other => return Err(BdevError::invalid(format!("Parameter 'server.type' does not accept value '{other}'"))),
    };
    o.finish()?;
    Ok(target)
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let server = opts.take("server").ok_or_else(|| opts.missing("server"))?;
    let export = opts.str_opt("export")?.unwrap_or_default();
    let reconnect_delay = Duration::from_secs(opts.u64_opt("reconnect-delay")?.unwrap_or(0));
    let open_timer = Duration::from_secs(opts.u64_opt("open-timer")?.unwrap_or(0));
    if opts.take("tls-creds").is_some() || opts.take("tls-hostname").is_some() {
        return Err(BdevError::Unsupported("nbd: TLS is not supported".into()));
    }
    if opts.take("x-dirty-bitmap").is_some() {
        return Err(BdevError::Unsupported("nbd: x-dirty-bitmap is not supported".into()));
    }
    opts.finish()?;
    let target = parse_server(server)?;
    // open-timer: keep trying this long for the first connection.
    let deadline = Instant::now() + open_timer;
    let (fd, neg) = loop {
        match connect_and_negotiate(&target, &export) {
            Ok(v) => break v,
            Err(e) if Instant::now() >= deadline => {
                return Err(BdevError::invalid(format!("Could not connect to NBD server {target}: {e}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let read_only = ctx.common().read_only || neg.read_only();
    let home = ctx.home();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let closed = Arc::new(AtomicBool::new(false));
    let (t, e, c, h) = (target.clone(), export.clone(), Arc::clone(&closed), home.clone());
    home.call(move || {
        let state = Rc::new(ClientNode {
            id,
            home: h,
            target: t,
            export: e,
            size: neg.size,
            reconnect_delay,
            closed: c,
            conn: RefCell::new(None),
            waiting: RefCell::new(VecDeque::new()),
        });
        state.install(fd, neg);
        NODES.with(|m| m.borrow_mut().insert(id, state));
    })
    .wait()
    .map_err(|_| BdevError::ReactorGone)?;
    Ok(Arc::new(NbdBdev {
        id,
        home,
        target,
        export,
        size: neg.size,
        block_size: neg.min_block.next_power_of_two(),
        read_only,
        closed,
    }))
}

pub struct NbdBdev {
    id: u64,
    home: Handle,
    target: Target,
    export: String,
    size: u64,
    block_size: u32,
    read_only: bool,
    closed: Arc<AtomicBool>,
}

impl Bdev for NbdBdev {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let id = self.id;
        let resolve = move || -> Result<Rc<dyn Channel>, BdevError> {
            let state = node(id).ok_or(BdevError::ReactorGone)?;
            Ok(Rc::new(NbdChannel { state }))
        };
        if self.home.is_current() {
            return resolve();
        }
        Ok(Rc::new(ForwardChannel::new(self.home.clone(), Arc::new(resolve))))
    }

    fn home(&self) -> Option<Handle> {
        Some(self.home.clone())
    }

    fn rehome(self: Arc<Self>, to: &Handle) -> Result<(), BdevError> {
        if to.id() == self.home.id() {
            return Ok(());
        }
        Err(BdevError::Unsupported("an nbd node cannot move to another reactor; add it there instead".into()))
    }

    fn info(&self) -> BdevInfo {
        let uri = match &self.target {
            Target::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
            Target::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
        };
        BdevInfo { filename: uri, direct: false, no_flush: false, actual_size: None, format_specific: None }
    }

    fn close(self: Arc<Self>) -> LocalBoxFuture<Result<(), IoError>> {
        self.closed.store(true, Ordering::Release);
        let id = self.id;
        Box::pin(async move {
            if let Some(state) = NODES.with(|m| m.borrow_mut().remove(&id)) {
                state.shutdown();
            }
            Ok(())
        })
    }
}

/// The node's state on its home reactor, across reconnections.
struct ClientNode {
    id: u64,
    home: Handle,
    target: Target,
    export: String,
    size: u64,
    reconnect_delay: Duration,
    closed: Arc<AtomicBool>,
    conn: RefCell<Option<Rc<ClientConn>>>,
    /// Requests waiting for a reconnection, with their deadline.
    waiting: RefCell<VecDeque<(Io, Done, Instant)>>,
}

impl ClientNode {
    /// Starts a connection on `fd` and sends it what waited.
    fn install(self: &Rc<Self>, fd: OwnedFd, neg: Negotiated) {
        let (id, home) = (self.id, self.home.clone());
        let on_death = Box::new(move || {
            if let Some(n) = node(id) {
                n.reconnect(home);
            }
        });
        let conn = ClientConn::start(Arc::new(fd), neg, on_death);
        *self.conn.borrow_mut() = Some(Rc::clone(&conn));
        let waiting: Vec<_> = self.waiting.borrow_mut().drain(..).collect();
        for (io, done, _) in waiting {
            conn.submit(io, done);
        }
    }

    fn live(&self) -> Option<Rc<ClientConn>> {
        self.conn.borrow().as_ref().filter(|c| !c.is_dead()).cloned()
    }

    fn submit(self: &Rc<Self>, io: Io, done: Done) {
        if let Some(c) = self.live() {
            return c.submit(io, done);
        }
        if self.reconnect_delay.is_zero() || self.closed.load(Ordering::Acquire) {
            return done.complete_later(io, Err(IoError::Io));
        }
        let deadline = Instant::now() + self.reconnect_delay;
        self.waiting.borrow_mut().push_back((io, done, deadline));
        let me = Rc::clone(self);
        reactor::spawn_local(async move {
            reactor::sleep_until(deadline).await;
            me.expire(Instant::now());
        });
    }

    /// Fails the waiting requests whose delay ran out.
    fn expire(&self, now: Instant) {
        let expired: Vec<_> = {
            let mut w = self.waiting.borrow_mut();
            let (gone, keep): (Vec<_>, Vec<_>) = w.drain(..).partition(|(_, _, d)| *d <= now);
            w.extend(keep);
            gone
        };
        for (io, done, _) in expired {
            done.complete(io, Err(IoError::Io));
        }
    }

    /// The connection died: reconnect from a helper thread.
    fn reconnect(&self, home: Handle) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        tracing::warn!(target = %self.target, export = %self.export, "NBD server connection lost; reconnecting");
        let (target, export, closed, id, size) =
            (self.target.clone(), self.export.clone(), Arc::clone(&self.closed), self.id, self.size);
        let spawned = std::thread::Builder::new().name("nbd-reconnect".into()).spawn(move || {
            while !closed.load(Ordering::Acquire) {
                match connect_and_negotiate(&target, &export) {
                    Ok((fd, neg)) if neg.size == size => {
                        tracing::info!(%target, %export, "NBD server reconnected");
                        home.send(move || {
                            if let Some(n) = node(id) {
                                n.install(fd, neg);
                            }
                        });
                        return;
                    }
                    Ok((_, neg)) => tracing::error!(%target, %export, size = neg.size, "the export changed size; not reconnecting to it"),
                    Err(e) => tracing::debug!(%target, error = %e, "NBD reconnect failed"),
                }
                std::thread::sleep(RECONNECT_INTERVAL);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the NBD reconnect thread");
        }
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(c) = self.conn.borrow_mut().take() {
            c.kill();
        }
        for (io, done, _) in self.waiting.borrow_mut().drain(..) {
            done.complete_later(io, Err(IoError::Canceled));
        }
    }
}

struct NbdChannel {
    state: Rc<ClientNode>,
}

impl Channel for NbdChannel {
    fn submit(&self, io: Io, done: Done) {
        self.state.submit(io, done);
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let conn = self.state.live();
        Box::pin(async move {
            let Some(conn) = conn else { return Err(IoError::Io) };
            if conn.negotiated().base_allocation.is_none() {
                // The server says nothing about allocation: all data.
                return Ok(BlockStatus::data(len, None));
            }
            let (tx, rx) = reactor::reply();
            conn.block_status(offset, len, tx);
            rx.await.unwrap_or(Err(IoError::Canceled))
        })
    }
}

/// Names for this driver in `blockdev-add` (registered by the daemon).
pub const DRIVER_NAME: &str = "nbd";
