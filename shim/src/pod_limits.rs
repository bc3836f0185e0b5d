//! The pod's resource limits as containerd passes them to the sandbox: since 1.6 the CRI plugin
//! writes the kubelet's `PodSandboxConfig.linux.resources` (the sum of the pod's container
//! limits) into the sandbox spec as annotations (pkg/cri/server/sandbox_run_linux.go). A VM
//! runtime sizes the VM from them; runc ignores them (its cgroups do the job).
//!
//! These annotations come from containerd, not from the pod's own annotations (containerd
//! overwrites any pod annotation of the same name), so they need no operator consent.

use std::collections::HashMap;

use crate::error::{Error, Result};

pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The CFS period the kernel uses when none is given (100 ms).
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1024 * 1024;

/// What the pod's limits ask of its VM; `None` where the pod sets no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLimits {
    /// The pod's memory limit, rounded up to whole MiB.
    pub memory_mib: Option<u64>,
    /// The pod's CPU limit (quota / period), rounded up to whole vCPUs.
    pub vcpus: Option<u64>,
}

/// One integer annotation; absent or empty is `None`.
fn integer(annotations: &HashMap<String, String>, key: &str) -> Result<Option<i64>> {
    match annotations.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(value) => value.parse::<i64>().map(Some).map_err(|_| {
            Error::InvalidArgument(format!(
                "annotation {key}: {value:?} is not an integer (containerd writes the pod's \
                 summed resource limits there)"
            ))
        }),
    }
}

/// Reads the pod's limits from the sandbox's annotations. CPU shares only weigh the pod against
/// others on the host; they do not size the VM (and are checked only for being a number).
pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<PodLimits> {
    let memory = integer(annotations, SANDBOX_MEMORY)?;
    let quota = integer(annotations, SANDBOX_CPU_QUOTA)?;
    let period = integer(annotations, SANDBOX_CPU_PERIOD)?;
    let shares = integer(annotations, SANDBOX_CPU_SHARES)?;
    for (key, value) in [
        (SANDBOX_MEMORY, memory),
        (SANDBOX_CPU_PERIOD, period),
        (SANDBOX_CPU_SHARES, shares),
    ] {
        if value.is_some_and(|v| v < 0) {
            return Err(Error::InvalidArgument(format!(
                "annotation {key}: {} is negative",
                value.unwrap_or_default()
            )));
        }
    }
    // Quota -1 (or 0) is "no limit", as in cgroups.
    if quota.is_some_and(|q| q < -1) {
        return Err(Error::InvalidArgument(format!(
            "annotation {SANDBOX_CPU_QUOTA}: {} is below -1",
            quota.unwrap_or_default()
        )));
    }
    let memory_mib = memory
        .filter(|&bytes| bytes > 0)
        .map(|bytes| (bytes as u64).div_ceil(MIB));
    let vcpus = quota.filter(|&q| q > 0).map(|q| {
        let period = period
            .filter(|&p| p > 0)
            .map_or(DEFAULT_CPU_PERIOD_US, |p| p as u64);
        (q as u64).div_ceil(period)
    });
    Ok(PodLimits { memory_mib, vcpus })
}

/// Refuses a container whose own memory limit (`linux.resources.memory.limit` of its spec) is
/// more than the pod's VM has. The VM is sized once, from the pod's limits at RunPodSandbox (a
/// pod's containers are known then and kubelet sums their limits), and does not grow: a container
/// asking for more can only come from a pod without limits or a client bypassing kubelet, and
/// failing it at once with the numbers beats an OOM kill of the whole guest later.
pub fn check_container_fits(spec: &serde_json::Value, vm_memory_mib: u32) -> Result<()> {
    let Some(limit) = spec.pointer("/linux/resources/memory/limit") else {
        return Ok(());
    };
    let limit = limit.as_i64().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "linux.resources.memory.limit {limit} is not an integer"
        ))
    })?;
    if limit > 0 && (limit as u64).div_ceil(MIB) > u64::from(vm_memory_mib) {
        return Err(Error::InvalidArgument(format!(
            "the container's memory limit ({} MiB) is more than its pod VM has ({vm_memory_mib} \
             MiB): the VM is sized from the pod's limits when the pod starts ({SANDBOX_MEMORY}); \
             give the pod's containers their limits from the start",
            (limit as u64).div_ceil(MIB)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_round_up_to_whole_mib_and_vcpus() {
        let limits = from_annotations(&annotations(&[
            (SANDBOX_MEMORY, "1073741824"),
            (SANDBOX_CPU_QUOTA, "250000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_CPU_SHARES, "1024"),
        ]))
        .unwrap();
        assert_eq!(
            limits,
            PodLimits {
                memory_mib: Some(1024),
                vcpus: Some(3)
            }
        );
        let odd = from_annotations(&annotations(&[
            (SANDBOX_MEMORY, "1048577"),
            (SANDBOX_CPU_QUOTA, "50000"),
        ]))
        .unwrap();
        assert_eq!(odd.memory_mib, Some(2), "a byte over 1 MiB is 2 MiB");
        assert_eq!(odd.vcpus, Some(1), "half a CPU over the default period");
    }

    #[test]
    fn no_limit_is_none() {
        assert_eq!(
            from_annotations(&HashMap::new()).unwrap(),
            PodLimits::default()
        );
        let unlimited = from_annotations(&annotations(&[
            (SANDBOX_MEMORY, "0"),
            (SANDBOX_CPU_QUOTA, "-1"),
            (SANDBOX_CPU_PERIOD, "0"),
            (SANDBOX_CPU_SHARES, "2"),
        ]))
        .unwrap();
        assert_eq!(unlimited, PodLimits::default());
    }

    #[test]
    fn a_container_must_fit_its_pod_vm() {
        let spec = |limit: serde_json::Value| serde_json::json!({"linux": {"resources": {"memory": {"limit": limit}}}});
        assert!(check_container_fits(&spec(serde_json::json!(512 << 20)), 1120).is_ok());
        assert!(check_container_fits(&spec(serde_json::json!(-1)), 128).is_ok());
        assert!(check_container_fits(&serde_json::json!({}), 128).is_ok());
        let err = check_container_fits(&spec(serde_json::json!(2u64 << 30)), 1120)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2048 MiB") && err.contains("1120 MiB"),
            "{err}"
        );
        assert!(check_container_fits(&spec(serde_json::json!("1Gi")), 1120).is_err());
    }

    #[test]
    fn malformed_values_name_the_annotation() {
        for (key, value) in [
            (SANDBOX_MEMORY, "1Gi"),
            (SANDBOX_MEMORY, "-5"),
            (SANDBOX_CPU_QUOTA, "-2"),
            (SANDBOX_CPU_PERIOD, "x"),
            (SANDBOX_CPU_SHARES, "-1"),
            (SANDBOX_MEMORY, "99999999999999999999999"),
        ] {
            let err = from_annotations(&annotations(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }
}
