//! One job's shared state and the job's own view of it ([`JobCtx`]).
//!
//! The state lives behind a mutex shared by the control thread (verbs,
//! queries, the end of a job's life) and the job's task on its home
//! reactor (pause points, progress, errors). Every status change goes
//! through [`JobShared::transition`], which checks QEMU's table and emits
//! `JOB_STATUS_CHANGE` while the lock is held, so events come out in the
//! order the changes happened.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bdev::IoError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ratelimit::{RateLimit, SLICE};
use crate::status::JobStatus;

/// Where events go (the daemon's event bus).
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// The kind of a job (QEMU's `JobType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
    Backup,
    Create,
    Amend,
}

impl JobType {
    pub fn name(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
        }
    }

    /// Block jobs emit the `BLOCK_JOB_*` events and appear in `query-block-jobs`.
    pub fn is_block_job(self) -> bool {
        matches!(self, JobType::Commit | JobType::Stream | JobType::Mirror | JobType::Backup)
    }
}

/// What a job does when its I/O fails (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Report,
    Ignore,
    Stop,
    Enospc,
    Auto,
}

/// The decision for one failed job I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail the job.
    Report,
    /// Carry on (mirror and commit retry the range; stream fails at the end).
    Ignore,
    /// Pause the job until the user resumes it, then retry.
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

impl OnError {
    pub fn action(self, err: IoError) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if err == IoError::NoSpace => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        }
    }
}

/// A job's I/O status, as `query-block-jobs` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    NoSpace,
}

impl IoStatus {
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

/// Everything about a job that changes.
#[derive(Debug)]
pub struct JobState {
    pub status: JobStatus,
    /// Paused by the user (`job-pause`, or an error with policy `stop`).
    pub user_paused: bool,
    /// Pause requests in force (user and internal).
    pub pause_count: u32,
    /// A cancel was asked for.
    pub cancelled: bool,
    /// The cancel is forced (anything but `block-job-cancel` of a ready job).
    pub force: bool,
    /// `job-complete` was asked for.
    pub complete_requested: bool,
    pub current: u64,
    pub total: u64,
    /// Doing work (false while paused or sleeping with nothing to do).
    pub busy: bool,
    pub io_status: IoStatus,
    /// Why the job failed.
    pub error: Option<String>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Mirror in write-blocking mode with nothing left to copy.
    pub actively_synced: bool,
    pub limit: RateLimit,
}

impl JobState {
    /// Cancelled hard: stop at the next chance, no clean end.
    pub fn force_cancelled(&self) -> bool {
        self.cancelled && self.force
    }

    /// Should finish its work and end (complete, or a soft cancel of a ready job).
    pub fn should_finish(&self) -> bool {
        self.complete_requested || (self.cancelled && !self.force)
    }

    pub fn ready(&self) -> bool {
        matches!(self.status, JobStatus::Ready | JobStatus::Standby)
    }
}

/// The state of one job, shared by the control thread and its task.
pub struct JobShared {
    pub id: String,
    pub kind: JobType,
    state: Mutex<JobState>,
    events: EventSink,
    /// Counts kicks (commands the task should look at).
    kicks: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for JobShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobShared").field("id", &self.id).field("kind", &self.kind).finish()
    }
}

impl JobShared {
    pub fn new(
        id: String,
        kind: JobType,
        auto_finalize: bool,
        auto_dismiss: bool,
        speed: u64,
        events: EventSink,
    ) -> Arc<JobShared> {
        Arc::new(JobShared {
            id,
            kind,
            state: Mutex::new(JobState {
                status: JobStatus::Undefined,
                user_paused: false,
                pause_count: 0,
                cancelled: false,
                force: false,
                complete_requested: false,
                current: 0,
                total: 0,
                busy: false,
                io_status: IoStatus::Ok,
                error: None,
                auto_finalize,
                auto_dismiss,
                actively_synced: false,
                limit: RateLimit::new(speed, Instant::now()),
            }),
            events,
            kicks: AtomicU64::new(0),
            waker: Mutex::new(None),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// Moves to `to` and emits `JOB_STATUS_CHANGE`. A move QEMU's table
    /// forbids is a bug; it is logged and refused.
    pub fn transition(&self, st: &mut JobState, to: JobStatus) {
        if !st.status.can_become(to) {
            tracing::error!(job = %self.id, from = %st.status, to = %to, "illegal job status transition refused");
            debug_assert!(false, "illegal job transition {} -> {}", st.status, to);
            return;
        }
        st.status = to;
        (self.events)("JOB_STATUS_CHANGE", json!({"id": self.id, "status": to.name()}));
    }

    /// Emits a `BLOCK_JOB_*` event with the common payload and `extra` (block jobs only).
    pub fn emit_block_event(&self, st: &JobState, name: &str, extra: Value) {
        if !self.kind.is_block_job() {
            return;
        }
        let mut data = json!({
            "type": self.kind.name(),
            "device": self.id,
            "len": st.total,
            "offset": st.current,
            "speed": st.limit.speed(),
        });
        if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
            d.extend(e);
        }
        (self.events)(name, data);
    }

    pub fn emit(&self, name: &str, data: Value) {
        (self.events)(name, data);
    }

    /// Makes the task look at its state again (a command arrived).
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    fn kick_count(&self) -> u64 {
        self.kicks.load(Ordering::SeqCst)
    }

    /// `query-jobs` entry.
    pub fn query_job(&self) -> Value {
        let st = self.lock();
        let mut v = json!({
            "id": self.id,
            "type": self.kind.name(),
            "status": st.status.name(),
            "current-progress": st.current,
            "total-progress": st.total,
        });
        if let Some(e) = &st.error {
            v["error"] = json!(e);
        }
        v
    }

    /// `query-block-jobs` entry.
    pub fn query_block_job(&self) -> Value {
        let st = self.lock();
        let mut v = json!({
            "type": self.kind.name(),
            "device": self.id,
            "len": st.total,
            "offset": st.current,
            "busy": st.busy,
            "paused": st.pause_count > 0,
            "speed": st.limit.speed(),
            "io-status": st.io_status.name(),
            "ready": st.ready(),
            "status": st.status.name(),
            "auto-finalize": st.auto_finalize,
            "auto-dismiss": st.auto_dismiss,
        });
        if self.kind == JobType::Mirror {
            v["actively-synced"] = json!(st.actively_synced);
        }
        if let Some(e) = &st.error {
            v["error"] = json!(e);
        }
        v
    }
}

/// Completes when the job is kicked after `seen`, or at `deadline`.
struct Kicked<'a> {
    job: &'a JobShared,
    seen: u64,
    sleep: Option<Pin<Box<reactor::timer::Sleep>>>,
}

impl Future for Kicked<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        *self.job.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if self.job.kick_count() != self.seen {
            return Poll::Ready(());
        }
        match self.sleep.as_mut() {
            Some(s) => s.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// A job's handle on itself, used by its task on the home reactor.
#[derive(Clone)]
pub struct JobCtx {
    job: Arc<JobShared>,
}

impl JobCtx {
    pub fn new(job: Arc<JobShared>) -> JobCtx {
        JobCtx { job }
    }

    pub fn shared(&self) -> &Arc<JobShared> {
        &self.job
    }

    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Waits for a kick (or `timeout`), having looked at the state with kick count `seen`.
    async fn wait_kick(&self, seen: u64, timeout: Option<Duration>) {
        let sleep = timeout.map(|d| Box::pin(reactor::sleep(d)));
        Kicked { job: &self.job, seen, sleep }.await
    }

    /// Pauses here while a pause is requested (status paused or standby,
    /// not busy) and resumes when it is lifted. A forced cancel ends the
    /// pause as a resume does — paused becomes running, standby ready, as
    /// in QEMU — so the job ends from a status that may become aborting.
    pub async fn pause_point(&self) {
        loop {
            let seen = {
                let mut st = self.job.lock();
                if st.pause_count == 0 || st.force_cancelled() {
                    if let Some(r) = st.status.resumed_form() {
                        self.job.transition(&mut st, r);
                    }
                    st.busy = true;
                    return;
                }
                if let Some(p) = st.status.paused_form() {
                    self.job.transition(&mut st, p);
                }
                st.busy = false;
                self.job.kick_count()
            };
            self.wait_kick(seen, None).await;
        }
    }

    /// Sleeps for `dur` (not busy); a command cuts the sleep short.
    pub async fn sleep(&self, dur: Duration) {
        let seen = {
            let mut st = self.job.lock();
            st.busy = false;
            self.job.kick_count()
        };
        self.wait_kick(seen, Some(dur)).await;
        self.job.lock().busy = true;
    }

    /// Sleeps until a command arrives or `max` passes.
    pub async fn idle(&self, max: Duration) {
        self.sleep(max).await
    }

    /// True while a pause is asked for (the next pause point will stop).
    pub fn pause_requested(&self) -> bool {
        self.job.lock().pause_count > 0
    }

    /// True once a forced cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.job.lock().force_cancelled()
    }

    /// True once the job should finish (complete or soft cancel) — or stop.
    pub fn should_finish(&self) -> bool {
        self.job.lock().should_finish()
    }

    /// True if the job should pivot users at the end (complete, not a soft cancel).
    pub fn complete_requested(&self) -> bool {
        self.job.lock().complete_requested
    }

    /// Charges `bytes` to the speed limit and sleeps off any debt (in
    /// slices, so commands are seen meanwhile).
    pub async fn rate_limit(&self, bytes: u64) {
        self.job.lock().limit.charge(bytes, Instant::now());
        loop {
            let d = {
                let mut st = self.job.lock();
                if st.force_cancelled() || st.pause_count > 0 {
                    return;
                }
                st.limit.delay(Instant::now())
            };
            if d.is_zero() {
                return;
            }
            self.sleep(d.min(SLICE)).await;
        }
    }

    pub fn add_progress(&self, n: u64) {
        self.job.lock().current += n;
    }

    pub fn set_total(&self, total: u64) {
        self.job.lock().total = total;
    }

    pub fn add_total(&self, n: u64) {
        self.job.lock().total += n;
    }

    pub fn progress(&self) -> (u64, u64) {
        let st = self.job.lock();
        (st.current, st.total)
    }

    /// Enters READY and emits `BLOCK_JOB_READY` (once).
    pub fn set_ready(&self) {
        let mut st = self.job.lock();
        if st.status != JobStatus::Running {
            return;
        }
        self.job.transition(&mut st, JobStatus::Ready);
        self.job.emit_block_event(&st, "BLOCK_JOB_READY", json!({}));
    }

    pub fn set_actively_synced(&self, synced: bool) {
        self.job.lock().actively_synced = synced;
    }

    /// Decides what a failed job I/O means under `policy`, emits
    /// `BLOCK_JOB_ERROR`, and for `stop` pauses the job as a user pause
    /// with the error in `io-status`.
    pub fn io_error(&self, read: bool, err: IoError, policy: OnError) -> ErrorAction {
        let action = policy.action(err);
        let mut st = self.job.lock();
        st.actively_synced = false;
        self.job.emit(
            "BLOCK_JOB_ERROR",
            json!({"device": self.job.id, "operation": if read { "read" } else { "write" }, "action": action.name()}),
        );
        if action == ErrorAction::Stop {
            st.io_status = if err == IoError::NoSpace { IoStatus::NoSpace } else { IoStatus::Failed };
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
        }
        action
    }
}
