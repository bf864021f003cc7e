//! Every job verb from every status a client can reach, paused and
//! standby included, run against qemu-storage-daemon and Spindle side by
//! side: the same scripted QMP commands go to both, and for each command
//! the reply (the return value, or the error class and text), the
//! `JOB_STATUS_CHANGE` statuses and the `BLOCK_JOB_*` event names that
//! follow it must be the same.
//!
//! Jobs are kept from finishing on their own: a mirror at 1 byte/s over
//! a source with more data than one burst (`buf-size`) copies, a mirror
//! of a small source is ready and waits, and with `auto-finalize` off a
//! completed job waits in pending.
//!
//! What is not compared, and why:
//! - progress numbers (`offset`, `len`, `current-progress`): the two copy
//!   in different chunk sizes;
//! - where a command's events fall relative to its reply: QEMU may send a
//!   status change before or after the answer that caused it, Spindle's
//!   answers and events leave by two queues. A step's events are those
//!   read from its command until what it waits for (an event, never a
//!   sleep), whichever side of the reply they came;
//! - the status `created`: both daemons create and start a job within the
//!   command that makes it, so no verb can reach a created job; it is
//!   compared only as the first event of every job.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::qsd::{Peer, Qsd, Reply};
use support::{Daemon, run};

/// Longest wait for an event a step expects: a bound on a hang, not a
/// timing (the jobs here are never slow to get there).
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// The job every scenario runs.
const ID: &str = "j";

/// What a scenario's job is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A mirror copying at 1 byte/s: running until cancelled.
    Slow,
    /// A mirror of 1 MiB of data: ready at once, waits for complete or cancel.
    Ready,
    /// A mirror whose first target write fails, with `on-target-error: stop`.
    StopOnError,
}

/// What a step waits for once answered.
#[derive(Clone, Copy, Debug)]
enum Wait {
    Nothing,
    Status(&'static str),
    Event(&'static str),
}

struct Step {
    cmd: &'static str,
    args: Value,
    wait: Wait,
}

fn step(cmd: &'static str, args: Value, wait: Wait) -> Step {
    Step { cmd, args, wait }
}

/// A verb by id (`job-*`, `block-job-finalize`, `block-job-dismiss`).
fn by_id(cmd: &'static str, wait: Wait) -> Step {
    step(cmd, json!({"id": ID}), wait)
}

/// A verb by device (`block-job-pause`, `-resume`, `-cancel`, `-complete`).
fn by_device(cmd: &'static str, wait: Wait) -> Step {
    step(cmd, json!({"device": ID}), wait)
}

fn block_cancel(force: bool, wait: Wait) -> Step {
    step("block-job-cancel", json!({"device": ID, "force": force}), wait)
}

/// The reply, statuses and block events of one step on one daemon.
#[derive(Debug, PartialEq)]
struct Seen {
    cmd: String,
    reply: String,
    statuses: Vec<String>,
    block_events: Vec<String>,
}

/// Makes the images a scenario needs in `dir` with qemu-img and qemu-io.
fn images(dir: &Path, kind: Kind) {
    let (src, tgt) = (dir.join("src.qcow2"), dir.join("tgt.qcow2"));
    for p in [&src, &tgt] {
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(p).arg("4M"));
    }
    // The slow mirror copies one 1 MiB burst, then owes the rate limit
    // for ever; the others copy 1 MiB and are ready.
    let data = if kind == Kind::Slow { "write -P 0x5a 0 4M" } else { "write -P 0x5a 0 1M" };
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", data]).arg(&src));
}

fn qcow2(node: &str, path: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}})
}

/// The nodes and the `blockdev-mirror` that starts the scenario's job.
fn setup(dir: &Path, kind: Kind, auto_finalize: bool, auto_dismiss: bool) -> Vec<Step> {
    let mut steps = vec![
        step("blockdev-add", qcow2("src", &dir.join("src.qcow2")), Wait::Nothing),
        step("blockdev-add", qcow2("tgt", &dir.join("tgt.qcow2")), Wait::Nothing),
    ];
    let mut mirror = json!({"job-id": ID, "device": "src", "target": "tgt", "sync": "full",
        "auto-finalize": auto_finalize, "auto-dismiss": auto_dismiss});
    let wait = match kind {
        Kind::Slow => {
            mirror["speed"] = json!(1);
            mirror["buf-size"] = json!(1 << 20);
            Wait::Status("running")
        }
        Kind::Ready => Wait::Event("BLOCK_JOB_READY"),
        Kind::StopOnError => {
            // "pwritev" arms the rule on the node's own writes in QEMU;
            // in Spindle it matches writes.
            steps.push(step(
                "blockdev-add",
                json!({"driver": "blkdebug", "node-name": "dbg", "image": "tgt",
                "inject-error": [{"event": "pwritev", "errno": 5, "once": true}]}),
                Wait::Nothing,
            ));
            mirror["target"] = json!("dbg");
            mirror["on-target-error"] = json!("stop");
            Wait::Status("paused")
        }
    };
    steps.push(step("blockdev-mirror", mirror, wait));
    steps
}

/// `query-jobs` without the progress numbers.
fn jobs_summary(v: &Value) -> String {
    let jobs: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|j| format!("{} {} {}", j["id"], j["status"], j.get("error").cloned().unwrap_or(Value::Null)))
                .collect()
        })
        .unwrap_or_default();
    format!("jobs [{}]", jobs.join(", "))
}

fn describe(cmd: &str, reply: &Reply) -> String {
    match reply {
        Reply::Return(v) if cmd == "query-jobs" => jobs_summary(v),
        Reply::Return(v) => format!("return {v}"),
        Reply::Error { class, desc } => format!("{class}: {desc}"),
        Reply::Lost(why) => format!("lost: {why}"),
    }
}

fn is_ours(e: &Value) -> bool {
    e["data"]["id"] == ID || e["data"]["device"] == ID
}

/// Runs `steps` on one daemon whose files are in `dir`; what it saw,
/// step by step.
fn play(qmp: &Path, dir: &Path, steps: &[Step]) -> Vec<Seen> {
    let mut p = Peer::negotiated(qmp);
    let mut seen = Vec::new();
    for s in steps {
        let reply = p.execute(s.cmd, s.args.clone());
        let found = match s.wait {
            Wait::Nothing => true,
            Wait::Status(st) => p.wait_event(EVENT_WAIT, |e| {
                e["event"] == "JOB_STATUS_CHANGE" && is_ours(e) && e["data"]["status"] == st
            }),
            Wait::Event(name) => p.wait_event(EVENT_WAIT, |e| e["event"] == name && is_ours(e)),
        };
        let events: Vec<Value> = std::mem::take(&mut p.events).into_iter().filter(is_ours).collect();
        let mut statuses: Vec<String> = events
            .iter()
            .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
            .map(|e| e["data"]["status"].as_str().unwrap_or("?").to_string())
            .collect();
        if !found {
            statuses.push(format!("(no {:?} within {EVENT_WAIT:?})", s.wait));
        }
        let block_events = events
            .iter()
            .filter_map(|e| e["event"].as_str())
            .filter(|n| n.starts_with("BLOCK_JOB_"))
            .map(String::from)
            .collect();
        // The same command on both sides, but for the directory.
        let cmd = format!("{} {}", s.cmd, s.args).replace(&dir.display().to_string(), "DIR");
        seen.push(Seen { cmd, reply: describe(s.cmd, &reply), statuses, block_events });
        if p.is_closed() {
            break;
        }
    }
    seen
}

/// Runs one scenario on a fresh qemu-storage-daemon and a fresh Spindle
/// and compares them step by step; `script` gives the verbs after setup.
fn compare(name: &str, kind: Kind, auto_finalize: bool, auto_dismiss: bool, script: Vec<Step>) {
    let qsd_dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::start(qsd_dir.path());
    let spindle = Daemon::start();
    let mut transcripts = Vec::new();
    for (dir, sock) in [(qsd_dir.path(), &qsd.qmp), (spindle.dir.path(), &spindle.qmp)] {
        images(dir, kind);
        let mut steps = setup(dir, kind, auto_finalize, auto_dismiss);
        steps.extend(script.iter().map(|s| step(s.cmd, s.args.clone(), s.wait)));
        steps.push(step("query-jobs", json!({}), Wait::Nothing));
        transcripts.push(play(sock, dir, &steps));
    }
    let (want, got) = (&transcripts[0], &transcripts[1]);
    let mut diff = Vec::new();
    for i in 0..want.len().max(got.len()) {
        let (w, g) = (want.get(i), got.get(i));
        if w != g {
            diff.push(format!("step {i}:\n  qemu-storage-daemon: {w:?}\n  spindle:             {g:?}"));
        }
    }
    assert!(
        diff.is_empty(),
        "{name}: Spindle differs from qemu-storage-daemon (pid {}):\n{}\n--- spindle log ---\n{}",
        qsd.pid(),
        diff.join("\n"),
        spindle.log_text()
    );
    assert_eq!(want.last().map(|s| s.reply.as_str()), Some("jobs []"), "{name}: a job was left behind");
}

const OK: Wait = Wait::Nothing;

#[test]
fn running_job_every_verb_then_concluded_every_verb() {
    compare(
        "running",
        Kind::Slow,
        true,
        false,
        vec![
            by_id("job-resume", OK),
            by_device("block-job-resume", OK),
            by_id("job-complete", OK),
            by_device("block-job-complete", OK),
            by_id("job-finalize", OK),
            by_id("block-job-finalize", OK),
            by_id("job-dismiss", OK),
            by_id("block-job-dismiss", OK),
            by_id("job-cancel", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("job-pause", OK),
            by_id("job-resume", OK),
            by_id("job-cancel", OK),
            block_cancel(false, OK),
            block_cancel(true, OK),
            by_id("job-complete", OK),
            by_id("job-finalize", OK),
            by_id("job-dismiss", Wait::Status("null")),
            by_id("job-pause", OK),
            by_device("block-job-pause", OK),
        ],
    );
}

#[test]
fn running_job_block_job_cancel_without_force_is_forced() {
    compare("running, soft cancel", Kind::Slow, true, true, vec![block_cancel(false, Wait::Status("null"))]);
}

#[test]
fn running_job_block_job_cancel_with_force() {
    compare("running, forced cancel", Kind::Slow, true, true, vec![block_cancel(true, Wait::Status("null"))]);
}

#[test]
fn paused_job_every_verb_then_job_cancel() {
    compare(
        "paused",
        Kind::Slow,
        true,
        false,
        vec![
            by_id("job-pause", Wait::Status("paused")),
            by_id("job-pause", OK),
            by_device("block-job-pause", OK),
            by_id("job-complete", OK),
            by_id("job-finalize", OK),
            by_id("job-dismiss", OK),
            block_cancel(false, OK),
            by_id("job-resume", Wait::Status("running")),
            by_id("job-resume", OK),
            by_device("block-job-pause", Wait::Status("paused")),
            by_id("job-cancel", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("job-dismiss", Wait::Status("null")),
        ],
    );
}

#[test]
fn paused_job_block_job_cancel_with_force() {
    compare(
        "paused, forced block-job-cancel",
        Kind::Slow,
        true,
        true,
        vec![by_id("job-pause", Wait::Status("paused")), block_cancel(true, Wait::Status("null"))],
    );
}

#[test]
fn ready_job_every_verb_then_standby_every_verb_then_pending_every_verb() {
    compare(
        "ready",
        Kind::Ready,
        false,
        false,
        vec![
            by_id("job-resume", OK),
            by_id("job-finalize", OK),
            by_id("job-dismiss", OK),
            by_id("job-pause", Wait::Status("standby")),
            by_id("job-pause", OK),
            block_cancel(false, OK),
            by_id("job-finalize", OK),
            by_id("job-dismiss", OK),
            by_id("job-resume", Wait::Status("ready")),
            by_device("block-job-pause", Wait::Status("standby")),
            // Accepted while paused; the job completes once resumed.
            by_id("job-complete", OK),
            by_device("block-job-resume", Wait::Event("BLOCK_JOB_PENDING")),
            by_id("job-pause", OK),
            by_id("job-resume", OK),
            by_id("job-complete", OK),
            by_id("job-dismiss", OK),
            by_id("job-finalize", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("job-dismiss", Wait::Status("null")),
        ],
    );
}

#[test]
fn ready_job_soft_cancel_finishes_without_pivot() {
    compare(
        "ready, soft cancel",
        Kind::Ready,
        false,
        false,
        vec![
            block_cancel(false, Wait::Event("BLOCK_JOB_PENDING")),
            by_id("block-job-finalize", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("block-job-dismiss", Wait::Status("null")),
        ],
    );
}

#[test]
fn ready_job_job_cancel() {
    compare("ready, job-cancel", Kind::Ready, true, true, vec![by_id("job-cancel", Wait::Status("null"))]);
}

#[test]
fn ready_job_forced_cancel() {
    compare("ready, forced cancel", Kind::Ready, true, true, vec![block_cancel(true, Wait::Status("null"))]);
}

#[test]
fn standby_job_block_job_cancel_with_force() {
    compare(
        "standby, forced block-job-cancel",
        Kind::Ready,
        true,
        true,
        vec![by_id("job-pause", Wait::Status("standby")), block_cancel(true, Wait::Status("null"))],
    );
}

#[test]
fn standby_job_job_cancel() {
    compare(
        "standby, job-cancel",
        Kind::Ready,
        true,
        false,
        vec![
            by_id("job-pause", Wait::Status("standby")),
            by_id("job-cancel", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("job-dismiss", Wait::Status("null")),
        ],
    );
}

#[test]
fn pending_job_refuses_pause_and_is_cancelled() {
    compare(
        "pending, cancel",
        Kind::Ready,
        false,
        true,
        vec![
            by_id("job-complete", Wait::Event("BLOCK_JOB_PENDING")),
            by_id("job-pause", OK),
            by_device("block-job-pause", OK),
            block_cancel(false, Wait::Status("null")),
        ],
    );
}

#[test]
fn job_paused_by_an_error_under_stop_is_cancelled() {
    compare(
        "error, stop, cancel",
        Kind::StopOnError,
        true,
        false,
        vec![
            block_cancel(false, OK),
            by_id("job-pause", OK),
            by_id("job-cancel", Wait::Status("concluded")),
            step("query-jobs", json!({}), OK),
            by_id("job-dismiss", Wait::Status("null")),
        ],
    );
}

#[test]
fn pending_job_job_cancel_and_forced_block_job_cancel() {
    for cancel in [by_id("job-cancel", Wait::Status("concluded")), block_cancel(true, Wait::Status("concluded"))] {
        compare(
            "pending, forced cancel",
            Kind::Ready,
            false,
            false,
            vec![
                by_device("block-job-complete", Wait::Event("BLOCK_JOB_PENDING")),
                cancel,
                step("query-jobs", json!({}), OK),
                by_id("block-job-dismiss", Wait::Status("null")),
            ],
        );
    }
}
