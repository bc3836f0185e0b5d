//! cgroup v2 statistics, OOM events and the cgroup operations that do not fork (freeze, update,
//! list pids) for containers. libcgroups' managers do the writes; statistics are read straight
//! from the v2 files so they map 1:1 onto the protocol's fields.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kata_like_protocol::{
    CpuStats, HugetlbStats, IoDeviceStats, MemoryStats, OomEvent, PidsStats, StatsContainerResponse,
};
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
        let cpu_stat = read_flat_keyed(&dir.join("cpu.stat"));
        let cpu = CpuStats {
            usage_usec: key(&cpu_stat, "usage_usec"),
            user_usec: key(&cpu_stat, "user_usec"),
            system_usec: key(&cpu_stat, "system_usec"),
            nr_periods: key(&cpu_stat, "nr_periods"),
            nr_throttled: key(&cpu_stat, "nr_throttled"),
            throttled_usec: key(&cpu_stat, "throttled_usec"),
        };
        let stat = read_flat_keyed(&dir.join("memory.stat"));
        let events = read_flat_keyed(&dir.join("memory.events"));
        let memory = MemoryStats {
            usage: read_value(&dir.join("memory.current")),
            usage_limit: read_value(&dir.join("memory.max")),
            swap_usage: read_value(&dir.join("memory.swap.current")),
            swap_limit: read_value(&dir.join("memory.swap.max")),
            anon: key(&stat, "anon"),
            file: key(&stat, "file"),
            kernel_stack: key(&stat, "kernel_stack"),
            slab: key(&stat, "slab"),
            sock: key(&stat, "sock"),
            shmem: key(&stat, "shmem"),
            file_mapped: key(&stat, "file_mapped"),
            file_dirty: key(&stat, "file_dirty"),
            file_writeback: key(&stat, "file_writeback"),
            active_anon: key(&stat, "active_anon"),
            inactive_anon: key(&stat, "inactive_anon"),
            active_file: key(&stat, "active_file"),
            inactive_file: key(&stat, "inactive_file"),
            unevictable: key(&stat, "unevictable"),
            pgfault: key(&stat, "pgfault"),
            pgmajfault: key(&stat, "pgmajfault"),
            workingset_refault_anon: key(&stat, "workingset_refault_anon"),
            workingset_refault_file: key(&stat, "workingset_refault_file"),
            oom: key(&events, "oom"),
            oom_kill: key(&events, "oom_kill"),
            max_events: key(&events, "max"),
            high_events: key(&events, "high"),
            low_events: key(&events, "low"),
        };
        let pids_max = read_value(&dir.join("pids.max"));
        let pids = PidsStats {
            current: read_value(&dir.join("pids.current")),
            limit: if pids_max == u64::MAX { 0 } else { pids_max },
        };
        let io = std::fs::read_to_string(dir.join("io.stat"))
            .map(|text| parse_io_stat(&text))
            .unwrap_or_default();
        let hugetlb = hugetlb_stats(&dir);
        Ok(StatsContainerResponse {
            cpu: Some(cpu),
            memory: Some(memory),
            pids: Some(pids),
            io,
            hugetlb,
            timestamp_unix_nanos: unix_nanos(SystemTime::now()),
        })
    }
}

fn key(map: &HashMap<String, u64>, name: &str) -> u64 {
    map.get(name).copied().unwrap_or(0)
}

/// "key value" lines (cpu.stat, memory.stat, memory.events).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn read_flat_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default()
}

/// A single-value file; "max" is u64::MAX, missing files are 0.
pub fn parse_value(text: &str) -> u64 {
    let text = text.trim();
    if text == "max" {
        u64::MAX
    } else {
        text.parse().unwrap_or(0)
    }
}

fn read_value(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| parse_value(&t))
        .unwrap_or(0)
}

/// io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ..." per device.
pub fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut stats = IoDeviceStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for field in fields {
                let Some((k, v)) = field.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => stats.rbytes = v,
                    "wbytes" => stats.wbytes = v,
                    "rios" => stats.rios = v,
                    "wios" => stats.wios = v,
                    _ => {}
                }
            }
            Some(stats)
        })
        .collect()
}

fn hugetlb_stats(dir: &Path) -> Vec<HugetlbStats> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut stats = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(size) = name
            .strip_prefix("hugetlb.")
            .and_then(|rest| rest.strip_suffix(".current"))
        else {
            continue;
        };
        let events = read_flat_keyed(&dir.join(format!("hugetlb.{size}.events")));
        stats.push(HugetlbStats {
            pagesize: size.to_string(),
            current: read_value(&entry.path()),
            max: read_value(&dir.join(format!("hugetlb.{size}.max"))),
            failcnt: key(&events, "max"),
        });
    }
    stats.sort_by(|a, b| a.pagesize.cmp(&b.pagesize));
    stats
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
        let mut seen = key(&read_flat_keyed(&file), "oom_kill");
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
            let now = key(&read_flat_keyed(&file), "oom_kill");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_files_are_parsed() {
        let map = parse_flat_keyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\n");
        assert_eq!(map["usage_usec"], 10);
        assert_eq!(parse_value("max\n"), u64::MAX);
        assert_eq!(parse_value("1234\n"), 1234);
        let io = parse_io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(io.len(), 1);
        assert_eq!(
            (io[0].major, io[0].minor, io[0].rbytes, io[0].wios),
            (254, 0, 4096, 2)
        );
    }
}
