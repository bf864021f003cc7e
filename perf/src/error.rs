//! Why a run could not start or finish.

use bdev::BdevError;

#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The options do not fit each other or the node; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// The node could not be claimed or its channel not created.
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// A job's reactor stopped before the job reported.
    #[error("the reactor of job {0} stopped before the job finished")]
    ReactorGone(usize),
}
