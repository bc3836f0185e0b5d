//! The pod's VM: the VMM process and its API client, and the guest agent's client.

pub mod agent_client;
pub mod console_log;
pub mod network;
pub mod shared_fs;
pub mod storage;
// The file is named for what it holds (the pod VM), as vmm_client.rs and agent_client.rs are.
#[allow(clippy::module_inception)]
pub mod vm;
pub mod vmm_client;
