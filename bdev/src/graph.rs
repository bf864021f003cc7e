//! The node graph: named nodes, their children, and the claims that keep a
//! node in use from being deleted or written behind its owner's back.
//!
//! The graph belongs to the control plane (one thread changes it). Nodes are
//! shared (`Arc<Node>`) with reactors, which reach a node's data plane
//! through [`Node::channel`]. Opening and closing a node runs its
//! driver's I/O on the main reactor.
//!
//! ```text
//!   Graph ──name──▶ Node "r0" (raw) ──file child (claim: write)──▶ Node "#block001" (file)
//!                    └─ claims: export "e0" (write), job "j0" (exclusive write)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reactor::Handle;
use serde_json::{Value, json};

use crate::backend::{Backend, Held};
use crate::bdev::{Bdev, EventSink};
use crate::bitmap::BitmapSet;
use crate::channel::{BlockChannel, ChannelPolicy, cached_channel, drop_cached_channel};
use crate::error::BdevError;
use crate::lock::{Perms, perm};
use crate::options::{CommonOptions, OptReader, validate_node_name};

/// Opens a device for a driver. Reads its own options from the reader and
/// must call [`OptReader::finish`] before acquiring anything, so a typo
/// never leaves a half-opened device behind.
pub type OpenFn = fn(&mut OpenCtx<'_>, OptReader) -> Result<Arc<dyn Bdev>, BdevError>;

static NEXT_NODE_ID: AtomicU64 = AtomicU64::new(1);

/// How much busier (as a fraction of its time) the first reactor with the
/// fewest nodes must be than another before a new node goes to the other:
/// below this, placement stays predictable.
const PLACE_BUSY_MARGIN: f64 = 0.2;

/// What a claim allows its holder to do (the usual cases of [`Perms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Write, sharing with other writers.
    Write,
    /// Write, and nobody else may read or write (a job's target).
    ExclusiveWrite,
}

#[derive(Debug)]
struct ClaimEntry {
    id: u64,
    holder: String,
    perms: Perms,
    /// Held by a parent node (a child link), not by a user or a job.
    parent: bool,
}

/// A node in use. Released when dropped.
pub struct Claim {
    node: Arc<Node>,
    id: u64,
}

impl Claim {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// What the claim holds.
    pub fn perms(&self) -> Perms {
        let claims = self.node.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.iter().find(|c| c.id == self.id).map_or(Perms::NONE, |c| c.perms)
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("node", &self.node.name).field("id", &self.id).finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claims = self.node.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.retain(|c| c.id != self.id);
        let union = claims.iter().fold(Perms::NONE, |u, c| u.union(c.perms));
        // Giving permissions up cannot conflict; a failure only leaves a
        // lock held longer than needed.
        if let Err(e) = self.node.bdev.set_perms(union) {
            tracing::error!(node = %self.node.name, error = %e, "releasing permissions failed");
        }
    }
}

/// A child link: the role (`file`, `backing`) and the claim the parent holds.
#[derive(Debug)]
pub struct Child {
    pub role: &'static str,
    pub claim: Claim,
}

impl Child {
    pub fn node(&self) -> &Arc<Node> {
        self.claim.node()
    }
}

/// One node of the graph.
pub struct Node {
    id: u64,
    name: String,
    bdev: Arc<dyn Bdev>,
    common: CommonOptions,
    /// Released (emptied) when the node leaves the graph, whoever still
    /// holds an `Arc` to it.
    children: Mutex<Vec<Child>>,
    /// Created inline as another node's child; deleted with it.
    implicit: bool,
    /// The `blockdev-add` arguments that created it (for `save_config`).
    options: Value,
    claims: Mutex<Vec<ClaimEntry>>,
    next_claim: AtomicU64,
    /// Backends whose root this node is.
    users: Mutex<Vec<std::sync::Weak<Backend>>>,
    /// Set while a job is about to move this node's users elsewhere (a
    /// mirror's source): new users would be left behind on a node nobody
    /// else writes any more, so there are none until it is cleared.
    replaced_by: Mutex<Option<String>>,
    /// Dirty bitmaps every write through the node's channels marks.
    bitmaps: Arc<BitmapSet>,
    /// Made read-only while open (the old top of a chain once an overlay
    /// is put over it): no claim may write any more.
    demoted: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("name", &self.name).field("driver", &self.bdev.driver()).finish()
    }
}

impl Node {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> &'static str {
        self.bdev.driver()
    }

    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    pub fn size(&self) -> u64 {
        self.bdev.size()
    }

    pub fn read_only(&self) -> bool {
        self.common.read_only || self.bdev.read_only() || self.demoted.load(Ordering::Relaxed)
    }

    /// What all claims on the node hold together.
    pub fn perms_in_use(&self) -> Perms {
        self.claims.lock().unwrap_or_else(|e| e.into_inner()).iter().fold(Perms::NONE, |u, c| u.union(c.perms))
    }

    /// What this node's claim on its child `role` holds.
    pub fn child_perms(&self, role: &str) -> Option<Perms> {
        self.children.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|c| c.role == role).map(|c| c.claim.perms())
    }

    /// True when `other` is this node or below it.
    pub fn reaches(&self, other: &Node) -> bool {
        self.id == other.id || self.children().iter().any(|(_, c)| c.reaches(other))
    }

    /// The reactor requests to this node are best submitted on (see [`Bdev::home`]).
    pub fn home(&self) -> Option<Handle> {
        self.bdev.home()
    }

    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The node's children: role and node.
    pub fn children(&self) -> Vec<(&'static str, Arc<Node>)> {
        self.children.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| (c.role, Arc::clone(c.node()))).collect()
    }

    /// The node the chain continues with below this one: a filter's child,
    /// else the backing file (QEMU's `bdrv_filter_or_cow_bs`).
    pub fn chain_next(&self) -> Option<Arc<Node>> {
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let filter = self.bdev.is_filter();
        children.iter().find(|c| filter || c.role == "backing").map(|c| Arc::clone(c.node()))
    }

    /// Drops the claims this node holds on its children.
    fn release_children(&self) -> Vec<Arc<Node>> {
        let children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        children.iter().map(|c| Arc::clone(c.node())).collect()
    }

    pub fn options(&self) -> &Value {
        &self.options
    }

    pub fn policy(&self) -> ChannelPolicy {
        ChannelPolicy {
            size: self.bdev.size(),
            block_size: self.bdev.block_size(),
            read_only: self.read_only(),
            discard: self.common.discard,
            detect_zeroes: self.common.detect_zeroes,
            compress: self.bdev.supports_compressed_writes(),
        }
    }

    /// This node's channel on the current reactor (created on first use).
    /// Must be called on a reactor thread.
    pub fn channel(&self) -> Result<BlockChannel, BdevError> {
        cached_channel(self.id, || {
            let inner = Arc::clone(&self.bdev).create_channel()?;
            Ok(BlockChannel::new(inner, self.policy()).tracking(Arc::clone(&self.bitmaps)))
        })
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &Arc<BitmapSet> {
        &self.bitmaps
    }

    /// Puts the node in use for `holder` (a person-readable name such as
    /// "export 'e0'"). Fails when what the holder needs or refuses to
    /// share conflicts with existing claims, or with an image lock.
    pub fn claim(self: &Arc<Self>, holder: impl Into<String>, perms: impl Into<Perms>) -> Result<Claim, BdevError> {
        self.claim_as(holder.into(), perms.into(), false)
    }

    /// Claims the node for a parent node's child link.
    pub fn claim_as_child(
        self: &Arc<Self>,
        holder: impl Into<String>,
        perms: impl Into<Perms>,
    ) -> Result<Claim, BdevError> {
        self.claim_as(holder.into(), perms.into(), true)
    }

    fn claim_as(self: &Arc<Self>, holder: String, perms: Perms, parent: bool) -> Result<Claim, BdevError> {
        if let Some(job) = self.replaced_by.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(BdevError::Replaced { name: self.name.clone(), job: job.clone() });
        }
        let perms = if self.common.force_share { perms.sharing_all() } else { perms };
        if perms.writes() && self.read_only() {
            return Err(BdevError::ReadOnly { name: self.name.clone(), what: holder });
        }
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        for c in claims.iter() {
            let conflict = match perms.conflicts(c.perms) {
                (0, 0) => continue,
                (needed, 0) => (needed, holder.clone(), c.holder.clone()),
                (_, unshared) => (unshared, c.holder.clone(), holder.clone()),
            };
            return Err(BdevError::Conflict {
                name: self.name.clone(),
                perms: crate::lock::perm::names(conflict.0),
                required_by: conflict.1,
                unshared_by: conflict.2,
            });
        }
        let union = claims.iter().fold(perms, |u, c| u.union(c.perms));
        self.bdev.set_perms(union)?;
        let id = self.next_claim.fetch_add(1, Ordering::Relaxed);
        claims.push(ClaimEntry { id, holder, perms, parent });
        Ok(Claim { node: Arc::clone(self), id })
    }

    /// Refuses new claims while `job` (a holder name such as "job 'm'")
    /// prepares to move this node's users away; None lifts that.
    pub fn set_replaced_by(&self, job: Option<String>) {
        *self.replaced_by.lock().unwrap_or_else(|e| e.into_inner()) = job;
    }

    /// Who holds claims on this node.
    pub fn holders(&self) -> Vec<String> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| c.holder.clone()).collect()
    }

    /// Parent nodes holding this one as a child (holder names). A node
    /// without parents is a root.
    pub fn parents(&self) -> Vec<String> {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.parent)
            .map(|c| c.holder.clone())
            .collect()
    }

    /// The backends whose root this node is.
    pub fn users(&self) -> Vec<Arc<Backend>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(|w| w.upgrade()).collect()
    }

    pub(crate) fn add_user(&self, backend: &Arc<Backend>) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|w| w.strong_count() > 0);
        users.push(Arc::downgrade(backend));
    }

    pub(crate) fn remove_user(&self, backend: &Backend) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), backend));
    }

    /// The entry of `query-named-block-nodes` for this node (QEMU's BlockDeviceInfo).
    pub fn describe(&self) -> Value {
        let info = self.bdev.info();
        let mut image = json!({
            "filename": info.filename,
            "format": self.driver(),
            "virtual-size": self.size(),
            "dirty-flag": false,
        });
        if let Some(actual) = info.actual_size {
            image["actual-size"] = json!(actual);
        }
        if let Some(fs) = &info.format_specific {
            image["format-specific"] = fs.clone();
        }
        let mut v = json!({
            "node-name": self.name,
            "drv": self.driver(),
            "ro": self.read_only(),
            "file": info.filename,
            "backing_file_depth": 0,
            "encrypted": false,
            "detect_zeroes": self.common.detect_zeroes.name(),
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "active": true,
            "cache": { "writeback": true, "direct": info.direct, "no-flush": info.no_flush },
            "image": image,
        });
        let bitmaps = self.bitmaps.named();
        if !bitmaps.is_empty() {
            v["dirty-bitmaps"] = Value::Array(bitmaps.iter().map(|b| b.describe()).collect());
        }
        let children = self.children();
        if !children.is_empty() {
            v["children"] =
                Value::Array(children.iter().map(|(role, n)| json!({"child": role, "node-name": n.name})).collect());
        }
        v
    }
}

/// What a driver's open function may use.
pub struct OpenCtx<'a> {
    graph: &'a mut Graph,
    node_name: String,
    common: CommonOptions,
    children: Vec<Child>,
    /// Implicit nodes created for this open, removed again if it fails.
    created: Vec<String>,
}

impl OpenCtx<'_> {
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn common(&self) -> &CommonOptions {
        &self.common
    }

    /// The reactor control-plane I/O runs on (header reads at open time).
    pub fn main_reactor(&self) -> &Handle {
        &self.graph.main
    }

    /// The reactor a node with state of its own (a format driver, a
    /// network client) lives on: that of the chain it joins — the first
    /// child opened so far that has a home — else the one
    /// [`Graph::place`] picks. Ask after opening the children.
    pub fn home(&self) -> Handle {
        if let Some(h) = &self.graph.home_override {
            return h.clone();
        }
        self.children.iter().find_map(|c| c.node().home()).unwrap_or_else(|| self.graph.place())
    }

    /// Resolves a child reference — a node name, or an inline options object
    /// (creating an implicit node, which inherits `read-only` and
    /// `force-share` as in QEMU) — and claims it for this node.
    pub fn open_child(&mut self, role: &'static str, reference: Value, perms: Perms) -> Result<Arc<Node>, BdevError> {
        let perms = if self.common.force_share { perms.sharing_all() } else { perms };
        let node = match reference {
            Value::String(name) => self.graph.get(&name)?,
            Value::Object(mut map) => {
                if self.common.read_only {
                    map.entry("read-only").or_insert(Value::Bool(true));
                }
                if self.common.force_share {
                    map.entry("force-share").or_insert(Value::Bool(true));
                }
                let node = self.graph.open_node(Value::Object(map), None)?;
                self.created.push(node.name.clone());
                node
            }
            _ => {
                return Err(BdevError::invalid(format!("Invalid parameter type for '{role}', expected: BlockdevRef")));
            }
        };
        let claim = node.claim_as_child(format!("node '{}' ({role} child)", self.node_name), perms)?;
        self.children.push(Child { role, claim });
        Ok(node)
    }

    /// A node already in the graph (options that name other nodes, such as
    /// a bitmap's).
    pub fn node(&self, name: &str) -> Result<Arc<Node>, BdevError> {
        self.graph.get(name)
    }

    /// Where events go, if anywhere.
    pub fn events(&self) -> Option<EventSink> {
        self.graph.events.clone()
    }

    /// The image-lock group files opened for this node join (see
    /// [`Graph::add_twin`]); None: each file is its own.
    pub fn lock_group(&self) -> Option<u64> {
        self.graph.lock_group
    }
}

/// All nodes, by name, and the drivers that open them.
pub struct Graph {
    nodes: BTreeMap<String, Arc<Node>>,
    /// Names in creation order (save_config replays in this order).
    order: Vec<String>,
    implicit_seq: u64,
    drivers: HashMap<&'static str, OpenFn>,
    main: Handle,
    reactors: Vec<Handle>,
    /// Set while a twin opens: its files join this image-lock group.
    lock_group: Option<u64>,
    /// Set while a node is reopened on a chosen reactor.
    home_override: Option<Handle>,
    /// Where drivers send events.
    events: Option<EventSink>,
}

impl Graph {
    /// An empty graph whose nodes may be used on `reactors`; control-plane
    /// I/O runs on the first one.
    pub fn new(reactors: Vec<Handle>) -> Graph {
        assert!(!reactors.is_empty(), "a graph needs at least one reactor");
        let mut g = Graph {
            nodes: BTreeMap::new(),
            order: Vec::new(),
            implicit_seq: 0,
            drivers: HashMap::new(),
            main: reactors[0].clone(),
            reactors,
            lock_group: None,
            home_override: None,
            events: None,
        };
        crate::drivers::register_builtin(&mut g);
        g
    }

    /// Sends the drivers' events (`BLOCK_IMAGE_CORRUPTED`) to `sink`, for
    /// nodes opened from now on.
    pub fn set_events(&mut self, sink: EventSink) {
        self.events = Some(sink);
    }

    pub fn register_driver(&mut self, name: &'static str, open: OpenFn) {
        self.drivers.insert(name, open);
    }

    /// Driver names, sorted.
    pub fn drivers(&self) -> Vec<&'static str> {
        let mut d: Vec<_> = self.drivers.keys().copied().collect();
        d.sort_unstable();
        d
    }

    pub fn main_reactor(&self) -> &Handle {
        &self.main
    }

    pub fn reactors(&self) -> &[Handle] {
        &self.reactors
    }

    /// Nodes whose state lives on each reactor, by reactor index.
    pub fn homed_nodes(&self) -> Vec<Vec<Arc<Node>>> {
        let mut per = vec![Vec::new(); self.reactors.len()];
        for n in self.nodes.values() {
            if let Some(i) = n.home().and_then(|h| self.reactors.iter().position(|r| r.id() == h.id())) {
                per[i].push(Arc::clone(n));
            }
        }
        per
    }

    /// The reactor a new node graph goes to: the one with the fewest nodes
    /// homed on it; among those, one clearly less busy than the others
    /// (by measured busy time), else the first.
    pub fn place(&self) -> Handle {
        let counts: Vec<usize> = self.homed_nodes().iter().map(Vec::len).collect();
        let least = counts.iter().copied().min().unwrap_or(0);
        let busy = |h: &Handle| {
            let s = h.stats();
            s.busy_ns as f64 / (s.busy_ns + s.idle_ns).max(1) as f64
        };
        let candidates: Vec<&Handle> =
            self.reactors.iter().zip(&counts).filter(|&(_, &c)| c == least).map(|(h, _)| h).collect();
        let first = candidates[0];
        let idlest = candidates.iter().copied().min_by(|a, b| busy(a).total_cmp(&busy(b))).unwrap_or(first);
        if busy(first) - busy(idlest) > PLACE_BUSY_MARGIN { idlest.clone() } else { first.clone() }
    }

    /// Moves `name` and the nodes below it to reactor `to` (QEMU's
    /// `x-blockdev-set-iothread`): drivers with state of their own flush it
    /// and load it again there, children first. Only a root whose subtree
    /// nobody else uses can move: no export, job or other parent may have
    /// requests on the way.
    pub fn move_to(&mut self, name: &str, to: &Handle) -> Result<(), BdevError> {
        let node = self.get(name)?;
        if !node.parents().is_empty() {
            return Err(BdevError::invalid(format!(
                "Node '{name}' is a child of {}; move the node above it",
                node.parents().join(", ")
            )));
        }
        // The subtree, parents before children.
        let mut set: Vec<Arc<Node>> = vec![Arc::clone(&node)];
        let mut i = 0;
        while i < set.len() {
            for (_, c) in set[i].children() {
                if !set.iter().any(|n| n.id == c.id) {
                    set.push(c);
                }
            }
            i += 1;
        }
        let links: Vec<String> = set
            .iter()
            .flat_map(|p| p.children().into_iter().map(move |(role, _)| format!("node '{}' ({role} child)", p.name)))
            .collect();
        for n in &set {
            if let Some(h) = n.holders().into_iter().find(|h| !links.contains(h)) {
                return Err(BdevError::InUse { name: n.name.clone(), holders: h });
            }
        }
        for n in set.iter().rev() {
            Arc::clone(&n.bdev).rehome(to)?;
            let id = n.id;
            for r in &self.reactors {
                // Channels made for the old home go; new ones find the new one.
                let _ = r.call(move || drop_cached_channel(id)).wait();
            }
        }
        Ok(())
    }

    /// Opens `options` as a new node whose state lives on `home` (an
    /// explicit placement: an iothread named by the user).
    pub fn add_on(&mut self, home: &Handle, options: Value) -> Result<Arc<Node>, BdevError> {
        self.home_override = Some(home.clone());
        let res = self.add(options);
        self.home_override = None;
        res
    }

    pub fn get(&self, name: &str) -> Result<Arc<Node>, BdevError> {
        self.nodes.get(name).cloned().ok_or_else(|| BdevError::NodeNotFound(name.to_string()))
    }

    /// Nodes in creation order.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.order.iter().filter_map(|n| self.nodes.get(n))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `blockdev-add`: opens a node (and its inline children) from QEMU-shaped options.
    pub fn add(&mut self, options: Value) -> Result<Arc<Node>, BdevError> {
        let name = match options.get("node-name") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(BdevError::invalid("Invalid parameter type for 'node-name', expected: string"));
            }
            None => {
                return Err(BdevError::invalid("'node-name' must be specified for the root node"));
            }
        };
        self.open_node(options, Some(name))
    }

    /// Opens a node Spindle needs for itself: implicit, with a generated
    /// name unless the options give one.
    pub fn add_implicit(&mut self, options: Value) -> Result<Arc<Node>, BdevError> {
        self.open_node(options, None)
    }

    /// Opens the same image as `original` again, from `options` (a writable
    /// twin of a read-only image for a commit): implicit, and its file
    /// shares `original`'s image locks instead of conflicting with them.
    pub fn add_twin(&mut self, original: &Arc<Node>, options: Value) -> Result<Arc<Node>, BdevError> {
        let file = original.children().into_iter().find(|(r, _)| *r == "file").map(|(_, n)| n);
        let group = file.as_deref().unwrap_or(original).bdev().lock_group();
        self.lock_group = group;
        let res = self.open_node(options, None);
        self.lock_group = None;
        res
    }

    fn open_node(&mut self, options: Value, name: Option<String>) -> Result<Arc<Node>, BdevError> {
        let mut opts = OptReader::new(options.clone())?;
        let explicit = opts.str_opt("node-name")?;
        let implicit = name.is_none() && explicit.is_none();
        let name = match name.or(explicit) {
            Some(n) => {
                validate_node_name(&n)?;
                n
            }
            None => {
                self.implicit_seq += 1;
                format!("#block{:03}", self.implicit_seq)
            }
        };
        if self.nodes.contains_key(&name) {
            return Err(BdevError::DuplicateNode(name));
        }
        let mut common = CommonOptions::read(&mut opts)?;
        common.node_name = name.clone();
        let Some(&open) = self.drivers.get(common.driver.as_str()) else {
            return Err(BdevError::invalid(format!("Parameter 'driver' does not accept value '{}'", common.driver)));
        };
        let mut ctx = OpenCtx {
            graph: self,
            node_name: name.clone(),
            common: common.clone(),
            children: Vec::new(),
            created: Vec::new(),
        };
        let opened = open(&mut ctx, opts);
        let OpenCtx { children, created, .. } = ctx;
        let bdev = match opened {
            Ok(b) => b,
            Err(e) => {
                drop(children);
                for n in created.iter().rev() {
                    if let Err(e2) = self.remove_node(n, true) {
                        tracing::error!(node = %n, error = %e2, "rolling back an implicit child failed");
                    }
                }
                return Err(e);
            }
        };
        if !bdev.block_size().is_power_of_two() {
            return Err(BdevError::invalid(format!(
                "driver reported block size {} (not a power of two)",
                bdev.block_size()
            )));
        }
        let node = Arc::new(Node {
            id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
            name: name.clone(),
            bdev,
            common,
            children: Mutex::new(children),
            implicit,
            options,
            claims: Mutex::new(Vec::new()),
            next_claim: AtomicU64::new(1),
            users: Mutex::new(Vec::new()),
            replaced_by: Mutex::new(None),
            bitmaps: Arc::default(),
            demoted: AtomicBool::new(false),
        });
        self.nodes.insert(name.clone(), Arc::clone(&node));
        self.order.push(name);
        Ok(node)
    }

    /// Adds a node built by Spindle itself (a job's filter) over `children`.
    /// It is implicit: listed, but deleted by its owner, not `blockdev-del`.
    pub fn add_internal(
        &mut self,
        name: Option<String>,
        bdev: Arc<dyn Bdev>,
        children: Vec<Child>,
    ) -> Result<Arc<Node>, BdevError> {
        let name = match name {
            Some(n) => {
                validate_node_name(&n)?;
                n
            }
            None => {
                self.implicit_seq += 1;
                format!("#block{:03}", self.implicit_seq)
            }
        };
        if self.nodes.contains_key(&name) {
            return Err(BdevError::DuplicateNode(name));
        }
        let mut opts = OptReader::new(json!({"driver": bdev.driver()}))?;
        let mut common = CommonOptions::read(&mut opts)?;
        common.node_name = name.clone();
        // A filter passes requests on unchanged; the node below applies its
        // own discard and detect-zeroes policies.
        common.discard = crate::options::DiscardMode::Unmap;
        let node = Arc::new(Node {
            id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
            name: name.clone(),
            common,
            children: Mutex::new(children),
            implicit: true,
            options: json!({"driver": bdev.driver(), "node-name": name}),
            bdev,
            claims: Mutex::new(Vec::new()),
            next_claim: AtomicU64::new(1),
            users: Mutex::new(Vec::new()),
            replaced_by: Mutex::new(None),
            bitmaps: Arc::default(),
            demoted: AtomicBool::new(false),
        });
        self.nodes.insert(name.clone(), Arc::clone(&node));
        self.order.push(name);
        Ok(node)
    }

    /// Removes a node added with [`Graph::add_internal`] (or an implicit
    /// node nobody holds any more), with its implicit children that nobody
    /// else holds. Fails while anyone holds it.
    pub fn remove_internal(&mut self, name: &str) -> Result<(), BdevError> {
        self.remove_node(name, false)
    }

    /// Replaces `parent`'s child link `role` (claims follow): the new child
    /// is claimed first, the old link is dropped, and an implicit old child
    /// nobody holds any more leaves the graph. The driver must already read
    /// from the new child.
    pub fn relink_child(
        &mut self,
        parent: &Arc<Node>,
        role: &'static str,
        new: Option<&Arc<Node>>,
        perms: Perms,
    ) -> Result<(), BdevError> {
        let claim = Self::claim_child(parent, role, new, perms)?;
        self.swap_child(parent, role, claim);
        Ok(())
    }

    fn claim_child(
        parent: &Arc<Node>,
        role: &'static str,
        new: Option<&Arc<Node>>,
        perms: Perms,
    ) -> Result<Option<Claim>, BdevError> {
        let perms = if parent.common.force_share { perms.sharing_all() } else { perms };
        new.map(|n| n.claim_as_child(format!("node '{}' ({role} child)", parent.name), perms)).transpose()
    }

    fn swap_child(&mut self, parent: &Arc<Node>, role: &'static str, claim: Option<Claim>) {
        let old = {
            let mut children = parent.children.lock().unwrap_or_else(|e| e.into_inner());
            let old = children.iter().position(|c| c.role == role).map(|i| children.remove(i));
            if let Some(claim) = claim {
                children.push(Child { role, claim });
            }
            old
        };
        if let Some(old) = old {
            let node = Arc::clone(old.node());
            drop(old);
            self.collect_orphan(&node);
        }
    }

    /// Re-points `node`'s backing to `backing` (or none), writing `name`
    /// and `format` into its image, and moves the child link. The new
    /// backing is claimed before anything is written, so a conflict
    /// changes nothing.
    pub fn change_backing(
        &mut self,
        node: &Arc<Node>,
        backing: Option<&Arc<Node>>,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), BdevError> {
        let claim = Self::claim_child(node, "backing", backing, Perms::backing())?;
        node.bdev.change_backing(backing, name, format)?;
        self.swap_child(node, "backing", claim);
        Ok(())
    }

    /// Makes `overlay` read what it lacks from `backing` (or from nothing),
    /// without writing its image: the link `blockdev-snapshot` adds.
    pub fn attach_backing(&mut self, overlay: &Arc<Node>, backing: Option<&Arc<Node>>) -> Result<(), BdevError> {
        let claim = Self::claim_child(overlay, "backing", backing, Perms::backing())?;
        overlay.bdev.attach_backing(backing)?;
        self.swap_child(overlay, "backing", claim);
        Ok(())
    }

    /// Makes an open node read-only, as QEMU reopens the old top of a chain
    /// after a snapshot: refused while a claim writes it; its format's file
    /// is then held for reading only.
    pub fn demote(&mut self, node: &Arc<Node>) -> Result<(), BdevError> {
        if node.read_only() {
            return Ok(());
        }
        if node.perms_in_use().writes() {
            return Err(BdevError::invalid(format!("Node '{}' is still written by its users", node.name)));
        }
        node.demoted.store(true, Ordering::Relaxed);
        // The format's file is then only read.
        let file = node.children().into_iter().find(|(r, _)| *r == "file").map(|(_, f)| f);
        let writes = node.child_perms("file").is_some_and(Perms::writes);
        if let (Some(f), true) = (file, writes) {
            let p = node.child_perms("file").unwrap_or(Perms::NONE);
            self.reclaim_child(node, "file", Perms { perm: p.perm & !perm::WRITES, shared: p.shared })?;
            if !f.perms_in_use().writes() {
                f.demoted.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Claims `node`'s child `role` again with `perms` (stricter or looser
    /// than before): the old claim goes first, since the two could conflict;
    /// if the new one is refused, the old one is taken back.
    pub fn reclaim_child(&mut self, node: &Arc<Node>, role: &'static str, perms: Perms) -> Result<(), BdevError> {
        let mut children = node.children.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = children.iter().position(|c| c.role == role) else {
            return Err(BdevError::invalid(format!("Node '{}' has no {role} child", node.name)));
        };
        let old = children.remove(i);
        let (child, was) = (Arc::clone(old.node()), old.claim.perms());
        let holder = format!("node '{}' ({role} child)", node.name);
        drop(old);
        match child.claim_as_child(holder.clone(), perms) {
            Ok(claim) => {
                children.insert(i, Child { role, claim });
                Ok(())
            }
            Err(e) => {
                let claim = child.claim_as_child(holder, was)?;
                children.insert(i, Child { role, claim });
                Err(e)
            }
        }
    }

    /// Holds every user whose root reaches one of `nodes` (see
    /// [`Backend::hold`]): when this returns, none of their requests is in
    /// flight and new ones wait until the returned guards are dropped.
    pub fn hold_users(&self, nodes: &[Arc<Node>], deadline: std::time::Instant) -> Result<Vec<Held>, BdevError> {
        let mut held: Vec<Held> = Vec::new();
        for root in self.nodes.values() {
            if !nodes.iter().any(|n| root.reaches(n)) {
                continue;
            }
            for user in root.users() {
                if held.iter().any(|h| Arc::ptr_eq(h.backend(), &user)) {
                    continue;
                }
                held.push(user.hold(deadline).map_err(|e| BdevError::invalid(e.to_string()))?);
            }
        }
        Ok(held)
    }

    /// Removes `node` and its chain below if they are implicit and nobody holds them.
    fn collect_orphan(&mut self, node: &Arc<Node>) {
        if node.implicit
            && node.holders().is_empty()
            && self.nodes.contains_key(&node.name)
            && let Err(e) = self.remove_node(&node.name, false)
        {
            tracing::error!(node = %node.name, error = %e, "removing an orphaned node failed");
        }
    }

    /// `blockdev-del`: closes a node nobody uses, with its implicit children.
    pub fn remove(&mut self, name: &str) -> Result<(), BdevError> {
        let node = self.get(name)?;
        if node.implicit {
            return Err(BdevError::invalid(format!(
                "Node '{name}' was created implicitly by its parent; delete the parent instead"
            )));
        }
        self.remove_node(name, false)
    }

    fn remove_node(&mut self, name: &str, force: bool) -> Result<(), BdevError> {
        let node = self.get(name)?;
        let holders = node.holders();
        if !holders.is_empty() && !force {
            return Err(BdevError::InUse { name: name.to_string(), holders: holders.join(", ") });
        }
        self.nodes.remove(name);
        self.order.retain(|n| n != name);
        self.close_node(&node);
        let implicit_children: Vec<String> =
            node.release_children().iter().filter(|c| c.implicit).map(|c| c.name.clone()).collect();
        drop(node);
        for child in implicit_children {
            // The parent is gone, so its claim on the child is released;
            // a child someone else still holds (a job) stays.
            let held = self.nodes.get(&child).is_some_and(|c| !c.holders().is_empty());
            if force || !held {
                self.remove_node(&child, force)?;
            }
        }
        Ok(())
    }

    /// Flushes and closes a node on the main reactor, then drops its channel
    /// on every reactor. Errors are logged: the node goes away regardless.
    fn close_node(&mut self, node: &Arc<Node>) {
        let id = node.id;
        let name = node.name.clone();
        let closing = Arc::clone(node);
        // On the node's home: a driver's state lives there.
        let home = node.home().unwrap_or_else(|| self.main.clone());
        let result = home.run(move || async move {
            let ch = closing.channel()?;
            if !closing.read_only() {
                ch.flush().await.map_err(|source| BdevError::Io { what: "flush".into(), source })?;
            }
            Arc::clone(&closing.bdev).close().await.map_err(|source| BdevError::Io { what: "close".into(), source })
        });
        match result.wait() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(node = %name, error = %e, "closing node failed"),
            Err(_) => tracing::error!(node = %name, "closing node: reactor stopped"),
        }
        for r in &self.reactors {
            // A stopped reactor has no channels left to drop.
            let _ = r.call(move || drop_cached_channel(id)).wait();
        }
    }

    /// Closes every node, parents before children (daemon shutdown).
    pub fn close_all(&mut self) {
        while let Some(name) =
            self.order.iter().rev().find(|n| self.nodes.get(*n).is_some_and(|nd| !nd.implicit)).cloned()
        {
            if let Err(e) = self.remove_node(&name, true) {
                tracing::error!(node = %name, error = %e, "closing node at shutdown failed");
                self.nodes.remove(&name);
                self.order.retain(|n| n != &name);
            }
        }
        // Implicit nodes whose parent failed to close.
        while let Some(name) = self.order.pop() {
            if let Some(node) = self.nodes.remove(&name) {
                self.close_node(&node);
                node.release_children();
            }
        }
    }

    /// `query-named-block-nodes`: newest first, as QEMU lists them.
    pub fn describe(&self) -> Vec<Value> {
        self.order.iter().rev().filter_map(|n| self.nodes.get(n)).map(|n| n.describe()).collect()
    }

    /// The `blockdev-add` calls that recreate the explicit nodes, in an
    /// order where every referenced node exists before its users.
    pub fn save_config(&self) -> Vec<Value> {
        self.nodes().filter(|n| !n.implicit).map(|n| json!({"method": "blockdev-add", "params": n.options})).collect()
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if !self.nodes.is_empty() {
            self.close_all();
        }
    }
}
