//! Watching the pod VM: its death ends every process in it; the guest's OOM kills become
//! task events.

use std::sync::Arc;
use std::time::Duration;

use super::process::{now, ExitInfo, Process};
use super::spec::Role;
use super::{lock, Pod, VM_GONE_EXIT_STATUS};
use crate::error::Error;
use crate::vm::vm::Vm;

/// Exit status of each process when the VM is gone: the sandbox's is 128 + the signal it was
/// killed with, or 0 after a clean VM exit; any other process died with the VM.
pub(super) fn exit_status_on_vm_exit(
    sandbox: bool,
    kill_signal: Option<u32>,
    vm_status: i32,
) -> u32 {
    match (sandbox, kill_signal) {
        (true, Some(sig)) => 128 + sig,
        (true, None) if vm_status == 0 => 0,
        _ => VM_GONE_EXIT_STATUS,
    }
}

impl Pod {
    /// When the VMM exits, every process still running in it has exited too.
    pub(super) fn watch_vm(&self, vm: Arc<Vm>) {
        let pod = self.clone();
        tokio::spawn(async move {
            let exit = vm.wait_exit().await;
            if !vm.is_stopping() {
                vm.console_flushed().await;
                tracing::error!(
                    sandbox_id = %vm.sandbox_id,
                    status = exit.status,
                    reason = %exit.reason,
                    console = %vm.console_tail(),
                    "the pod VM died"
                );
            }
            let procs: Vec<(Arc<Process>, Option<u32>, bool)> = {
                let containers = lock(&pod.inner.containers);
                containers
                    .values()
                    .flat_map(|c| {
                        let sandbox = c.role == Role::Sandbox;
                        std::iter::once((c.init.clone(), c.kill_signal, sandbox))
                            .chain(c.execs.values().map(|e| (e.clone(), None, false)))
                    })
                    .collect()
            };
            let at = now();
            for (p, kill_signal, sandbox) in procs {
                let status = exit_status_on_vm_exit(sandbox, kill_signal, exit.status);
                p.drain_output().await;
                pod.finish(
                    &p,
                    ExitInfo {
                        status,
                        at: at.clone(),
                    },
                );
            }
        });
    }

    /// Publishes the guest's OOM kills until the VM is gone.
    pub(super) fn watch_oom(&self, vm: Arc<Vm>) {
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            loop {
                if vm.exit().is_some() {
                    return;
                }
                match vm.agent.oom_events().await {
                    Ok(mut stream) => {
                        while let Some(container_id) = stream.next().await {
                            tracing::warn!(container_id = %container_id, "OOM kill in the guest");
                            events.oom(&container_id);
                        }
                    }
                    Err(e @ Error::Unimplemented(_)) => {
                        tracing::warn!(error = %e, "the agent has no OOM events; not watching");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "OomEvents failed; retrying");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}
