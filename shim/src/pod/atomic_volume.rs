//! Atomic-writer volumes (configMap, secret, projected, downwardAPI) in the pod VM, with
//! kubelet's exact layout and its live updates.
//!
//! On the node kubelet's AtomicWriter keeps the payload in a `..<timestamp>` directory, points
//! `..data` at it and gives every key a `key -> ..data/key` symlink; an update writes a new
//! timestamped directory and renames a `..data_tmp` symlink over `..data`. A shared file system
//! (virtio-fs) would show the files, but inotify in the guest never fires for changes made on
//! the host (FUSE has no remote notifications), and applications reload on those events. So
//! the guest gets a tmpfs of its own: the shim copies the current generation into it and the
//! agent performs the same swap there (PublishVolumeGeneration), which a watcher in the
//! container sees as on a node. One task per volume watches the host directory with inotify
//! and pushes each new generation as soon as `..data` moves; it stops with the volume.
//!
//! Trust: the host directory is the pod's own, but a payload that holds a symlink, or a
//! top-level symlink other than kubelet's, could name anything of the host: it is refused
//! (CreateContainer fails naming it; a later bad generation is logged and the guest keeps the
//! last good one).

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::vm::vm::Vm;

const DATA_DIR: &str = "..data";
/// One generation's files and bytes, at most: a configMap or secret holds at most 1 MiB, a
/// projected volume a few of them; these leave ample room and bound what a volume costs the VM.
const MAX_GENERATION_FILES: usize = 16_384;
const MAX_GENERATION_BYTES: u64 = 64 * 1024 * 1024;
/// A host swap racing the copy makes the copy start over, at most this many times in a row.
const MAX_SYNC_ATTEMPTS: usize = 5;

/// Whether `dir` has kubelet's AtomicWriter layout: a `..data` symlink naming a `..<ts>`
/// directory beside it.
pub fn is_atomic_writer_dir(dir: &Path) -> bool {
    current_generation(dir).is_ok_and(|generation| {
        std::fs::symlink_metadata(dir.join(generation)).is_ok_and(|m| m.is_dir())
    })
}

/// The name `..data` points to, checked to be one `..`-prefixed component of the volume.
fn current_generation(dir: &Path) -> Result<String> {
    let link = dir.join(DATA_DIR);
    let target =
        std::fs::read_link(&link).map_err(Error::io(format!("readlink {}", link.display())))?;
    let name = target.to_str().unwrap_or("");
    let valid = name.starts_with("..")
        && name.len() > 2
        && name != DATA_DIR
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "{} points to {}: an atomic-writer volume's ..data names a \"..<timestamp>\" \
             directory inside the volume",
            link.display(),
            target.display()
        )));
    }
    Ok(name.to_string())
}

/// One generation of a host volume: its name and files.
#[derive(Debug)]
pub struct Generation {
    pub name: String,
    pub files: Vec<HostFile>,
}

/// Reads the host volume's current generation and checks the volume: the payload holds only
/// files and directories, and every top-level symlink is kubelet's (`..data`, `key ->
/// ..data/key`).
pub fn read_generation(dir: &Path) -> Result<Generation> {
    let name = current_generation(dir)?;
    for entry in std::fs::read_dir(dir).map_err(Error::io(format!("read {}", dir.display())))? {
        let entry = entry.map_err(Error::io(format!("read {}", dir.display())))?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let key = entry.file_name();
        let key = key.to_string_lossy();
        if key == DATA_DIR || target == Path::new(DATA_DIR).join(&*key) {
            continue;
        }
        return Err(Error::InvalidArgument(format!(
            "{} is a symlink to {}; in an atomic-writer volume only ..data and key -> \
             ..data/key symlinks are allowed (nothing outside the volume is copied)",
            entry.path().display(),
            target.display()
        )));
    }
    let files = walk_files(&dir.join(&name), MAX_GENERATION_FILES, MAX_GENERATION_BYTES)?;
    Ok(Generation { name, files })
}

/// Copies the host volume's current generation into the guest storage and publishes it,
/// unless `published` already is the current one; returns the generation now published.
/// A host swap during the copy (kubelet removes the old generation right after its swap)
/// makes it start over with the newer one.
async fn sync(
    vm: &Vm,
    host: &Path,
    storage_id: &str,
    mount_point: &str,
    published: Option<&str>,
) -> Result<String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let generation = read_generation(host)?;
        if published == Some(generation.name.as_str()) {
            return Ok(generation.name);
        }
        let copied = copy_generation(vm, &generation, mount_point).await;
        let moved_on = current_generation(host).ok().as_deref() != Some(generation.name.as_str());
        match copied {
            Ok(()) if !moved_on => {
                vm.agent
                    .publish_volume_generation(storage_id, &generation.name)
                    .await?;
                tracing::info!(sandbox_id = %vm.sandbox_id, storage_id, volume = %host.display(), generation = %generation.name, files = generation.files.len(), "volume generation published");
                return Ok(generation.name);
            }
            Err(e) if !moved_on || attempt >= MAX_SYNC_ATTEMPTS => return Err(e),
            _ if attempt >= MAX_SYNC_ATTEMPTS => {
                return Err(Error::Other(format!(
                    "volume {} changed {MAX_SYNC_ATTEMPTS} times while it was being copied",
                    host.display()
                )))
            }
            _ => {}
        }
    }
}

async fn copy_generation(vm: &Vm, generation: &Generation, mount_point: &str) -> Result<()> {
    for file in &generation.files {
        let guest = format!("{mount_point}/{}/{}", generation.name, file.relative);
        vm.copy_file(&file.path, &guest).await?;
    }
    Ok(())
}

/// The inotify instance, on tokio's reactor (nix's `Inotify` offers only `AsFd`).
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A volume kept up to date; dropping it stops its watcher.
pub struct WatchedVolume {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchedVolume {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Fills the fresh guest storage `storage_id` (at `mount_point`) with the host volume's
/// current generation and starts following its updates. The watch starts before the first
/// copy, so that no swap is missed in between.
pub async fn attach(
    vm: Arc<Vm>,
    host: PathBuf,
    storage_id: String,
    mount_point: String,
) -> Result<WatchedVolume> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| Error::Other(format!("inotify_init: {e}")))?;
    inotify
        .add_watch(
            &host,
            AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_ONLYDIR,
        )
        .map_err(|e| Error::InvalidArgument(format!("watching volume {}: {e}", host.display())))?;
    let interest = tokio::io::Interest::READABLE;
    // SAFETY: InotifyFd owns the inotify fd: it stays open and the same for the AsyncFd's
    // whole life, and as_raw_fd always returns it.
    let inotify = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), interest) }
        .map_err(|e| e.into_parts().1)
        .map_err(Error::io(format!("watching volume {}", host.display())))?;
    let published = sync(&vm, &host, &storage_id, &mount_point, None).await?;
    let task = tokio::spawn(follow(
        vm,
        host,
        storage_id,
        mount_point,
        inotify,
        published,
    ));
    Ok(WatchedVolume { task })
}

/// What the host's inotify events mean for the volume.
#[derive(Debug, PartialEq, Eq)]
enum HostChange {
    Nothing,
    /// `..data` was (re)placed: a new generation may be current.
    DataSwapped,
    /// The volume's directory is gone (the pod's volumes are being torn down).
    VolumeGone,
}

fn host_change(events: &[nix::sys::inotify::InotifyEvent]) -> HostChange {
    let mut change = HostChange::Nothing;
    for event in events {
        let gone =
            AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED;
        if event.mask.intersects(gone) {
            return HostChange::VolumeGone;
        }
        if event.name.as_deref().is_some_and(|n| n == DATA_DIR) {
            change = HostChange::DataSwapped;
        }
    }
    change
}

async fn follow(
    vm: Arc<Vm>,
    host: PathBuf,
    storage_id: String,
    mount_point: String,
    inotify: AsyncFd<InotifyFd>,
    mut published: String,
) {
    loop {
        let events = match inotify.readable().await {
            Ok(mut ready) => match ready.get_inner().0.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %vm.sandbox_id, storage_id, error = %e, "reading the volume's inotify events failed: updates stop");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(sandbox_id = %vm.sandbox_id, storage_id, error = %e, "waiting for the volume's inotify events failed: updates stop");
                return;
            }
        };
        match host_change(&events) {
            HostChange::Nothing => continue,
            HostChange::VolumeGone => {
                tracing::info!(sandbox_id = %vm.sandbox_id, storage_id, volume = %host.display(), "the host volume is gone: the guest keeps its last generation");
                return;
            }
            HostChange::DataSwapped => {}
        }
        if vm.exit().is_some() {
            return;
        }
        match sync(&vm, &host, &storage_id, &mount_point, Some(&published)).await {
            Ok(generation) => published = generation,
            Err(error) => {
                tracing::warn!(sandbox_id = %vm.sandbox_id, storage_id, volume = %host.display(), %error, "a volume update was not applied: the guest keeps generation {published}");
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Writes a generation as kubelet's AtomicWriter does (files, then the swap).
    fn kubelet_write(dir: &Path, generation: &str, files: &[(&str, &str)]) {
        for (key, text) in files {
            let path = dir.join(generation).join(key);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(generation, &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join(DATA_DIR)).expect("rename");
        for (key, _) in files {
            let top = key.split('/').next().expect("key");
            let link = dir.join(top);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{top}"), link).expect("symlink");
            }
        }
    }

    #[test]
    fn the_current_generation_is_read_with_nested_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        kubelet_write(dir.path(), "..g1", &[("a", "1"), ("conf/b", "2")]);
        kubelet_write(dir.path(), "..g2", &[("a", "new"), ("conf/b", "2")]);
        let generation = read_generation(dir.path()).expect("read");
        assert_eq!(generation.name, "..g2");
        let mut files: Vec<&str> = generation
            .files
            .iter()
            .map(|f| f.relative.as_str())
            .collect();
        files.sort();
        assert_eq!(files, ["a", "conf/b"]);
        assert!(generation
            .files
            .iter()
            .all(|f| f.path.starts_with(dir.path().join("..g2"))));
    }

    #[test]
    fn symlinks_out_of_the_volume_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        kubelet_write(dir.path(), "..g1", &[("a", "1")]);
        std::os::unix::fs::symlink("/etc/shadow", dir.path().join("shadow")).expect("symlink");
        let err = read_generation(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("shadow") && err.contains("/etc/shadow"),
            "{err}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        kubelet_write(dir.path(), "..g1", &[("a", "1")]);
        std::os::unix::fs::symlink("/etc", dir.path().join("..g1/etc")).expect("symlink");
        let err = read_generation(dir.path()).unwrap_err().to_string();
        assert!(err.contains("symlink") && err.contains("/etc"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc", dir.path().join(DATA_DIR)).expect("symlink");
        assert!(!is_atomic_writer_dir(dir.path()));
        let err = read_generation(dir.path()).unwrap_err().to_string();
        assert!(err.contains("inside the volume"), "{err}");
    }

    #[test]
    fn a_plain_directory_is_not_an_atomic_writer_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), "1").expect("write");
        assert!(!is_atomic_writer_dir(dir.path()));
        // ..data naming a generation that does not exist.
        std::os::unix::fs::symlink("..g1", dir.path().join(DATA_DIR)).expect("symlink");
        assert!(!is_atomic_writer_dir(dir.path()));
    }

    #[test]
    fn only_a_moved_data_symlink_or_a_vanished_volume_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
        inotify
            .add_watch(
                dir.path(),
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_DELETE_SELF,
            )
            .expect("watch");
        std::fs::create_dir(dir.path().join("..g1")).expect("mkdir");
        assert_eq!(
            host_change(&inotify.read_events().expect("events")),
            HostChange::Nothing
        );
        kubelet_write(dir.path(), "..g1", &[]);
        assert_eq!(
            host_change(&inotify.read_events().expect("events")),
            HostChange::DataSwapped
        );
        std::fs::remove_file(dir.path().join(DATA_DIR)).expect("rm");
        std::fs::remove_dir(dir.path().join("..g1")).expect("rmdir");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert_eq!(
            host_change(&inotify.read_events().expect("events")),
            HostChange::VolumeGone
        );
    }
}
