//! The pod's host cgroup: the sandbox's `linux.cgroupsPath`, where kubelet's pod cgroup
//! (`/kubepods/<qos>/pod<uid>`, holding the pod's limits) is the parent.
//!
//! A runc pod's processes live there, so the node's accounting and the pod's limits see them.
//! A kata-like pod's host processes are the shim, the VMM (whose vCPU threads run the guest and
//! whose guest RAM is its memory) and any helper the shim starts: the shim enters the cgroup
//! before it starts the VMM, so the VMM, its threads and every later child inherit it, and the
//! guest's RAM and CPU time are charged to the pod and bounded by kubelet's pod limits.
//! containerd 1.6 moves no shim anywhere (the runc shim places only the container's init,
//! through runc), so the shim moves itself, as Kata's `sandbox_cgroup_only` does.
//!
//! Path forms, as runc maps them (libcontainer's cgroupfs and systemd managers):
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` -> `/sys/fs/cgroup/kubepods/burstable/...`;
//! - systemd: `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>` -> the slice's nesting
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/` plus the
//!   scope `cri-containerd-<id>.scope`. The shim creates that directory itself in both cases
//!   (runc's cgroupfs way; it does not ask systemd over D-Bus for a transient scope, which a
//!   node without systemd could not do): on a systemd node the directory sits where systemd
//!   would have put the scope, inside kubelet's slice, but systemd does not track it as a unit.
//!
//! Like runc, the shim creates missing ancestors, enables the controllers of each parent for
//! its children, and writes only what the sandbox's own `linux.resources` asks (containerd 1.6
//! sets the sandbox's `cpu.shares` to 2); the pod-level limits are kubelet's, in the parent.
//! The cgroup is removed when the pod ends (only a cgroup this shim created, once empty):
//! the state dir records it, so every teardown path, and a `delete` after a crashed shim, go
//! through `leave_recorded`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_like_protocol::StatsContainerResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Where the host's cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Record in the pod's state dir.
const RECORD: &str = "cgroup.json";
/// Longest `linux.cgroupsPath` accepted (PATH_MAX).
const MAX_CGROUPS_PATH: usize = 4096;
/// How long the removal waits for the last process (a VMM just killed) to leave the cgroup.
const RMDIR_ATTEMPTS: u32 = 100;
const RMDIR_PAUSE: Duration = Duration::from_millis(20);

/// The sandbox's cgroup request, validated when the pod starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCgroup {
    /// `linux.cgroupsPath` as containerd wrote it.
    pub cgroups_path: String,
    /// Directory under the cgroup root, relative.
    pub relative_dir: PathBuf,
    /// cgroup v2 files and values from the sandbox's `linux.resources`.
    pub settings: Vec<(&'static str, String)>,
}

impl HostCgroup {
    /// The sandbox spec's cgroup, or None when it names none (`ctr run` without one).
    pub fn from_spec(spec: &Value) -> Result<Option<HostCgroup>> {
        let Some(path) = spec.pointer("/linux/cgroupsPath") else {
            return Ok(None);
        };
        let path = path
            .as_str()
            .ok_or_else(|| Error::InvalidArgument("linux.cgroupsPath is not a string".into()))?;
        if path.is_empty() {
            return Ok(None);
        }
        Ok(Some(HostCgroup {
            cgroups_path: path.to_string(),
            relative_dir: relative_dir(path)?,
            settings: resource_settings(spec.pointer("/linux/resources"))?,
        }))
    }
}

/// The cgroup directory (relative to the root) that runc would use for `cgroups_path`.
pub fn relative_dir(cgroups_path: &str) -> Result<PathBuf> {
    let bad = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "linux.cgroupsPath {cgroups_path:?} {why}; containerd writes it from the pod's \
             cgroup_parent: give the pod a cgroup parent like kubelet's (\"/kubepods/...\" or \
             \"kubepods-....slice\")"
        )))
    };
    if cgroups_path.len() > MAX_CGROUPS_PATH || cgroups_path.contains('\0') {
        return bad("is too long or holds a NUL byte");
    }
    let dir = if cgroups_path.starts_with('/') {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    } else {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return bad("is neither an absolute cgroupfs path nor systemd's \"slice:prefix:name\"");
        };
        if [slice, prefix, name].iter().any(|p| p.contains('/')) {
            return bad("has a '/' in a systemd slice, prefix or name");
        }
        let mut dir = match expand_slice(slice) {
            Some(dir) => dir,
            None => return bad("names a systemd slice that is not \"<a>-<b>-....slice\""),
        };
        if name.is_empty() {
            return bad("has an empty systemd unit name");
        }
        // runc's systemd manager: "<prefix>-<name>.scope", or the name itself if it is a slice.
        dir.push(if name.ends_with(".slice") {
            name.to_string()
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        });
        dir
    };
    // Checked on the text: Path::components() drops "." silently.
    let text = dir.to_string_lossy();
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return bad("has a '.' or '..' component");
    }
    if parts.is_empty() {
        return bad("names the root cgroup");
    }
    Ok(dir)
}

/// systemd's slice nesting: "a-b-c.slice" is a.slice/a-b.slice/a-b-c.slice ("-.slice" is the
/// root), as runc's `ExpandSlice`.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let name = slice.strip_suffix(".slice")?;
    if name == "-" || name.is_empty() {
        return Some(PathBuf::new());
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return None;
    }
    let mut dir = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dir.push(format!("{prefix}.slice"));
    }
    Some(dir)
}

/// The cgroup v2 settings runc's fs2 manager would write for the sandbox's `linux.resources`:
/// CPU shares -> `cpu.weight` (runc's conversion), quota/period -> `cpu.max`, memory limit ->
/// `memory.max`, pids limit -> `pids.max`. Other fields stay unset: kubelet puts the pod's
/// limits on the parent.
pub fn resource_settings(resources: Option<&Value>) -> Result<Vec<(&'static str, String)>> {
    let mut settings = Vec::new();
    let Some(resources) = resources.filter(|r| !r.is_null()) else {
        return Ok(settings);
    };
    let number = |pointer: &str| -> Result<Option<i64>> {
        match resources.pointer(pointer) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "linux.resources{} of the sandbox is not an integer: {v}",
                    pointer.replace('/', ".")
                ))
            }),
        }
    };
    let out_of_range = |what: &str, v: i64| {
        Error::InvalidArgument(format!(
            "linux.resources.{what} of the sandbox is out of range: {v}"
        ))
    };
    if let Some(shares) = number("/cpu/shares")? {
        if !(0..=262_144).contains(&shares) {
            return Err(out_of_range("cpu.shares", shares));
        }
        if shares != 0 {
            // runc's ConvertCPUSharesToCgroupV2Value: [2, 262144] -> [1, 10000].
            let shares = shares.max(2);
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            settings.push(("cpu.weight", weight.to_string()));
        }
    }
    let quota = number("/cpu/quota")?;
    let period = number("/cpu/period")?;
    if quota.is_some() || period.is_some() {
        let period = period.unwrap_or(100_000);
        if !(1_000..=1_000_000).contains(&period) {
            return Err(out_of_range("cpu.period", period));
        }
        match quota {
            Some(q) if q > 0 => {
                if q < 1_000 {
                    return Err(out_of_range("cpu.quota", q));
                }
                settings.push(("cpu.max", format!("{q} {period}")));
            }
            _ => settings.push(("cpu.max", format!("max {period}"))),
        }
    }
    if let Some(limit) = number("/memory/limit")? {
        match limit {
            -1 => settings.push(("memory.max", "max".into())),
            l if l > 0 => settings.push(("memory.max", l.to_string())),
            l => return Err(out_of_range("memory.limit", l)),
        }
    }
    if let Some(limit) = number("/pids/limit")? {
        match limit {
            l if l <= 0 => settings.push(("pids.max", "max".into())),
            l => settings.push(("pids.max", l.to_string())),
        }
    }
    Ok(settings)
}

/// What the state dir records about the pod's cgroup.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The pod's cgroup directory.
    dir: PathBuf,
    /// The shim's cgroup before it entered the pod's (where it goes back before the removal).
    origin: PathBuf,
    /// Whether this shim created it (only then is it removed).
    created: bool,
}

/// The pod's cgroup, with the shim (and so every child it starts afterwards) in it.
#[derive(Debug, Clone)]
pub struct PodCgroup {
    pub dir: PathBuf,
}

impl PodCgroup {
    /// Creates the pod's cgroup if needed (ancestors too, controllers enabled on the way),
    /// applies the sandbox's settings and moves this shim into it. Recorded in `pod_state_dir`
    /// first, so a failure half way is undone by the state dir cleanup.
    pub fn enter(root: &Path, request: &HostCgroup, pod_state_dir: &Path) -> Result<PodCgroup> {
        let dir = root.join(&request.relative_dir);
        let origin = own_cgroup(root)?;
        let created = !dir.exists();
        let record = Record {
            dir: dir.clone(),
            origin,
            created,
        };
        let record_path = pod_state_dir.join(RECORD);
        let text = serde_json::to_vec(&record)
            .map_err(|e| Error::Other(format!("encode the cgroup record: {e}")))?;
        std::fs::write(&record_path, text)
            .map_err(Error::io(format!("write {}", record_path.display())))?;
        create_with_controllers(root, &request.relative_dir)?;
        for (file, value) in &request.settings {
            let path = dir.join(file);
            std::fs::write(&path, value).map_err(|e| {
                Error::InvalidArgument(format!(
                    "the sandbox's linux.resources: writing {value:?} to {}: {e}",
                    path.display()
                ))
            })?;
        }
        let cgroup = PodCgroup { dir };
        cgroup.add_process(std::process::id())?;
        Ok(cgroup)
    }

    /// Puts a helper process of the pod (a daemon the shim started before it entered the cgroup,
    /// or one started by another parent) into the pod's cgroup. Children the shim starts after
    /// `enter` are there already.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        let procs = self.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| {
            Error::Other(format!(
                "moving process {pid} into the pod's cgroup ({}): {e}",
                procs.display()
            ))
        })
    }

    /// The cgroup's statistics (CPU, memory, pids, io): the pod's host processes.
    pub fn stats(&self) -> StatsContainerResponse {
        kata_like_protocol::cgroup_stats::read_v2_dir(&self.dir)
    }
}

/// Whether the host has a cgroup v2 hierarchy at `root` (the pod cgroup needs one).
pub fn is_cgroup2(root: &Path) -> bool {
    nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// This process's cgroup v2 directory.
fn own_cgroup(root: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(Error::io("read /proc/self/cgroup"))?;
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| {
            Error::FailedPrecondition(
                "/proc/self/cgroup has no cgroup v2 entry: the pod cgroup needs cgroup v2".into(),
            )
        })?;
    Ok(root.join(path.trim().trim_start_matches('/')))
}

/// mkdir -p of `relative` under `root`, enabling on each parent the controllers it has for its
/// children, as runc's fs2 `CreateCgroupPath` does (a controller the parent cannot delegate is
/// skipped: its files are then absent below, as with runc).
fn create_with_controllers(root: &Path, relative: &Path) -> Result<()> {
    let mut parent = root.to_path_buf();
    for component in relative.components() {
        enable_controllers(&parent);
        let dir = parent.join(component);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("create cgroup {}", dir.display()))(e)),
        }
        parent = dir;
    }
    Ok(())
}

fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in available.split_whitespace() {
        if enabled.split_whitespace().any(|c| c == controller) {
            continue;
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"))
        {
            tracing::debug!(dir = %dir.display(), controller, error = %e, "controller not enabled");
        }
    }
}

/// Undoes what `enter` recorded in `pod_state_dir`: this process leaves the pod's cgroup (back
/// to where it came from) if it is in it, and the cgroup is removed if this shim created it,
/// once its last process (the VMM, already killed) has gone.
pub fn leave_recorded(pod_state_dir: &Path) -> Result<()> {
    let record_path = pod_state_dir.join(RECORD);
    let Some(record): Option<Record> = super::read_state_record(
        &record_path,
        "cgroup record",
        "remove the pod's cgroup by hand once empty (rmdir)",
    )?
    else {
        return Ok(());
    };
    let root = Path::new(CGROUP_ROOT);
    if own_cgroup(root).ok().as_deref() == Some(record.dir.as_path()) {
        let back = PodCgroup {
            dir: record.origin.clone(),
        };
        if let Err(e) = back.add_process(std::process::id()) {
            // The origin may be gone or may have children by now: the root always takes us.
            tracing::warn!(error = %e, "returning to the shim's own cgroup failed; moving to the root");
            PodCgroup {
                dir: root.to_path_buf(),
            }
            .add_process(std::process::id())?;
        }
    }
    if record.created {
        remove_when_empty(&record.dir)?;
    }
    std::fs::remove_file(&record_path)
        .map_err(Error::io(format!("remove {}", record_path.display())))
}

fn remove_when_empty(dir: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY: a process (the VMM being killed) is still in it.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(RMDIR_PAUSE);
            }
            Err(e) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(Error::Other(format!(
                    "removing the pod's cgroup {}: {e} (processes still in it: {:?}); it is \
                     removed at the pod's next delete",
                    dir.display(),
                    procs.split_whitespace().collect::<Vec<_>>()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cgroupfs_paths_are_taken_under_the_root() {
        assert_eq!(
            relative_dir("/kubepods/burstable/pod1234/abc").expect("ok"),
            PathBuf::from("kubepods/burstable/pod1234/abc")
        );
    }

    #[test]
    fn systemd_paths_become_the_slices_nesting_and_a_scope() {
        assert_eq!(
            relative_dir("kubepods-burstable-pod12_34.slice:cri-containerd:abc").expect("ok"),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/\
                 cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_dir("-.slice:p:n").expect("root slice"),
            PathBuf::from("p-n.scope")
        );
        assert_eq!(
            relative_dir("a.slice::x.slice").expect("slice name"),
            PathBuf::from("a.slice/x.slice")
        );
    }

    #[test]
    fn hostile_cgroup_paths_are_refused_naming_the_setting() {
        for path in [
            "/",
            "/kubepods/../../etc",
            "/a/./b",
            "relative/path",
            "a.slice:b",
            "a.slice:b:c:d",
            "a--b.slice:p:n",
            "-a.slice:p:n",
            "notaslice:p:n",
            "a.slice:p/q:n",
            "a.slice:p:",
            "/a\0b",
        ] {
            let err = relative_dir(path).expect_err(path).to_string();
            assert!(err.contains("linux.cgroupsPath"), "{path}: {err}");
        }
        let long = format!("/{}", "a/".repeat(3000));
        assert!(relative_dir(&long).is_err());
    }

    #[test]
    fn the_sandboxs_resources_map_to_cgroup_v2_as_runc_maps_them() {
        let settings = resource_settings(Some(&json!({
            "cpu": {"shares": 2, "quota": 50000, "period": 100000},
            "memory": {"limit": 268435456},
            "pids": {"limit": 0}
        })))
        .expect("ok");
        assert_eq!(
            settings,
            vec![
                ("cpu.weight", "1".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("memory.max", "268435456".to_string()),
                ("pids.max", "max".to_string()),
            ]
        );
        let settings = resource_settings(Some(&json!({"cpu": {"shares": 1024}}))).expect("ok");
        assert_eq!(settings, vec![("cpu.weight", "39".to_string())]);
        assert!(resource_settings(None).expect("none").is_empty());
        assert!(resource_settings(Some(&json!({"devices": []})))
            .expect("devices only")
            .is_empty());
    }

    #[test]
    fn bad_sandbox_resources_are_refused_naming_the_field() {
        for (resources, says) in [
            (json!({"cpu": {"shares": "2"}}), "cpu.shares"),
            (json!({"cpu": {"shares": 1_000_000}}), "cpu.shares"),
            (json!({"cpu": {"quota": 10, "period": 100000}}), "cpu.quota"),
            (json!({"cpu": {"quota": 10000, "period": 5}}), "cpu.period"),
            (json!({"memory": {"limit": -5}}), "memory.limit"),
        ] {
            let err = resource_settings(Some(&resources))
                .expect_err(&resources.to_string())
                .to_string();
            assert!(err.contains(says), "{resources}: {err}");
        }
    }

    #[test]
    fn a_spec_without_cgroups_path_asks_for_no_cgroup() {
        assert_eq!(
            HostCgroup::from_spec(&json!({"linux": {}})).expect("ok"),
            None
        );
        assert_eq!(
            HostCgroup::from_spec(&json!({"linux": {"cgroupsPath": ""}})).expect("ok"),
            None
        );
        let request = HostCgroup::from_spec(&json!({"linux": {
            "cgroupsPath": "/kubepods/besteffort/podx/sb",
            "resources": {"cpu": {"shares": 2}}
        }}))
        .expect("ok")
        .expect("some");
        assert_eq!(
            request.relative_dir,
            PathBuf::from("kubepods/besteffort/podx/sb")
        );
        assert_eq!(request.settings, vec![("cpu.weight", "1".to_string())]);
        assert!(HostCgroup::from_spec(&json!({"linux": {"cgroupsPath": 7}})).is_err());
    }

    #[test]
    fn leaving_without_a_record_does_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        leave_recorded(dir.path()).expect("no record");
    }
}
