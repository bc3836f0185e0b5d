//! containerd-shim-kata-like-v2: containerd's runtime-v2 shim of kata-like. One shim process
//! and one jailed microVM per pod; the pod's containers run in the VM through the guest agent.
//!
//! Read top-down: `task` translates containerd's task API, `pod` holds the pod model, `vm` owns
//! the pod's VM (the VMM process, its API client and the agent client).

pub mod config;
pub mod error;
pub mod ids;
pub mod logging;
pub mod pod;
pub mod pod_limits;
pub mod shim;
pub mod task;
pub mod vm;
