//! The agent's domain error: what went wrong, in words for the shim's user, and which kind of
//! failure it is. Only the RPC layer (`rpc.rs`) turns it into a gRPC status, so the domain
//! modules do not depend on the transport.

/// Which kind of failure an [`Error`] is. Each maps to one gRPC code at the RPC boundary; the
/// shim tells them apart (e.g. NotFound on a process that already went away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a bad id, path, spec or value): fix the request.
    InvalidArgument,
    /// The container, process, storage or interface named does not exist (any more).
    NotFound,
    /// What the request would create exists already.
    AlreadyExists,
    /// The request is valid but not in the current state (no sandbox yet, container not running).
    FailedPrecondition,
    /// The request is above a size limit.
    ResourceExhausted,
    /// The guest failed to do what was asked (a syscall, the runtime, the cgroup).
    Internal,
}

/// One constructor per kind, named like tonic's (`Error::not_found(..)` reads as the status it
/// becomes); a macro because the six differ only in the kind.
macro_rules! constructors {
    ($($name:ident => $kind:ident,)*) => {
        $(
            pub fn $name(message: impl Into<String>) -> Self {
                Self::new(ErrorKind::$kind, message)
            }
        )*
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    constructors! {
        invalid_argument => InvalidArgument,
        not_found => NotFound,
        already_exists => AlreadyExists,
        failed_precondition => FailedPrecondition,
        resource_exhausted => ResourceExhausted,
        internal => Internal,
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Shorthand for the most common error: the request is invalid.
pub fn invalid(message: impl Into<String>) -> Error {
    Error::invalid_argument(message)
}
