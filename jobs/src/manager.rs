//! The job table and the life of a job, on the control thread.
//!
//! A job is created by a command, runs as a task on the home reactor, and
//! reports back through a channel the control loop watches
//! ([`JobManager::finished`]). Everything after the task — waiting,
//! pending, finalizing (the graph changes), aborting, concluding — happens
//! here, where the graph can be changed:
//!
//! ```text
//!   created → running ⇄ paused        task returns Ok ─▶ waiting → pending
//!                ↓ ready ⇄ standby        (auto-finalize, or job-finalize)
//!                                         → prepare ─ok─▶ commit → COMPLETED → concluded
//!   task fails / forced cancel ─▶ aborting → abort → CANCELLED | COMPLETED{error}
//!                                         → concluded → null (auto-dismiss or job-dismiss)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Claim, Graph, LocalBoxFuture, Node};
use crossbeam_channel::{Receiver, Sender, unbounded};
use reactor::Handle;
use serde_json::{Value, json};

use crate::job::{EventSink, JobCtx, JobShared, JobType};
use crate::status::{JobStatus, Verb};

/// Why a job command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Invalid(String),
    /// `job-*` with an unknown id.
    #[error("Job not found")]
    NoSuchJob,
    /// `block-job-*` with an unknown id (QEMU's DeviceNotActive).
    #[error("Block job '{0}' not found")]
    NotActive(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// What a job type does on the control thread at the end of its life.
pub trait JobHooks: Send {
    /// The graph changes of a successful job (mirror pivot, commit and
    /// stream re-pointing). An error aborts the job.
    fn prepare(&mut self, _graph: &mut Graph, _job: &JobShared) -> Result<(), String> {
        Ok(())
    }

    /// Makes a prepared job's outcome final (a backup's bitmap); cannot
    /// fail. In a transaction, runs once every job of it has prepared.
    fn commit(&mut self, _graph: &mut Graph, _job: &JobShared) {}

    /// Undoes what the job set up, after a failure or a cancel.
    fn abort(&mut self, _graph: &mut Graph, _job: &JobShared) {}

    /// Runs last, either way (filters out, temporary nodes gone).
    fn clean(&mut self, _graph: &mut Graph, _job: &JobShared) {}

    /// Accepts `job-complete` (mirror, active commit).
    fn can_complete(&self) -> bool {
        false
    }
}

/// A job's work: a future on the home reactor.
pub type RunFn = Box<dyn FnOnce(JobCtx) -> LocalBoxFuture<Result<(), String>> + Send>;

/// Everything needed to start a job.
pub struct NewJob {
    pub id: String,
    pub kind: JobType,
    /// The reactor the job's task runs on: the home of its nodes (None:
    /// the manager's default, the main reactor).
    pub home: Option<Handle>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub speed: u64,
    /// Nodes the job owns until it concludes: no other job may use them.
    pub nodes: Vec<Arc<Node>>,
    /// Claims held until the job concludes.
    pub claims: Vec<Claim>,
    pub hooks: Box<dyn JobHooks>,
    pub run: RunFn,
}

struct Entry {
    job: Arc<JobShared>,
    hooks: Box<dyn JobHooks>,
    nodes: Vec<Arc<Node>>,
    claims: Vec<Claim>,
    /// The task has not reported back yet.
    running: bool,
    /// The reactor its task runs on.
    home: Handle,
}

/// The jobs of the daemon.
pub struct JobManager {
    entries: Vec<Entry>,
    events: EventSink,
    home: Handle,
    done_tx: Sender<(String, Result<(), String>)>,
    done_rx: Receiver<(String, Result<(), String>)>,
}

/// Checks a job id the way QEMU does: a letter, then letters, digits, `-`, `.`, `_`.
pub fn validate_job_id(id: &str) -> Result<(), JobError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok { Ok(()) } else { Err(JobError::Invalid(format!("Invalid job ID '{id}'"))) }
}

impl JobManager {
    /// Jobs run on `home` (the reactor their nodes live on) and emit to `events`.
    pub fn new(home: Handle, events: EventSink) -> JobManager {
        let (done_tx, done_rx) = unbounded();
        JobManager { entries: Vec::new(), events, home, done_tx, done_rx }
    }

    pub fn events(&self) -> &EventSink {
        &self.events
    }

    /// Where finished tasks report; the control loop hands what arrives to
    /// [`JobManager::on_finished`].
    pub fn finished(&self) -> &Receiver<(String, Result<(), String>)> {
        &self.done_rx
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Fails if a job owns `node`, with QEMU's wording.
    pub fn check_free(&self, node: &Node) -> Result<(), JobError> {
        match self.entries.iter().find(|e| e.nodes.iter().any(|n| n.id() == node.id())) {
            Some(e) => Err(JobError::Busy(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.name(),
                e.job.kind.name()
            ))),
            None => Ok(()),
        }
    }

    /// Checks that `id` may name a new job.
    pub fn check_new_id(&self, id: &str) -> Result<(), JobError> {
        validate_job_id(id)?;
        if self.entries.iter().any(|e| e.job.id == id) {
            return Err(JobError::Exists(format!("Job ID '{id}' already in use")));
        }
        Ok(())
    }

    /// Registers and starts a job: created, running, task spawned on the home reactor.
    pub fn start(&mut self, new: NewJob) -> Result<Arc<JobShared>, JobError> {
        let job = JobShared::new(
            new.id.clone(),
            new.kind,
            new.auto_finalize,
            new.auto_dismiss,
            new.speed,
            Arc::clone(&self.events),
        );
        self.start_shared(Arc::clone(&job), new)?;
        Ok(job)
    }

    /// Like [`JobManager::start`], for a job whose shared state was made
    /// first (its data path needs it before the job starts).
    pub fn start_shared(&mut self, job: Arc<JobShared>, new: NewJob) -> Result<(), JobError> {
        self.check_new_id(&new.id)?;
        for n in &new.nodes {
            self.check_free(n)?;
        }
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Created);
            job.transition(&mut st, JobStatus::Running);
            st.busy = true;
        }
        let home = new.home.unwrap_or_else(|| self.home.clone());
        self.entries.push(Entry {
            job: Arc::clone(&job),
            hooks: new.hooks,
            nodes: new.nodes,
            claims: new.claims,
            running: true,
            home: home.clone(),
        });
        let (task_job, tx, run) = (job, self.done_tx.clone(), new.run);
        home.send(move || {
            reactor::spawn_local(async move {
                let id = task_job.id.clone();
                let ctx = JobCtx::new(task_job);
                ctx.pause_point().await;
                let res = if ctx.cancelled() { Ok(()) } else { run(ctx).await };
                let _ = tx.send((id, res));
            });
        });
        Ok(())
    }

    fn index(&self, id: &str, block: bool) -> Result<usize, JobError> {
        let found = self.entries.iter().position(|e| e.job.id == id && (!block || e.job.kind.is_block_job()));
        match (found, block) {
            (Some(i), _) => Ok(i),
            (None, true) => Err(JobError::NotActive(id.to_string())),
            (None, false) => Err(JobError::NoSuchJob),
        }
    }

    /// The job, if `verb` is legal in its status.
    fn with_verb(&self, id: &str, block: bool, verb: Verb) -> Result<usize, JobError> {
        let i = self.index(id, block)?;
        let status = self.entries[i].job.status();
        if !verb.allowed_in(status) {
            return Err(JobError::Invalid(format!(
                "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
            )));
        }
        Ok(i)
    }

    pub fn get(&self, id: &str) -> Option<Arc<JobShared>> {
        self.entries.iter().find(|e| e.job.id == id).map(|e| Arc::clone(&e.job))
    }

    /// `job-pause` / `block-job-pause`.
    pub fn pause(&mut self, id: &str, block: bool) -> Result<(), JobError> {
        let i = self.with_verb(id, block, Verb::Pause)?;
        let job = &self.entries[i].job;
        let mut st = job.lock();
        if st.user_paused {
            return Err(JobError::Invalid("Job is already paused".into()));
        }
        st.user_paused = true;
        st.pause_count += 1;
        drop(st);
        job.kick();
        Ok(())
    }

    /// `job-resume` / `block-job-resume`: lifts a user pause; the I/O
    /// status goes back to ok and failed ranges are retried. As in QEMU,
    /// a job that is not paused says so before the verb table is asked
    /// (a pending or concluded job answers "not paused", not "cannot
    /// accept command verb").
    pub fn resume(&mut self, id: &str, block: bool) -> Result<(), JobError> {
        let i = self.index(id, block)?;
        if !self.entries[i].job.lock().user_paused {
            return Err(JobError::Invalid("Can't resume a job that was not paused".into()));
        }
        let i = self.with_verb(id, block, Verb::Resume)?;
        let job = &self.entries[i].job;
        let mut st = job.lock();
        st.user_paused = false;
        st.pause_count -= 1;
        st.io_status = crate::job::IoStatus::Ok;
        drop(st);
        job.kick();
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&mut self, id: &str, speed: i64) -> Result<(), JobError> {
        let i = self.with_verb(id, true, Verb::SetSpeed)?;
        if speed < 0 {
            return Err(JobError::Invalid("Parameter 'speed' expects a non-negative value".into()));
        }
        let job = &self.entries[i].job;
        job.lock().limit.set_speed(speed as u64, Instant::now());
        job.kick();
        Ok(())
    }

    /// `job-complete` / `block-job-complete`.
    pub fn complete(&mut self, id: &str, block: bool) -> Result<(), JobError> {
        let i = self.with_verb(id, block, Verb::Complete)?;
        let e = &self.entries[i];
        let mut st = e.job.lock();
        if st.cancelled || !e.hooks.can_complete() {
            return Err(JobError::Invalid(format!("The active block job '{id}' cannot be completed")));
        }
        st.complete_requested = true;
        drop(st);
        e.job.kick();
        Ok(())
    }

    /// `job-cancel` (always forced) / `block-job-cancel` (`force` as given:
    /// without it a ready mirror finishes without pivoting).
    /// A user-paused job refuses a soft `block-job-cancel` before the verb
    /// table is asked, as in QEMU.
    pub fn cancel(&mut self, graph: &mut Graph, id: &str, force: bool, block: bool) -> Result<(), JobError> {
        let i = self.index(id, block)?;
        if block && !force && self.entries[i].job.lock().user_paused {
            return Err(JobError::Invalid(format!("The block job for device '{id}' is currently paused")));
        }
        let i = self.with_verb(id, block, Verb::Cancel)?;
        let job = Arc::clone(&self.entries[i].job);
        let mut st = job.lock();
        let soft = !force && st.ready();
        st.cancelled = true;
        st.force = !soft;
        if st.force && st.user_paused {
            st.user_paused = false;
            st.pause_count -= 1;
        }
        let deferred = matches!(st.status, JobStatus::Waiting | JobStatus::Pending);
        drop(st);
        job.kick();
        if deferred && !self.entries[i].running {
            // The work is done; the job is waiting for its end: end it now.
            job.lock().force = true;
            self.abort(graph, i, None);
        }
        Ok(())
    }

    /// `job-finalize` / `block-job-finalize`.
    pub fn finalize(&mut self, graph: &mut Graph, id: &str, block: bool) -> Result<(), JobError> {
        let i = self.with_verb(id, block, Verb::Finalize)?;
        self.do_finalize(graph, i);
        Ok(())
    }

    /// `job-dismiss` / `block-job-dismiss`.
    pub fn dismiss(&mut self, id: &str, block: bool) -> Result<(), JobError> {
        let i = self.with_verb(id, block, Verb::Dismiss)?;
        let e = self.entries.remove(i);
        let mut st = e.job.lock();
        e.job.transition(&mut st, JobStatus::Null);
        Ok(())
    }

    /// A task reported back.
    pub fn on_finished(&mut self, graph: &mut Graph, id: &str, result: Result<(), String>) {
        let Some(i) = self.entries.iter().position(|e| e.job.id == id && e.running) else {
            tracing::error!(job = %id, "a job reported back that is not running");
            return;
        };
        self.entries[i].running = false;
        let job = Arc::clone(&self.entries[i].job);
        let forced = job.lock().force_cancelled();
        match result {
            Err(e) => self.abort(graph, i, Some(e)),
            Ok(()) if forced => self.abort(graph, i, None),
            Ok(()) => {
                let mut st = job.lock();
                job.transition(&mut st, JobStatus::Waiting);
                job.transition(&mut st, JobStatus::Pending);
                st.busy = false;
                if !st.auto_finalize {
                    job.emit("BLOCK_JOB_PENDING", json!({"type": job.kind.name(), "id": job.id}));
                    return;
                }
                drop(st);
                self.do_finalize(graph, i);
            }
        }
    }

    fn do_finalize(&mut self, graph: &mut Graph, i: usize) {
        let job = Arc::clone(&self.entries[i].job);
        if let Err(e) = self.entries[i].hooks.prepare(graph, &job) {
            return self.abort(graph, i, Some(e));
        }
        self.entries[i].hooks.commit(graph, &job);
        {
            let st = job.lock();
            job.emit_block_event(&st, "BLOCK_JOB_COMPLETED", json!({}));
        }
        self.release(i);
        self.entries[i].hooks.clean(graph, &job);
        self.conclude(i);
    }

    /// Fails (with `error`) or cancels (without) job `i`.
    fn abort(&mut self, graph: &mut Graph, i: usize, error: Option<String>) {
        let job = Arc::clone(&self.entries[i].job);
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Aborting);
            st.busy = false;
            st.error = Some(error.clone().unwrap_or_else(|| "Operation canceled".into()));
        }
        self.entries[i].hooks.abort(graph, &job);
        {
            let st = job.lock();
            match &error {
                None => job.emit_block_event(&st, "BLOCK_JOB_CANCELLED", json!({})),
                Some(e) => job.emit_block_event(&st, "BLOCK_JOB_COMPLETED", json!({"error": e})),
            }
        }
        self.release(i);
        self.entries[i].hooks.clean(graph, &job);
        self.conclude(i);
    }

    /// Gives up the job's claims and nodes (before its clean-up, which may
    /// remove nodes it held).
    fn release(&mut self, i: usize) {
        let e = &mut self.entries[i];
        e.claims.clear();
        e.nodes.clear();
    }

    fn conclude(&mut self, i: usize) {
        let e = &mut self.entries[i];
        let mut st = e.job.lock();
        e.job.transition(&mut st, JobStatus::Concluded);
        if st.auto_dismiss {
            e.job.transition(&mut st, JobStatus::Null);
            drop(st);
            self.entries.remove(i);
        }
    }

    /// Each job's id and the reactor its task runs on.
    pub fn homes(&self) -> Vec<(String, Handle)> {
        self.entries.iter().map(|e| (e.job.id.clone(), e.home.clone())).collect()
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Vec<Value> {
        self.entries.iter().map(|e| e.job.query_job()).collect()
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Vec<Value> {
        self.entries.iter().filter(|e| e.job.kind.is_block_job()).map(|e| e.job.query_block_job()).collect()
    }

    /// Cancels every job and waits (up to `limit`) for them to end — the
    /// daemon is stopping. Jobs that do not end in time are left behind.
    pub fn cancel_all(&mut self, graph: &mut Graph, limit: Duration) {
        let ids: Vec<String> = self.entries.iter().map(|e| e.job.id.clone()).collect();
        for id in &ids {
            let Some(i) = self.entries.iter().position(|e| &e.job.id == id) else { continue };
            let job = Arc::clone(&self.entries[i].job);
            if Verb::Cancel.allowed_in(job.status()) {
                let _ = self.cancel(graph, id, true, false);
            }
        }
        let deadline = Instant::now() + limit;
        while self.entries.iter().any(|e| e.running) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok((id, res)) => self.on_finished(graph, &id, res),
                Err(_) => {
                    tracing::error!("jobs did not stop in time at shutdown");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
