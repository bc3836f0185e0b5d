//! The pod-wide setup: hostname, DNS, /etc/hosts, sysctls and the shared pid namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_like_protocol::CreateSandboxRequest;

use crate::error::{invalid, Error};
use crate::reaper::{wait_exit, ExitReceiver, Reaper};
use crate::runtime::{run_helper, HelperStdio, RuntimeRequest};
use crate::validate::{check_hostname, check_id};

const MAX_FILE: usize = 64 * 1024;
const MAX_SYSCTLS: usize = 256;
/// Namespaced sysctls a pod may set (the same families Kubernetes calls "safe" or namespaced).
const SYSCTL_PREFIXES: &[&str] = &[
    "net.",
    "kernel.shm",
    "kernel.msg",
    "kernel.sem",
    "fs.mqueue.",
];

pub struct Sandbox {
    pub id: String,
    pub hostname: String,
    /// Init of the shared pid namespace (pid, exit), if the sandbox has one.
    pid_ns_holder: Option<(u32, ExitReceiver)>,
    /// Files bind-mounted into every container that does not mount the path itself.
    pub files: Vec<(PathBuf, PathBuf)>,
}

impl Sandbox {
    pub fn pid_ns_path(&self) -> Option<PathBuf> {
        self.pid_ns_holder
            .as_ref()
            .map(|(pid, _)| PathBuf::from(format!("/proc/{pid}/ns/pid")))
    }

    /// Ends the shared pid namespace, removes the sandbox's cgroups and its files in `dir`.
    pub async fn destroy(self, reaper: &Reaper, dir: &Path) {
        if let Some((pid, exit)) = self.pid_ns_holder {
            reaper.with_live_pid(pid, |live| {
                if live {
                    // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(10), wait_exit(exit)).await;
        }
        remove_sandbox_cgroups(&self.id);
        for name in ["hostname", "hosts", "resolv.conf"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        tracing::info!(sandbox_id = %self.id, "sandbox destroyed");
    }
}

/// Removes the (by now empty) parent cgroups `/kata-like/<sandbox>` the containers lived in:
/// the v2 directory, or one per v1 hierarchy on a host with v1 controllers.
fn remove_sandbox_cgroups(sandbox_id: &str) {
    let root = Path::new(crate::cgroups::CGROUP_ROOT);
    let mut candidates = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        candidates.extend(entries.flatten().map(|e| e.path()));
    }
    for hierarchy in candidates {
        let dir = hierarchy.join("kata-like").join(sandbox_id);
        if dir.is_dir() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

pub fn check_sysctl(key: &str, value: &str) -> Result<(), Error> {
    let key_ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !key.contains("..")
        && SYSCTL_PREFIXES.iter().any(|p| key.starts_with(p));
    if !key_ok {
        return Err(invalid(format!(
            "sysctl {key:?} is not a namespaced sysctl ({})",
            SYSCTL_PREFIXES.join(", ")
        )));
    }
    if value.len() > 256 || value.contains(['\n', '\0']) {
        return Err(invalid(format!("sysctl {key} has an invalid value")));
    }
    Ok(())
}

fn default_hosts(hostname: &str) -> String {
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    hosts
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), Error> {
    std::fs::write(path, data)
        .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))
}

/// What creating a sandbox needs from the agent.
pub struct SandboxEnv<'a> {
    pub reaper: &'a Reaper,
    /// The agent's state directory (the runtime helper's working directory).
    pub state_dir: &'a Path,
    /// Where the sandbox's hostname, hosts and resolv.conf files are written.
    pub dir: &'a Path,
    /// Whether the guest-wide hostname, /etc files and sysctls are the pod's to change.
    pub guest: bool,
}

/// Checks a CreateSandbox request before anything is changed.
pub fn validate(req: &CreateSandboxRequest) -> Result<(), Error> {
    check_id("sandbox id", &req.sandbox_id)?;
    if !req.hostname.is_empty() {
        check_hostname(&req.hostname)?;
    }
    if req.resolv_conf.len() > MAX_FILE || req.hosts.len() > MAX_FILE {
        return Err(Error::resource_exhausted("resolv_conf/hosts above 64 KiB"));
    }
    if req.sysctls.len() > MAX_SYSCTLS {
        return Err(invalid("too many sysctls"));
    }
    for (key, value) in &req.sysctls {
        check_sysctl(key, value)?;
    }
    Ok(())
}

impl Sandbox {
    /// Sets the pod up as a validated (see [`validate`]) request asks: its files, in the guest
    /// the hostname, /etc files and sysctls, and the shared pid namespace.
    pub async fn create(req: &CreateSandboxRequest, env: &SandboxEnv<'_>) -> Result<Self, Error> {
        let dir = env.dir;
        let hosts = if req.hosts.is_empty() {
            default_hosts(&req.hostname).into_bytes()
        } else {
            req.hosts.clone()
        };
        write_file(&dir.join("hosts"), &hosts)?;
        write_file(
            &dir.join("hostname"),
            format!("{}\n", req.hostname).as_bytes(),
        )?;
        let mut files = vec![
            (PathBuf::from("/etc/hosts"), dir.join("hosts")),
            (PathBuf::from("/etc/hostname"), dir.join("hostname")),
        ];
        if !req.resolv_conf.is_empty() {
            write_file(&dir.join("resolv.conf"), &req.resolv_conf)?;
            files.push((PathBuf::from("/etc/resolv.conf"), dir.join("resolv.conf")));
        }
        if env.guest {
            // The guest is the pod: its own hostname, files and namespaced sysctls are the pod's.
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname)
                    .map_err(|e| Error::internal(format!("sethostname: {e}")))?;
            }
            let _ = std::fs::create_dir_all("/etc");
            write_file(Path::new("/etc/hosts"), &hosts)?;
            if !req.resolv_conf.is_empty() {
                write_file(Path::new("/etc/resolv.conf"), &req.resolv_conf)?;
            }
            for (key, value) in &req.sysctls {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value)
                    .map_err(|e| invalid(format!("sysctl {key}={value}: {e}")))?;
            }
        } else if !req.sysctls.is_empty() {
            tracing::info!(sandbox_id = %req.sandbox_id, count = req.sysctls.len(), "host mode: sysctls validated, not applied to the host");
        }
        let pid_ns_holder = if req.shared_pid_namespace {
            let response = run_helper(
                env.reaper,
                env.state_dir,
                &RuntimeRequest::PidNamespace,
                HelperStdio::null(),
            )
            .await
            .map_err(Error::internal)?;
            match (response.pid, response.error) {
                (Some(pid), None) => Some((pid, env.reaper.claim(pid))),
                (_, error) => {
                    return Err(Error::internal(format!(
                        "creating the shared pid namespace: {}",
                        error.unwrap_or_default()
                    )))
                }
            }
        } else {
            None
        };
        tracing::info!(sandbox_id = %req.sandbox_id, shared_pid_namespace = req.shared_pid_namespace, "sandbox created");
        Ok(Sandbox {
            id: req.sandbox_id.clone(),
            hostname: req.hostname.clone(),
            pid_ns_holder,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaced_sysctls_pass() {
        assert!(check_sysctl("net.ipv4.ip_forward", "1").is_ok());
        assert!(check_sysctl("kernel.shmmax", "1000").is_ok());
        for bad in [
            "kernel.panic",
            "vm.overcommit_memory",
            "net/../../x",
            "net.a\0",
            "",
        ] {
            assert!(check_sysctl(bad, "1").is_err(), "{bad}");
        }
        assert!(check_sysctl("net.core.somaxconn", "1\n2").is_err());
    }
}
