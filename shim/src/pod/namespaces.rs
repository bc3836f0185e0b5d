//! The pod's namespaces as containerd asks for them (CRI `NamespaceMode` written into the OCI
//! specs), mapped onto the pod VM.
//!
//! containerd writes host views into the specs: "join the pod's pid namespace" is the path
//! `/proc/<sandbox task pid>/ns/pid`, "join container X's" (TARGET, ephemeral debug containers)
//! is `/proc/<X's task pid>/ns/pid`, a missing entry means the node's namespace. The sandbox's
//! task pid is the VMM's and a guest container's is its guest pid, so the shim resolves the path
//! against its own table of task pids and tells the agent the mode ([`PidNamespace`]).
//!
//! What cannot be the node's inside a VM:
//! - host network (`hostNetwork: true`): refused. The pod's processes would get the VM's network,
//!   not the node's; a pod that asks for the node's network (a CNI or monitoring daemon) would
//!   silently do the wrong thing.
//! - host PID (`hostPID: true`): refused, for the same reason: the node's processes are not
//!   visible from the guest, and the guest's own (the agent) must not be.
//! - host IPC (`hostIPC: true`): a pod-wide stand-in. The pod's containers share one IPC
//!   namespace (the guest's) in every mode, so host IPC gives what a pod can use of it (System V
//!   IPC and POSIX message queues between its containers); the node's IPC objects are not reachable.

use serde_json::Value;

use crate::error::{Error, Result};

/// The pid namespace a container in the guest runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PidNamespace {
    /// A new one of its own (CRI CONTAINER; also a standalone container).
    Own,
    /// The pod's shared one, whose PID 1 is the sandbox init (CRI POD).
    Pod,
    /// The one of this container of the pod (CRI TARGET).
    Target(String),
}

/// Whose task a pid in a namespace path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOwner {
    /// The pod's sandbox (its task pid is the VMM's).
    Sandbox,
    /// A container of the pod running in the guest.
    Container(String),
}

/// The spec's namespace entry of `typ`: `None` if the spec has none (the node's namespace),
/// `Some(path)` with the path to join, if any.
fn namespace_entry(spec: &Value, typ: &str) -> Result<Option<Option<String>>> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else {
        return Ok(None);
    };
    let namespaces = namespaces
        .as_array()
        .ok_or_else(|| Error::InvalidArgument("linux.namespaces is not a list".into()))?;
    for ns in namespaces {
        if ns.get("type").and_then(Value::as_str) != Some(typ) {
            continue;
        }
        return match ns.get("path") {
            None | Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(path)) if path.is_empty() => Ok(Some(None)),
            Some(Value::String(path)) => Ok(Some(Some(path.clone()))),
            Some(other) => Err(Error::InvalidArgument(format!(
                "linux.namespaces {typ} path {other} is not a string"
            ))),
        };
    }
    Ok(None)
}

/// Refuses a pod sandbox that asks for the node's network or pid namespace (see the module
/// comment for why, and for host IPC).
pub fn check_sandbox(spec: &Value) -> Result<()> {
    if namespace_entry(spec, "network")?.is_none() {
        return Err(Error::InvalidArgument(
            "hostNetwork pods are not supported by the kata-like runtime: the pod runs in its own \
             VM and cannot share the node's network; use a runc RuntimeClass for this pod"
                .into(),
        ));
    }
    if namespace_entry(spec, "pid")?.is_none() {
        return Err(Error::InvalidArgument(
            "hostPID pods are not supported by the kata-like runtime: the pod runs in its own VM \
             and cannot see the node's processes; use a runc RuntimeClass for this pod"
                .into(),
        ));
    }
    Ok(())
}

/// The pid namespace an application container of the pod runs in. `owner` says whose task the
/// pid in a `/proc/<pid>/ns/pid` path is.
pub fn pid_namespace(
    spec: &Value,
    owner: impl Fn(u32) -> Option<TaskOwner>,
) -> Result<PidNamespace> {
    let path =
        match namespace_entry(spec, "pid")? {
            None => return Err(Error::InvalidArgument(
                "the container asks for the node's pid namespace (hostPID), which the kata-like \
                 runtime does not support"
                    .into(),
            )),
            Some(None) => return Ok(PidNamespace::Own),
            Some(Some(path)) => path,
        };
    let pid = path
        .strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/pid"))
        .and_then(|pid| pid.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "pid namespace path {path:?} is not /proc/<pid>/ns/pid"
            ))
        })?;
    match owner(pid) {
        Some(TaskOwner::Sandbox) => Ok(PidNamespace::Pod),
        Some(TaskOwner::Container(id)) => Ok(PidNamespace::Target(id)),
        None => Err(Error::InvalidArgument(format!(
            "pid namespace path {path:?} is neither the pod's nor one of its containers'"
        ))),
    }
}

/// The pod's sysctls (containerd puts `linux.sysctl` into the sandbox's spec only), applied
/// in the guest by the agent, which admits namespaced ones only.
pub fn sandbox_sysctls(spec: &Value) -> Result<std::collections::HashMap<String, String>> {
    let Some(sysctl) = spec.pointer("/linux/sysctl") else {
        return Ok(Default::default());
    };
    let sysctl = sysctl
        .as_object()
        .ok_or_else(|| Error::InvalidArgument("linux.sysctl is not an object".into()))?;
    sysctl
        .iter()
        .map(|(key, value)| {
            value
                .as_str()
                .map(|v| (key.clone(), v.to_string()))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("linux.sysctl {key:?} is not a string"))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(namespaces: Value) -> Value {
        json!({"linux": {"namespaces": namespaces}})
    }

    #[test]
    fn host_network_and_host_pid_sandboxes_are_refused_host_ipc_is_not() {
        let pod = spec(
            json!([{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid"}, {"type": "ipc"}]),
        );
        assert!(check_sandbox(&pod).is_ok());
        let host_ipc =
            spec(json!([{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid"}]));
        assert!(check_sandbox(&host_ipc).is_ok());
        let host_net = spec(json!([{"type": "pid"}, {"type": "ipc"}]));
        let e = check_sandbox(&host_net).unwrap_err().to_string();
        assert!(e.contains("hostNetwork"), "{e}");
        let host_pid = spec(json!([{"type": "network", "path": "/n"}]));
        let e = check_sandbox(&host_pid).unwrap_err().to_string();
        assert!(e.contains("hostPID"), "{e}");
        assert!(check_sandbox(&json!({"linux": {"namespaces": "x"}})).is_err());
    }

    #[test]
    fn the_pid_namespace_path_resolves_to_the_pod_or_a_target_container() {
        let owner = |pid| match pid {
            100 => Some(TaskOwner::Sandbox),
            7 => Some(TaskOwner::Container("app".into())),
            _ => None,
        };
        let with = |path: &str| spec(json!([{"type": "pid", "path": path}]));
        assert_eq!(
            pid_namespace(&with("/proc/100/ns/pid"), owner).unwrap(),
            PidNamespace::Pod
        );
        assert_eq!(
            pid_namespace(&with("/proc/7/ns/pid"), owner).unwrap(),
            PidNamespace::Target("app".into())
        );
        assert_eq!(
            pid_namespace(&spec(json!([{"type": "pid"}])), owner).unwrap(),
            PidNamespace::Own
        );
        for bad in [
            "/proc/8/ns/pid",
            "/proc/self/ns/pid",
            "/proc/7/ns/net",
            "/run/x",
        ] {
            assert!(pid_namespace(&with(bad), owner).is_err(), "{bad}");
        }
        let e = pid_namespace(&spec(json!([])), owner)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostPID"), "{e}");
    }

    #[test]
    fn sandbox_sysctls_are_read_from_the_spec() {
        let s = json!({"linux": {"sysctl": {"net.core.somaxconn": "1024"}}});
        assert_eq!(
            sandbox_sysctls(&s)
                .unwrap()
                .get("net.core.somaxconn")
                .map(String::as_str),
            Some("1024")
        );
        assert!(sandbox_sysctls(&json!({})).unwrap().is_empty());
        assert!(sandbox_sysctls(&json!({"linux": {"sysctl": {"a": 1}}})).is_err());
        assert!(sandbox_sysctls(&json!({"linux": {"sysctl": []}})).is_err());
    }
}
