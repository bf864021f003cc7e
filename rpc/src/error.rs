//! RPC errors: a kind for control flow, a message for people, and the two
//! exhaustive mappings to JSON-RPC codes and QMP error classes.

/// What went wrong, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes were not JSON (or too many of them).
    ParseError,
    /// JSON, but not a valid request.
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    /// A named object (node, export) does not exist.
    NotFound,
    /// No job has this id (`job-*` commands).
    NoSuchJob,
    /// No block job has this id (`block-job-*` commands; QEMU's DeviceNotActive).
    NotActive,
    /// The object to create already exists.
    Exists,
    /// The object is in use.
    Busy,
    /// A valid request that failed (I/O error, cannot open, ...).
    Failed,
    Internal,
}

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RpcError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RpcError {
        RpcError { kind, message: message.into() }
    }

    pub fn parse_error(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::ParseError, message)
    }

    pub fn invalid_request(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::InvalidRequest, message)
    }

    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(ErrorKind::MethodNotFound, format!("The command {method} has not been found"))
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::InvalidParams, message)
    }

    pub fn not_found(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::NotFound, message)
    }

    pub fn exists(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::Exists, message)
    }

    pub fn busy(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::Busy, message)
    }

    pub fn failed(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::Failed, message)
    }

    pub fn internal(message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorKind::Internal, message)
    }

    pub fn code(&self) -> i64 {
        json_rpc_code(self.kind)
    }

    pub fn class(&self) -> &'static str {
        qmp_class(self.kind)
    }
}

/// The JSON-RPC error code of a kind: the standard codes where JSON-RPC has
/// one, negative errno values (as SPDK answers) for conditions automation
/// must tell apart.
pub fn json_rpc_code(kind: ErrorKind) -> i64 {
    match kind {
        ErrorKind::ParseError => -32700,
        ErrorKind::InvalidRequest => -32600,
        ErrorKind::MethodNotFound => -32601,
        ErrorKind::InvalidParams => -32602,
        ErrorKind::Internal => -32603,
        ErrorKind::NotFound | ErrorKind::NoSuchJob | ErrorKind::NotActive => -i64::from(libc::ENODEV),
        ErrorKind::Exists => -i64::from(libc::EEXIST),
        ErrorKind::Busy => -i64::from(libc::EBUSY),
        ErrorKind::Failed => -i64::from(libc::EIO),
    }
}

/// The QMP error class of a kind (QEMU uses only a handful).
pub fn qmp_class(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::MethodNotFound => "CommandNotFound",
        ErrorKind::NotFound => "DeviceNotFound",
        ErrorKind::NotActive => "DeviceNotActive",
        ErrorKind::ParseError
        | ErrorKind::InvalidRequest
        | ErrorKind::InvalidParams
        | ErrorKind::NoSuchJob
        | ErrorKind::Exists
        | ErrorKind::Busy
        | ErrorKind::Failed
        | ErrorKind::Internal => "GenericError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_classes() {
        assert_eq!(RpcError::method_not_found("x").code(), -32601);
        assert_eq!(RpcError::method_not_found("x").class(), "CommandNotFound");
        assert_eq!(RpcError::method_not_found("x").message, "The command x has not been found");
        assert_eq!(RpcError::not_found("n").code(), -19);
        assert_eq!(RpcError::not_found("n").class(), "DeviceNotFound");
        assert_eq!(RpcError::exists("e").code(), -17);
        assert_eq!(RpcError::busy("b").code(), -16);
        assert_eq!(RpcError::failed("f").code(), -5);
        assert_eq!(RpcError::invalid_params("p").class(), "GenericError");
    }
}
