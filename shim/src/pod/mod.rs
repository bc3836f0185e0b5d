//! The pod model: the pod's VM, its containers and their processes, behind one lock.
//!
//! Containers of a pod share one shim (grouped on `io.kubernetes.cri.sandbox-id`). The pod's
//! sandbox (pause) container creates the VM and does not run in it: its "process" is the VM,
//! its pid the VMM's, its exit the VM's end. Application containers run in the guest through
//! the agent. A container without CRI annotations (`ctr run`) gets a VM of its own and runs in it.
//! `namespaces.rs` maps the CRI's namespace modes (pod, container, target, node) onto the VM.
//!
//! `container.rs` creates and deletes containers with their storages, `process_io.rs` starts,
//! signals and waits for processes and wires their stdio, `watch.rs` follows the VM's death and
//! the guest's OOM kills, `volumes.rs` makes host directories visible in the guest (`atomic_volume.rs`: kubelet's
//! configMap/secret layout with live updates),
//! `port_forward.rs` carries CRI port-forward connections from the pod's namespace to the guest.
//! The task service above translates containerd's API into the operations here; events go out
//! through an [`EventSink`] it hands in.

pub mod atomic_volume;
pub mod container;
pub mod namespaces;
pub mod port_forward;
pub mod process;
pub mod process_io;
pub mod rootfs;
pub mod spec;
pub mod stdio;
pub mod volumes;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::vm::vm::Vm;
use container::Container;
use process::{ExitInfo, Process, Status, StdioPaths};
use spec::Role;

/// Name of the file in a bundle that records the pod's state dir (read by `delete`).
pub const STATE_DIR_FILE: &str = "kata-like-state-dir";
/// Exit status of processes whose VM went away under them.
pub const VM_GONE_EXIT_STATUS: u32 = 255;

/// Where the pod's task events go. Defined here and implemented by the task layer
/// (`task::events::Events`), so that the pod publishes without importing its caller.
/// Implementations keep containerd's order: an exit is not published before its process's start.
pub trait EventSink: Send + Sync {
    fn create(&self, container_id: &str, bundle: &str, stdio: &StdioPaths, pid: u32);
    fn start(&self, container_id: &str, pid: u32);
    fn exec_added(&self, container_id: &str, exec_id: &str);
    fn exec_started(&self, container_id: &str, exec_id: &str, pid: u32);
    /// The exit of a process; `exec_id` is "" for a container's init process. (`id` is the
    /// container's.)
    fn exit(&self, container_id: &str, exec_id: &str, pid: u32, exit_status: u32, at: Timestamp);
    /// The exit of a process that never started (killed or failed in the created state).
    fn exit_unstarted(&self, id: &str, exec_id: &str, pid: u32, status: u32, at: Timestamp);
    fn delete(&self, container_id: &str, pid: u32, exit_status: u32, at: Timestamp);
    /// Forgets an exec's ordering state once it is deleted.
    fn exec_deleted(&self, container_id: &str, exec_id: &str);
    fn oom(&self, container_id: &str);
    fn paused(&self, container_id: &str);
    fn resumed(&self, container_id: &str);
}

/// One pod: cheap to clone, every clone is the same pod.
#[derive(Clone)]
pub struct Pod {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Arc<dyn EventSink>,
    config: Mutex<Option<Arc<Config>>>,
    vm: Mutex<Option<Arc<Vm>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Atomic-writer volumes followed on the host, by storage id; dropped (watch stopped) when
    /// their last container releases them.
    watched_volumes: Mutex<HashMap<String, atomic_volume::WatchedVolume>>,
    /// Serializes create and delete: they change the VM and the container set together.
    lifecycle: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pod {
    pub fn new(namespace: &str, events: Arc<dyn EventSink>) -> Pod {
        Pod {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                events,
                config: Mutex::new(None),
                vm: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                watched_volumes: Mutex::new(HashMap::new()),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The shim's configuration, loaded once (from the first create's runtime options).
    fn config(&self, options: Option<&Any>) -> Result<Arc<Config>> {
        if let Some(c) = lock(&self.inner.config).as_ref() {
            return Ok(c.clone());
        }
        let explicit = match options {
            Some(any) => config::config_path_from_options(&any.type_url, &any.value)?,
            None => None,
        };
        let config = Arc::new(Config::load(explicit.as_deref())?);
        *lock(&self.inner.config) = Some(config.clone());
        Ok(config)
    }

    fn vm(&self) -> Result<Arc<Vm>> {
        lock(&self.inner.vm)
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("the pod VM is not running".into()))
    }

    /// The VMM's pid, if the pod VM runs.
    pub fn vm_pid(&self) -> Option<u32> {
        lock(&self.inner.vm).as_ref().map(|vm| vm.pid)
    }

    /// A container's init process (`exec_id` "") or one of its execs.
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let containers = lock(&self.inner.containers);
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))?;
        if exec_id.is_empty() {
            Ok(c.init.clone())
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of container {id}")))
        }
    }

    /// The bundle path of a container ("" for an unknown one).
    pub fn bundle(&self, id: &str) -> String {
        lock(&self.inner.containers)
            .get(id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default()
    }

    fn container_role(&self, id: &str) -> Result<(Role, bool)> {
        let containers = lock(&self.inner.containers);
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))?;
        Ok((c.role.clone(), c.in_guest))
    }

    /// Publishes a recorded exit in the right order.
    fn publish_exit(&self, p: &Process, before: Status, info: &ExitInfo) {
        let events = &self.inner.events;
        if before == Status::Created {
            events.exit_unstarted(
                &p.container_id,
                &p.exec_id,
                p.pid(),
                info.status,
                info.at.clone(),
            );
        } else {
            events.exit(
                &p.container_id,
                &p.exec_id,
                p.pid(),
                info.status,
                info.at.clone(),
            );
        }
    }

    /// Records a process's exit and publishes it, once.
    fn finish(&self, p: &Process, info: ExitInfo) {
        if let Some(before) = p.record_exit(info.clone()) {
            tracing::info!(
                container_id = %p.container_id,
                exec_id = %p.exec_id,
                exit_status = info.status,
                "process exited"
            );
            self.publish_exit(p, before, &info);
        }
    }

    /// Once the last container is gone, stops the VM. Returns whether the pod is empty (then the
    /// shim may exit).
    pub async fn shutdown(&self) -> bool {
        let _guard = self.inner.lifecycle.lock().await;
        if !lock(&self.inner.containers).is_empty() {
            return false;
        }
        let vm = lock(&self.inner.vm).take();
        if let Some(vm) = vm {
            vm.destroy().await;
        }
        true
    }
}

#[cfg(test)]
mod tests;
