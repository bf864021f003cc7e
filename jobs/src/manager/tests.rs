//! The job life on a real reactor with a stand-in job: every verb from
//! every status a client can reach, paused and standby included, against
//! the replies and `JOB_STATUS_CHANGE` sequences qemu-storage-daemon 10.0
//! gives (tests/job_verbs.rs compares the two daemons themselves).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use bdev::IoError;
use reactor::{ReactorOptions, Reactors};

use super::*;
use crate::job::OnError;

/// Longest wait for an event: a bound on a hang, not a timing.
const EVENT_WAIT_MAX: Duration = Duration::from_secs(20);

/// Every event emitted, in order, and a way to wait for more.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<(String, Value)>>,
    more: Condvar,
}

impl Log {
    fn sink(self: &Arc<Self>) -> EventSink {
        let log = Arc::clone(self);
        Arc::new(move |name: &str, data: Value| {
            log.events.lock().unwrap().push((name.to_string(), data));
            log.more.notify_all();
        })
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Statuses of `JOB_STATUS_CHANGE` from event `from` on.
    fn statuses(&self, from: usize) -> Vec<String> {
        let ev = self.events.lock().unwrap();
        ev[from..]
            .iter()
            .filter(|(n, _)| n == "JOB_STATUS_CHANGE")
            .map(|(_, d)| d["status"].as_str().unwrap().to_string())
            .collect()
    }

    /// Names of `BLOCK_JOB_*` events from event `from` on.
    fn block_events(&self, from: usize) -> Vec<String> {
        let ev = self.events.lock().unwrap();
        ev[from..].iter().filter(|(n, _)| n.starts_with("BLOCK_JOB_")).map(|(n, _)| n.clone()).collect()
    }

    /// Waits for an event named `name`.
    fn wait_for(&self, name: &str) {
        let ev = self.events.lock().unwrap();
        let (ev, _) = self.more.wait_timeout_while(ev, EVENT_WAIT_MAX, |ev| ev.iter().all(|(n, _)| n != name)).unwrap();
        assert!(ev.iter().any(|(n, _)| n == name), "no {name}");
    }

    /// Waits a moment for an event past the first `seen`.
    fn wait_past(&self, seen: usize, max: Duration) {
        let ev = self.events.lock().unwrap();
        let _ = self.more.wait_timeout_while(ev, max, |ev| ev.len() <= seen).unwrap();
    }
}

/// What the stand-in job's task does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Task {
    /// Copies forever: never ready, ends only when cancelled.
    Slow,
    /// Ready at once (a mirror in sync), ends on complete or soft cancel.
    Ready,
    /// Fails its first I/O under policy `stop`, then copies forever.
    StopOnError,
    /// Never reaches a pause point; ends when cancelled or told to finish.
    NoPausePoint,
}

fn run(task: Task, finish: Arc<AtomicBool>) -> RunFn {
    Box::new(move |ctx: JobCtx| {
        Box::pin(async move {
            match task {
                Task::StopOnError => {
                    ctx.io_error(false, IoError::Io, OnError::Stop);
                }
                // Past the pause point every task starts with.
                Task::NoPausePoint => ctx.shared().emit("TEST_TASK_STARTED", Value::Null),
                _ => {}
            }
            loop {
                if task != Task::NoPausePoint {
                    ctx.pause_point().await;
                }
                let (forced, should_finish) = {
                    let st = ctx.shared().lock();
                    (st.force_cancelled(), st.should_finish())
                };
                if forced || finish.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if task == Task::Ready {
                    ctx.set_ready();
                    if should_finish {
                        return Ok(());
                    }
                }
                ctx.idle(Duration::from_secs(1)).await;
            }
        })
    })
}

struct Hooks;

impl JobHooks for Hooks {
    fn can_complete(&self) -> bool {
        true
    }
}

/// A job manager on one reactor, driven from the test thread as the
/// control thread drives the real one.
struct Bench {
    jobs: JobManager,
    graph: Graph,
    log: Arc<Log>,
    finish: Arc<AtomicBool>,
    _reactors: Reactors,
}

impl Bench {
    fn new() -> Bench {
        let reactors = Reactors::start(&[0], false, ReactorOptions::default()).unwrap();
        let log = Arc::new(Log::default());
        let jobs = JobManager::new(reactors.main().clone(), log.sink());
        let graph = Graph::new(reactors.handles().to_vec());
        let finish = Arc::new(AtomicBool::new(false));
        Bench { jobs, graph, log, finish, _reactors: reactors }
    }

    /// Starts job `j` with manual finalize and dismiss, so every status
    /// stays until a verb moves it.
    fn start(&mut self, task: Task) {
        self.jobs
            .start(NewJob {
                id: "j".into(),
                kind: JobType::Mirror,
                home: None,
                auto_finalize: false,
                auto_dismiss: false,
                speed: 0,
                nodes: Vec::new(),
                claims: Vec::new(),
                hooks: Box::new(Hooks),
                run: run(task, Arc::clone(&self.finish)),
            })
            .unwrap();
    }

    /// Waits until job `j` has gone through `want` (from event `from` on),
    /// handing finished tasks to the manager meanwhile; the statuses seen.
    fn until(&mut self, from: usize, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + EVENT_WAIT_MAX;
        loop {
            let seen = self.log.statuses(from);
            if seen.len() >= want.len() || Instant::now() >= deadline {
                return seen;
            }
            let n = self.log.len();
            match self.jobs.finished().try_recv() {
                Ok((id, res)) => self.jobs.on_finished(&mut self.graph, &id, res),
                Err(_) => self.log.wait_past(n, Duration::from_millis(20)),
            }
        }
    }

    fn expect(&mut self, from: usize, want: &[&str]) {
        assert_eq!(self.until(from, want), want, "statuses from event {from}");
    }

    fn status(&self) -> Option<JobStatus> {
        self.jobs.get("j").map(|j| j.status())
    }

    /// Brings job `j` to `status` the way a client would.
    fn reach(&mut self, status: JobStatus) {
        use JobStatus::*;
        let task = match status {
            Ready | Standby | Pending | Concluded => Task::Ready,
            _ => Task::Slow,
        };
        self.start(task);
        // Cumulative from the first event: a ready job may be ready
        // before anyone looks.
        let mut want = vec!["created", "running"];
        let path: &[(Option<Verb>, &[&str])] = match status {
            Running => &[],
            Paused => &[(Some(Verb::Pause), &["paused"])],
            Ready => &[(None, &["ready"])],
            Standby => &[(None, &["ready"]), (Some(Verb::Pause), &["standby"])],
            Pending => &[(None, &["ready"]), (Some(Verb::Complete), &["waiting", "pending"])],
            Concluded => &[
                (None, &["ready"]),
                (Some(Verb::Complete), &["waiting", "pending"]),
                (Some(Verb::Finalize), &["concluded"]),
            ],
            other => panic!("a client cannot reach {other}"),
        };
        if path.is_empty() {
            self.expect(0, &want);
        }
        for (verb, more) in path {
            if let Some(v) = verb {
                self.verb(Act::Verb(*v)).unwrap();
            }
            want.extend_from_slice(more);
            self.expect(0, &want);
        }
        assert_eq!(self.status(), Some(status));
    }

    fn verb(&mut self, act: Act) -> Result<(), JobError> {
        let g = &mut self.graph;
        match act {
            Act::Verb(Verb::Cancel) => self.jobs.cancel(g, "j", true, false),
            Act::BlockCancel { force } => self.jobs.cancel(g, "j", force, true),
            Act::Verb(Verb::Pause) => self.jobs.pause("j", false),
            Act::Verb(Verb::Resume) => self.jobs.resume("j", false),
            Act::Verb(Verb::Complete) => self.jobs.complete("j", false),
            Act::Verb(Verb::Finalize) => self.jobs.finalize(g, "j", false),
            Act::Verb(Verb::Dismiss) => self.jobs.dismiss("j", false),
            Act::Verb(v) => panic!("{v} is not exercised here"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Act {
    /// `job-<verb>` (`job-cancel` is always forced).
    Verb(Verb),
    /// `block-job-cancel` with or without `force`.
    BlockCancel { force: bool },
}

fn refused_verb(status: &str, verb: &str) -> Result<(), String> {
    Err(format!("Job 'j' in state '{status}' cannot accept command verb '{verb}'"))
}

const NOT_PAUSED: &str = "Can't resume a job that was not paused";
const PAUSED: &str = "The block job for device 'j' is currently paused";

/// From a status, a verb: its reply, then the statuses and `BLOCK_JOB_*`
/// events that follow.
type Row = (JobStatus, Act, Result<(), String>, &'static [&'static str], &'static [&'static str]);

#[test]
fn every_verb_from_every_status_gives_qemus_reply_and_statuses() {
    use Act::{BlockCancel, Verb as V};
    use JobStatus::*;
    let cancel = V(Verb::Cancel);
    let (soft, force) = (BlockCancel { force: false }, BlockCancel { force: true });
    let (pause, resume, complete) = (V(Verb::Pause), V(Verb::Resume), V(Verb::Complete));
    let (finalize, dismiss) = (V(Verb::Finalize), V(Verb::Dismiss));
    let ok = Ok(());
    let err = |m: &str| Err(m.to_string());
    let cancelled: &[&str] = &["aborting", "concluded"];
    #[rustfmt::skip]
    let table: Vec<Row> = vec![
        (Running, cancel, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        // Before READY every cancel is forced.
        (Running, soft, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Running, force, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Running, pause, ok.clone(), &["paused"], &[]),
        (Running, resume, err(NOT_PAUSED), &[], &[]),
        (Running, complete, refused_verb("running", "complete"), &[], &[]),
        (Running, finalize, refused_verb("running", "finalize"), &[], &[]),
        (Running, dismiss, refused_verb("running", "dismiss"), &[], &[]),
        // A cancelled pause resumes first: paused → running → aborting.
        (Paused, cancel, ok.clone(), &["running", "aborting", "concluded"], &["BLOCK_JOB_CANCELLED"]),
        (Paused, soft, err(PAUSED), &[], &[]),
        (Paused, force, ok.clone(), &["running", "aborting", "concluded"], &["BLOCK_JOB_CANCELLED"]),
        (Paused, pause, err("Job is already paused"), &[], &[]),
        (Paused, resume, ok.clone(), &["running"], &[]),
        (Paused, complete, refused_verb("paused", "complete"), &[], &[]),
        (Paused, finalize, refused_verb("paused", "finalize"), &[], &[]),
        (Paused, dismiss, refused_verb("paused", "dismiss"), &[], &[]),
        (Ready, cancel, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        // A soft cancel of a ready job ends it cleanly, without pivoting.
        (Ready, soft, ok.clone(), &["waiting", "pending"], &["BLOCK_JOB_PENDING"]),
        (Ready, force, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Ready, pause, ok.clone(), &["standby"], &[]),
        (Ready, resume, err(NOT_PAUSED), &[], &[]),
        (Ready, complete, ok.clone(), &["waiting", "pending"], &["BLOCK_JOB_PENDING"]),
        (Ready, finalize, refused_verb("ready", "finalize"), &[], &[]),
        (Ready, dismiss, refused_verb("ready", "dismiss"), &[], &[]),
        (Standby, cancel, ok.clone(), &["ready", "aborting", "concluded"], &["BLOCK_JOB_CANCELLED"]),
        (Standby, soft, err(PAUSED), &[], &[]),
        (Standby, force, ok.clone(), &["ready", "aborting", "concluded"], &["BLOCK_JOB_CANCELLED"]),
        (Standby, pause, err("Job is already paused"), &[], &[]),
        (Standby, resume, ok.clone(), &["ready"], &[]),
        // Accepted; the job completes once resumed (see below).
        (Standby, complete, ok.clone(), &[], &[]),
        (Standby, finalize, refused_verb("standby", "finalize"), &[], &[]),
        (Standby, dismiss, refused_verb("standby", "dismiss"), &[], &[]),
        (Pending, cancel, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Pending, soft, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Pending, force, ok.clone(), cancelled, &["BLOCK_JOB_CANCELLED"]),
        (Pending, pause, refused_verb("pending", "pause"), &[], &[]),
        (Pending, resume, err(NOT_PAUSED), &[], &[]),
        (Pending, complete, refused_verb("pending", "complete"), &[], &[]),
        (Pending, finalize, ok.clone(), &["concluded"], &["BLOCK_JOB_COMPLETED"]),
        (Pending, dismiss, refused_verb("pending", "dismiss"), &[], &[]),
        (Concluded, cancel, refused_verb("concluded", "cancel"), &[], &[]),
        (Concluded, soft, refused_verb("concluded", "cancel"), &[], &[]),
        (Concluded, force, refused_verb("concluded", "cancel"), &[], &[]),
        (Concluded, pause, refused_verb("concluded", "pause"), &[], &[]),
        (Concluded, resume, err(NOT_PAUSED), &[], &[]),
        (Concluded, complete, refused_verb("concluded", "complete"), &[], &[]),
        (Concluded, finalize, refused_verb("concluded", "finalize"), &[], &[]),
        (Concluded, dismiss, ok.clone(), &["null"], &[]),
    ];
    let mut failures = Vec::new();
    for (status, act, reply, statuses, block_events) in table {
        let mut b = Bench::new();
        b.reach(status);
        let from = b.log.len();
        let got = b.verb(act).map_err(|e| e.to_string());
        let seen = b.until(from, statuses);
        let events = b.log.block_events(from);
        if got != reply || seen != statuses || events != block_events {
            failures.push(format!(
                "{status} + {act:?}: got {got:?} {seen:?} {events:?}, want {reply:?} {statuses:?} {block_events:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_job_completed_in_standby_finishes_once_resumed() {
    let mut b = Bench::new();
    b.reach(JobStatus::Standby);
    b.verb(Act::Verb(Verb::Complete)).unwrap();
    let from = b.log.len();
    b.verb(Act::Verb(Verb::Resume)).unwrap();
    b.expect(from, &["ready", "waiting", "pending"]);
}

#[test]
fn a_job_paused_by_an_error_under_stop_can_be_cancelled() {
    let mut b = Bench::new();
    b.start(Task::StopOnError);
    b.expect(0, &["created", "running", "paused"]);
    assert_eq!(b.log.block_events(0), ["BLOCK_JOB_ERROR"]);
    assert_eq!(b.verb(Act::BlockCancel { force: false }).unwrap_err().to_string(), PAUSED);
    let from = b.log.len();
    b.verb(Act::Verb(Verb::Cancel)).unwrap();
    b.expect(from, &["running", "aborting", "concluded"]);
    b.verb(Act::Verb(Verb::Dismiss)).unwrap();
    assert!(b.jobs.is_empty(), "the id is free again");
}

#[test]
fn a_pause_the_task_never_reached_ends_with_the_job() {
    // Cancelled: the pause is dropped, the job ends from running.
    let mut b = Bench::new();
    b.start(Task::NoPausePoint);
    b.log.wait_for("TEST_TASK_STARTED");
    b.verb(Act::Verb(Verb::Pause)).unwrap();
    let from = b.log.len();
    b.verb(Act::Verb(Verb::Cancel)).unwrap();
    b.expect(from, &["aborting", "concluded"]);
    assert_eq!(b.log.statuses(0), ["created", "running", "aborting", "concluded"]);

    // Finished on its own: the job goes on to pending as usual.
    let mut b = Bench::new();
    b.start(Task::NoPausePoint);
    b.log.wait_for("TEST_TASK_STARTED");
    b.verb(Act::Verb(Verb::Pause)).unwrap();
    let from = b.log.len();
    b.finish.store(true, Ordering::SeqCst);
    b.jobs.get("j").unwrap().kick();
    b.expect(from, &["waiting", "pending"]);
    b.verb(Act::Verb(Verb::Finalize)).unwrap();
    b.verb(Act::Verb(Verb::Dismiss)).unwrap();
    assert!(b.jobs.is_empty());
}

#[test]
fn shutdown_ends_paused_standby_and_pending_jobs() {
    for status in [JobStatus::Paused, JobStatus::Standby, JobStatus::Pending] {
        let mut b = Bench::new();
        b.reach(status);
        b.jobs.cancel_all(&mut b.graph, EVENT_WAIT_MAX);
        let st = b.log.statuses(0);
        assert_eq!(st[st.len() - 2..], ["aborting", "concluded"], "{status}: {st:?}");
        assert_eq!(b.status(), Some(JobStatus::Concluded), "{status}");
    }
}
