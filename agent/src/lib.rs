//! kata-like's guest agent: PID 1 in the pod VM, serving the shim over gRPC and running the OCI
//! lifecycle with youki's libcontainer.
//!
//! Layout (by concern), from the top down (a module only imports modules below it):
//! - `server` (listening), `rpc` (the gRPC service: requests to domain calls, [`error::Error`]
//!   to `tonic::Status`; the only modules that know tonic);
//! - `agent` (the agent's state and the operations that span sandbox, containers and storages);
//! - `sandbox`, `container/` (the container table and lifecycle, spec validation), `storage`,
//!   `network` (rtnetlink), `files` (CopyFile), `atomic_volume` (kubelet's volume layout), `port_forward` (PortForward's guest end);
//! - `process/` (processes and their stdio), `cgroups` (stats, OOM, freeze), `runtime`
//!   (libcontainer helper; `exec_confinement` gives its execs the container's confinement), `reaper` (child exits), `init` (PID 1 duties);
//! - `validate` (ids, hostnames, guest paths), `fd` (fds on the tokio reactor) and `error` (the
//!   domain error type), used by all.

pub mod agent;
pub mod atomic_volume;
pub mod cgroups;
pub mod container;
pub mod error;
pub mod exec_confinement;
pub mod fd;
pub mod files;
pub mod init;
pub mod network;
pub mod port_forward;
pub mod process;
pub mod reaper;
pub mod rpc;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod storage;
pub mod validate;
