//! Host volumes made visible in the guest. A host directory bind is one of three kinds
//! ([`classify_dir`]):
//! - an atomic-writer volume (configMap, secret, projected, downwardAPI): kubelet's layout and
//!   its live updates are reproduced in a guest tmpfs (`atomic_volume.rs`), because inotify in
//!   the guest never fires for changes made on the host side of a shared file system;
//! - a memory emptyDir: a guest tmpfs of the host tmpfs's size, for the pod's lifetime;
//! - anything else (hostPath, disk emptyDir, subPath binds): a directory of the pod's shared
//!   file system (virtio-fs, `vm::shared_fs`): the container sees the host's files themselves,
//!   both ways, for as long as a container of the pod binds it. A disk emptyDir is kubelet's
//!   directory on the node's disk, so it outlives container restarts and dies with the pod, as
//!   kubelet decides.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::vm::vm::Vm;

/// Storage ids of shared-file-system directories start with this (the others are tmpfs).
pub const SHARED_FS_STORAGE_PREFIX: &str = "dir-";

/// The name of the directory under which kubelet puts a pod's emptyDir volumes
/// (`<kubelet root>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`).
const EMPTY_DIR_PLUGIN_DIR: &str = "kubernetes.io~empty-dir";

/// What a host directory bind becomes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedDirKind {
    /// A directory of the pod's shared file system (virtio-fs).
    SharedFs,
    /// kubelet's AtomicWriter layout (`..data`), kept up to date.
    AtomicWriter,
    /// A memory emptyDir: a guest tmpfs with these mount options (size, mode, uid, gid), for
    /// the pod's lifetime.
    MemoryEmptyDir { tmpfs_options: Vec<String> },
}

/// Decides the kind of a host directory.
///
/// Atomic-writer volumes are recognised by their layout, not their path: kubelet's root
/// directory is configurable (`--root-dir`), but every volume its AtomicWriter writes has a
/// `..data` symlink to a `..<timestamp>` directory beside it, which no plain hostPath has.
/// A memory emptyDir needs both kubelet's plugin directory and a tmpfs (kubelet mounts one per
/// `medium: Memory` volume); a disk emptyDir (no tmpfs) and a hostPath that happens to be on a
/// tmpfs (`/run/...`) are shared.
pub fn classify_dir(dir: &Path) -> Result<SharedDirKind> {
    if super::atomic_volume::is_atomic_writer_dir(dir) {
        return Ok(SharedDirKind::AtomicWriter);
    }
    let in_empty_dir_plugin = dir
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == EMPTY_DIR_PLUGIN_DIR);
    if !in_empty_dir_plugin {
        return Ok(SharedDirKind::SharedFs);
    }
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| {
        Error::InvalidArgument(format!("statfs of emptyDir {}: {e}", dir.display()))
    })?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(SharedDirKind::SharedFs);
    }
    let meta = std::fs::metadata(dir).map_err(Error::io(format!("stat {}", dir.display())))?;
    let size_bytes = fs.blocks().saturating_mul(fs.block_size() as u64);
    Ok(SharedDirKind::MemoryEmptyDir {
        tmpfs_options: memory_empty_dir_options(size_bytes, meta.mode(), meta.uid(), meta.gid()),
    })
}

/// The guest tmpfs's options for a memory emptyDir: the host tmpfs's size limit (kubelet's
/// `sizeLimit`), mode and owner (fsGroup).
fn memory_empty_dir_options(size_bytes: u64, mode: u32, uid: u32, gid: u32) -> Vec<String> {
    vec![
        format!("size={size_bytes}"),
        format!("mode={:o}", mode & 0o7777),
        format!("uid={uid}"),
        format!("gid={gid}"),
    ]
}

/// Shares host directory `host` with the guest as `storage_id` (once per pod; later users
/// count).
pub(super) async fn attach_dir(
    vm: &Vm,
    storage_id: &str,
    host: &Path,
    read_only: bool,
) -> Result<()> {
    vm.attach_shared_dir(storage_id, host, read_only).await?;
    Ok(())
}

/// A container that bound `storage_id` is gone.
pub(super) async fn release_dir(vm: &Vm, storage_id: &str) -> Result<()> {
    vm.release_shared_dir(storage_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_directories_and_disk_empty_dirs_are_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("data");
        std::fs::create_dir(&plain).expect("mkdir");
        assert_eq!(
            classify_dir(&plain).expect("classify"),
            SharedDirKind::SharedFs
        );
        // The emptyDir plugin's directory, but not a tmpfs (tempdir is on the build's disk,
        // unless /tmp is a tmpfs: then this is a memory emptyDir, which the next test covers).
        let disk = dir.path().join(EMPTY_DIR_PLUGIN_DIR).join("cache");
        std::fs::create_dir_all(&disk).expect("mkdir");
        let on_tmpfs = nix::sys::statfs::statfs(&disk)
            .expect("statfs")
            .filesystem_type()
            == nix::sys::statfs::TMPFS_MAGIC;
        let kind = classify_dir(&disk).expect("classify");
        assert_eq!(
            matches!(kind, SharedDirKind::MemoryEmptyDir { .. }),
            on_tmpfs
        );
    }

    #[test]
    fn a_directory_with_a_data_symlink_is_an_atomic_writer_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("..2026_12_06_10_00_00.1")).expect("mkdir");
        std::os::unix::fs::symlink("..2026_12_06_10_00_00.1", dir.path().join("..data"))
            .expect("symlink");
        assert_eq!(
            classify_dir(dir.path()).expect("classify"),
            SharedDirKind::AtomicWriter
        );
    }

    #[test]
    fn memory_empty_dirs_keep_the_hosts_size_mode_and_owner() {
        assert_eq!(
            memory_empty_dir_options(8 << 20, 0o40777, 0, 2000),
            ["size=8388608", "mode=777", "uid=0", "gid=2000"]
        );
    }
}
