//! An exec'd process gets exactly its container's confinement (issue 12 item 2).
//!
//! libcontainer 0.7 runs an exec as a "tenant": `TenantContainerBuilder::adapt_spec_for_tenant`
//! rebuilds the spec's `linux` from namespaces, cgroupsPath, personality and timeOffsets only,
//! so the container's seccomp filter (and with it the agent's AF_VSOCK wall) is lost, and the
//! exec ran unfiltered. Everything else of the confinement already holds: capabilities, user
//! and groups, no_new_privs, rlimits and apparmor come from the exec's process JSON (containerd
//! copies the container's process), the cgroup from cgroupsPath, the namespaces are joined from
//! the init's, and the masked and read-only paths are mounts of the joined mount namespace.
//!
//! Two ways to put the filter back were weighed:
//! - a vendored copy of libcontainer with `linux.seccomp` kept in `adapt_spec_for_tenant`: a
//!   three-line change, but a fork of a large crate to carry and re-apply on every upgrade, and
//!   it would also have to solve the seccomp-notify fd hand-over for tenants;
//! - this wrap of public API: libcontainer's `Executor` (the last step of its init, run right
//!   before execve) installs the container's own filter (read from the bundle's config.json,
//!   which the agent wrote) and drops the capabilities. It is what was chosen.
//!
//! The executor runs after libcontainer's capability drop, and without no_new_privs installing
//! a filter needs CAP_SYS_ADMIN. So libcontainer gets the process without `capabilities` (it
//! then keeps the helper's full set), and the executor applies the process's five sets itself,
//! in runc's order (`setns_init_linux.go`): without no_new_privs the filter first (while
//! CAP_SYS_ADMIN is still held), then the capability drop, which the filter must let through
//! (capset, prctl), exactly as for the container's init; with no_new_privs the capability drop
//! first, then the filter, as close to execve as possible.
//!
//! A seccomp notify profile is refused for exec: the init hands its listener fd to a seccomp
//! agent through libcontainer's main process, a channel an executor does not have.

use std::collections::HashMap;

use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::{LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction, Process, Spec};

/// One step of confining the exec'd process before it executes its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Load the container's seccomp filter.
    InstallFilter,
    /// Set the bounding, effective, permitted, inheritable and ambient sets to the process's.
    DropCapabilities,
}

/// What the executor applies to an exec'd process: the container's filter and the process's
/// capabilities, which libcontainer's tenant path would lose or apply too early.
#[derive(Debug, Clone)]
pub struct ExecConfinement {
    seccomp: Option<LinuxSeccomp>,
    capabilities: Option<LinuxCapabilities>,
    no_new_privileges: bool,
}

impl ExecConfinement {
    /// Splits an exec's `process` for libcontainer: returns the process libcontainer runs
    /// (without `capabilities`, which the executor applies) and the confinement the executor
    /// applies, with the filter of the container whose adapted spec is `container`.
    pub fn split(container: &Spec, mut process: Process) -> Result<(Process, Self), String> {
        let seccomp = container
            .linux()
            .as_ref()
            .and_then(|linux| linux.seccomp().clone());
        if let Some(seccomp) = &seccomp {
            refuse_notify(seccomp)?;
        }
        let capabilities = process.capabilities().clone();
        process.set_capabilities(None);
        let confinement = Self {
            seccomp,
            capabilities,
            no_new_privileges: process.no_new_privileges() == Some(true),
        };
        Ok((process, confinement))
    }

    /// The steps in runc's order (see the module comment).
    pub fn steps(&self) -> Vec<Step> {
        let filter = self.seccomp.as_ref().map(|_| Step::InstallFilter);
        let caps = self.capabilities.as_ref().map(|_| Step::DropCapabilities);
        let ordered = if self.no_new_privileges {
            [caps, filter]
        } else {
            [filter, caps]
        };
        ordered.into_iter().flatten().collect()
    }

    /// Applies the steps to the calling process (the exec's init, right before execve).
    fn apply(&self) -> Result<(), String> {
        for step in self.steps() {
            match (step, &self.seccomp, &self.capabilities) {
                (Step::InstallFilter, Some(seccomp), _) => {
                    let notify_fd = libcontainer::seccomp::initialize_seccomp(seccomp)
                        .map_err(|e| format!("installing the container's seccomp filter: {e}"))?;
                    if let Some(fd) = notify_fd {
                        // SAFETY: initialize_seccomp returned this fd to us; nobody else owns it.
                        unsafe { libc::close(fd) };
                        return Err("the container's seccomp filter asked for a notify fd, \
                                    which exec cannot hand to a seccomp agent"
                            .into());
                    }
                }
                (Step::DropCapabilities, _, Some(capabilities)) => {
                    let syscall = libcontainer::syscall::syscall::create_syscall();
                    libcontainer::capabilities::drop_privileges(capabilities, syscall.as_ref())
                        .map_err(|e| format!("setting the process's capabilities: {e}"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Refuses a profile with a notify action: see the module comment.
fn refuse_notify(seccomp: &LinuxSeccomp) -> Result<(), String> {
    let notify = LinuxSeccompAction::ScmpActNotify;
    let rule_notifies = seccomp
        .syscalls()
        .iter()
        .flatten()
        .find(|rule| rule.action() == notify);
    if seccomp.default_action() == notify || rule_notifies.is_some() {
        let what = rule_notifies
            .map(|rule| format!("for {:?}", rule.names()))
            .unwrap_or_else(|| "as its default action".into());
        return Err(format!(
            "the container's seccomp profile uses SCMP_ACT_NOTIFY {what}: an exec cannot hand \
             the notify fd to a seccomp agent, so it would run unconfined; remove the notify \
             rules from the profile to exec into this container"
        ));
    }
    Ok(())
}

/// libcontainer's default executor (PATH lookup, execvp) preceded by [`ExecConfinement`].
#[derive(Clone)]
pub struct ConfiningExecutor {
    confinement: ExecConfinement,
    inner: Box<dyn Executor>,
}

impl ConfiningExecutor {
    pub fn new(confinement: ExecConfinement) -> Self {
        Self {
            confinement,
            inner: libcontainer::workload::default::get_executor(),
        }
    }
}

impl Executor for ConfiningExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.confinement.apply().map_err(ExecutorError::Other)?;
        self.inner.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        self.inner.validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        self.inner.setup_envs(envs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(seccomp: Option<serde_json::Value>) -> Spec {
        let mut spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sleep", "1"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"namespaces": [{"type": "pid"}]}
        });
        if let Some(seccomp) = seccomp {
            spec["linux"]["seccomp"] = seccomp;
        }
        serde_json::from_value(spec).unwrap()
    }

    fn process(no_new_privileges: Option<bool>) -> Process {
        let mut process = serde_json::json!({
            "args": ["sh"], "cwd": "/", "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}],
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
                "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []
            }
        });
        if let Some(nnp) = no_new_privileges {
            process["noNewPrivileges"] = nnp.into();
        }
        serde_json::from_value(process).unwrap()
    }

    fn deny_chmod() -> serde_json::Value {
        serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]})
    }

    #[test]
    fn libcontainer_gets_the_process_without_capabilities_and_the_executor_gets_all_five_sets() {
        let original = process(Some(true));
        let (for_libcontainer, confinement) =
            ExecConfinement::split(&container(Some(deny_chmod())), original.clone()).unwrap();
        assert!(for_libcontainer.capabilities().is_none());
        assert_eq!(&confinement.capabilities, original.capabilities());
        // Everything else of the process is left to libcontainer as it was.
        let mut expected = original;
        expected.set_capabilities(None);
        assert_eq!(
            serde_json::to_value(&for_libcontainer).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
        let caps = confinement.capabilities.unwrap();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), 2);
        assert!(caps.inheritable().as_ref().unwrap().is_empty());
        assert!(caps.ambient().as_ref().unwrap().is_empty());
    }

    #[test]
    fn the_exec_gets_the_containers_own_filter() {
        let (_, confinement) =
            ExecConfinement::split(&container(Some(deny_chmod())), process(None)).unwrap();
        let seccomp = confinement.seccomp.unwrap();
        assert_eq!(seccomp.syscalls().as_ref().unwrap()[0].names(), &["chmod"]);
    }

    #[test]
    fn without_no_new_privs_the_filter_goes_in_before_the_capabilities_are_dropped() {
        for nnp in [None, Some(false)] {
            let (_, confinement) =
                ExecConfinement::split(&container(Some(deny_chmod())), process(nnp)).unwrap();
            assert_eq!(
                confinement.steps(),
                [Step::InstallFilter, Step::DropCapabilities],
                "{nnp:?}"
            );
        }
    }

    #[test]
    fn with_no_new_privs_the_capabilities_are_dropped_before_the_filter_goes_in() {
        let (_, confinement) =
            ExecConfinement::split(&container(Some(deny_chmod())), process(Some(true))).unwrap();
        assert_eq!(
            confinement.steps(),
            [Step::DropCapabilities, Step::InstallFilter]
        );
    }

    #[test]
    fn a_container_without_filter_or_a_process_without_capabilities_skips_that_step() {
        let mut no_caps = process(None);
        no_caps.set_capabilities(None);
        let (_, confinement) = ExecConfinement::split(&container(None), no_caps).unwrap();
        assert!(confinement.steps().is_empty());
        let (_, confinement) = ExecConfinement::split(&container(None), process(None)).unwrap();
        assert_eq!(confinement.steps(), [Step::DropCapabilities]);
    }

    #[test]
    fn a_notify_profile_is_refused_for_exec_with_a_reason() {
        for profile in [
            serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]}),
        ] {
            let err = ExecConfinement::split(&container(Some(profile.clone())), process(None))
                .unwrap_err();
            assert!(err.contains("SCMP_ACT_NOTIFY"), "{profile}: {err}");
        }
    }
}
