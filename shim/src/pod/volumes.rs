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
use std::path::{Path, PathBuf};

use super::spec::SharedDir;
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

/// A regular file found under a walked directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    pub path: PathBuf,
    /// Its path relative to the walked directory (UTF-8, `/`-separated).
    pub relative: String,
}

/// The regular files under `root`, at most `max_files` of them and `max_bytes` in all. A
/// symlink fails the walk, naming it: a volume payload kubelet wrote has none.
pub fn walk_files(root: &Path, max_files: usize, max_bytes: u64) -> Result<Vec<HostFile>> {
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut files = Vec::new();
    let mut bytes = 0u64;
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("read {}", dir.display())))?;
            let path = entry.path();
            let meta = entry
                .metadata()
                .map_err(Error::io(format!("stat {}", path.display())))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            if ft.is_symlink() {
                let target = std::fs::read_link(&path).unwrap_or_default();
                return Err(Error::InvalidArgument(format!(
                    "{} is a symlink (to {}); a volume's payload may hold only files and \
                     directories, nothing that points elsewhere",
                    path.display(),
                    target.display()
                )));
            }
            if !ft.is_file() {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .ok()
                .and_then(Path::to_str)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{} is not a UTF-8 path", path.display()))
                })?
                .to_string();
            bytes = bytes.saturating_add(meta.len());
            files.push(HostFile { path, relative });
            if files.len() > max_files || bytes > max_bytes {
                return Err(Error::InvalidArgument(format!(
                    "host directory {} is too big to copy into the pod VM \
                     (more than {max_files} files or {max_bytes} bytes)",
                    root.display()
                )));
            }
        }
    }
    Ok(files)
}

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

    #[test]
    fn walks_list_relative_paths_and_refuse_symlinks_and_excess() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("a"), "1").expect("write");
        std::fs::write(dir.path().join("sub/b"), "22").expect("write");
        let mut files = walk_files(dir.path(), 10, 100).expect("walk");
        files.sort_by(|a, b| a.relative.cmp(&b.relative));
        let names: Vec<&str> = files.iter().map(|f| f.relative.as_str()).collect();
        assert_eq!(names, ["a", "sub/b"]);
        let err = walk_files(dir.path(), 10, 2).unwrap_err().to_string();
        assert!(err.contains("too big"), "{err}");
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).expect("symlink");
        let err = walk_files(dir.path(), 10, 100).unwrap_err().to_string();
        assert!(err.contains("link") && err.contains("/etc"), "{err}");
    }
}
