//! Copy-before-write: keeping a point in time of a node that clients go on
//! writing. Backup jobs and fleecing share it.
//!
//! ```text
//!   users ──▶ copy-before-write ──▶ file (the disk)
//!                 │ a write to clusters not copied yet:
//!                 │ their old data goes to the target first
//!                 └──────────────────────▶ target
//!   reader ──▶ snapshot-access ──▶ (the cbw's state) clusters copied: target
//!                                                   not yet: file, locked
//! ```
//!
//! [`Cbw`] is the state on the home reactor: the clusters still to copy (a
//! bitmap, from `full`, a user's bitmap, or what a job decides), range locks
//! that copies, reads of the point in time and client writes share, and the
//! error policy. A copy locks its clusters, clears their bits, copies, and
//! sets them again if it fails; a client write waits for copies of its
//! clusters and copies those still marked itself; a reader of the point in
//! time locks what it reads from the file, so no write lands under it.
//!
//! The drivers: `copy-before-write` (QEMU's filter: `file`, `target`,
//! `bitmap`, `on-cbw-error`, `cbw-timeout`, `min-cluster-size`) and
//! `snapshot-access` (a read-only node over a copy-before-write filter that
//! reads the point in time; a discard there gives clusters up).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reactor::Handle;

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::bitmap::DirtyBits;
use crate::channel::{BlockChannel, IO_BYTES_MAX};
use crate::error::{BdevError, IoError};
use crate::forward::ForwardChannel;
use crate::graph::{Node, OpenCtx};
use crate::io::{BlockStatus, Done, Io, IoFlags, IoKind};
use crate::lock::{Perms, perm};
use crate::locks::RangeLocks;
use crate::options::OptReader;

/// Smallest copy-before-write cluster (QEMU's block-copy default).
pub const CLUSTER_MIN: u64 = 64 << 10;

/// What a failed copy before a write does (QEMU's `on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCbwError {
    /// The client's write fails; the point in time stays whole.
    BreakGuestWrite,
    /// The client's write goes on; the point in time is lost, and reads of
    /// it fail from then on.
    BreakSnapshot,
}

/// Who wants to know what the copies before writes do (a backup job's
/// progress). Called on the home reactor.
pub trait CbwObserver {
    /// `bytes` were copied (or found not to need it) before a client write.
    fn copied(&self, _bytes: u64) {}
    /// A copy before a client write has finished, well or not.
    fn settled(&self) {}
}

/// Error of a copy: whether the read (source) or the write (target) failed.
pub type CopyError = (bool, IoError);

/// The copy state of one filter, on its home reactor.
pub struct Cbw {
    pub source: BlockChannel,
    pub target: BlockChannel,
    /// Clusters still to copy.
    pub bits: Arc<DirtyBits>,
    pub cluster: u64,
    pub locks: Rc<RangeLocks>,
    /// Only what the source's own layer holds is copied (backup `sync=top`).
    pub top_only: bool,
    /// Discard each cluster on the source once copied.
    pub discard_source: bool,
    /// Flags of the copies' data writes to the target (`COMPRESS` for a
    /// backup's `compress`).
    write_flags: IoFlags,
    on_error: OnCbwError,
    /// How long a copy before a write may take (None: no limit).
    timeout: Option<Duration>,
    /// The point in time was given up (break-snapshot after a failure).
    broken: Cell<bool>,
    /// Clusters a reader of the point in time gave up (discarded).
    gone: DirtyBits,
    observer: RefCell<Option<Rc<dyn CbwObserver>>>,
}

/// How a [`Cbw`] is set up.
pub struct CbwSettings {
    pub bits: Arc<DirtyBits>,
    pub cluster: u64,
    pub top_only: bool,
    pub discard_source: bool,
    /// Store the copies compressed (the target must take
    /// [`IoFlags::COMPRESS`]).
    pub compress: bool,
    pub on_error: OnCbwError,
    pub timeout: Option<Duration>,
}

impl Cbw {
    pub fn new(source: BlockChannel, target: BlockChannel, s: CbwSettings) -> Rc<Cbw> {
        let gone = DirtyBits::new(s.bits.size(), s.cluster);
        Rc::new(Cbw {
            source,
            target,
            bits: s.bits,
            cluster: s.cluster,
            locks: RangeLocks::new(),
            top_only: s.top_only,
            discard_source: s.discard_source,
            write_flags: if s.compress { IoFlags::COMPRESS } else { IoFlags::NONE },
            on_error: s.on_error,
            timeout: s.timeout,
            broken: Cell::new(false),
            gone,
            observer: RefCell::new(None),
        })
    }

    pub fn set_observer(&self, o: Option<Rc<dyn CbwObserver>>) {
        *self.observer.borrow_mut() = o;
    }

    /// Clusters touched by `[offset, offset + len)`.
    pub fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = (offset + len).min(self.bits.size());
        (offset / self.cluster, end.div_ceil(self.cluster))
    }

    /// Copies the clusters of `[a, b)` that are still marked; the caller
    /// holds their range lock. A failed run is marked again. Returns the
    /// bytes copied (or skipped as not to be copied).
    pub async fn copy_locked(&self, a: u64, b: u64) -> Result<u64, CopyError> {
        let mut done = 0;
        let mut c = a;
        while let Some(hit) = self.bits.scan(c, b) {
            let n = self.bits.run_len(hit, b - hit);
            self.bits.clear_chunks(hit, hit + n);
            let (start, end) = (hit * self.cluster, ((hit + n) * self.cluster).min(self.bits.size()));
            if let Err(e) = self.copy_range(start, end).await {
                self.bits.set_chunks(hit, hit + n);
                return Err(e);
            }
            done += end - start;
            c = hit + n;
        }
        Ok(done)
    }

    /// Copies `[start, end)` of the source to the target; ranges that read
    /// as zeroes are written as zeroes.
    async fn copy_range(&self, start: u64, end: u64) -> Result<(), CopyError> {
        let mut pos = start;
        while pos < end {
            let mut st = self.source.block_status(pos, end - pos).await.map_err(|e| (true, e))?;
            let mut len = st.len.clamp(1, end - pos);
            if self.write_flags.contains(IoFlags::COMPRESS) && len < end - pos {
                // Compressed writes take whole clusters (QEMU's block-copy
                // rounds block status to its clusters the same way): a run
                // shorter than a cluster is copied as data.
                let whole = len / self.cluster * self.cluster;
                if whole == 0 {
                    len = self.cluster.min(end - pos);
                    st = BlockStatus { data: true, zero: false, allocated: true, depth: 0, ..st };
                } else {
                    len = whole;
                }
            }
            if self.top_only && !(st.allocated && st.depth == 0) {
                // The target reads this from its own backing file.
            } else if st.zero && !st.data {
                self.target.write_zeroes(pos, len, IoFlags::MAY_UNMAP).await.map_err(|e| (false, e))?;
            } else {
                let mut at = pos;
                while at < pos + len {
                    let n = (pos + len - at).min(IO_BYTES_MAX);
                    let buf = self.source.read(at, n as usize).await.map_err(|e| (true, e))?;
                    self.target.write(at, buf, self.write_flags).await.1.map_err(|e| (false, e))?;
                    at += n;
                }
            }
            pos += len;
        }
        if self.discard_source {
            // Best effort: what was copied is no longer needed on the source.
            let _ = self.source.discard(start, end - start).await;
        }
        Ok(())
    }

    /// True when no bit is left in `[a, b)` and no copy or read of the
    /// point in time holds any of it.
    pub fn settled(&self, a: u64, b: u64) -> bool {
        self.broken.get() || (self.bits.scan(a, b).is_none() && !self.locks.overlaps(a, b))
    }

    /// A write to `[offset, offset + len)` is about to reach the source:
    /// the old data of its clusters that are still to be copied goes to the
    /// target first (the write waits for copies and reads already there).
    pub async fn before_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let (a, b) = self.span(offset, len);
        if a >= b || self.settled(a, b) {
            return Ok(());
        }
        let guard = self.locks.lock(a, b).await;
        let res = match self.timeout {
            None => self.copy_locked(a, b).await,
            Some(t) => match reactor::timeout(t, self.copy_locked(a, b)).await {
                Ok(r) => r,
                Err(_) => {
                    // The copy was dropped half way: what it had not done
                    // yet is marked again, what it had is on the target.
                    let (s, e) = (a * self.cluster, (b * self.cluster).min(self.bits.size()));
                    self.bits.set_range(s, e - s);
                    Err((false, IoError::Os(libc::ETIMEDOUT)))
                }
            },
        };
        drop(guard);
        let observer = self.observer.borrow().clone();
        let res = match res {
            Ok(n) => {
                if let Some(o) = &observer {
                    o.copied(n);
                }
                Ok(())
            }
            Err((read, e)) => match self.on_error {
                OnCbwError::BreakGuestWrite => {
                    tracing::warn!(read, error = %e, "copy before write failed; the write fails");
                    Err(e)
                }
                OnCbwError::BreakSnapshot => {
                    tracing::warn!(read, error = %e, "copy before write failed; the point in time is lost");
                    self.broken.set(true);
                    Ok(())
                }
            },
        };
        if let Some(o) = &observer {
            o.settled();
        }
        res
    }

    /// From `pos`, the run of clusters that are all copied or all not, up
    /// to `limit`: whether they are copied, and where the run ends.
    fn run_of_kind(&self, pos: u64, limit: u64) -> (bool, u64) {
        let copied = !self.bits.get(pos / self.cluster);
        let mut end = ((pos / self.cluster + 1) * self.cluster).min(limit);
        while end < limit && self.bits.get(end / self.cluster) != copied {
            end = ((end / self.cluster + 1) * self.cluster).min(limit);
        }
        (copied, end)
    }

    fn check_snapshot(&self, a: u64, b: u64) -> Result<(), IoError> {
        if self.broken.get() || self.gone.scan(a, b).is_some() {
            return Err(IoError::Os(libc::EACCES));
        }
        Ok(())
    }

    /// Reads `[offset, offset + len)` of the point in time: from the target
    /// where a cluster was copied, else from the source under a range lock
    /// (a client write there waits until the read is done).
    pub async fn snapshot_read(&self, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let len = out.len() as u64;
        let (a, b) = self.span(offset, len);
        self.check_snapshot(a, b)?;
        let guard = self.locks.lock(a, b).await;
        let mut pos = offset;
        while pos < offset + len {
            // Clusters of one kind at a time.
            let (copied, end) = self.run_of_kind(pos, offset + len);
            let from = if copied { &self.target } else { &self.source };
            let mut at = pos;
            while at < end {
                let n = (end - at).min(IO_BYTES_MAX);
                let buf = from.read(at, n as usize).await?;
                let i = (at - offset) as usize;
                out[i..i + n as usize].copy_from_slice(&buf[..n as usize]);
                at += n;
            }
            pos = end;
        }
        drop(guard);
        // A failure meanwhile may have given the point in time up.
        self.check_snapshot(a, b)
    }

    /// Block status of the point in time: the target's where copied, the
    /// source's elsewhere, clipped to one kind.
    pub async fn snapshot_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        let (a, b) = self.span(offset, len);
        self.check_snapshot(a, b)?;
        let (copied, end) = self.run_of_kind(offset, offset + len);
        let from = if copied { &self.target } else { &self.source };
        let mut st = from.block_status(offset, end - offset).await?;
        st.len = st.len.min(end - offset);
        // The point in time is one layer to its readers.
        st.depth = 0;
        st.offset = None;
        Ok(st)
    }

    /// A reader gives the whole clusters of `[offset, offset + len)` up:
    /// they need no copy any more and read as errors from now on.
    pub async fn snapshot_discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let a = offset.div_ceil(self.cluster);
        let b = (offset + len).min(self.bits.size()) / self.cluster;
        if a >= b {
            return Ok(());
        }
        let guard = self.locks.lock(a, b).await;
        self.gone.set_chunks(a, b);
        self.bits.clear_chunks(a, b);
        let (s, e) = (a * self.cluster, (b * self.cluster).min(self.bits.size()));
        let _ = self.target.discard(s, e - s).await;
        drop(guard);
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Copy states whose home is this reactor.
    static STATES: RefCell<HashMap<u64, Rc<Cbw>>> = RefCell::new(HashMap::new());
}

/// A new id for a copy state.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Registers `state` under `id` on the calling (home) reactor.
pub fn register(id: u64, state: Rc<Cbw>) {
    STATES.with(|m| m.borrow_mut().insert(id, state));
}

/// The state registered under `id` on the calling reactor.
pub fn state(id: u64) -> Option<Rc<Cbw>> {
    STATES.with(|m| m.borrow().get(&id).cloned())
}

/// Drops the state registered under `id` on the calling reactor.
pub fn unregister(id: u64) {
    STATES.with(|m| m.borrow_mut().remove(&id));
}

/// The copy-before-write filter node over `source`.
pub struct CbwBdev {
    id: u64,
    home: Handle,
    source: Arc<Node>,
    /// Set for a filter opened by `blockdev-add` (its state goes with it).
    owned: bool,
}

impl CbwBdev {
    /// A filter over `source` for the state registered as `id` on `home`.
    pub fn new(id: u64, home: Handle, source: Arc<Node>) -> CbwBdev {
        CbwBdev { id, home, source, owned: false }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn home_handle(&self) -> &Handle {
        &self.home
    }
}

fn channel_on(id: u64, home: &Handle, make: fn(Rc<Cbw>) -> Rc<dyn Channel>) -> Result<Rc<dyn Channel>, BdevError> {
    if home.is_current() {
        return Ok(make(state(id).ok_or(BdevError::ReactorGone)?));
    }
    let resolve =
        Arc::new(move || -> Result<Rc<dyn Channel>, BdevError> { Ok(make(state(id).ok_or(BdevError::ReactorGone)?)) });
    Ok(Rc::new(ForwardChannel::new(home.clone(), resolve)))
}

impl Bdev for CbwBdev {
    fn driver(&self) -> &'static str {
        "copy-before-write"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.source.size()
    }

    fn block_size(&self) -> u32 {
        self.source.bdev().block_size()
    }

    fn read_only(&self) -> bool {
        self.source.read_only()
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        channel_on(self.id, &self.home, |c| Rc::new(CbwChannel { cbw: c }))
    }

    fn home(&self) -> Option<Handle> {
        Some(self.home.clone())
    }

    fn info(&self) -> BdevInfo {
        BdevInfo { format_specific: None, ..self.source.bdev().info() }
    }

    fn cbw_state(&self) -> Option<(u64, Handle)> {
        Some((self.id, self.home.clone()))
    }

    fn close(self: Arc<Self>) -> LocalBoxFuture<Result<(), IoError>> {
        let (id, owned) = (self.id, self.owned);
        Box::pin(async move {
            if owned {
                unregister(id);
            }
            Ok(())
        })
    }
}

struct CbwChannel {
    cbw: Rc<Cbw>,
}

impl Channel for CbwChannel {
    fn submit(&self, io: Io, done: Done) {
        let c = &self.cbw;
        let (a, b) = c.span(io.offset, io.len);
        // Reads, flushes and writes to clusters already copied go straight on.
        if !io.kind.is_write() || a >= b || c.settled(a, b) {
            return c.source.submit(io, done);
        }
        let c = Rc::clone(c);
        reactor::spawn_local(async move {
            if let Err(e) = c.before_write(io.offset, io.len).await {
                return done.complete(io, Err(e));
            }
            let (io, res) = c.source.submit_io(io).await;
            done.complete(io, res);
        });
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let ch = self.cbw.source.clone();
        Box::pin(async move { ch.block_status(offset, len).await })
    }
}

/// The cluster size copies go by: the target's cluster size, at least
/// 64 KiB and at least `min`.
pub fn cluster_size(target: &Node, min: u64) -> u64 {
    let cs = target.bdev().info().format_specific.and_then(|f| f["data"]["cluster-size"].as_u64());
    cs.unwrap_or(CLUSTER_MIN).max(CLUSTER_MIN).max(min)
}

/// `copy-before-write`, opened by `blockdev-add`: the point in time is the
/// moment it opens (put it in front of the disk's users in the same
/// transaction, with `x-blockdev-replace`).
pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    let target = opts.take("target").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("target"))?;
    let bitmap = opts.object_opt("bitmap")?;
    let on_error = match opts.enum_opt("on-cbw-error", &["break-guest-write", "break-snapshot"])?.as_deref() {
        Some("break-snapshot") => OnCbwError::BreakSnapshot,
        _ => OnCbwError::BreakGuestWrite,
    };
    let timeout = opts.u64_opt("cbw-timeout")?.filter(|&t| t > 0).map(Duration::from_secs);
    let min_cluster = opts.u64_opt("min-cluster-size")?.unwrap_or(0);
    opts.finish()?;
    if min_cluster != 0 && !min_cluster.is_power_of_two() {
        return Err(BdevError::invalid("min-cluster-size needs to be a power of 2"));
    }
    let bitmap = match bitmap {
        Some(mut b) => {
            let node = b.str_opt("node")?.ok_or_else(|| b.missing("node"))?;
            let name = b.str_opt("name")?.ok_or_else(|| b.missing("name"))?;
            b.finish()?;
            let n = ctx.node(&node)?;
            let bm = n
                .bitmaps()
                .find(&name)
                .ok_or_else(|| BdevError::invalid(format!("Dirty bitmap '{name}' not found")))?;
            Some(bm)
        }
        None => None,
    };
    // The file is written through; others may write it too until the
    // filter has users (x-blockdev-replace then keeps other writers out).
    let source = ctx.open_child("file", file, Perms::write())?;
    let target = ctx.open_child("target", target, Perms { perm: perm::WRITE, shared: perm::ALL & !perm::RESIZE })?;
    if target.size() != source.size() {
        return Err(BdevError::invalid(format!(
            "Source and target sizes differ: '{}' is {} bytes, '{}' is {}",
            source.name(),
            source.size(),
            target.name(),
            target.size()
        )));
    }
    let cluster = cluster_size(&target, min_cluster);
    let bits = Arc::new(DirtyBits::new(source.size(), cluster));
    match &bitmap {
        Some(b) => {
            if b.bits().size() != source.size() {
                return Err(BdevError::invalid("Bitmap size does not match the file's"));
            }
            bits.merge_from(b.bits());
        }
        None => bits.set_all(),
    }
    let home = source.home().unwrap_or_else(|| ctx.home());
    let id = next_id();
    let (s, t) = (Arc::clone(&source), Arc::clone(&target));
    home.run(move || async move {
        let state = Cbw::new(
            s.channel()?,
            t.channel()?,
            CbwSettings { bits, cluster, top_only: false, discard_source: false, compress: false, on_error, timeout },
        );
        register(id, state);
        Ok::<(), BdevError>(())
    })
    .wait()
    .map_err(|_| BdevError::ReactorGone)??;
    Ok(Arc::new(CbwBdev { id, home, source, owned: true }))
}

/// `snapshot-access`: reads the point in time a copy-before-write filter
/// keeps. Read-only; a discard gives clusters up.
pub struct SnapshotAccess {
    id: u64,
    home: Handle,
    size: u64,
    block_size: u32,
}

/// Opens `snapshot-access` over `file`, which must be a copy-before-write
/// filter opened by `blockdev-add`.
pub fn open_snapshot_access(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    opts.finish()?;
    let node = ctx.open_child("file", file, Perms { perm: perm::CONSISTENT_READ, shared: perm::ALL })?;
    let Some((id, home)) = node.bdev().cbw_state() else {
        return Err(BdevError::invalid(format!(
            "'{}' is not a copy-before-write filter: snapshot-access reads one",
            node.name()
        )));
    };
    Ok(Arc::new(SnapshotAccess { id, home, size: node.size(), block_size: node.bdev().block_size() }))
}

impl Bdev for SnapshotAccess {
    fn driver(&self) -> &'static str {
        "snapshot-access"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        channel_on(self.id, &self.home, |c| Rc::new(AccessChannel { cbw: c }))
    }

    fn home(&self) -> Option<Handle> {
        Some(self.home.clone())
    }

    fn info(&self) -> BdevInfo {
        BdevInfo {
            filename: format!("json:{{\"driver\": \"snapshot-access\", \"id\": {}}}", self.id),
            direct: false,
            no_flush: false,
            actual_size: None,
            format_specific: None,
        }
    }
}

struct AccessChannel {
    cbw: Rc<Cbw>,
}

impl Channel for AccessChannel {
    fn submit(&self, mut io: Io, done: Done) {
        let c = Rc::clone(&self.cbw);
        reactor::spawn_local(async move {
            let res = match io.kind {
                IoKind::Read => {
                    let mut buf = io.buf.take().expect("a read carries a buffer");
                    let len = io.len as usize;
                    let r = c.snapshot_read(io.offset, &mut buf[..len]).await;
                    io.buf = Some(buf);
                    r
                }
                IoKind::Discard => c.snapshot_discard(io.offset, io.len).await,
                IoKind::Flush => Ok(()),
                _ => Err(IoError::ReadOnly),
            };
            done.complete(io, res);
        });
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let c = Rc::clone(&self.cbw);
        Box::pin(async move { c.snapshot_block_status(offset, len).await })
    }
}
