//! Backup (`blockdev-backup`, `drive-backup`): a copy of a node as it was
//! when the job started, made while clients keep writing to it.
//!
//! ```text
//!   exports ──▶ Backend ──▶ copy-before-write filter ──▶ source    (job reads)
//!                              │ a write to clusters not copied yet:
//!                              │ their old data goes to the target first
//!                              └──────────────────────────▶ target (job writes)
//! ```
//!
//! What is left to copy is a bitmap in backup clusters (the target's
//! cluster size, at least 64 KiB), set at the start from the sync mode:
//! everything (`full`), what the top layer holds (`top`, decided as each
//! range is copied), a user's bitmap (`bitmap`, `incremental`), or nothing
//! (`none`: the filter alone copies what clients are about to overwrite,
//! until the job is cancelled — the fleecing of old). A copy locks its
//! clusters (range locks), clears their bits, copies, and sets them again
//! if it fails; a client write waits for copies of its clusters and copies
//! those still marked itself before it goes to the source, so the target
//! holds the point in time whatever the order. Ranges that read as zeroes
//! are written as zeroes, not copied byte by byte.
//!
//! With a user's bitmap the job freezes it (busy, not recording) and lets
//! an anonymous successor record the writes from the start on; at the end
//! QEMU's `bitmap-mode` decides: `on-success` keeps only the successor's
//! bits if the job succeeded, `always` also keeps what was not copied when
//! it failed, `never` (and any failure) puts the successor's bits back into
//! the original, losing nothing.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bdev::forward::ForwardChannel;
use bdev::lock::perm;
use bdev::locks::RangeLocks;
use bdev::{
    Bdev, BdevError, BdevInfo, Bitmap, BlockChannel, BlockStatus, Channel, Child, Claim, DirtyBits, Done, Graph, Io,
    IoError, IoFlags, LocalBoxFuture, Node, Perms,
};
use reactor::Handle;

use crate::copies::Copies;
use crate::job::{ErrorAction, JobCtx, JobShared, JobType, OnError};
use crate::manager::{JobError, JobHooks, JobManager, NewJob};
use crate::mirror::{GraphFn, move_users};

/// Smallest backup cluster (QEMU's BACKUP_CLUSTER_SIZE_DEFAULT).
pub const CLUSTER_MIN: u64 = 64 << 10;
/// Bytes one background copy moves at most (without `x-perf.max-chunk`).
pub const CHUNK_DEFAULT: u64 = 1 << 20;
/// How long the job sleeps when everything left is being copied by clients' writes.
const WAIT_SLICE: Duration = Duration::from_millis(10);

static NEXT_FILTER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Copy states whose home is this reactor.
    static COPIERS: RefCell<HashMap<u64, Rc<Copier>>> = RefCell::new(HashMap::new());
}

fn copier(id: u64) -> Option<Rc<Copier>> {
    COPIERS.with(|m| m.borrow().get(&id).cloned())
}

/// QEMU's `MirrorSyncMode` as backup takes it (`incremental` is `bitmap`
/// with `on-success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupSync {
    Full,
    Top,
    None,
    Bitmap,
}

/// QEMU's `BitmapSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    OnSuccess,
    Never,
    Always,
}

/// A backup's settings, checked by [`start`].
pub struct BackupConfig {
    pub job_id: String,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub sync: BackupSync,
    pub bitmap: Option<Arc<Bitmap>>,
    pub bitmap_mode: Option<BitmapMode>,
    pub speed: u64,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub filter_node_name: Option<String>,
    pub discard_source: bool,
    /// Bytes one background copy moves at most (`x-perf.max-chunk`, 0: default).
    pub max_chunk: u64,
    /// Runs on the control thread when the job has ended (drive-backup
    /// closes the target it opened).
    pub on_end: Option<GraphFn>,
}

/// The copy state, on the job's home reactor, shared by the filter and the job.
struct Copier {
    job: Arc<JobShared>,
    source: BlockChannel,
    target: BlockChannel,
    /// Clusters still to copy.
    bits: Arc<DirtyBits>,
    cluster: u64,
    locks: Rc<RangeLocks>,
    /// `sync=top`: only what the source's own layer holds is copied.
    top_only: bool,
    discard_source: bool,
    /// The job sleeps waiting for a client write to finish its copy.
    job_waiting: Cell<bool>,
}

impl Copier {
    /// Clusters touched by `[offset, offset + len)`.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = (offset + len).min(self.bits.size());
        (offset / self.cluster, end.div_ceil(self.cluster))
    }

    /// Copies the clusters of `[a, b)` that are still marked; the caller
    /// holds their range lock. A failed run is marked again. Returns the
    /// bytes copied (or skipped as not to be copied).
    async fn copy_locked(&self, a: u64, b: u64) -> Result<u64, (bool, IoError)> {
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

    /// Copies `[start, end)` of the source to the target.
    async fn copy_range(&self, start: u64, end: u64) -> Result<(), (bool, IoError)> {
        let mut pos = start;
        while pos < end {
            let st = self.source.block_status(pos, end - pos).await.map_err(|e| (true, e))?;
            let len = st.len.clamp(1, end - pos);
            if self.top_only && !(st.allocated && st.depth == 0) {
                // The target reads this from its own backing file.
            } else if st.zero && !st.data {
                self.target.write_zeroes(pos, len, IoFlags::MAY_UNMAP).await.map_err(|e| (false, e))?;
            } else {
                let mut at = pos;
                while at < pos + len {
                    let n = (pos + len - at).min(bdev::IO_BYTES_MAX);
                    let buf = self.source.read(at, n as usize).await.map_err(|e| (true, e))?;
                    self.target.write(at, buf, IoFlags::NONE).await.1.map_err(|e| (false, e))?;
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

    /// A write to `[offset, offset + len)` is about to reach the source:
    /// the old data of its clusters that are still to be copied goes to the
    /// target first (the write waits for copies already running there).
    async fn before_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let (a, b) = self.span(offset, len);
        if a >= b || (self.bits.scan(a, b).is_none() && !self.locks.overlaps(a, b)) {
            return Ok(());
        }
        let guard = self.locks.lock(a, b).await;
        let res = self.copy_locked(a, b).await;
        drop(guard);
        if self.job_waiting.get() {
            self.job.kick();
        }
        match res {
            Ok(n) => {
                self.job.lock().current += n;
                Ok(())
            }
            Err((read, e)) => {
                // QEMU's on-cbw-error=break-guest-write: the client's write
                // fails rather than the copy losing the old data.
                tracing::warn!(job = %self.job.id, read, error = %e, "copy before write failed; the write fails");
                Err(e)
            }
        }
    }

    /// True when no bit is left in `[a, b)` and no copy is running there.
    fn settled(&self, a: u64, b: u64) -> bool {
        self.bits.scan(a, b).is_none() && !self.locks.overlaps(a, b)
    }
}

/// The `copy-before-write` filter node over the source.
struct CbwBdev {
    id: u64,
    home: Handle,
    source: Arc<Node>,
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
        let id = self.id;
        if self.home.is_current() {
            return Ok(Rc::new(CbwChannel { copier: copier(id).ok_or(BdevError::ReactorGone)? }));
        }
        let resolve = Arc::new(move || -> Result<Rc<dyn Channel>, BdevError> {
            Ok(Rc::new(CbwChannel { copier: copier(id).ok_or(BdevError::ReactorGone)? }))
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

struct CbwChannel {
    copier: Rc<Copier>,
}

impl Channel for CbwChannel {
    fn submit(&self, io: Io, done: Done) {
        let c = &self.copier;
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
        let ch = self.copier.source.clone();
        Box::pin(async move { ch.block_status(offset, len).await })
    }
}

/// The backup cluster size: the target's cluster size, at least 64 KiB.
fn cluster_size(target: &Node) -> u64 {
    let cs = target.bdev().info().format_specific.and_then(|f| f["data"]["cluster-size"].as_u64());
    cs.unwrap_or(CLUSTER_MIN).max(CLUSTER_MIN)
}

/// Checks the settings, sets the bitmaps up, puts the filter in front of
/// the source and starts the job.
pub fn start(graph: &mut Graph, jobs: &mut JobManager, cfg: BackupConfig) -> Result<(), JobError> {
    let invalid = |m: &str| JobError::Invalid(m.to_string());
    let (source, target) = (Arc::clone(&cfg.source), Arc::clone(&cfg.target));
    if Arc::ptr_eq(&source, &target) {
        return Err(invalid("Source and target cannot be the same"));
    }
    if source.size() != target.size() {
        return Err(invalid("Source and target image have different sizes"));
    }
    let cluster = cluster_size(&target);
    if cfg.max_chunk != 0 && cfg.max_chunk < cluster {
        return Err(JobError::Invalid(format!(
            "Required max-chunk ({}) is less than backup cluster size ({cluster})",
            cfg.max_chunk
        )));
    }
    jobs.check_new_id(&cfg.job_id)?;
    jobs.check_free(&source)?;
    jobs.check_free(&target)?;
    if let Some(b) = &cfg.bitmap
        && b.busy()
    {
        return Err(JobError::Busy(format!(
            "Bitmap '{}' is currently in use by another operation and cannot be used",
            b.name().unwrap_or_default()
        )));
    }
    let holder = format!("job '{}'", cfg.job_id);
    // The target is the job's to write; others may read it (an image
    // exported read-only while it fills, the fleecing of old).
    let target_perms = Perms { perm: perm::WRITE, shared: perm::CONSISTENT_READ | perm::WRITE_UNCHANGED };
    let target_claim = target.claim(holder.clone(), target_perms).map_err(|e| JobError::Busy(e.to_string()))?;
    let source_claim = source.claim(holder.clone(), Perms::read()).map_err(|e| JobError::Failed(e.to_string()))?;

    // What is left to copy, and the bitmaps' state at this instant.
    let bits = Arc::new(DirtyBits::new(source.size(), cluster));
    match cfg.sync {
        // With `sync=none` nothing is copied in the background, but every
        // cluster's old data is copied the first time it is written.
        BackupSync::Full | BackupSync::Top | BackupSync::None => bits.set_all(),
        BackupSync::Bitmap => bits.merge_from(cfg.bitmap.as_ref().expect("checked by the caller").bits()),
    }
    let frozen = cfg.bitmap.as_ref().map(|b| Frozen::new(&source, b));

    let home = crate::chain::home(graph, &source);
    let id = NEXT_FILTER.fetch_add(1, Ordering::Relaxed);
    let job = JobShared::new(
        cfg.job_id.clone(),
        JobType::Backup,
        cfg.auto_finalize,
        cfg.auto_dismiss,
        cfg.speed,
        Arc::clone(jobs.events()),
    );
    let (src, tgt, j, b) = (Arc::clone(&source), Arc::clone(&target), Arc::clone(&job), Arc::clone(&bits));
    let (top_only, discard_source) = (cfg.sync == BackupSync::Top, cfg.discard_source);
    let setup = home
        .run(move || async move {
            let (source, target) = (src.channel()?, tgt.channel()?);
            let c = Rc::new(Copier {
                job: j,
                source,
                target,
                bits: b,
                cluster,
                locks: RangeLocks::new(),
                top_only,
                discard_source,
                job_waiting: Cell::new(false),
            });
            COPIERS.with(|m| m.borrow_mut().insert(id, c));
            Ok::<(), BdevError>(())
        })
        .wait();
    let undo = |frozen: Option<Frozen>, home: &Handle| {
        if let Some(f) = frozen {
            f.release(&source);
        }
        let _ = home.call(move || drop(COPIERS.with(|m| m.borrow_mut().remove(&id)))).wait();
    };
    match setup {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            undo(frozen, &home);
            return Err(JobError::Failed(e.to_string()));
        }
        Err(_) => {
            undo(frozen, &home);
            return Err(JobError::Failed("the reactors stopped".into()));
        }
    }
    let access = if source.read_only() { Perms::read() } else { Perms::write() };
    let child = match source.claim_as_child(format!("copy-before-write filter of job '{}'", cfg.job_id), access) {
        Ok(claim) => Child { role: "file", claim },
        Err(e) => {
            undo(frozen, &home);
            return Err(JobError::Failed(e.to_string()));
        }
    };
    let bdev = Arc::new(CbwBdev { id, home: home.clone(), source: Arc::clone(&source) });
    let filter = match graph.add_internal(cfg.filter_node_name.clone(), bdev, vec![child]) {
        Ok(n) => n,
        Err(e) => {
            undo(frozen, &home);
            return Err(invalid(&e.to_string()));
        }
    };
    // The point in time: once the users' requests to the source are done,
    // every write goes through the filter.
    if let Err(e) = move_users(&source.users(), &filter, Some(&source)) {
        let _ = graph.remove_internal(filter.name());
        undo(frozen, &home);
        return Err(JobError::Failed(e));
    }
    source.set_replaced_by(Some(holder.clone()));
    let total = bits.dirty_bytes();
    let hooks = BackupHooks {
        id,
        home: home.clone(),
        source: Arc::clone(&source),
        filter: Some(filter),
        frozen,
        bits: Arc::clone(&bits),
        mode: cfg.bitmap_mode.unwrap_or(BitmapMode::OnSuccess),
        succeeded: false,
        target_claim: Some(target_claim),
        on_end: cfg.on_end,
    };
    let (sync, on_source_error, on_target_error, max_chunk) =
        (cfg.sync, cfg.on_source_error, cfg.on_target_error, cfg.max_chunk);
    let run: crate::manager::RunFn = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            let c = copier(id).ok_or("the backup's copy state is gone")?;
            run(c, ctx, sync, total, max_chunk, on_source_error, on_target_error).await
        })
    });
    jobs.start_shared(
        job,
        NewJob {
            id: cfg.job_id,
            kind: JobType::Backup,
            home: Some(home),
            auto_finalize: cfg.auto_finalize,
            auto_dismiss: cfg.auto_dismiss,
            speed: cfg.speed,
            nodes: vec![Arc::clone(&source), Arc::clone(&target)],
            claims: vec![source_claim],
            hooks: Box::new(hooks),
            run,
        },
    )
    .inspect_err(|_| source.set_replaced_by(None))
}

/// The background copy: every cluster left, `COPIES_MAX` copies at once,
/// under the speed limit and the error policies. With `sync=none` there is
/// nothing to copy: the filter works until the job is cancelled.
async fn run(
    c: Rc<Copier>,
    ctx: JobCtx,
    sync: BackupSync,
    total: u64,
    max_chunk: u64,
    on_source_error: OnError,
    on_target_error: OnError,
) -> Result<(), String> {
    ctx.set_total(total);
    if sync == BackupSync::None {
        loop {
            ctx.pause_point().await;
            if ctx.cancelled() {
                return Ok(());
            }
            ctx.idle(Duration::from_secs(3600)).await;
        }
    }
    let chunk_clusters = (if max_chunk == 0 { CHUNK_DEFAULT } else { max_chunk } / c.cluster).max(1);
    let copies = Copies::new();
    let mut cursor = 0;
    loop {
        while let Some(f) = copies.failure() {
            let policy = if f.read { on_source_error } else { on_target_error };
            if ctx.io_error(f.read, f.error, policy) == ErrorAction::Report {
                copies.drain().await;
                return Err(f.error.to_string());
            }
            // Ignore and stop: the clusters are marked again and copied later
            // (after the pause, for stop).
        }
        if ctx.pause_requested() || ctx.cancelled() {
            copies.drain().await;
            ctx.pause_point().await;
            if ctx.cancelled() {
                return Ok(());
            }
            continue;
        }
        let Some(first) = next_free(&c, cursor) else {
            if copies.running() > 0 {
                copies.drain().await;
            } else if c.bits.count() == 0 {
                break;
            } else {
                // What is left is being copied by clients' writes.
                c.job_waiting.set(true);
                ctx.sleep(WAIT_SLICE).await;
                c.job_waiting.set(false);
            }
            continue;
        };
        let mut n = 1;
        while n < chunk_clusters
            && first + n < c.bits.chunks()
            && c.bits.get(first + n)
            && !c.locks.overlaps(first + n, first + n + 1)
        {
            n += 1;
        }
        cursor = first + n;
        let guard = c.locks.insert(first, first + n);
        copies.room().await;
        let (cc, ctx2) = (Rc::clone(&c), ctx.clone());
        let bytes = (n * c.cluster).min(c.bits.size() - first * c.cluster);
        copies.start(first * c.cluster, bytes, async move {
            let res = cc.copy_locked(first, first + n).await;
            drop(guard);
            res.map(|done| ctx2.add_progress(done))
        });
        ctx.rate_limit(bytes).await;
    }
    copies.drain().await;
    if let Some(f) = copies.failure() {
        return Err(f.error.to_string());
    }
    c.target.flush().await.map_err(|e| e.to_string())
}

/// The first marked cluster at or after `from` (wrapping) that no copy holds.
fn next_free(c: &Copier, from: u64) -> Option<u64> {
    let first = c.bits.next_dirty(from)?;
    let mut at = first;
    loop {
        if !c.locks.overlaps(at, at + 1) {
            return Some(at);
        }
        let next = c.bits.next_dirty((at + 1) % c.bits.chunks().max(1))?;
        if next == first {
            return None;
        }
        at = next;
    }
}

/// How a job ended, for its bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
}

/// A user's bitmap held by a backup: frozen, with a successor recording
/// the writes made since the job started.
struct Frozen {
    bitmap: Arc<Bitmap>,
    successor: Arc<Bitmap>,
    was_recording: bool,
}

impl Frozen {
    fn new(node: &Node, bitmap: &Arc<Bitmap>) -> Frozen {
        let was_recording = bitmap.recording();
        let successor = Arc::new(Bitmap::new(None, bitmap.bits().size(), bitmap.bits().granularity(), was_recording));
        node.bitmaps().add(Arc::clone(&successor));
        node.bitmaps().set_recording(bitmap, false);
        bitmap.set_busy(true);
        Frozen { bitmap: Arc::clone(bitmap), successor, was_recording }
    }

    /// QEMU's bitmap-mode at the end of the job, then gives the bitmap back.
    fn finish(self, node: &Node, mode: BitmapMode, outcome: Outcome, uncopied: &DirtyBits) {
        let b = self.bitmap.bits();
        match (mode, outcome) {
            (BitmapMode::OnSuccess | BitmapMode::Always, Outcome::Succeeded) => {
                // Only what was written since the backup started.
                b.clear_all();
                b.merge_from(self.successor.bits());
            }
            (BitmapMode::Always, Outcome::Failed) => {
                // What was written since, and what the backup did not copy.
                b.clear_all();
                b.merge_from(self.successor.bits());
                b.merge_from(uncopied);
            }
            // `never`, or a failure: every bit stays, the new writes join.
            _ => b.merge_from(self.successor.bits()),
        }
        self.give_back(node);
    }

    /// The job ended before it began: nothing changes but the writes made
    /// meanwhile, which join the bitmap.
    fn release(self, node: &Node) {
        self.bitmap.bits().merge_from(self.successor.bits());
        self.give_back(node);
    }

    fn give_back(self, node: &Node) {
        node.bitmaps().remove(&self.successor);
        node.bitmaps().set_recording(&self.bitmap, self.was_recording);
        self.bitmap.set_busy(false);
    }
}

/// The control-thread end of a backup.
struct BackupHooks {
    id: u64,
    home: Handle,
    source: Arc<Node>,
    filter: Option<Arc<Node>>,
    frozen: Option<Frozen>,
    bits: Arc<DirtyBits>,
    mode: BitmapMode,
    succeeded: bool,
    target_claim: Option<Claim>,
    on_end: Option<GraphFn>,
}

impl BackupHooks {
    /// The users go back to the source; the filter and its state go.
    fn remove_filter(&mut self, graph: &mut Graph) {
        self.source.set_replaced_by(None);
        if let Some(f) = self.filter.take() {
            if let Err(e) = move_users(&f.users(), &self.source, None) {
                tracing::error!(error = %e, "moving a backup's users back to its source");
            }
            let name = f.name().to_string();
            drop(f);
            if let Err(e) = graph.remove_internal(&name) {
                tracing::error!(filter = %name, error = %e, "removing the copy-before-write filter failed");
            }
        }
        let id = self.id;
        let _ = self.home.call(move || drop(COPIERS.with(|m| m.borrow_mut().remove(&id)))).wait();
    }
}

impl JobHooks for BackupHooks {
    fn commit(&mut self, _graph: &mut Graph, _job: &JobShared) {
        self.succeeded = true;
    }

    fn abort(&mut self, _graph: &mut Graph, _job: &JobShared) {
        self.succeeded = false;
    }

    fn clean(&mut self, graph: &mut Graph, _job: &JobShared) {
        self.remove_filter(graph);
        if let Some(f) = self.frozen.take() {
            let outcome = if self.succeeded { Outcome::Succeeded } else { Outcome::Failed };
            f.finish(&self.source, self.mode, outcome, &self.bits);
        }
        self.target_claim = None;
        if let Some(f) = self.on_end.take() {
            f(graph);
        }
    }
}
