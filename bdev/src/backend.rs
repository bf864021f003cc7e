//! Backends: the users' end of the graph (QEMU's BlockBackend).
//!
//! An NBD export (later a vhost-user disk) does not hold a node: it holds a
//! [`Backend`] whose root node can be replaced while requests flow. That is
//! how a job puts a filter in front of a disk (mirror, backup) and how
//! `job-complete` moves every user onto a mirror's target at once.
//!
//! ```text
//!   export ──▶ Backend ──root──▶ mirror filter ──▶ source
//!                  └── replace_root(target): users now reach the target
//! ```
//!
//! Every request counts itself in flight under the root generation it was
//! sent to, in a per-reactor slot (no shared cache line between reactors).
//! [`Backend::replace_root`] bumps the generation; [`Backend::drained`]
//! then tells when every request sent to the old root has completed — the
//! moment a filter inserted in front of it sees every write.
//!
//! [`Backend::hold`] quiesces a user: new requests wait (they are not
//! failed) and the call returns once those in flight have completed. A
//! transaction holds every user of the nodes it touches, so all its actions
//! take effect at one instant; dropping the [`Held`] lets the waiting
//! requests go, to whatever root the backend has by then.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::channel::BlockChannel;
use crate::error::{BdevError, IoError};
use crate::graph::{Access, Claim, Node};
use crate::io::{BlockStatus, Done, Io, IoDone};

/// In-flight counter slots (reactors hash onto them by id).
const SLOTS: usize = 64;

/// How long the graph waits for a user's requests to drain after moving
/// it to another root before it gives up (see [`Backend::wait_drained`]).
pub const DRAIN_WAIT_MAX: Duration = Duration::from_secs(30);

/// Requests sent under an old root did not finish in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requests of {holder} did not finish within {secs} s", secs = DRAIN_WAIT_MAX.as_secs())]
pub struct DrainTimeout {
    pub holder: String,
}

/// One slot: requests in flight under even and odd generations, on its
/// own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Slot([AtomicU64; 2]);

/// Requests that arrived while the backend was held, one wake-up per
/// waiting request.
#[derive(Default)]
struct Gate {
    waiting: Vec<reactor::ReplyTx<()>>,
}

struct Root {
    generation: u64,
    node: Arc<Node>,
    _claim: Claim,
}

/// A user's handle on a node that can be replaced underneath it.
pub struct Backend {
    holder: String,
    access: Access,
    root: Mutex<Root>,
    generation: AtomicU64,
    inflight: Box<[Slot]>,
    /// Set while held: requests wait at the gate instead of entering.
    held: AtomicBool,
    gate: Mutex<Gate>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("holder", &self.holder).field("root", &self.root().name()).finish()
    }
}

impl Backend {
    /// Puts `node` in use for `holder` with `access` (see [`Node::claim`]).
    pub fn new(node: &Arc<Node>, holder: impl Into<String>, access: Access) -> Result<Arc<Backend>, BdevError> {
        let holder = holder.into();
        let claim = node.claim(holder.clone(), access)?;
        let backend = Arc::new(Backend {
            holder,
            access,
            root: Mutex::new(Root { generation: 0, node: Arc::clone(node), _claim: claim }),
            generation: AtomicU64::new(0),
            inflight: (0..SLOTS).map(|_| Slot::default()).collect(),
            held: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
        });
        node.add_user(&backend);
        Ok(backend)
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn access(&self) -> Access {
        self.access
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Root> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node requests go to now.
    pub fn root(&self) -> Arc<Node> {
        Arc::clone(&self.lock().node)
    }

    /// Sends new requests to `new` instead of the current root, claiming it
    /// first (a conflicting claim leaves everything as it was). Requests
    /// already sent finish where they went; pass the returned generation to
    /// [`Backend::drained`] to learn when they have.
    pub fn replace_root(self: &Arc<Self>, new: &Arc<Node>) -> Result<u64, BdevError> {
        let claim = new.claim(self.holder.clone(), self.access)?;
        let (old_node, old_generation) = {
            let mut root = self.lock();
            let old_generation = root.generation;
            let old = std::mem::replace(
                &mut *root,
                Root { generation: old_generation + 1, node: Arc::clone(new), _claim: claim },
            );
            // Requests count themselves, then re-check the generation: the
            // SeqCst store orders every later check after this swap.
            self.generation.store(old_generation + 1, Ordering::SeqCst);
            (old.node, old_generation)
        };
        old_node.remove_user(self);
        new.add_user(self);
        Ok(old_generation)
    }

    /// True once no request sent under `generation` is in flight any more.
    pub fn drained(&self, generation: u64) -> bool {
        let parity = (generation & 1) as usize;
        self.inflight.iter().all(|s| s.0[parity].load(Ordering::SeqCst) == 0)
    }

    /// Blocks the calling (control) thread until [`Backend::drained`], or
    /// fails once `deadline` passes: a request that never completes (a
    /// device that stopped answering) must not hang the control plane.
    pub fn wait_drained(&self, generation: u64, deadline: Instant) -> Result<(), DrainTimeout> {
        let mut pause = Duration::from_micros(50);
        while !self.drained(generation) {
            let now = Instant::now();
            if now >= deadline {
                return Err(DrainTimeout { holder: self.holder.clone() });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Quiesces the backend until the returned [`Held`] is dropped: new
    /// requests wait, and the call returns once every request already sent
    /// has completed (or fails at `deadline`, released again).
    pub fn hold(self: &Arc<Self>, deadline: Instant) -> Result<Held, DrainTimeout> {
        let old = {
            let mut root = self.lock();
            // The flag before the generation: a request that sees the new
            // generation also sees the flag (both SeqCst), and one that saw
            // neither is counted under the old generation and waited for.
            self.held.store(true, Ordering::SeqCst);
            let old = root.generation;
            root.generation = old + 1;
            self.generation.store(old + 1, Ordering::SeqCst);
            old
        };
        let held = Held { backend: Arc::clone(self) };
        self.wait_drained(old, deadline)?;
        Ok(held)
    }

    fn release(&self) {
        let waiting = {
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            self.held.store(false, Ordering::SeqCst);
            std::mem::take(&mut gate.waiting)
        };
        for w in waiting {
            w.send(());
        }
    }

    /// A wake-up for a request that found the backend held, or None if the
    /// hold ended meanwhile.
    fn wait_at_gate(&self) -> Option<reactor::Reply<()>> {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if !self.held.load(Ordering::SeqCst) {
            return None;
        }
        let (tx, rx) = reactor::reply();
        gate.waiting.push(tx);
        Some(rx)
    }

    /// A channel for the calling reactor (one per user and reactor).
    pub fn channel(self: &Arc<Self>) -> Result<Rc<BackendChannel>, BdevError> {
        let (generation, node) = {
            let root = self.lock();
            (root.generation, Arc::clone(&root.node))
        };
        let ch = node.channel()?;
        let slot = reactor::current().id() % SLOTS;
        Ok(Rc::new_cyclic(|me| BackendChannel {
            backend: Arc::clone(self),
            current: RefCell::new((generation, ch)),
            slot,
            pending: RefCell::new(Slab::new()),
            me: me.clone(),
        }))
    }
}

/// A held backend (see [`Backend::hold`]); dropping it lets requests go.
pub struct Held {
    backend: Arc<Backend>,
}

impl Held {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backend.release();
    }
}

/// A backend's data path on one reactor: follows root replacements.
pub struct BackendChannel {
    backend: Arc<Backend>,
    current: RefCell<(u64, BlockChannel)>,
    slot: usize,
    pending: RefCell<Slab<(Done, u64)>>,
    me: Weak<BackendChannel>,
}

impl BackendChannel {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Size of the current root.
    pub fn size(&self) -> u64 {
        self.current.borrow().1.size()
    }

    /// The root's channel for generation `generation`, re-resolved after a replacement.
    fn channel_for(&self, generation: u64) -> Result<BlockChannel, BdevError> {
        let mut cur = self.current.borrow_mut();
        if cur.0 != generation {
            let node = self.backend.root();
            *cur = (generation, node.channel()?);
        }
        Ok(cur.1.clone())
    }

    /// Counts a request in flight under the current generation and returns
    /// it, or None while the backend is held.
    fn enter(&self) -> Option<u64> {
        let slot = &self.backend.inflight[self.slot].0;
        loop {
            let g = self.backend.generation.load(Ordering::SeqCst);
            slot[(g & 1) as usize].fetch_add(1, Ordering::SeqCst);
            if self.backend.generation.load(Ordering::SeqCst) == g {
                if self.backend.held.load(Ordering::SeqCst) {
                    slot[(g & 1) as usize].fetch_sub(1, Ordering::SeqCst);
                    return None;
                }
                return Some(g);
            }
            slot[(g & 1) as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Counts a request in, waiting out a hold.
    async fn enter_wait(&self) -> u64 {
        loop {
            if let Some(g) = self.enter() {
                return g;
            }
            if let Some(wake) = self.backend.wait_at_gate() {
                // A dropped wake-up means the hold's owner is gone: go on.
                let _ = wake.await;
            }
        }
    }

    fn leave(&self, generation: u64) {
        self.backend.inflight[self.slot].0[(generation & 1) as usize].fetch_sub(1, Ordering::SeqCst);
    }

    /// Submits a request to the current root (once a hold is over).
    pub fn submit(&self, io: Io, done: Done) {
        let Some(generation) = self.enter() else {
            let Some(me) = self.me.upgrade() else {
                return done.complete_later(io, Err(IoError::Canceled));
            };
            reactor::spawn_local(async move {
                let generation = me.enter_wait().await;
                me.submit_entered(generation, io, done);
            });
            return;
        };
        self.submit_entered(generation, io, done);
    }

    fn submit_entered(&self, generation: u64, io: Io, done: Done) {
        let ch = match self.channel_for(generation) {
            Ok(ch) => ch,
            Err(e) => {
                self.leave(generation);
                tracing::error!(backend = %self.backend.holder, error = %e, "no channel for the backend's root");
                return done.complete_later(io, Err(IoError::Canceled));
            }
        };
        let key = self.pending.borrow_mut().insert((done, generation));
        let me: Rc<dyn IoDone> = self.me.upgrade().expect("channel alive while submitting");
        ch.submit(io, Done::new(me, key as u64));
    }

    /// Block status of the current root.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        let generation = self.enter_wait().await;
        let res = match self.channel_for(generation) {
            Ok(ch) => ch.block_status(offset, len).await,
            Err(_) => Err(IoError::Canceled),
        };
        self.leave(generation);
        res
    }
}

impl IoDone for BackendChannel {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let (done, generation) = self.pending.borrow_mut().remove(tag as usize);
        self.leave(generation);
        done.complete(io, res);
    }
}
