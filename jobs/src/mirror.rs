//! Mirror (`drive-mirror`, `blockdev-mirror`) and active commit: copy a
//! disk to a target while clients keep writing, converge, stay in sync,
//! and on `job-complete` move every user to the target.
//!
//! ```text
//!   exports ──▶ Backend ──▶ mirror_top filter ──▶ source        (job reads)
//!                              │ background: a finished write marks its chunks dirty
//!                              │ write-blocking: the write goes to the target too
//!                              └──────────────────────────────▶ target  (job writes)
//! ```
//!
//! The job tracks writes with a dirty bitmap of the source node (anonymous,
//! at `granularity`): every write that completes on the source marks it,
//! whoever sent it and on whichever reactor. Each iteration takes a run
//! of dirty chunks, clears their bits *before* reading (a write landing
//! meanwhile marks them again), asks block-status, and copies data or
//! writes zeroes — at most [`OPS_MAX`] operations and `buf-size` bytes in
//! flight. With nothing dirty and nothing in flight it flushes the target
//! and is READY. To finish it parks new client writes, waits for the
//! ones in flight, re-checks, flushes the target; the control thread then
//! sends parked and future requests to the target (pivot) or back to the
//! source (soft cancel, failure) and moves the backends.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bdev::forward::ForwardChannel;
use bdev::{
    Access, Backend, Bdev, BdevError, BdevInfo, Bitmap, BlockChannel, BlockStatus, Channel, Child, Claim, Done, Graph,
    Io, IoDone, IoError, IoFlags, IoKind, LocalBoxFuture, Node, Perms,
};
use reactor::{Handle, IoBuf};
use slab::Slab;

use crate::job::{ErrorAction, JobCtx, JobShared, OnError};
use crate::manager::{JobError, JobHooks, NewJob};
use crate::ratelimit::SLICE;
use bdev::locks::{RangeGuard, RangeLocks};

/// Copy operations in flight at most.
pub const OPS_MAX: usize = 16;
/// Bytes in flight at most while clients are doing I/O, and the largest
/// operation then: a few medium requests queue ahead of a client's, not
/// sixteen large ones.
pub const BUSY_BUF_BYTES: u64 = 1 << 20;
pub const BUSY_OP_BYTES: u64 = 256 << 10;
/// How recently a client request makes the source busy.
const BUSY_WINDOW: Duration = Duration::from_millis(50);
/// Default bytes in flight (`buf-size`).
pub const BUF_SIZE_DEFAULT: u64 = 16 << 20;
/// Smallest and largest granularity.
pub const GRANULARITY_MIN: u64 = 512;
pub const GRANULARITY_MAX: u64 = 64 << 20;

static NEXT_FILTER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Mirror filters whose home is this reactor.
    static FILTERS: RefCell<HashMap<u64, Rc<MirrorShared>>> = RefCell::new(HashMap::new());
}

fn filter(id: u64) -> Option<Rc<MirrorShared>> {
    FILTERS.with(|m| m.borrow().get(&id).cloned())
}

/// A graph change to run on the control thread.
pub type GraphFn = Box<dyn FnOnce(&mut Graph) + Send>;

/// What the initial copy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything the source reads (the whole chain).
    Full,
    /// What the source's top layer holds.
    Top,
    /// Only what is written from now on.
    None,
    /// Active commit: what the layers above the base hold (`depth` layers).
    AboveBase { depth: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    #[default]
    Background,
    WriteBlocking,
}

/// A mirror's settings, checked by [`start`].
pub struct MirrorConfig {
    pub job_id: String,
    pub kind: crate::job::JobType,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub sync: SyncMode,
    pub speed: u64,
    /// None: 4 KiB, doubled while the dirty bitmap would exceed its bound.
    pub granularity: Option<u64>,
    /// QEMU's `buf-size` (an int): None or 0 is the default, negative is refused.
    pub buf_size: Option<i64>,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub unmap: bool,
    pub copy_mode: CopyMode,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub filter_node_name: Option<String>,
    /// Claims the job holds until it ends (e.g. on the nodes of a committed chain).
    pub extra_claims: Vec<Claim>,
    /// Nodes the job owns besides source and target.
    pub extra_nodes: Vec<Arc<Node>>,
    /// Runs on the control thread after a pivot (active commit drops the
    /// committed layers).
    pub on_pivot: Option<GraphFn>,
    /// Runs on the control thread when the job ends without a pivot.
    pub on_abort: Option<GraphFn>,
}

/// Where the filter sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Copying: writes go to the source and are tracked.
    Active,
    /// Finishing: new writes wait; reads go to the source.
    Parked,
    /// Completed: everything goes to the target.
    ToTarget,
    /// Cancelled or failed: everything goes to the source, untracked.
    ToSource,
}

/// The mirror's state on the home reactor, shared by the filter and the job.
struct MirrorShared {
    job: Arc<JobShared>,
    source: BlockChannel,
    target: BlockChannel,
    /// The job's own bitmap on the source node (marked by the node's
    /// channels as writes complete).
    bitmap: Arc<Bitmap>,
    /// Chunks being copied or written through (write-blocking).
    locks: Rc<RangeLocks>,
    copy_mode: Cell<CopyMode>,
    phase: Cell<Phase>,
    parked: RefCell<VecDeque<(Io, Done)>>,
    /// Client writes in flight through the filter.
    writes: Cell<u64>,
    /// Copy operations in flight, and their bytes.
    ops: Cell<usize>,
    op_bytes: Cell<u64>,
    /// The job sleeps waiting for a change.
    job_waiting: Cell<bool>,
    /// Client requests seen (the job yields to clients while they come).
    client_requests: Cell<u64>,
    /// A copy failed under policy `report`: the job ends with this.
    failed: RefCell<Option<String>>,
    on_source_error: OnError,
    on_target_error: OnError,
    unmap: bool,
    pending: RefCell<Slab<(Done, u64, u64)>>,
    me: Weak<MirrorShared>,
}

impl MirrorShared {
    fn wake_job(&self) {
        if self.job_waiting.get() {
            self.job.kick();
        }
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        self.bitmap.bits().set_range(offset, len);
        self.wake_job();
    }

    /// Requests go through the nodes' front doors, so the nodes' bitmaps
    /// (this job's and anyone's) see every write.
    fn route(&self, io: Io, done: Done) {
        self.client_requests.set(self.client_requests.get() + 1);
        match self.phase.get() {
            Phase::ToTarget => self.target.submit(io, done),
            Phase::ToSource => self.source.submit(io, done),
            Phase::Parked if io.kind.is_write() => self.parked.borrow_mut().push_back((io, done)),
            Phase::Parked => self.source.submit(io, done),
            Phase::Active if !io.kind.is_write() => self.source.submit(io, done),
            Phase::Active => self.client_write(io, done),
        }
    }

    fn client_write(&self, io: Io, done: Done) {
        self.writes.set(self.writes.get() + 1);
        match self.copy_mode.get() {
            CopyMode::Background => {
                let key = self.pending.borrow_mut().insert((done, io.offset, io.len));
                let me: Rc<dyn IoDone> = self.me.upgrade().expect("filter alive while submitting");
                self.source.submit(io, Done::new(me, key as u64));
            }
            CopyMode::WriteBlocking => {
                let me = self.me.upgrade().expect("filter alive while submitting");
                reactor::spawn_local(async move {
                    let (io, res) = me.write_blocking(io).await;
                    me.write_done();
                    done.complete(io, res);
                });
            }
        }
    }

    fn write_done(&self) {
        self.writes.set(self.writes.get() - 1);
        self.wake_job();
    }

    /// A client write in write-blocking mode: to the source, then the
    /// same to the target, before the client hears back.
    async fn write_blocking(&self, io: Io) -> (Io, Result<(), IoError>) {
        let g = self.bitmap.bits().granularity();
        let (a, b) = (io.offset / g, io.end().div_ceil(g));
        let _lock = self.locks.lock(a, b).await;
        let copy = match io.kind {
            IoKind::Write => io.buf.as_deref().map(IoBuf::from_slice),
            _ => None,
        };
        let (offset, len, kind, flags) = (io.offset, io.len, io.kind, io.flags);
        let (io, res) = self.source.submit_io(io).await;
        if res.is_err() {
            // What the source holds now is unknown: copy it again later.
            self.mark_dirty(offset, len);
            return (io, res);
        }
        let mirrored = match kind {
            IoKind::Write => {
                let buf = copy.expect("writes carry data");
                self.target.write(offset, buf, flags.without(IoFlags::FUA)).await.1
            }
            IoKind::WriteZeroes => self.target.write_zeroes(offset, len, flags.without(IoFlags::FUA)).await,
            IoKind::Discard => self.target.discard(offset, len).await,
            _ => Ok(()),
        };
        match mirrored {
            Ok(()) => {
                // Chunks the write covers whole are in sync; one it covers
                // in part is copied whole later, so a target that filled
                // the rest of a cluster on its own (no backing yet) gets
                // the source's data there.
                let bm = self.bitmap.bits();
                bm.set_range(offset, len);
                bm.clear_covered(offset, len);
                self.wake_job();
            }
            Err(e) => {
                self.mark_dirty(offset, len);
                self.job_error(false, e);
            }
        }
        (io, res)
    }

    /// Applies the error policy to a failed job I/O (the range is already
    /// marked dirty again); `report` makes the job end with the error.
    fn job_error(&self, read: bool, e: IoError) -> ErrorAction {
        let policy = if read { self.on_source_error } else { self.on_target_error };
        let action = JobCtx::new(Arc::clone(&self.job)).io_error(read, e, policy);
        if action == ErrorAction::Report {
            self.failed.borrow_mut().get_or_insert_with(|| e.to_string());
        }
        self.wake_job();
        action
    }

    /// Sends parked writes on to wherever the filter routes now.
    fn release_parked(&self) {
        let parked: Vec<_> = self.parked.borrow_mut().drain(..).collect();
        for (io, done) in parked {
            self.route(io, done);
        }
    }
}

impl IoDone for MirrorShared {
    fn io_done(&self, tag: u64, io: Io, res: Result<(), IoError>) {
        let (done, _offset, _len) = self.pending.borrow_mut().remove(tag as usize);
        // The source's channel marked the range when the write reached the
        // source, so a copy that read the old data is always redone.
        self.write_done();
        done.complete(io, res);
    }
}

/// The `mirror_top` filter node.
struct MirrorTopBdev {
    id: u64,
    home: Handle,
    source: Arc<Node>,
}

impl Bdev for MirrorTopBdev {
    fn driver(&self) -> &'static str {
        "mirror_top"
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
        let id = self.id;
        if self.home.is_current() {
            return Ok(Rc::new(MirrorTopChannel { shared: filter(id).ok_or(BdevError::ReactorGone)? }));
        }
        let resolve = Arc::new(move || -> Result<Rc<dyn Channel>, BdevError> {
            Ok(Rc::new(MirrorTopChannel { shared: filter(id).ok_or(BdevError::ReactorGone)? }))
        });
        Ok(Rc::new(ForwardChannel::new(self.home.clone(), resolve)))
    }

    fn home(&self) -> Option<Handle> {
        Some(self.home.clone())
    }

    fn info(&self) -> BdevInfo {
        BdevInfo { format_specific: None, ..self.source.bdev().info() }
    }
}

struct MirrorTopChannel {
    shared: Rc<MirrorShared>,
}

impl Channel for MirrorTopChannel {
    fn submit(&self, io: Io, done: Done) {
        self.shared.route(io, done);
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let ch = if self.shared.phase.get() == Phase::ToTarget {
            self.shared.target.clone()
        } else {
            self.shared.source.clone()
        };
        Box::pin(async move { ch.block_status(offset, len).await })
    }
}

/// Bits a default-granularity dirty bitmap has at most (16 MiB of bitmap).
const DEFAULT_BITMAP_BITS_MAX: u64 = 1 << 27;

/// The default granularity: 4 KiB, coarser only for disks whose bitmap
/// would pass [`DEFAULT_BITMAP_BITS_MAX`]. QEMU uses the target's cluster
/// size (often 64 KiB); a finer bitmap makes a 4 KiB client write dirty
/// 4 KiB instead of 64, which is what lets a mirror converge under random
/// writes, and costs nothing in copy efficiency: contiguous dirty chunks
/// are copied together.
fn default_granularity(source: &Node) -> u64 {
    let mut g = 4u64 << 10;
    while source.size().div_ceil(g) > DEFAULT_BITMAP_BITS_MAX {
        g <<= 1;
    }
    g
}

/// The nodes of `node`'s backing chain below it.
pub fn chain_below(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut out = Vec::new();
    let mut cur = Arc::clone(node);
    while let Some((_, b)) = cur.children().into_iter().find(|(r, _)| *r == "backing") {
        out.push(Arc::clone(&b));
        cur = b;
    }
    out
}

/// Checks a mirror's settings and starts it: filter in, users moved onto
/// it, job running.
pub fn start(graph: &mut Graph, jobs: &mut crate::JobManager, cfg: MirrorConfig) -> Result<(), JobError> {
    let (source, target) = (&Arc::clone(&cfg.source), &Arc::clone(&cfg.target));
    let invalid = |m: String| JobError::Invalid(m);
    if !source.parents().is_empty() {
        return Err(invalid("Need a root block node".into()));
    }
    if Arc::ptr_eq(source, target) {
        return Err(invalid("Can't mirror node into itself".into()));
    }
    let is_commit = matches!(cfg.sync, SyncMode::AboveBase { .. });
    if !is_commit && chain_below(source).iter().any(|n| Arc::ptr_eq(n, target)) {
        return Err(invalid(format!("Target '{}' is in the backing chain of '{}'", target.name(), source.name())));
    }
    if !is_commit && source.size() != target.size() {
        return Err(invalid("Source and target image have different sizes".into()));
    }
    if target.size() < source.size() {
        return Err(invalid(format!(
            "Base '{}' is smaller than top '{}'; resizing is not supported",
            target.name(),
            source.name()
        )));
    }
    // QEMU's checks, in QEMU's order: the range, then the power of two.
    let granularity = cfg.granularity.unwrap_or_else(|| default_granularity(source));
    if !(GRANULARITY_MIN..=GRANULARITY_MAX).contains(&granularity) {
        return Err(invalid("Parameter 'granularity' expects a value in range [512B, 64MB]".into()));
    }
    if !granularity.is_power_of_two() {
        return Err(invalid("Parameter 'granularity' expects a power of 2".into()));
    }
    let buf_size = match cfg.buf_size {
        Some(b) if b < 0 => return Err(invalid("Invalid parameter 'buf-size'".into())),
        None | Some(0) => BUF_SIZE_DEFAULT.max(granularity),
        Some(b) => (b as u64).next_multiple_of(granularity),
    };
    jobs.check_new_id(&cfg.job_id)?;
    jobs.check_free(source)?;
    jobs.check_free(target)?;
    for n in &cfg.extra_nodes {
        jobs.check_free(n)?;
    }
    let holder = format!("job '{}'", cfg.job_id);
    let bdev_err = |e: BdevError| JobError::Failed(e.to_string());
    // A commit's target is a layer of the source's own chain: what it
    // receives is what the layers above it already show.
    let target_perms = if is_commit { Perms::write_unchanged() } else { Perms::exclusive_write() };
    let target_claim = target.claim(holder.clone(), target_perms).map_err(|e| JobError::Busy(e.to_string()))?;
    let source_claim = source.claim(holder.clone(), Access::Read).map_err(bdev_err)?;

    // The filter over the source and the job, on the source's home.
    let home = crate::chain::home(graph, source);
    let id = NEXT_FILTER.fetch_add(1, Ordering::Relaxed);
    let job = JobShared::new(
        cfg.job_id.clone(),
        cfg.kind,
        cfg.auto_finalize,
        cfg.auto_dismiss,
        cfg.speed,
        Arc::clone(jobs.events()),
    );
    // From now on every write that completes on the source marks it.
    let bitmap = Arc::new(Bitmap::new(None, source.size(), granularity, true));
    source.bitmaps().add(Arc::clone(&bitmap));
    let (src, tgt, j, bm) = (Arc::clone(source), Arc::clone(target), Arc::clone(&job), Arc::clone(&bitmap));
    let (copy_mode, on_source_error, on_target_error, unmap) =
        (cfg.copy_mode, cfg.on_source_error, cfg.on_target_error, cfg.unmap);
    let setup = home
        .run(move || async move {
            let (source, target) = (src.channel()?, tgt.channel()?);
            let shared = Rc::new_cyclic(|me| MirrorShared {
                job: j,
                source,
                target,
                bitmap: bm,
                locks: RangeLocks::new(),
                copy_mode: Cell::new(copy_mode),
                phase: Cell::new(Phase::Active),
                parked: RefCell::new(VecDeque::new()),
                writes: Cell::new(0),
                ops: Cell::new(0),
                op_bytes: Cell::new(0),
                job_waiting: Cell::new(false),
                client_requests: Cell::new(0),
                failed: RefCell::new(None),
                on_source_error,
                on_target_error,
                unmap,
                pending: RefCell::new(Slab::new()),
                me: me.clone(),
            });
            FILTERS.with(|m| m.borrow_mut().insert(id, shared));
            Ok::<(), BdevError>(())
        })
        .wait();
    let setup = match setup {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(bdev_err(e)),
        Err(_) => Err(JobError::Failed("the reactors stopped".into())),
    };
    if let Err(e) = setup {
        source.bitmaps().remove(&bitmap);
        return Err(e);
    }

    let drop_filter_state = |home: &Handle| {
        source.bitmaps().remove(&bitmap);
        let _ = home.call(move || drop(FILTERS.with(|m| m.borrow_mut().remove(&id)))).wait();
    };
    let child_access = if source.read_only() { Access::Read } else { Access::Write };
    let child = match source.claim_as_child(format!("mirror filter of job '{}'", cfg.job_id), child_access) {
        Ok(claim) => Child { role: "file", claim },
        Err(e) => {
            drop_filter_state(&home);
            return Err(bdev_err(e));
        }
    };
    let bdev = Arc::new(MirrorTopBdev { id, home: home.clone(), source: Arc::clone(source) });
    let filter_node = match graph.add_internal(cfg.filter_node_name.clone(), bdev, vec![child]) {
        Ok(n) => n,
        Err(e) => {
            drop_filter_state(&home);
            return Err(invalid(e.to_string()));
        }
    };
    // Move the users onto the filter; once their requests to the source
    // are done, the filter sees every write.
    if let Err(e) = move_users(&source.users(), &filter_node, Some(source)) {
        let _ = graph.remove_internal(filter_node.name());
        drop_filter_state(&home);
        return Err(JobError::Failed(e));
    }

    // From now on the source's users are the filter's, and move with it.
    source.set_replaced_by(Some(holder.clone()));
    let hooks = MirrorHooks {
        id,
        home: home.clone(),
        bitmap: Arc::clone(&bitmap),
        source: Arc::clone(source),
        target: Arc::clone(target),
        filter: Some(filter_node),
        target_claim: Some(target_claim),
        on_pivot: cfg.on_pivot,
        on_abort: cfg.on_abort,
        pivoted: false,
    };
    let sync = cfg.sync;
    let run: crate::manager::RunFn = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            let shared = filter(id).ok_or("the mirror filter is gone")?;
            run(shared, ctx, sync, buf_size).await
        })
    });
    let mut claims = cfg.extra_claims;
    claims.push(source_claim);
    let mut nodes = vec![Arc::clone(source), Arc::clone(target)];
    nodes.extend(cfg.extra_nodes);
    jobs.start_shared(
        job,
        NewJob {
            id: cfg.job_id,
            kind: cfg.kind,
            home: Some(home.clone()),
            auto_finalize: cfg.auto_finalize,
            auto_dismiss: cfg.auto_dismiss,
            speed: cfg.speed,
            nodes,
            claims,
            hooks: Box::new(hooks),
            run,
        },
    )
    // Checked above already; should it fail anyway, the source is free again.
    .inspect_err(|_| {
        source.set_replaced_by(None);
        source.bitmaps().remove(&bitmap);
    })
}

/// Marks what the initial copy covers; returns the bytes marked. Ranges
/// of a full sync that read as zeroes are zeroed on the target right away
/// (where it does not read zeroes already) instead of being copied.
async fn initial_dirty(shared: &MirrorShared, ctx: &JobCtx, sync: SyncMode) -> Result<(), IoError> {
    if sync == SyncMode::None {
        return Ok(());
    }
    let size = shared.source.size();
    let mut pos = 0;
    while pos < size {
        if ctx.cancelled() {
            return Ok(());
        }
        let st = shared.source.block_status(pos, size - pos).await?;
        let len = st.len.max(1).min(size - pos);
        let mark = match sync {
            SyncMode::Full => st.allocated || st.data,
            SyncMode::Top => st.allocated && st.depth == 0,
            SyncMode::AboveBase { depth } => st.allocated && st.depth < depth,
            SyncMode::None => false,
        };
        if mark {
            shared.bitmap.bits().set_range(pos, len);
        } else if sync == SyncMode::Full {
            zero_target_range(shared, pos, len).await?;
        }
        pos += len;
    }
    Ok(())
}

/// Makes the target read zeroes in `[pos, pos + len)` where it does not already.
async fn zero_target_range(shared: &MirrorShared, pos: u64, len: u64) -> Result<(), IoError> {
    let end = pos + len;
    let mut at = pos;
    while at < end {
        let st = shared.target.block_status(at, end - at).await?;
        let n = st.len.max(1).min(end - at);
        if !st.zero || st.data {
            let flags = if shared.unmap { IoFlags::MAY_UNMAP } else { IoFlags::NONE };
            shared.target.write_zeroes(at, n, flags).await?;
        }
        at += n;
    }
    Ok(())
}

/// The job's loop on the home reactor.
async fn run(shared: Rc<MirrorShared>, ctx: JobCtx, sync: SyncMode, buf_size: u64) -> Result<(), String> {
    if let Err(e) = initial_dirty(&shared, &ctx, sync).await {
        return Err(e.to_string());
    }
    let g = shared.bitmap.bits().granularity();
    let max_op = (buf_size / OPS_MAX as u64).max(1 << 20).next_multiple_of(g);
    let mut cursor = 0u64;
    let mut ready = false;
    let (mut seen, mut last_client) = (shared.client_requests.get(), std::time::Instant::now() - BUSY_WINDOW);
    loop {
        ctx.pause_point().await;
        // Clients active lately: copy with less in flight, so their
        // requests do not queue behind the job's.
        let now = std::time::Instant::now();
        if shared.client_requests.get() != seen {
            seen = shared.client_requests.get();
            last_client = now;
        }
        let busy = now.duration_since(last_client) < BUSY_WINDOW;
        let (buf_now, op_now) =
            if busy { (BUSY_BUF_BYTES.min(buf_size), BUSY_OP_BYTES.min(max_op).max(g)) } else { (buf_size, max_op) };
        let failed = shared.failed.borrow().clone();
        let (cancelled, finish) = {
            let st = ctx.shared().lock();
            (st.force_cancelled(), st.should_finish() || (st.force_cancelled() && st.ready()))
        };
        if failed.is_some() || (cancelled && !finish) {
            wait_ops(&shared, &ctx).await;
            return failed.map_or(Ok(()), Err);
        }
        let dirty = shared.bitmap.bits().dirty_bytes();
        let (cur, _) = ctx.progress();
        ctx.set_total(cur + dirty + shared.op_bytes.get());
        let ops = shared.ops.get();
        if dirty > 0
            && ops < OPS_MAX
            && shared.op_bytes.get() < buf_now
            && let Some(c) = next_chunk(&shared, cursor)
        {
            let copied;
            (cursor, copied) = iterate(&shared, &ctx, c, op_now, buf_now).await;
            ctx.rate_limit(copied).await;
            continue;
        }
        if ops > 0 {
            wait_change(&shared, &ctx, SLICE).await;
            continue;
        }
        if dirty == 0 {
            if !ready {
                if let Err(e) = shared.target.flush().await {
                    match shared.job_error(false, e) {
                        ErrorAction::Report => return Err(e.to_string()),
                        _ => continue,
                    }
                }
                ready = true;
                ctx.set_actively_synced(shared.copy_mode.get() == CopyMode::WriteBlocking);
                ctx.set_ready();
            }
            if finish {
                match converge(&shared, &ctx).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
            wait_change(&shared, &ctx, SLICE).await;
        } else {
            // Dirty chunks all being written through: wait for them.
            wait_change(&shared, &ctx, SLICE).await;
        }
    }
}

/// The first dirty chunk at or after `cursor` that nobody is copying.
fn next_chunk(shared: &MirrorShared, cursor: u64) -> Option<u64> {
    let bm = shared.bitmap.bits();
    let c = bm.next_dirty(cursor)?;
    if !shared.locks.overlaps(c, c + 1) {
        return Some(c);
    }
    // Look further for one that is free.
    let mut at = c + 1;
    while let Some(n) = bm.next_dirty(at) {
        if n <= c && at > c {
            break;
        }
        if !shared.locks.overlaps(n, n + 1) {
            return Some(n);
        }
        at = n + 1;
        if at >= bm.chunks() {
            at = 0;
        }
        if at == c {
            break;
        }
    }
    None
}

/// Sleeps until a write, a finished operation or a command changes something.
async fn wait_change(shared: &MirrorShared, ctx: &JobCtx, max: Duration) {
    shared.job_waiting.set(true);
    ctx.sleep(max).await;
    shared.job_waiting.set(false);
}

async fn wait_ops(shared: &MirrorShared, ctx: &JobCtx) {
    while shared.ops.get() > 0 {
        wait_change(shared, ctx, SLICE).await;
    }
}

/// Parks new client writes, waits for those in flight and re-checks: true
/// when nothing is dirty (target flushed, writes stay parked for the
/// switch), false when writes dirtied it meanwhile (unparked, keep going).
async fn converge(shared: &Rc<MirrorShared>, ctx: &JobCtx) -> Result<bool, IoError> {
    shared.phase.set(Phase::Parked);
    while shared.writes.get() > 0 {
        wait_change(shared, ctx, Duration::from_millis(10)).await;
    }
    if shared.bitmap.bits().count() == 0 && shared.ops.get() == 0 {
        shared.target.flush().await?;
        return Ok(true);
    }
    shared.phase.set(Phase::Active);
    shared.release_parked();
    Ok(false)
}

/// Starts copy operations for the dirty run at chunk `c`; returns the next
/// cursor and the bytes it copies (zeroing is not charged to the speed limit).
async fn iterate(shared: &Rc<MirrorShared>, ctx: &JobCtx, c: u64, max_op: u64, buf_size: u64) -> (u64, u64) {
    let mut copied = 0;
    let g = shared.bitmap.bits().granularity();
    let size = shared.source.size();
    let room = buf_size.saturating_sub(shared.op_bytes.get()).max(g);
    let max_chunks = (room / g).max(1);
    let mut n = 0;
    {
        let bm = shared.bitmap.bits();
        while n < max_chunks && c + n < bm.chunks() && bm.get(c + n) && !shared.locks.overlaps(c + n, c + n + 1) {
            n += 1;
        }
    }
    let start = c * g;
    let end = ((c + n) * g).min(size);
    // Cleared before reading: a write landing from now on marks them again.
    shared.bitmap.bits().clear_chunks(c, c + n);
    let guard = Rc::new(shared.locks.insert(c, c + n));
    let mut pos = start;
    while pos < end {
        let st = match shared.source.block_status(pos, end - pos).await {
            Ok(st) => st,
            Err(e) => {
                shared.mark_dirty(pos, end - pos);
                shared.job_error(true, e);
                break;
            }
        };
        let len = st.len.max(1).min(end - pos);
        if st.zero && !st.data {
            spawn_op(shared, ctx, Op::Zero, pos, len, Rc::clone(&guard));
        } else {
            let mut at = pos;
            while at < pos + len {
                let n = max_op.min(pos + len - at);
                spawn_op(shared, ctx, Op::Copy, at, n, Rc::clone(&guard));
                copied += n;
                at += n;
            }
        }
        pos += len;
    }
    (c + n, copied)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Copy,
    Zero,
}

fn spawn_op(shared: &Rc<MirrorShared>, ctx: &JobCtx, op: Op, offset: u64, len: u64, guard: Rc<RangeGuard>) {
    shared.ops.set(shared.ops.get() + 1);
    shared.op_bytes.set(shared.op_bytes.get() + len);
    let (shared, ctx) = (Rc::clone(shared), ctx.clone());
    reactor::spawn_local(async move {
        let res = match op {
            Op::Copy => match shared.source.read(offset, len as usize).await {
                Ok(buf) => shared.target.write(offset, buf, IoFlags::NONE).await.1.map_err(|e| (false, e)),
                Err(e) => Err((true, e)),
            },
            Op::Zero => {
                let flags = if shared.unmap { IoFlags::MAY_UNMAP } else { IoFlags::NONE };
                shared.target.write_zeroes(offset, len, flags).await.map_err(|e| (false, e))
            }
        };
        match res {
            Ok(()) => ctx.add_progress(len),
            Err((read, e)) => {
                shared.mark_dirty(offset, len);
                shared.job_error(read, e);
            }
        }
        drop(guard);
        shared.ops.set(shared.ops.get() - 1);
        shared.op_bytes.set(shared.op_bytes.get() - len);
        shared.wake_job();
    });
}

/// The control-thread end of a mirror.
struct MirrorHooks {
    id: u64,
    home: Handle,
    /// The job's bitmap on the source, removed when the job ends.
    bitmap: Arc<Bitmap>,
    source: Arc<Node>,
    target: Arc<Node>,
    filter: Option<Arc<Node>>,
    target_claim: Option<Claim>,
    on_pivot: Option<GraphFn>,
    on_abort: Option<GraphFn>,
    pivoted: bool,
}

impl MirrorHooks {
    /// Routes the filter and moves its users to `to`.
    fn switch(&mut self, to_target: bool) -> Result<(), String> {
        self.source.set_replaced_by(None);
        let id = self.id;
        let phase = if to_target { Phase::ToTarget } else { Phase::ToSource };
        let _ = self
            .home
            .call(move || {
                if let Some(s) = filter(id) {
                    s.phase.set(phase);
                    s.release_parked();
                }
            })
            .wait();
        let Some(filter_node) = &self.filter else { return Ok(()) };
        let to = if to_target { &self.target } else { &self.source };
        if to_target {
            // The users take over the target from the job. Should they not
            // get there, the job fails and its abort moves them to the source.
            self.target_claim = None;
            return move_users(&filter_node.users(), to, Some(filter_node));
        }
        // Back to the source, where a late request lands anyway: the users
        // stay there whatever happens.
        move_users(&filter_node.users(), to, None)
    }
}

/// Moves `users` to `to` and waits until no request of theirs is still on
/// the way to their old root (a write in flight there would be missed).
/// If one does not finish in time, or a user cannot move, every user goes
/// back to `back` (when given) and nothing has changed.
pub(crate) fn move_users(users: &[Arc<Backend>], to: &Arc<Node>, back: Option<&Arc<Node>>) -> Result<(), String> {
    let restore = |moved: &[(Arc<Backend>, u64)]| {
        for (b, _) in moved {
            if let Some(Err(e)) = back.map(|n| b.replace_root(n)) {
                tracing::error!(backend = %b.holder(), error = %e, "moving a user back failed");
            }
        }
    };
    let mut moved = Vec::new();
    for b in users {
        match b.replace_root(to) {
            Ok(g) => moved.push((Arc::clone(b), g)),
            Err(e) => {
                restore(&moved);
                return Err(e.to_string());
            }
        }
    }
    let deadline = std::time::Instant::now() + bdev::DRAIN_WAIT_MAX;
    for (b, g) in &moved {
        if let Err(e) = b.wait_drained(*g, deadline) {
            tracing::error!(backend = %b.holder(), error = %e, "a user's requests did not drain");
            restore(&moved);
            let stay = back.unwrap_or(to);
            return Err(format!("{e}; the users stay on '{}'", stay.name()));
        }
    }
    Ok(())
}

impl JobHooks for MirrorHooks {
    fn prepare(&mut self, _graph: &mut Graph, job: &JobShared) -> Result<(), String> {
        let pivot = job.lock().complete_requested;
        self.pivoted = pivot;
        self.switch(pivot)
    }

    fn abort(&mut self, _graph: &mut Graph, _job: &JobShared) {
        if let Err(e) = self.switch(false) {
            tracing::error!(error = %e, "moving users back to the mirror's source failed");
        }
    }

    fn clean(&mut self, graph: &mut Graph, _job: &JobShared) {
        self.source.set_replaced_by(None);
        self.source.bitmaps().remove(&self.bitmap);
        self.target_claim = None;
        if let Some(f) = self.filter.take() {
            let name = f.name().to_string();
            drop(f);
            if let Err(e) = graph.remove_internal(&name) {
                tracing::error!(filter = %name, error = %e, "removing the mirror filter failed");
            }
        }
        let id = self.id;
        let _ = self.home.call(move || drop(FILTERS.with(|m| m.borrow_mut().remove(&id)))).wait();
        let after = if self.pivoted { self.on_pivot.take() } else { self.on_abort.take() };
        if let Some(f) = after {
            f(graph);
        }
    }

    fn can_complete(&self) -> bool {
        true
    }
}
