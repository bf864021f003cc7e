//! Block jobs: QEMU's job model (statuses, verbs, events, speed limits,
//! error policies) and the jobs that move data between nodes while clients
//! keep using them.
//!
//! ```text
//!   status.rs    statuses, transitions, the verb table
//!   job.rs       a job's shared state; JobCtx, the job's own handle
//!   manager.rs   the job table and a job's life on the control thread
//!                (manager/tests.rs: every verb from every status)
//!   copies.rs    the bounded copy machinery commit and stream share
//!   ratelimit.rs the speed limit
//!   mirror.rs    mirror and active commit (filter, copy loop, pivot)
//!   backup.rs    backup (copy-before-write filter, background copy, bitmaps)
//!   chain.rs     backing chains: layers by name, writable twins
//!   commit.rs    commit (intermediate here, active on the mirror engine)
//!   stream.rs    stream
//! ```
//!
//! A job's work is a task on the home reactor of its nodes with a bounded
//! number of I/Os in flight; its beginning and end (checks, claims, graph
//! changes) run on the control thread.

#![forbid(unsafe_code)]

pub mod backup;
pub mod chain;
pub mod commit;
pub mod copies;
pub mod job;
pub mod manager;
pub mod mirror;
pub mod ratelimit;
pub mod status;
pub mod stream;

pub use job::{ErrorAction, EventSink, IoStatus, JobCtx, JobShared, JobType, OnError};
pub use manager::{JobError, JobHooks, JobManager, NewJob, RunFn};
pub use status::{JobStatus, Verb};
