//! Containers of the pod: create (boot or join the VM, attach storages, create in the guest),
//! delete (remove from the guest, release storages, stop the VM with its last user), and the
//! container-wide operations (pause, update, processes, stats).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use kata_like_protocol as pb;

use super::namespaces::{self, PidNamespace, TaskOwner};
use super::process::{now, ExitInfo, Process, Status, StdioPaths};
use super::rootfs::{self, ImageBuilder, RootfsMount};
use super::spec::{self, Bundle, Role};
use super::volumes::SharedDirKind;
use super::{lock, Pod, STATE_DIR_FILE};
use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::pod_limits;
use crate::vm::agent_client::PodIdentity;
use crate::vm::cgroup::HostCgroup;
use crate::vm::network;
use crate::vm::vm::{PodHost, Vm};

/// How long RemoveContainer lets left-over processes live before SIGKILL.
const REMOVE_TIMEOUT_MS: u32 = 5_000;

pub(super) struct Container {
    pub(super) bundle: String,
    pub(super) role: Role,
    /// Runs in the guest (every role but the sandbox).
    pub(super) in_guest: bool,
    pub(super) init: Arc<Process>,
    pub(super) execs: HashMap<String, Arc<Process>>,
    layers: Vec<String>,
    dirs: Vec<String>,
    /// Signal the sandbox was killed with (its exit status is 128 + it).
    pub(super) kill_signal: Option<u32>,
}

impl Container {
    pub(super) fn new(bundle: &str, role: Role, init: Arc<Process>) -> Container {
        Container {
            bundle: bundle.to_string(),
            in_guest: role != Role::Sandbox,
            role,
            init,
            execs: HashMap::new(),
            layers: Vec::new(),
            dirs: Vec::new(),
            kill_signal: None,
        }
    }
}

/// What the VM does for a new container, decided by its role.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum VmPlan {
    /// The sandbox, or a container without a pod (`ctr run`): it brings the pod VM up.
    Boot,
    /// An application container: it joins the VM of its pod.
    Join { sandbox_id: String },
}

impl VmPlan {
    pub(super) fn for_role(role: &Role) -> VmPlan {
        match role {
            Role::Sandbox | Role::Standalone => VmPlan::Boot,
            Role::App { sandbox_id } => VmPlan::Join {
                sandbox_id: sandbox_id.clone(),
            },
        }
    }
}

/// A container to create, as containerd describes it.
pub struct NewContainer {
    pub id: String,
    pub bundle: String,
    pub rootfs: Vec<RootfsMount>,
    pub stdio: StdioPaths,
    /// The runtime options (they may name the configuration file).
    pub options: Option<Any>,
}

/// What deleting a process leaves: its pid and its exit.
#[derive(Debug)]
pub struct Deleted {
    pub pid: u32,
    pub exit: ExitInfo,
}

/// A container's resource usage: the sandbox's is its host cgroup's (the shim, the VMM with
/// guest RAM and vCPUs, helpers), or the VMM process's without one; others' the guest's.
pub enum ContainerStats {
    VmmProcess(u32),
    PodCgroup(Box<pb::StatsContainerResponse>),
    Guest(Box<pb::StatsContainerResponse>),
}

impl Pod {
    /// Creates a container; returns its init process's pid.
    pub async fn create(&self, new: NewContainer) -> Result<u32> {
        let config = self.config(new.options.as_ref())?;
        let bundle = Bundle::load(Path::new(&new.bundle))?;
        let role = bundle.role()?;
        let _guard = self.inner.lifecycle.lock().await;
        if lock(&self.inner.containers).contains_key(&new.id) {
            return Err(Error::AlreadyExists(format!("container {}", new.id)));
        }
        let init = Arc::new(Process::new(&new.id, "", new.stdio.clone(), None));
        let mut container = Container::new(&new.bundle, role.clone(), init.clone());

        let started_vm = match VmPlan::for_role(&role) {
            VmPlan::Boot => {
                if lock(&self.inner.vm).is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "this shim already runs a pod VM; container {} would need a second one",
                        new.id
                    )));
                }
                let identity = if role == Role::Sandbox {
                    namespaces::check_sandbox(&bundle.spec)?;
                    PodIdentity {
                        hostname: bundle.hostname(),
                        sysctls: namespaces::sandbox_sysctls(&bundle.spec)?,
                        shared_pid_namespace: true,
                    }
                } else {
                    // A standalone container applies its own spec's sysctls, in its own pid
                    // namespace.
                    PodIdentity {
                        hostname: bundle.hostname(),
                        ..Default::default()
                    }
                };
                let shape = config::vm_shape(&config, &bundle.annotations)?;
                let netns = network::netns_of_spec(&bundle.spec)?;
                let host_cgroup = HostCgroup::from_spec(&bundle.spec)?;
                let pod_log_dir = bundle.pod_log_dir();
                let host = PodHost {
                    netns: netns.as_deref(),
                    cgroup: host_cgroup.as_ref(),
                    pod_log_dir: pod_log_dir.as_deref(),
                };
                let vm = Vm::start(
                    &config,
                    &shape,
                    &self.inner.namespace,
                    &new.id,
                    &identity,
                    &host,
                )
                .await?;
                let state_file = Path::new(&new.bundle).join(STATE_DIR_FILE);
                if let Err(e) =
                    std::fs::write(&state_file, vm.state_dir.as_os_str().as_encoded_bytes())
                {
                    vm.destroy().await;
                    return Err(Error::io(format!("write {}", state_file.display()))(e));
                }
                *lock(&self.inner.vm) = Some(vm.clone());
                self.watch_vm(vm.clone());
                self.watch_oom(vm.clone());
                if role == Role::Sandbox {
                    start_port_forward(&vm, &bundle);
                }
                Some(vm)
            }
            VmPlan::Join { sandbox_id } => {
                let vm = self.vm()?;
                if vm.sandbox_id != sandbox_id {
                    return Err(Error::InvalidArgument(format!(
                        "container {} belongs to pod {sandbox_id}, this shim serves pod {}",
                        new.id, vm.sandbox_id
                    )));
                }
                None
            }
        };

        let result = if container.in_guest {
            self.create_in_guest(&config, &new, &bundle, &mut container)
                .await
        } else {
            let vm = self.vm()?;
            init.set_pid(vm.pid);
            Ok(())
        };
        if let Err(e) = result {
            if let Ok(vm) = self.vm() {
                // The guest's side of the failure (agent and kernel messages) is on its console.
                tracing::warn!(container_id = %new.id, error = %e, console = %vm.console_tail(), "container creation failed");
            }
            if let Some(vm) = started_vm {
                vm.destroy().await;
                *lock(&self.inner.vm) = None;
            }
            return Err(e);
        }
        let pid = init.pid();
        lock(&self.inner.containers).insert(new.id.clone(), container);
        self.inner
            .events
            .create(&new.id, &new.bundle, &new.stdio, pid);
        tracing::info!(container_id = %new.id, role = ?role, pid, "container created");
        Ok(pid)
    }

    async fn create_in_guest(
        &self,
        config: &Config,
        new: &NewContainer,
        bundle: &Bundle,
        container: &mut Container,
    ) -> Result<()> {
        let vm = self.vm()?;
        vm.check_alive()?;
        pod_limits::check_container_fits(&bundle.spec, vm.memory_mib)?;
        let attached = self
            .attach_storages(config, &vm, new, bundle, container)
            .await;
        let created = match attached {
            Ok(create_req) => vm.agent.create_container(create_req).await,
            Err(e) => Err(e),
        };
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                self.release_storages(&vm, container).await;
                return Err(e);
            }
        };
        container.init.set_pid(pid);
        if let Err(e) = self.attach_stdio(&vm, &container.init) {
            let _ = vm.agent.remove_container(&new.id, 0).await;
            self.release_storages(&vm, container).await;
            return Err(e);
        }
        self.spawn_waiter(vm, container.init.clone());
        Ok(())
    }

    /// Rootfs layers into drive slots, host directories into guest tmpfs, host files copied;
    /// returns the agent's CreateContainer request.
    async fn attach_storages(
        &self,
        config: &Config,
        vm: &Vm,
        new: &NewContainer,
        bundle: &Bundle,
        container: &mut Container,
    ) -> Result<pb::CreateContainerRequest> {
        let layers = rootfs::layers_from_mounts(&new.rootfs, &bundle.path.join("rootfs"))?;
        let builder = ImageBuilder {
            mkfs_erofs: config.mkfs_erofs.clone(),
            cache_dir: config.rootfs_cache_dir.clone(),
            cache_entries: config.rootfs_cache_entries,
        };
        let mut lower_dirs = Vec::new();
        let started = std::time::Instant::now();
        for layer in &layers {
            let image = builder.image(layer, &vm.state_dir.join("images")).await?;
            let storage_id = image.storage_id.clone();
            let mount_point = vm.attach_layer(&storage_id, Some(image)).await?;
            container.layers.push(storage_id);
            lower_dirs.push(mount_point);
        }
        tracing::info!(
            container_id = %new.id,
            layers = layers.len(),
            rootfs_ms = started.elapsed().as_millis() as u64,
            "rootfs attached"
        );
        let pid_namespace = match &container.role {
            Role::App { .. } => {
                namespaces::pid_namespace(&bundle.spec, |pid| self.task_owner(pid))?
            }
            Role::Sandbox | Role::Standalone => PidNamespace::Own,
        };
        let guest = spec::guest_spec(&bundle.spec)?;
        for dir in &guest.dirs {
            self.attach_shared_dir(vm, dir, container).await?;
        }
        for file in &guest.files {
            vm.copy_file(&file.host, &file.guest).await?;
        }
        let oci_spec_json = serde_json::to_vec(&guest.spec)
            .map_err(|e| Error::Other(format!("encode spec: {e}")))?;
        let (pid_mode, pid_namespace_target) = match pid_namespace {
            PidNamespace::Own => (pb::PidNamespaceMode::Own, String::new()),
            PidNamespace::Pod => (pb::PidNamespaceMode::Pod, String::new()),
            PidNamespace::Target(id) => (pb::PidNamespaceMode::Target, id),
        };
        Ok(pb::CreateContainerRequest {
            pid_namespace: pid_mode as i32,
            pid_namespace_target,
            container_id: new.id.clone(),
            oci_spec_json,
            rootfs: Some(pb::Rootfs {
                lower_dirs,
                // Always writable, also for `root.readonly` (readOnlyRootFilesystem): as with
                // runc on containerd's writable snapshot, the runtime first creates the mount
                // points (volumes, /etc/hosts, /dev/termination-log) in the rootfs and then
                // remounts the container's / read-only from the spec's `root.readonly`, which
                // the agent passes on. A read-only overlay would leave no place for them.
                writable: true,
                upper_size_bytes: 0,
            }),
            stdio: Some(pb::Stdio {
                terminal: new.stdio.terminal,
                stdin: !new.stdio.stdin.is_empty(),
            }),
        })
    }

    /// A host directory in the guest, as its kind asks (see `volumes::classify_dir`).
    async fn attach_shared_dir(
        &self,
        vm: &Vm,
        dir: &spec::SharedDir,
        container: &mut Container,
    ) -> Result<()> {
        match &dir.kind {
            SharedDirKind::MemoryEmptyDir { tmpfs_options } => {
                // The pod's: kept across its containers' restarts, released with the VM.
                vm.attach_pod_tmpfs(&dir.storage_id, tmpfs_options.clone())
                    .await?;
            }
            SharedDirKind::SharedFs => {
                super::volumes::attach_dir(vm, &dir.storage_id, &dir.host, dir.read_only).await?;
                container.dirs.push(dir.storage_id.clone());
            }
            SharedDirKind::AtomicWriter => {
                let (mount_point, fresh) = vm.attach_tmpfs(&dir.storage_id).await?;
                container.dirs.push(dir.storage_id.clone());
                if fresh {
                    let watched = super::atomic_volume::attach(
                        self.vm()?,
                        dir.host.clone(),
                        dir.storage_id.clone(),
                        mount_point,
                    )
                    .await?;
                    lock(&self.inner.watched_volumes).insert(dir.storage_id.clone(), watched);
                }
            }
        }
        Ok(())
    }

    /// Whose task `pid` is, as containerd sees task pids: the sandbox's is the VMM's, a guest
    /// container's its guest pid. Should a guest pid equal the VMM's, the sandbox wins (POD is
    /// by far the more common mode; TARGET is for ephemeral debug containers).
    fn task_owner(&self, pid: u32) -> Option<TaskOwner> {
        let containers = lock(&self.inner.containers);
        let mut owner = None;
        for (id, c) in containers.iter() {
            if c.init.pid() != pid {
                continue;
            }
            match c.role {
                Role::Sandbox => return Some(TaskOwner::Sandbox),
                Role::App { .. } => owner = Some(TaskOwner::Container(id.clone())),
                Role::Standalone => {}
            }
        }
        owner
    }

    async fn release_storages(&self, vm: &Vm, container: &mut Container) {
        for id in std::mem::take(&mut container.layers) {
            if let Err(e) = vm.release_layer(&id).await {
                tracing::warn!(storage_id = %id, error = %e, "releasing a layer failed");
            }
        }
        for id in std::mem::take(&mut container.dirs) {
            if id.starts_with(super::volumes::SHARED_FS_STORAGE_PREFIX) {
                if let Err(e) = super::volumes::release_dir(vm, &id).await {
                    tracing::warn!(storage_id = %id, error = %e, "releasing a shared dir failed");
                }
                continue;
            }
            if let Err(e) = vm.release_tmpfs(&id).await {
                tracing::warn!(storage_id = %id, error = %e, "releasing a volume tmpfs failed");
            }
            if !vm.has_tmpfs(&id).await {
                // Its last user is gone: stop following the host volume.
                lock(&self.inner.watched_volumes).remove(&id);
            }
        }
    }

    /// Deletes an exec (`exec_id` not empty) or a whole container; the sandbox's or a
    /// standalone container's delete stops the VM.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        if !exec_id.is_empty() {
            let p = self.process(id, exec_id)?;
            match p.status() {
                Status::Stopped | Status::Created => {}
                s => {
                    return Err(Error::FailedPrecondition(format!(
                        "exec {exec_id} is {s:?}; kill it first"
                    )))
                }
            }
            if let Some(c) = lock(&self.inner.containers).get_mut(id) {
                c.execs.remove(exec_id);
            }
            self.inner.events.exec_deleted(id, exec_id);
            let exit = p.exit().unwrap_or(ExitInfo {
                status: 0,
                at: now(),
            });
            return Ok(Deleted { pid: p.pid(), exit });
        }

        let _guard = self.inner.lifecycle.lock().await;
        let p = self.process(id, "")?;
        match p.status() {
            Status::Stopped | Status::Created => {}
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is {s:?}; kill it first"
                )))
            }
        }
        let mut container = lock(&self.inner.containers)
            .remove(id)
            .ok_or_else(|| Error::NotFound(format!("container {id}")))?;
        let vm = lock(&self.inner.vm).clone();
        if let Some(vm) = &vm {
            if container.in_guest && vm.exit().is_none() {
                let removed = vm.agent.remove_container(id, REMOVE_TIMEOUT_MS).await;
                if let Err(e) = removed {
                    if !matches!(e, Error::NotFound(_)) {
                        tracing::warn!(container_id = %id, error = %e, "RemoveContainer failed");
                    }
                }
            }
            self.release_storages(vm, &mut container).await;
            if matches!(container.role, Role::Sandbox | Role::Standalone) {
                vm.destroy().await;
                *lock(&self.inner.vm) = None;
            }
        }
        // A created process that never ran has exited by being deleted.
        let exit = match p.exit() {
            Some(e) => e,
            None => {
                let info = ExitInfo {
                    status: if container.role == Role::Sandbox {
                        0
                    } else {
                        128 + libc::SIGKILL as u32
                    },
                    at: now(),
                };
                p.record_exit(info.clone());
                info
            }
        };
        self.inner
            .events
            .delete(id, p.pid(), exit.status, exit.at.clone());
        tracing::info!(container_id = %id, exit_status = exit.status, "container deleted");
        Ok(Deleted { pid: p.pid(), exit })
    }

    /// The VM of a container that runs in the guest (not the sandbox).
    pub(super) fn guest_container(&self, id: &str) -> Result<Arc<Vm>> {
        let (_, in_guest) = self.container_role(id)?;
        if !in_guest {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is the pod sandbox (the VM itself)"
            )));
        }
        self.vm()
    }

    /// Pauses (or resumes) a container: the sandbox's pause is the whole VM's.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let p = self.process(id, "")?;
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        if role == Role::Sandbox {
            if pause {
                vm.api.pause().await?
            } else {
                vm.api.resume().await?
            }
        } else if pause {
            vm.agent.pause_container(id).await?;
        } else {
            vm.agent.resume_container(id).await?;
        }
        if pause {
            p.set_status(Status::Paused);
            self.inner.events.paused(id);
        } else {
            p.set_status(Status::Running);
            self.inner.events.resumed(id);
        }
        Ok(())
    }

    /// The pids of a container's processes: the VMM's for the sandbox, guest pids otherwise.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        if role == Role::Sandbox {
            Ok(vec![vm.pid])
        } else {
            vm.agent.list_processes(id).await
        }
    }

    pub async fn stats(&self, id: &str) -> Result<ContainerStats> {
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        if role == Role::Sandbox {
            Ok(match &vm.cgroup {
                Some(cgroup) => ContainerStats::PodCgroup(Box::new(cgroup.stats())),
                None => ContainerStats::VmmProcess(vm.pid),
            })
        } else {
            Ok(ContainerStats::Guest(Box::new(
                vm.agent.stats_container(id).await?,
            )))
        }
    }

    /// Applies new resources (containerd's `LinuxResources` JSON) to a guest container.
    pub async fn update(&self, id: &str, resources: Option<&[u8]>) -> Result<()> {
        let vm = self.guest_container(id)?;
        let resources =
            resources.ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
        let json = spec::guest_resources(resources)?;
        vm.agent.update_container(id, json).await
    }
}

/// Port forwarding for a CRI pod (see port_forward.rs). A pod whose forwarding cannot be set up
/// still runs (its port-forward then fails as before, with this warning in the shim's log):
/// the node's netfilter is not a reason to refuse a pod.
fn start_port_forward(vm: &Arc<Vm>, bundle: &Bundle) {
    let started = network::netns_of_spec(&bundle.spec).and_then(|netns| {
        match netns {
            Some(netns) => super::port_forward::start(vm.clone(), &netns),
            None => {
                tracing::info!(sandbox_id = %vm.sandbox_id, "no network namespace of its own: no port-forward");
                Ok(())
            }
        }
    });
    if let Err(error) = started {
        tracing::warn!(sandbox_id = %vm.sandbox_id, %error, "port-forward is not available for this pod");
    }
}
