//! cgroup v2 statistics, OOM events and the cgroup operations that do not fork (freeze, update,
//! list pids) for containers. libcgroups' managers do the writes; statistics are read straight
//! from the v2 files so they map 1:1 onto the protocol's fields.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kata_like_protocol::cgroup_stats::parse_flat_keyed;
use kata_like_protocol::{OomEvent, StatsContainerResponse};
use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
    FreezerState,
};
use oci_spec::runtime::LinuxResources;
use tokio::sync::broadcast;

use crate::error::Error;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

pub fn unix_nanos(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Whether /sys/fs/cgroup is a pure cgroup v2 hierarchy (always so in the guest).
pub fn is_unified() -> bool {
    nix::sys::statfs::statfs(CGROUP_ROOT)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The cgroup of one container; `path` is relative to the hierarchy root ("/kata-like/...").
#[derive(Clone, Debug)]
pub struct ContainerCgroup {
    pub path: PathBuf,
    pub name: String,
}

impl ContainerCgroup {
    fn manager(&self) -> Result<AnyCgroupManager, Error> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.name.clone(),
        })
        .map_err(|e| Error::internal(format!("cgroup manager: {e}")))
    }

    /// The v2 directory of this cgroup.
    pub fn v2_dir(&self) -> PathBuf {
        Path::new(CGROUP_ROOT).join(self.path.strip_prefix("/").unwrap_or(&self.path))
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), Error> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager()?
            .freeze(state)
            .map_err(|e| Error::internal(format!("cgroup freezer: {e}")))
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), Error> {
        let manager = self.manager()?;
        // On cgroup v2 libcgroups raises RLIMIT_MEMLOCK to 128 MiB before it loads the device
        // filter; here that is the agent's own limit, which every process it starts later would
        // inherit: put it back.
        let mut memlock = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass.
        let saved = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut memlock) } == 0;
        let result = manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| Error::internal(format!("applying resources: {e}")));
        if saved {
            // SAFETY: setrlimit reads the rlimit we pass; lowering a limit is always allowed.
            unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &memlock) };
        }
        result
    }

    pub fn pids(&self) -> Result<Vec<u32>, Error> {
        let pids = self
            .manager()?
            .get_all_pids()
            .map_err(|e| Error::internal(format!("listing cgroup pids: {e}")))?;
        Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
    }

    /// Statistics from the cgroup v2 files.
    pub fn stats(&self) -> Result<StatsContainerResponse, Error> {
        if !is_unified() {
            return Err(Error::failed_precondition(
                "container statistics need a cgroup v2 hierarchy at /sys/fs/cgroup",
            ));
        }
        let dir = self.v2_dir();
        if !dir.is_dir() {
            return Err(Error::not_found("the container's cgroup is gone"));
        }
        Ok(kata_like_protocol::cgroup_stats::read_v2_dir(&dir))
    }
}

/// Watches memory.events of a container's cgroup and publishes one [`OomEvent`] per OOM kill.
/// Ends when the cgroup goes away or the task is aborted. Without cgroup v2 it does nothing.
pub fn watch_oom(
    cgroup: &ContainerCgroup,
    container_id: String,
    events: broadcast::Sender<OomEvent>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !is_unified() {
        return None;
    }
    let file = cgroup.v2_dir().join("memory.events");
    let fd = inotify_on(&file).ok()?;
    Some(tokio::spawn(async move {
        let mut seen = oom_kills(&file);
        let mut buf = [0u8; 4096];
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            // The events themselves do not matter: any of them means "look at the file again".
            match guard.try_io(|inner| {
                nix::unistd::read(inner.get_ref().as_raw_fd(), &mut buf)
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
            if !file.exists() {
                // The cgroup was removed.
                return;
            }
            let now = oom_kills(&file);
            while seen < now {
                seen += 1;
                tracing::info!(container_id, "oom kill");
                let _ = events.send(OomEvent {
                    container_id: container_id.clone(),
                    at_unix_nanos: unix_nanos(SystemTime::now()),
                });
            }
        }
    }))
}

fn inotify_on(file: &Path) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: inotify_init1 returns a new fd or -1.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a new fd that we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let path =
        std::ffi::CString::new(file.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: path is a valid C string; fd is our inotify instance.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    crate::fd::register(fd)
}

fn oom_kills(memory_events: &Path) -> u64 {
    let events = std::fs::read_to_string(memory_events).unwrap_or_default();
    parse_flat_keyed(&events)
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}
