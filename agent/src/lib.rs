//! kata-like's guest agent: PID 1 in the pod VM, serving the shim over gRPC and running the OCI
//! lifecycle with youki's libcontainer.
//!
//! Layout (by concern): `init` (PID 1 duties), `reaper` (child exits), `server`/`rpc` (gRPC),
//! `agent` (state), `sandbox`, `storage`, `container/` (lifecycle, spec validation),
//! `process/` (stdio), `runtime` (libcontainer helper), `cgroups` (stats, OOM, freeze),
//! `network` (rtnetlink), `files` (CopyFile).

pub mod agent;
pub mod cgroups;
pub mod container;
pub mod files;
pub mod init;
pub mod network;
pub mod process;
pub mod reaper;
pub mod rpc;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod storage;
