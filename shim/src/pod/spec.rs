//! The OCI bundle: reading and checking config.json, the CRI annotations that group containers
//! into pods, and the rewrite of a host spec into one the guest agent can run.
//!
//! What changes for the guest, and why:
//! - host bind mounts cannot reach the guest: regular files (/etc/hosts, resolv.conf, hostname,
//!   termination-log) are copied into the guest; directories become a guest tmpfs shared by every
//!   container of the pod that mounts the same host directory: filled with a copy of the
//!   directory's files, or kept up to date for kubelet's atomic-writer volumes, or empty for a
//!   memory emptyDir (volumes.rs decides); the sandbox's /dev/shm becomes a tmpfs. Binds of /dev nodes stay.
//! - hooks (host binaries), AppArmor and SELinux labels refer to the host and are removed.
//! - `cgroup` mounts become `cgroup2` (the guest has only cgroup v2).
//!
//! Namespace paths and `cgroupsPath` are left to the agent, which maps "join the pod's
//! namespace" onto the VM's own (the VM is the pod) and owns the guest's cgroup tree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::volumes::{classify_dir, SharedDirKind, SHARED_FS_STORAGE_PREFIX};
use crate::error::{Error, Result};
use crate::vm::storage::storage_mount_point;

pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Largest config.json / process spec accepted.
pub const MAX_SPEC_BYTES: u64 = 4 * 1024 * 1024;
/// Guest directory where copied host files land.
pub const GUEST_SHARED_DIR: &str = "/run/kata-like/shared";
/// At most this many bind mounts per container.
const MAX_MOUNTS: usize = 256;

/// What kind of container this is, from the CRI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The pod's pause container: the VM itself stands in for it.
    Sandbox,
    /// An application container of the pod `sandbox_id`.
    App { sandbox_id: String },
    /// No CRI annotations (e.g. `ctr run`): a container with a VM of its own.
    Standalone,
}

/// A parsed bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    pub spec: Value,
    pub annotations: HashMap<String, String>,
}

impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle> {
        if !path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "bundle path {path:?} must be absolute"
            )));
        }
        let config = path.join("config.json");
        let meta = std::fs::metadata(&config)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", config.display())))?;
        if meta.len() > MAX_SPEC_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{} is larger than {MAX_SPEC_BYTES} bytes",
                config.display()
            )));
        }
        let text =
            std::fs::read(&config).map_err(Error::io(format!("read {}", config.display())))?;
        Bundle::from_json(path, &text)
    }

    pub fn from_json(path: &Path, text: &[u8]) -> Result<Bundle> {
        let spec: Value = serde_json::from_slice(text)
            .map_err(|e| Error::InvalidArgument(format!("config.json is not valid JSON: {e}")))?;
        if !spec.is_object() {
            return Err(Error::InvalidArgument(
                "config.json is not a JSON object".into(),
            ));
        }
        let mut annotations = HashMap::new();
        if let Some(map) = spec.get("annotations").and_then(Value::as_object) {
            for (k, v) in map {
                let v = v.as_str().ok_or_else(|| {
                    Error::InvalidArgument(format!("annotation {k:?} is not a string"))
                })?;
                annotations.insert(k.clone(), v.to_string());
            }
        }
        Ok(Bundle {
            path: path.to_path_buf(),
            spec,
            annotations,
        })
    }

    pub fn role(&self) -> Result<Role> {
        match self
            .annotations
            .get(CONTAINER_TYPE_ANNOTATION)
            .map(String::as_str)
        {
            Some("sandbox") => Ok(Role::Sandbox),
            Some("container") => {
                let id = self.annotations.get(SANDBOX_ID_ANNOTATION).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "container has {CONTAINER_TYPE_ANNOTATION}=container but no \
                         {SANDBOX_ID_ANNOTATION}"
                    ))
                })?;
                if !kata_like_protocol::is_valid_id(id) {
                    return Err(Error::InvalidArgument(format!(
                        "{SANDBOX_ID_ANNOTATION} {id:?} is not a valid id"
                    )));
                }
                Ok(Role::App {
                    sandbox_id: id.clone(),
                })
            }
            Some(other) => Err(Error::InvalidArgument(format!(
                "{CONTAINER_TYPE_ANNOTATION}={other:?} is neither sandbox nor container"
            ))),
            None => Ok(Role::Standalone),
        }
    }

    /// The pod's log directory as containerd passes it from CRI (kubelet's
    /// `/var/log/pods/<ns>_<name>_<uid>`), unchecked: `console_log::create_kept` validates it.
    pub fn pod_log_dir(&self) -> Option<PathBuf> {
        self.annotations
            .get(crate::vm::console_log::SANDBOX_LOG_DIRECTORY_ANNOTATION)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
    }

    pub fn hostname(&self) -> String {
        self.spec
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    pub fn terminal(&self) -> bool {
        self.spec
            .pointer("/process/terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// The grouping key of a container: the id of the shim (and VM) that serves it.
pub fn grouping_id(container_id: &str, bundle: &Bundle) -> Result<String> {
    Ok(match bundle.role()? {
        Role::App { sandbox_id } => sandbox_id,
        Role::Sandbox | Role::Standalone => container_id.to_string(),
    })
}

/// A host file the guest needs, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    pub host: PathBuf,
    pub guest: String,
}

/// A host directory the guest sees through the pod's shared file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    /// Storage id (same for every container binding the same host directory the same way).
    pub storage_id: String,
    pub host: PathBuf,
    /// How the guest gets it and how long it lives (see `volumes::classify_dir`).
    pub kind: SharedDirKind,
    /// Bound read-only: the host side is read-only too, so the guest cannot write it even
    /// through the shared file system's root.
    pub read_only: bool,
}

/// The rewritten spec plus what must be put in the guest before the container is created.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub spec: Value,
    pub files: Vec<FileCopy>,
    pub dirs: Vec<SharedDir>,
}

fn short_hash(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites a host OCI spec for the guest (see the module comment).
pub fn guest_spec(spec: &Value) -> Result<GuestSpec> {
    let mut spec = spec.clone();
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("spec is not an object".into()))?;
    obj.remove("hooks");
    if let Some(process) = obj.get_mut("process").and_then(Value::as_object_mut) {
        strip_host_security_labels(process);
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        linux.remove("mountLabel");
    }

    let mut files = Vec::new();
    let mut dirs: Vec<SharedDir> = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        if mounts.len() > MAX_MOUNTS {
            return Err(Error::InvalidArgument(format!(
                "{} mounts; at most {MAX_MOUNTS} are supported",
                mounts.len()
            )));
        }
        for m in mounts.iter_mut() {
            rewrite_mount(m, &mut files, &mut dirs)?;
        }
    }
    Ok(GuestSpec { spec, files, dirs })
}

fn strip_host_security_labels(process: &mut Map<String, Value>) {
    process.remove("apparmorProfile");
    process.remove("selinuxLabel");
}

fn rewrite_mount(
    m: &mut Value,
    files: &mut Vec<FileCopy>,
    dirs: &mut Vec<SharedDir>,
) -> Result<()> {
    let destination = m
        .get("destination")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidArgument("mount without destination".into()))?
        .to_string();
    if !destination.starts_with('/') || destination.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "mount destination {destination:?} must be absolute without \"..\""
        )));
    }
    let options: Vec<String> = m
        .get("options")
        .and_then(Value::as_array)
        .map(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if m.get("type").and_then(Value::as_str) == Some("cgroup") {
        // The guest is pure cgroup v2 (runc does the same translation on v2 hosts).
        m["type"] = Value::from("cgroup2");
        m["source"] = Value::from("cgroup2");
        return Ok(());
    }
    let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
        || options.iter().any(|o| o == "bind" || o == "rbind");
    if !is_bind {
        return Ok(());
    }
    let source = m
        .get("source")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidArgument(format!("bind mount {destination} has no source")))?
        .to_string();
    let source_path = Path::new(&source);
    if !source_path.is_absolute() || source.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "bind mount source {source:?} must be absolute without \"..\""
        )));
    }
    // The pod's /dev/shm (the sandbox's, or the node's /dev/shm itself for a hostIPC pod, whose
    // stand-in is the pod's own IPC namespace: see namespaces.rs) is a tmpfs of the guest.
    if destination == "/dev/shm" {
        *m = json!({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        });
        return Ok(());
    }
    if source.starts_with("/dev/") {
        // Device nodes exist in the guest too.
        return Ok(());
    }
    let read_only = options.iter().any(|o| o == "ro");
    let meta = std::fs::metadata(source_path)
        .map_err(|e| Error::InvalidArgument(format!("bind mount source {source}: {e}")))?;
    let guest_source = if meta.is_file() {
        let guest = format!("{GUEST_SHARED_DIR}/files/{}", short_hash(&source));
        files.push(FileCopy {
            host: source_path.to_path_buf(),
            guest: guest.clone(),
        });
        guest
    } else if meta.is_dir() {
        let kind = classify_dir(source_path)?;
        let storage_id = match kind {
            SharedDirKind::SharedFs => {
                let access = if read_only { "ro" } else { "rw" };
                format!("{SHARED_FS_STORAGE_PREFIX}{}-{access}", short_hash(&source))
            }
            SharedDirKind::AtomicWriter => format!("vol-{}", short_hash(&source)),
            SharedDirKind::MemoryEmptyDir { .. } => format!("emptydir-{}", short_hash(&source)),
        };
        let guest = storage_mount_point(&storage_id);
        if !dirs.iter().any(|d| d.storage_id == storage_id) {
            dirs.push(SharedDir {
                storage_id,
                host: source_path.to_path_buf(),
                kind,
                read_only,
            });
        }
        guest
    } else {
        return Err(Error::InvalidArgument(format!(
            "bind mount source {source} is neither a file nor a directory"
        )));
    };
    let mut opts = vec![Value::from("rbind")];
    if read_only {
        opts.push(Value::from("ro"));
    }
    *m = json!({
        "destination": destination,
        "type": "bind",
        "source": guest_source,
        "options": opts,
    });
    Ok(())
}

/// Checks an exec's process spec (JSON from containerd's Any) and strips host-only labels.
pub fn guest_process(json: &[u8]) -> Result<Vec<u8>> {
    if json.len() as u64 > MAX_SPEC_BYTES {
        return Err(Error::InvalidArgument(format!(
            "process spec larger than {MAX_SPEC_BYTES} bytes"
        )));
    }
    let mut process: Value = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("process spec is not valid JSON: {e}")))?;
    let obj = process
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("process spec is not a JSON object".into()))?;
    match obj.get("args").and_then(Value::as_array) {
        Some(args) if !args.is_empty() => {}
        _ => {
            return Err(Error::InvalidArgument(
                "process spec has no args".to_string(),
            ))
        }
    }
    strip_host_security_labels(obj);
    serde_json::to_vec(&process).map_err(|e| Error::Other(format!("encode process spec: {e}")))
}

/// Checks a resources update (JSON of the OCI LinuxResources).
pub fn guest_resources(json: &[u8]) -> Result<Vec<u8>> {
    if json.len() > 1024 * 1024 {
        return Err(Error::InvalidArgument("resources larger than 1 MiB".into()));
    }
    let value: Value = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("resources are not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::InvalidArgument(
            "resources are not a JSON object".into(),
        ));
    }
    Ok(json.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::check_id;

    fn bundle(spec: Value) -> Bundle {
        Bundle::from_json(Path::new("/b"), spec.to_string().as_bytes()).expect("bundle")
    }

    #[test]
    fn cri_annotations_group_containers_into_pods() {
        let sandbox = bundle(json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1"}}));
        assert_eq!(sandbox.role().expect("role"), Role::Sandbox);
        assert_eq!(grouping_id("pod1", &sandbox).expect("group"), "pod1");
        let app = bundle(json!({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"}}));
        assert_eq!(grouping_id("c1", &app).expect("group"), "pod1");
        let plain = bundle(json!({"process": {"args": ["sh"]}}));
        assert_eq!(plain.role().expect("role"), Role::Standalone);
        assert_eq!(grouping_id("c2", &plain).expect("group"), "c2");
    }

    #[test]
    fn hostile_bundles_are_refused() {
        let bad_sandbox = bundle(json!({"annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "../../etc"}}));
        assert!(bad_sandbox.role().is_err());
        let no_sandbox = bundle(json!({"annotations": {
            "io.kubernetes.cri.container-type": "container"}}));
        assert!(no_sandbox.role().is_err());
        assert!(Bundle::from_json(Path::new("/b"), b"[1,2]").is_err());
        assert!(Bundle::from_json(Path::new("/b"), b"{not json").is_err());
        assert!(Bundle::from_json(Path::new("/b"), br#"{"annotations":{"a":1}}"#).is_err());
        assert!(Bundle::load(Path::new("relative")).is_err());
        assert!(check_id("container", "../x").is_err());
        assert!(check_id("container", &"a".repeat(300)).is_err());
        assert!(check_id("exec", "0123abcdef").is_ok());
    }

    #[test]
    fn host_specific_parts_are_rewritten_for_the_guest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("write");
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).expect("mkdir");
        let spec = json!({
            "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d"},
            "hooks": {"prestart": [{"path": "/usr/bin/evil"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind"]},
                {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["rbind"]},
            ],
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/proc/42/ns/net"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "mount"}
                ]
            }
        });
        let g = guest_spec(&spec).expect("rewrite");
        assert!(g.spec.get("hooks").is_none());
        assert!(g.spec.pointer("/process/apparmorProfile").is_none());
        // Namespaces and cgroupsPath are the agent's business: passed through unchanged.
        assert_eq!(g.spec.get("linux"), spec.get("linux"));
        let mounts = g
            .spec
            .get("mounts")
            .and_then(Value::as_array)
            .expect("mounts");
        assert_eq!(
            mounts[0],
            json!({"destination": "/proc", "type": "proc", "source": "proc"})
        );
        assert_eq!(
            mounts[1],
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup2", "options": ["ro"]})
        );
        let mounts = &mounts[1..];
        assert_eq!(g.files.len(), 1);
        assert_eq!(g.files[0].host, hosts);
        assert_eq!(mounts[1]["source"], json!(g.files[0].guest));
        assert!(g.files[0].guest.starts_with("/run/kata-like/shared/files/"));
        assert_eq!(g.dirs.len(), 1);
        assert_eq!(
            mounts[2]["source"],
            json!(storage_mount_point(&g.dirs[0].storage_id))
        );
        assert_eq!(mounts[2]["options"], json!(["rbind", "ro"]));
        assert_eq!(mounts[3]["type"], json!("tmpfs"));
        assert_eq!(mounts[4]["source"], json!("/dev/fuse"));
    }

    #[test]
    fn hostile_mounts_are_refused() {
        for (m, expect) in [
            (
                json!({"destination": "rel", "type": "bind", "source": "/etc/hosts"}),
                "absolute",
            ),
            (
                json!({"destination": "/a/../b", "type": "tmpfs", "source": "x"}),
                "absolute",
            ),
            (
                json!({"destination": "/a", "type": "bind", "source": "/etc/../etc/shadow"}),
                "absolute",
            ),
            (
                json!({"destination": "/a", "type": "bind", "source": "/nonexistent/x"}),
                "nonexistent",
            ),
            (json!({"type": "tmpfs"}), "destination"),
        ] {
            let err = guest_spec(&json!({"mounts": [m]})).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn exec_process_specs_are_checked() {
        let p = guest_process(br#"{"args":["ls"],"selinuxLabel":"x","cwd":"/"}"#).expect("ok");
        let v: Value = serde_json::from_slice(&p).expect("json");
        assert!(v.get("selinuxLabel").is_none());
        assert_eq!(v["cwd"], json!("/"));
        assert!(guest_process(br#"{"args":[]}"#).is_err());
        assert!(guest_process(b"[]").is_err());
        assert!(guest_resources(br#"{"memory":{"limit":1}}"#).is_ok());
        assert!(guest_resources(b"nope").is_err());
    }
}
