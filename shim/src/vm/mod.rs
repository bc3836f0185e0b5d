//! The pod's VM: the VMM process and its API client, and the guest agent's client.

pub mod agent_client;
pub mod cgroup;
pub mod console_log;
pub mod network;
pub mod pid_file;
pub mod shared_fs;
pub mod storage;
// The file is named for what it holds (the pod VM), as vmm_client.rs and agent_client.rs are.
#[allow(clippy::module_inception)]
pub mod vm;
pub mod vmm_client;
pub mod vmm_ids;

/// Reads a JSON record the pod's state dir keeps of something to undo (`network.json`,
/// `cgroup.json`): None when there is none; `fix` tells the operator what to do with a record
/// that cannot be read.
pub(crate) fn read_state_record<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
    fix: &str,
) -> crate::error::Result<Option<T>> {
    use crate::error::Error;
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", path.display()))(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::Other(format!("{} is not a {what} ({e}); {fix}", path.display())))
}
