//! Host volumes made visible in the guest. A host directory bind (hostPath, disk emptyDir)
//! is a directory of the pod's shared file system (virtio-fs, `vm::shared_fs`): the container
//! sees the host's files themselves, both ways, for as long as a container of the pod binds it.
//! A disk emptyDir is kubelet's directory on the node's disk, so it outlives container
//! restarts and dies with the pod, as kubelet decides.

use super::spec::SharedDir;
use crate::error::Result;
use crate::vm::vm::Vm;

/// Shares `dir` with the guest (once per pod; later users count).
pub(super) async fn attach_dir(vm: &Vm, dir: &SharedDir) -> Result<()> {
    vm.attach_shared_dir(&dir.storage_id, &dir.host, dir.read_only)
        .await?;
    Ok(())
}

/// A container that bound `storage_id` is gone.
pub(super) async fn release_dir(vm: &Vm, storage_id: &str) -> Result<()> {
    vm.release_shared_dir(storage_id).await
}
