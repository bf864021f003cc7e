//! Block jobs: QEMU's job model (statuses, verbs, events, speed limits,
//! error policies) and the jobs that move data between nodes while clients
//! keep using them — mirror, commit, stream, then backup, create, amend.
//! Each job is a task on the home reactor of its nodes.
//!
//! The crate is reserved in the workspace; the job core lands with the
//! block-job work.

#![forbid(unsafe_code)]
