//! containerd-shim-kata-like-v2: containerd's runtime-v2 shim of kata-like. One shim process
//! and one jailed microVM per pod; the pod's containers run in the VM through the guest agent.

pub mod agent;
pub mod config;
pub mod error;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod shim;
pub mod spec;
pub mod stdio;
pub mod vmm;
