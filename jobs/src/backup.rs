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
//! The copy state and the filter are [`bdev::cbw`]'s, which the
//! `copy-before-write` driver (fleecing) uses too; the job adds the
//! background copy, progress and the bitmaps.
//!
//! With `compress` every copy — background or before a client's write —
//! writes the target with [`bdev::IoFlags::COMPRESS`] (zeroes stay zero
//! writes), in whole clusters of the target; only targets that store
//! compressed data take it (qcow2), as in QEMU.
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
use std::time::Duration;

use bdev::cbw::{self, Cbw, CbwBdev, CbwObserver, CbwSettings, OnCbwError};
use bdev::lock::perm;
use bdev::{BdevError, Bitmap, Child, Claim, DirtyBits, Graph, Node, Perms};
use reactor::Handle;

use crate::copies::Copies;
use crate::job::{ErrorAction, JobCtx, JobShared, JobType, OnError};
use crate::manager::{JobError, JobHooks, JobManager, NewJob};
use crate::mirror::{GraphFn, move_users};

/// Bytes one background copy moves at most (without `x-perf.max-chunk`).
pub const CHUNK_DEFAULT: u64 = 1 << 20;
/// QEMU's refusal of `compress` for a target that cannot store compressed
/// data. QEMU names the target's BlockBackend, which a node added with
/// blockdev-add (every node of a storage daemon) does not have: the name
/// is empty.
pub const COMPRESS_UNSUPPORTED: &str = "Compression is not supported for this drive ";
/// How long the job sleeps when everything left is being copied by clients' writes.
const WAIT_SLICE: Duration = Duration::from_millis(10);

thread_local! {
    /// The jobs' observers of their filters, on the filters' home reactor.
    static OBSERVERS: RefCell<HashMap<u64, Rc<JobObserver>>> = RefCell::new(HashMap::new());
}

fn observer(id: u64) -> Option<Rc<JobObserver>> {
    OBSERVERS.with(|m| m.borrow().get(&id).cloned())
}

/// Drops a backup's copy state and observer (on their home reactor).
fn forget(id: u64) {
    cbw::unregister(id);
    OBSERVERS.with(|m| m.borrow_mut().remove(&id));
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
    /// Writes to the target are stored compressed (QEMU's `compress`).
    pub compress: bool,
    /// Bytes one background copy moves at most (`x-perf.max-chunk`, 0: default).
    pub max_chunk: u64,
    /// Runs on the control thread when the job has ended (drive-backup
    /// closes the target it opened).
    pub on_end: Option<GraphFn>,
}

/// The job's side of the copies clients' writes make: progress, and a
/// wake-up when the job waits for them.
struct JobObserver {
    job: Arc<JobShared>,
    /// The job sleeps waiting for a client write to finish its copy.
    waiting: Cell<bool>,
}

impl CbwObserver for JobObserver {
    fn copied(&self, bytes: u64) {
        self.job.lock().current += bytes;
    }

    fn settled(&self) {
        if self.waiting.get() {
            self.job.kick();
        }
    }
}

/// Checks the settings, sets the bitmaps up, puts the filter in front of
/// the source and starts the job.
pub fn start(graph: &mut Graph, jobs: &mut JobManager, cfg: BackupConfig) -> Result<(), JobError> {
    let invalid = |m: &str| JobError::Invalid(m.to_string());
    let (source, target) = (Arc::clone(&cfg.source), Arc::clone(&cfg.target));
    if Arc::ptr_eq(&source, &target) {
        return Err(invalid("Source and target cannot be the same"));
    }
    if cfg.compress && !target.bdev().supports_compressed_writes() {
        return Err(invalid(COMPRESS_UNSUPPORTED));
    }
    if source.size() != target.size() {
        return Err(invalid("Source and target image have different sizes"));
    }
    let cluster = cbw::cluster_size(&target, 0);
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
    let id = cbw::next_id();
    let job = JobShared::new(
        cfg.job_id.clone(),
        JobType::Backup,
        cfg.auto_finalize,
        cfg.auto_dismiss,
        cfg.speed,
        Arc::clone(jobs.events()),
    );
    let (src, tgt, j, b) = (Arc::clone(&source), Arc::clone(&target), Arc::clone(&job), Arc::clone(&bits));
    let (top_only, discard_source, compress) = (cfg.sync == BackupSync::Top, cfg.discard_source, cfg.compress);
    let setup = home
        .run(move || async move {
            let (source, target) = (src.channel()?, tgt.channel()?);
            let settings = CbwSettings {
                bits: b,
                cluster,
                top_only,
                discard_source,
                compress,
                on_error: OnCbwError::BreakGuestWrite,
                timeout: None,
            };
            let state = Cbw::new(source, target, settings);
            let obs = Rc::new(JobObserver { job: j, waiting: Cell::new(false) });
            state.set_observer(Some(Rc::clone(&obs) as Rc<dyn CbwObserver>));
            cbw::register(id, state);
            OBSERVERS.with(|m| m.borrow_mut().insert(id, obs));
            Ok::<(), BdevError>(())
        })
        .wait();
    let undo = |frozen: Option<Frozen>, home: &Handle| {
        if let Some(f) = frozen {
            f.release(&source);
        }
        let _ = home.call(move || forget(id)).wait();
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
    let bdev = Arc::new(CbwBdev::new(id, home.clone(), Arc::clone(&source)));
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
    let plan = Plan {
        sync: cfg.sync,
        total,
        max_chunk: cfg.max_chunk,
        on_source_error: cfg.on_source_error,
        on_target_error: cfg.on_target_error,
    };
    let run: crate::manager::RunFn = Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            let c = cbw::state(id).ok_or("the backup's copy state is gone")?;
            let o = observer(id).ok_or("the backup's copy state is gone")?;
            run(c, o, ctx, plan).await
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

/// What the background copy does.
#[derive(Clone, Copy)]
struct Plan {
    sync: BackupSync,
    /// Bytes to copy at the start.
    total: u64,
    max_chunk: u64,
    on_source_error: OnError,
    on_target_error: OnError,
}

/// The background copy: every cluster left, `COPIES_MAX` copies at once,
/// under the speed limit and the error policies. With `sync=none` there is
/// nothing to copy: the filter works until the job is cancelled.
async fn run(c: Rc<Cbw>, o: Rc<JobObserver>, ctx: JobCtx, plan: Plan) -> Result<(), String> {
    let Plan { sync, total, max_chunk, on_source_error, on_target_error } = plan;
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
            } else if c.bits.count() == 0 && c.locks.is_empty() {
                // A bit is cleared when its copy starts: the job ends once
                // clients' copies before their writes have landed too.
                break;
            } else {
                // What is left is being copied by clients' writes.
                o.waiting.set(true);
                ctx.sleep(WAIT_SLICE).await;
                o.waiting.set(false);
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
fn next_free(c: &Cbw, from: u64) -> Option<u64> {
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
        let _ = self.home.call(move || forget(id)).wait();
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
