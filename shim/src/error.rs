//! The shim's error type and its mapping to ttrpc status codes (containerd turns those codes back
//! into errdefs: NotFound, AlreadyExists, FailedPrecondition, ...).

use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::{Code, Status};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM: {0}")]
    Vmm(String),
    #[error("agent: {0}")]
    Agent(String),
    #[error("the pod VM is gone: {0}")]
    VmGone(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::InvalidConfig(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) | Error::VmGone(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Io { .. } | Error::Vmm(_) | Error::Agent(_) | Error::Other(_) => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<Error> for containerd_shim::Error {
    fn from(e: Error) -> Self {
        containerd_shim::Error::Other(e.to_string())
    }
}

/// Builds a ttrpc status error directly (for handlers that have no shim error at hand).
pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    let s: Status = ttrpc::get_status(code, msg.into());
    ttrpc::Error::RpcStatus(s)
}
