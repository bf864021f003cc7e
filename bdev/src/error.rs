//! Errors of the device layer.
//!
//! [`IoError`] is the status of one I/O: small, `Copy`, carried through the
//! completion path. [`BdevError`] is a control-plane failure (opening a
//! device, changing the graph) and carries a message a person can act on.
//! Mapping errno to `IoError` is one exhaustive function, as is the way back.

/// Why an I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("Input/output error")]
    Io,
    #[error("No space left on device")]
    NoSpace,
    #[error("Device is read-only")]
    ReadOnly,
    #[error("Request beyond the end of the device")]
    OutOfRange,
    #[error("Invalid request")]
    Invalid,
    #[error("Operation not supported")]
    NotSupported,
    /// Resources are short right now; the same request may succeed later.
    #[error("Out of resources, try again")]
    NoMem,
    #[error("Canceled")]
    Canceled,
    /// Any other errno, kept so nothing is lost in translation.
    #[error("Error {0} ({msg})", msg = nix::errno::Errno::from_raw(*.0).desc())]
    Os(i32),
}

impl IoError {
    /// From a positive or negative errno value.
    pub fn from_errno(errno: i32) -> IoError {
        match errno.abs() {
            libc::EIO => IoError::Io,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => IoError::NoSpace,
            libc::EROFS | libc::EPERM | libc::EACCES => IoError::ReadOnly,
            libc::EOVERFLOW | libc::ENXIO => IoError::OutOfRange,
            libc::EINVAL => IoError::Invalid,
            libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY => IoError::NotSupported,
            libc::ENOMEM | libc::EAGAIN | libc::ENOBUFS => IoError::NoMem,
            libc::ECANCELED | libc::ESHUTDOWN => IoError::Canceled,
            other => IoError::Os(other),
        }
    }

    /// The (positive) errno that best describes the error.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Io => libc::EIO,
            IoError::NoSpace => libc::ENOSPC,
            IoError::ReadOnly => libc::EPERM,
            IoError::OutOfRange => libc::EINVAL,
            IoError::Invalid => libc::EINVAL,
            IoError::NotSupported => libc::EOPNOTSUPP,
            IoError::NoMem => libc::ENOMEM,
            IoError::Canceled => libc::ECANCELED,
            IoError::Os(e) => e,
        }
    }

    /// Worth submitting again unchanged (transient shortage).
    pub fn is_retryable(self) -> bool {
        matches!(self, IoError::NoMem)
    }
}

/// A control-plane failure of the device layer.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// Bad options: the message names the parameter.
    #[error("{0}")]
    InvalidParam(String),
    #[error("Failed to find node with node-name='{0}'")]
    NodeNotFound(String),
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    #[error("Node '{name}' is in use by {holders}")]
    InUse { name: String, holders: String },
    #[error("Node '{name}' is read-only; {what} needs write access")]
    ReadOnly { name: String, what: String },
    /// Two users of a node need what the other does not share (QEMU's wording).
    #[error(
        "Permission conflict on node '{name}': permissions '{perms}' are both required by {required_by} and unshared by {unshared_by}."
    )]
    Conflict { name: String, perms: String, required_by: String, unshared_by: String },
    /// A job is about to move the node's users elsewhere.
    #[error(
        "Node '{name}' is about to be replaced by {job}: it takes no new users until the job ends (add them before the job starts, and they move along)"
    )]
    Replaced { name: String, job: String },
    /// An image lock (of this process or another) forbids the access.
    #[error("{0}")]
    Locked(String),
    #[error("Could not open '{path}': {source}")]
    Open { path: String, source: std::io::Error },
    #[error("{what} failed: {source}")]
    Io { what: String, source: IoError },
    #[error("{0}")]
    Unsupported(String),
    #[error("the reactors stopped before the operation completed")]
    ReactorGone,
}

impl BdevError {
    pub fn invalid(msg: impl Into<String>) -> BdevError {
        BdevError::InvalidParam(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_roundtrip_for_named_errors() {
        for e in [
            IoError::Io,
            IoError::NoSpace,
            IoError::ReadOnly,
            IoError::Invalid,
            IoError::NotSupported,
            IoError::NoMem,
            IoError::Canceled,
        ] {
            assert_eq!(IoError::from_errno(e.errno()), e, "{e:?}");
            assert_eq!(IoError::from_errno(-e.errno()), e, "{e:?}");
        }
        assert_eq!(IoError::from_errno(libc::ENOENT), IoError::Os(libc::ENOENT));
        assert_eq!(IoError::Os(libc::ENOENT).errno(), libc::ENOENT);
        assert!(IoError::NoMem.is_retryable());
        assert!(!IoError::Io.is_retryable());
        assert_eq!(IoError::Os(libc::ENOENT).to_string(), "Error 2 (No such file or directory)");
    }
}
