//! The pod's shared file system on the host: one virtiofsd per pod VM serving
//! `<state_dir>/shared/`, a directory that holds nothing but bind mounts of the pod's host
//! volumes (hostPath, disk emptyDir), one per volume, as Kata's
//! /run/kata-containers/shared/sandboxes/<id>/ does. The VMM's vhost-user-fs device (tag
//! `SHARED_FS_TAG`) connects to virtiofsd's socket; the agent mounts the tag once and binds
//! each volume's directory.
//!
//! Confinement: virtiofsd runs in its own sandbox (`--sandbox namespace`: new mount, pid and
//! net namespaces, pivoted into the shared directory, so a symlink in a volume that points
//! outside it resolves inside the sandbox, never on the host), with its seccomp filter
//! (`--seccomp kill`). `shared/` is a shared mount on itself, so binds added after virtiofsd
//! started propagate into its (slave) mount namespace.
//!
//! Coherence: `--cache never`. The guest caches neither data nor attributes, so what the host
//! writes to a volume is what the guest reads next, and the reverse, at the cost of a round
//! trip per operation (README's benchmark table). `auto` would let the guest keep stale
//! attributes and pages for up to a second.
//!
//! Every mount made here is undone on every path: `remove_dir` per volume, `cleanup` for the
//! whole pod (also for a state dir an earlier shim left), before the state dir is removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{Error, Result};

/// The virtio-fs tag of the pod's shared file system (the agent's `SHARED_FS_TAG`).
pub const SHARED_FS_TAG: &str = "kata-like-shared";
/// How long virtiofsd may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a pod's shared file system lives in its state dir.
#[derive(Debug, Clone)]
pub struct SharedFsPaths {
    /// The directory virtiofsd serves: only bind mounts of the pod's volumes.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

impl SharedFsPaths {
    pub fn new(state_dir: &Path) -> Self {
        SharedFsPaths {
            dir: state_dir.join("shared"),
            socket: state_dir.join("virtiofsd.sock"),
            pid_file: state_dir.join("virtiofsd.pid"),
            log: state_dir.join("virtiofsd.log"),
        }
    }
}

/// A running virtiofsd for one pod.
#[derive(Debug)]
pub struct SharedFs {
    pub paths: SharedFsPaths,
    sandbox_id: String,
    pid: u32,
    /// Set before we kill it: its end is then expected.
    stopping: Arc<AtomicBool>,
    exited: watch::Receiver<bool>,
}

/// The virtiofsd command line for `paths`.
pub fn virtiofsd_args(paths: &SharedFsPaths) -> Vec<String> {
    vec![
        format!("--socket-path={}", paths.socket.display()),
        format!("--shared-dir={}", paths.dir.display()),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        "--cache=never".into(),
        // Each volume is a mount of its own under the shared dir: the guest must see them as
        // distinct file systems (inode numbers are per file system).
        "--announce-submounts".into(),
        "--log-level=info".into(),
    ]
}

impl SharedFs {
    /// Prepares `<state_dir>/shared/` and starts virtiofsd on it; returns once it listens.
    pub async fn start(config: &Config, state_dir: &Path, sandbox_id: &str) -> Result<SharedFs> {
        if !config.virtiofsd.exists() {
            return Err(Error::InvalidConfig(format!(
                "virtiofsd {} does not exist: install it (tests/install-deps does) and set \
                 `virtiofsd` in the kata-like config to its path",
                config.virtiofsd.display()
            )));
        }
        let paths = SharedFsPaths::new(state_dir);
        std::fs::create_dir_all(&paths.dir)
            .map_err(Error::io(format!("create {}", paths.dir.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("chmod {}", paths.dir.display())))?;
        // A shared mount of its own: binds added later reach virtiofsd's mount namespace.
        mount(
            Some(&paths.dir),
            &paths.dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| Error::Other(format!("bind {} on itself: {e}", paths.dir.display())))?;
        mount(
            None::<&str>,
            &paths.dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| Error::Other(format!("make {} shared: {e}", paths.dir.display())))?;
        let log = std::fs::File::create(&paths.log)
            .map_err(Error::io(format!("create {}", paths.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io("duplicate the virtiofsd log fd"))?;
        let mut command = tokio::process::Command::new(&config.virtiofsd);
        command
            .args(virtiofsd_args(&paths))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no shared state.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(Error::io(format!(
            "start virtiofsd {}",
            config.virtiofsd.display()
        )))?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(&paths.pid_file, pid.to_string())
            .map_err(Error::io(format!("write {}", paths.pid_file.display())))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (exit_tx, exited) = watch::channel(false);
        let (sid, expected) = (sandbox_id.to_string(), stopping.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            if !expected.load(Ordering::SeqCst) {
                tracing::error!(
                    sandbox_id = %sid,
                    status = ?status,
                    "virtiofsd (the pod's shared file system) exited: file operations on the \
                     pod's hostPath and emptyDir volumes now fail; the pod VM goes on"
                );
            }
            let _ = exit_tx.send(true);
        });
        let fs = SharedFs {
            paths,
            sandbox_id: sandbox_id.to_string(),
            pid,
            stopping,
            exited,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !fs.paths.socket.exists() {
            if *fs.exited.borrow() || tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&fs.paths.log).unwrap_or_default();
                fs.stop().await;
                return Err(Error::Other(format!(
                    "virtiofsd did not start listening on {}: {}",
                    fs.paths.socket.display(),
                    log.trim()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(sandbox_id, pid, "virtiofsd is up");
        Ok(fs)
    }

    /// Binds host directory `host` as `<shared>/<name>` (read-only when `read_only`).
    pub fn add_dir(&self, name: &str, host: &Path, read_only: bool) -> Result<()> {
        let target = self.paths.dir.join(name);
        std::fs::create_dir(&target).map_err(Error::io(format!("create {}", target.display())))?;
        let bind = mount(
            Some(host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        );
        let bind = bind.and_then(|()| {
            if !read_only {
                return Ok(());
            }
            let remounted = mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            if remounted.is_err() {
                let _ = umount2(&target, MntFlags::MNT_DETACH);
            }
            remounted
        });
        if let Err(e) = bind {
            let _ = std::fs::remove_dir(&target);
            return Err(Error::InvalidArgument(format!(
                "sharing host directory {} with the pod VM: {e}",
                host.display()
            )));
        }
        tracing::debug!(sandbox_id = %self.sandbox_id, name, host = %host.display(), read_only, "volume shared");
        Ok(())
    }

    /// Undoes `add_dir`.
    pub fn remove_dir(&self, name: &str) -> Result<()> {
        let target = self.paths.dir.join(name);
        unmount_and_remove(&target)
    }

    /// Kills virtiofsd and waits (bounded) until it is reaped.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if !*self.exited.borrow() && self.pid != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let mut exited = self.exited.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
    }
}

fn unmount_and_remove(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::Other(format!("unmount {}: {e}", target.display())));
        }
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", target.display()))(e)),
    }
}

/// Mount points at or under `dir`, deepest first (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Kills a virtiofsd an earlier shim left in `state_dir` and unmounts everything under its
/// shared dir. Must run before the state dir is removed: removing it with a volume still bound
/// there would delete the volume's files on the host.
pub fn cleanup(state_dir: &Path) -> Result<()> {
    let paths = SharedFsPaths::new(state_dir);
    let marker = format!("--socket-path={}", paths.socket.display());
    if let Some(pid) = super::pid_file::kill_recorded_pid(&paths.pid_file, &marker)? {
        tracing::warn!(pid, state_dir = %state_dir.display(), "killed a virtiofsd left behind");
    }
    // Twice: the shared dir is mounted on itself, and unmounting it may reveal nothing more.
    for _ in 0..2 {
        for target in mounts_under(&paths.dir) {
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                    return Err(Error::Other(format!(
                        "unmount {}: {e} (the state dir is kept so that no volume's files are removed)",
                        target.display()
                    )));
                }
            }
        }
    }
    if !mounts_under(&paths.dir).is_empty() {
        return Err(Error::Other(format!(
            "{} still has mounts: the state dir is kept so that no volume's files are removed",
            paths.dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_is_sandboxed_with_seccomp_and_no_guest_cache() {
        let args = virtiofsd_args(&SharedFsPaths::new(Path::new("/run/kl/abc")));
        assert!(args.contains(&"--shared-dir=/run/kl/abc/shared".to_string()));
        assert!(args.contains(&"--socket-path=/run/kl/abc/virtiofsd.sock".to_string()));
        assert!(args.contains(&"--sandbox=namespace".to_string()));
        assert!(args.contains(&"--seccomp=kill".to_string()));
        assert!(args.contains(&"--cache=never".to_string()));
    }

    #[test]
    fn cleanup_of_a_state_dir_without_shared_fs_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        cleanup(dir.path()).expect("cleanup");
        assert!(mounts_under(&dir.path().join("shared")).is_empty());
    }
}
