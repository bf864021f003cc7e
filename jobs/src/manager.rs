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
//!                                         → prepare ─ok─▶ commit → clean → COMPLETED → concluded
//!   task fails / forced cancel ─▶ aborting → abort → clean → CANCELLED | COMPLETED{error}
//!                                         → concluded → null (auto-dismiss or job-dismiss)
//! ```
//!
//! Jobs started inside a transaction ([`JobManager::begin_txn`]) stay
//! `created` until [`JobManager::commit_txn`] runs them all, or leave
//! without having run ([`JobManager::abort_txn`]). With grouped completion
//! they form a group: each waits for the others, one failure or cancel
//! cancels the rest, and they are finalized together.

use std::collections::HashMap;
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
    /// Spawns the task: set while a transaction has not committed yet.
    launch: Option<Box<dyn FnOnce() + Send>>,
    /// The group it completes with (grouped transactions).
    group: Option<u64>,
    /// How its task ended when that is not the job's end yet (a group
    /// member): None for success, Some(None) cancelled, Some(Some(e)) failed.
    outcome: Option<Option<String>>,
}

/// A transaction being prepared: the jobs it starts are deferred.
struct Txn {
    group: Option<u64>,
    jobs: Vec<String>,
}

/// The jobs of the daemon.
pub struct JobManager {
    entries: Vec<Entry>,
    events: EventSink,
    home: Handle,
    done_tx: Sender<(String, Result<(), String>)>,
    done_rx: Receiver<(String, Result<(), String>)>,
    txn: Option<Txn>,
    next_group: u64,
    /// Groups that are being aborted.
    aborting: HashMap<u64, ()>,
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
        JobManager {
            entries: Vec::new(),
            events,
            home,
            done_tx,
            done_rx,
            txn: None,
            next_group: 1,
            aborting: HashMap::new(),
        }
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
        }
        let home = new.home.unwrap_or_else(|| self.home.clone());
        let (task_job, tx, run, task_home) = (Arc::clone(&job), self.done_tx.clone(), new.run, home.clone());
        let launch: Box<dyn FnOnce() + Send> = Box::new(move || {
            {
                let mut st = task_job.lock();
                task_job.transition(&mut st, JobStatus::Running);
                st.busy = true;
            }
            task_home.send(move || {
                reactor::spawn_local(async move {
                    let id = task_job.id.clone();
                    let ctx = JobCtx::new(task_job);
                    ctx.pause_point().await;
                    let res = if ctx.cancelled() { Ok(()) } else { run(ctx).await };
                    let _ = tx.send((id, res));
                });
            });
        });
        let group = self.txn.as_ref().and_then(|t| t.group);
        self.entries.push(Entry {
            job: Arc::clone(&job),
            hooks: new.hooks,
            nodes: new.nodes,
            claims: new.claims,
            running: true,
            home,
            launch: None,
            group,
            outcome: None,
        });
        match &mut self.txn {
            Some(t) => {
                t.jobs.push(job.id.clone());
                self.entries.last_mut().expect("just pushed").launch = Some(launch);
            }
            None => launch(),
        }
        Ok(())
    }

    /// Starts a transaction: jobs started until it commits or aborts are
    /// created but do not run; `grouped` makes them complete as one.
    pub fn begin_txn(&mut self, grouped: bool) {
        let group = grouped.then(|| {
            self.next_group += 1;
            self.next_group
        });
        self.txn = Some(Txn { group, jobs: Vec::new() });
    }

    /// Runs the jobs the transaction created.
    pub fn commit_txn(&mut self) {
        let Some(txn) = self.txn.take() else { return };
        for id in txn.jobs {
            if let Some(launch) = self.entries.iter_mut().find(|e| e.job.id == id).and_then(|e| e.launch.take()) {
                launch();
            }
        }
    }

    /// Undoes the jobs the transaction created that are still there: they
    /// leave without having run.
    pub fn abort_txn(&mut self, graph: &mut Graph) {
        let Some(txn) = self.txn.take() else { return };
        for id in txn.jobs.iter().rev() {
            self.abort_unstarted(graph, id);
        }
    }

    /// Undoes job `id`, created by the transaction under way and not run
    /// yet: aborting, concluded (null with auto-dismiss), no BLOCK_JOB_*
    /// event, its set-up undone — QEMU's cancel of a job never started.
    pub fn abort_txn_job(&mut self, graph: &mut Graph, id: &str) {
        if let Some(t) = &mut self.txn {
            t.jobs.retain(|j| j != id);
        }
        self.abort_unstarted(graph, id);
    }

    fn abort_unstarted(&mut self, graph: &mut Graph, id: &str) {
        let Some(i) = self.entries.iter().position(|e| e.job.id == id && e.launch.is_some()) else { return };
        let job = Arc::clone(&self.entries[i].job);
        self.entries[i].launch = None;
        self.entries[i].running = false;
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Aborting);
            st.error = Some("Operation canceled".into());
        }
        self.entries[i].hooks.abort(graph, &job);
        self.release(i);
        self.entries[i].hooks.clean(graph, &job);
        self.conclude(i);
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
            match self.entries[i].group {
                Some(g) => {
                    self.entries[i].outcome = Some(None);
                    self.abort_group(graph, g);
                }
                None => self.abort(graph, i, None),
            }
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
        let failure = match result {
            Err(e) => Some(Some(e)),
            Ok(()) if forced => Some(None),
            Ok(()) => None,
        };
        if let Some(g) = self.entries[i].group {
            return self.group_member_finished(graph, g, i, failure);
        }
        match failure {
            Some(error) => self.abort(graph, i, error),
            None => {
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
        if let Some(g) = self.entries[i].group {
            return self.finalize_group(graph, g);
        }
        let job = Arc::clone(&self.entries[i].job);
        if let Err(e) = self.entries[i].hooks.prepare(graph, &job) {
            return self.abort(graph, i, Some(e));
        }
        self.finish_committed(graph, i);
    }

    /// The last steps of a job whose prepare succeeded.
    fn finish_committed(&mut self, graph: &mut Graph, i: usize) {
        let job = Arc::clone(&self.entries[i].job);
        self.entries[i].hooks.commit(graph, &job);
        self.release(i);
        self.entries[i].hooks.clean(graph, &job);
        // After the clean-up, as QEMU: whoever reacts to the event finds
        // filters gone and targets closed.
        {
            let st = job.lock();
            job.emit_block_event(&st, "BLOCK_JOB_COMPLETED", json!({}));
        }
        self.conclude(i);
    }

    /// The ids of group `g`'s jobs that have not concluded, in start order.
    fn members(&self, g: u64) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.group == Some(g) && e.job.status() != JobStatus::Concluded)
            .map(|e| e.job.id.clone())
            .collect()
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.job.id == id)
    }

    /// A member of group `g` is done running: it waits for the others, or
    /// (failed or cancelled) takes the group down.
    fn group_member_finished(&mut self, graph: &mut Graph, g: u64, i: usize, failure: Option<Option<String>>) {
        let job = Arc::clone(&self.entries[i].job);
        match failure {
            None => {
                let mut st = job.lock();
                job.transition(&mut st, JobStatus::Waiting);
                st.busy = false;
            }
            Some(error) => {
                self.entries[i].outcome = Some(error);
                self.aborting.insert(g, ());
            }
        }
        if self.aborting.contains_key(&g) {
            return self.abort_group(graph, g);
        }
        let ids = self.members(g);
        if ids.iter().any(|id| self.position(id).is_some_and(|k| self.entries[k].running)) {
            return;
        }
        let mut manual = false;
        for id in &ids {
            let Some(k) = self.position(id) else { continue };
            let job = Arc::clone(&self.entries[k].job);
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Pending);
            if !st.auto_finalize {
                manual = true;
                job.emit("BLOCK_JOB_PENDING", json!({"type": job.kind.name(), "id": job.id}));
            }
        }
        if !manual {
            self.finalize_group(graph, g);
        }
    }

    /// Cancels the group's running jobs; once none runs, every member is
    /// aborted: a failed one reports its error, the others a cancel.
    fn abort_group(&mut self, graph: &mut Graph, g: u64) {
        self.aborting.insert(g, ());
        let ids = self.members(g);
        let mut running = false;
        for id in &ids {
            let Some(k) = self.position(id) else { continue };
            let e = &self.entries[k];
            if e.running {
                running = true;
                let mut st = e.job.lock();
                if !st.cancelled {
                    st.cancelled = true;
                    st.force = true;
                    if st.user_paused {
                        st.user_paused = false;
                        st.pause_count -= 1;
                    }
                    drop(st);
                    e.job.kick();
                }
            }
        }
        if running {
            return;
        }
        self.aborting.remove(&g);
        for id in &ids {
            let Some(k) = self.position(id) else { continue };
            let error = self.entries[k].outcome.take().flatten();
            self.entries[k].job.lock().force = true;
            self.abort(graph, k, error);
        }
    }

    /// Finalizes a group whose jobs are all pending: every prepare, then
    /// every commit; one failed prepare aborts them all.
    fn finalize_group(&mut self, graph: &mut Graph, g: u64) {
        let ids = self.members(g);
        let mut prepared = Vec::new();
        for id in &ids {
            let Some(k) = self.position(id) else { continue };
            let job = Arc::clone(&self.entries[k].job);
            if let Err(e) = self.entries[k].hooks.prepare(graph, &job) {
                self.entries[k].outcome = Some(Some(e));
                return self.abort_group(graph, g);
            }
            prepared.push(id.clone());
        }
        for id in &prepared {
            if let Some(k) = self.position(id) {
                self.finish_committed(graph, k);
            }
        }
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
        self.release(i);
        self.entries[i].hooks.clean(graph, &job);
        {
            let st = job.lock();
            match &error {
                None => job.emit_block_event(&st, "BLOCK_JOB_CANCELLED", json!({})),
                Some(e) => job.emit_block_event(&st, "BLOCK_JOB_COMPLETED", json!({"error": e})),
            }
        }
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
