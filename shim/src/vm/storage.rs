//! What the pod hands its VM to make visible in the guest: layer images for drive slots, and
//! where the agent mounts a storage. Defined here, below the pod model, so that the VM layer
//! never imports the pod model that drives it.

/// A built image, opened read-only (the fd is what the VMM gets).
#[derive(Debug)]
pub struct LayerImage {
    /// Stable name of the layer: the guest storage id, shared by every container of the pod
    /// that uses the same layer.
    pub storage_id: String,
    pub file: std::fs::File,
    pub cached: bool,
}

/// Guest mount point of a storage (the agent's rule: /run/kata-like/storage/<id>).
pub fn storage_mount_point(storage_id: &str) -> String {
    format!("/run/kata-like/storage/{storage_id}")
}
