//! The task API (containerd runtime v2) of one pod's shim.
//!
//! Containers of a pod share this shim (grouped on `io.kubernetes.cri.sandbox-id`). The pod's
//! sandbox (pause) container creates the VM and does not run in it: its "process" is the VM,
//! its pid the VMM's, its exit the VM's end. Application containers run in the guest through
//! the agent. A container without CRI annotations (`ctr run`) gets a VM of its own and runs in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::TaskIO;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::Code;
use kata_like_protocol as pb;
use tokio::sync::oneshot;

use crate::config::{self, Config};
use crate::error::{status, Error, Result};
use crate::pod::process::{ExitInfo, Process, Status, StdioPaths};
use crate::pod::rootfs::{self, ImageBuilder, RootfsMount};
use crate::pod::spec::{self, Bundle, Role};
use crate::pod::stdio;
use crate::task::events::{self, Events};
use crate::task::metrics;
use crate::vm::vm::Vm;

type TtrpcResult<T> = containerd_shim_protos::ttrpc::Result<T>;

/// Name of the file in a bundle that records the pod's state dir (read by `delete`).
pub const STATE_DIR_FILE: &str = "kata-like-state-dir";
/// Exit status of processes whose VM went away under them.
pub const VM_GONE_EXIT_STATUS: u32 = 255;
/// How long RemoveContainer lets left-over processes live before SIGKILL.
const REMOVE_TIMEOUT_MS: u32 = 5_000;
/// Files copied into the guest for one host directory bind, at most.
const MAX_DIR_FILES: usize = 4096;
const MAX_DIR_BYTES: u64 = 256 * 1024 * 1024;

struct Container {
    bundle: String,
    role: Role,
    /// Runs in the guest (every role but the sandbox).
    in_guest: bool,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    layers: Vec<String>,
    dirs: Vec<String>,
    /// Signal the sandbox was killed with (its exit status is 128 + it).
    kill_signal: Option<u32>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Events,
    exit: Arc<ExitSignal>,
    config: Mutex<Option<Arc<Config>>>,
    vm: Mutex<Option<Arc<Vm>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Serializes create and delete: they change the VM and the container set together.
    lifecycle: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                events,
                exit,
                config: Mutex::new(None),
                vm: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        }
    }

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

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
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

    // ---- create -------------------------------------------------------------------------

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<u32> {
        spec::check_id("container", &req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented("checkpoint/restore".into()));
        }
        let config = self.config(req.options.as_ref())?;
        let bundle = Bundle::load(Path::new(&req.bundle))?;
        let role = bundle.role()?;
        let _guard = self.inner.lifecycle.lock().await;
        if lock(&self.inner.containers).contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!("container {}", req.id)));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Arc::new(Process::new(&req.id, "", stdio, None));
        let mut container = Container {
            bundle: req.bundle.clone(),
            role: role.clone(),
            in_guest: role != Role::Sandbox,
            init: init.clone(),
            execs: HashMap::new(),
            layers: Vec::new(),
            dirs: Vec::new(),
            kill_signal: None,
        };

        let started_vm = match &role {
            Role::Sandbox | Role::Standalone => {
                if lock(&self.inner.vm).is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "this shim already runs a pod VM; container {} would need a second one",
                        req.id
                    )));
                }
                let shape = config::vm_shape(&config, &bundle.annotations)?;
                let vm = Vm::start(
                    &config,
                    &shape,
                    &self.inner.namespace,
                    &req.id,
                    &bundle.hostname(),
                )
                .await?;
                let state_file = Path::new(&req.bundle).join(STATE_DIR_FILE);
                if let Err(e) =
                    std::fs::write(&state_file, vm.state_dir.as_os_str().as_encoded_bytes())
                {
                    vm.destroy().await;
                    return Err(Error::io(format!("write {}", state_file.display()))(e));
                }
                *lock(&self.inner.vm) = Some(vm.clone());
                self.watch_vm(vm.clone());
                self.watch_oom(vm.clone());
                Some(vm)
            }
            Role::App { sandbox_id } => {
                let vm = self.vm()?;
                if &vm.sandbox_id != sandbox_id {
                    return Err(Error::InvalidArgument(format!(
                        "container {} belongs to pod {sandbox_id}, this shim serves pod {}",
                        req.id, vm.sandbox_id
                    )));
                }
                None
            }
        };

        let result = if container.in_guest {
            self.create_in_guest(&config, &req, &bundle, &mut container)
                .await
        } else {
            let vm = self.vm()?;
            init.set_pid(vm.pid);
            Ok(())
        };
        if let Err(e) = result {
            if let Ok(vm) = self.vm() {
                // The guest's side of the failure (agent and kernel messages) is on its console.
                tracing::warn!(container_id = %req.id, error = %e, console = %vm.console_tail(), "container creation failed");
            }
            if let Some(vm) = started_vm {
                vm.destroy().await;
                *lock(&self.inner.vm) = None;
            }
            return Err(e);
        }
        let pid = init.pid();
        lock(&self.inner.containers).insert(req.id.clone(), container);
        self.inner.events.create(
            &req.id,
            &req.bundle,
            TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            },
            pid,
        );
        tracing::info!(container_id = %req.id, role = ?role, pid, "container created");
        Ok(pid)
    }

    async fn create_in_guest(
        &self,
        config: &Config,
        req: &api::CreateTaskRequest,
        bundle: &Bundle,
        container: &mut Container,
    ) -> Result<()> {
        let vm = self.vm()?;
        vm.check_alive()?;
        let attached = self
            .attach_storages(config, &vm, req, bundle, container)
            .await;
        let created = match attached {
            Ok(create_req) => vm
                .agent
                .client()
                .create_container(vm.agent.request(create_req))
                .await
                .map_err(|s| Error::from_agent("CreateContainer", s)),
            Err(e) => Err(e),
        };
        let pid = match created {
            Ok(resp) => resp.into_inner().pid,
            Err(e) => {
                self.release_storages(&vm, container).await;
                return Err(e);
            }
        };
        container.init.set_pid(pid);
        if let Err(e) = self.attach_stdio(&vm, &container.init) {
            let _ = vm
                .agent
                .client()
                .remove_container(vm.agent.request(pb::RemoveContainerRequest {
                    container_id: req.id.clone(),
                    timeout_ms: 0,
                }))
                .await;
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
        req: &api::CreateTaskRequest,
        bundle: &Bundle,
        container: &mut Container,
    ) -> Result<pb::CreateContainerRequest> {
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fs_type: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let layers = rootfs::layers_from_mounts(&mounts, &bundle.path.join("rootfs"))?;
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
            container_id = %req.id,
            layers = layers.len(),
            rootfs_ms = started.elapsed().as_millis() as u64,
            "rootfs attached"
        );
        let guest = spec::guest_spec(&bundle.spec)?;
        for dir in &guest.dirs {
            let (mount_point, fresh) = vm.attach_tmpfs(&dir.storage_id).await?;
            container.dirs.push(dir.storage_id.clone());
            if fresh {
                copy_dir(vm, &dir.host, &mount_point).await?;
            }
        }
        for file in &guest.files {
            vm.copy_file(&file.host, &file.guest).await?;
        }
        let read_only_root = bundle
            .spec
            .pointer("/root/readonly")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let oci_spec_json = serde_json::to_vec(&guest.spec)
            .map_err(|e| Error::Other(format!("encode spec: {e}")))?;
        Ok(pb::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec_json,
            rootfs: Some(pb::Rootfs {
                lower_dirs,
                writable: !read_only_root,
                upper_size_bytes: 0,
            }),
            stdio: Some(pb::Stdio {
                terminal: req.terminal,
                stdin: !req.stdin.is_empty(),
            }),
        })
    }

    async fn release_storages(&self, vm: &Vm, container: &mut Container) {
        for id in std::mem::take(&mut container.layers) {
            if let Err(e) = vm.release_layer(&id).await {
                tracing::warn!(storage_id = %id, error = %e, "releasing a layer failed");
            }
        }
        for id in std::mem::take(&mut container.dirs) {
            if let Err(e) = vm.release_tmpfs(&id).await {
                tracing::warn!(storage_id = %id, error = %e, "releasing a shared dir failed");
            }
        }
    }

    /// Starts the copies between containerd's FIFOs and the agent for one process.
    fn attach_stdio(&self, vm: &Arc<Vm>, p: &Arc<Process>) -> Result<()> {
        let outputs: Vec<(pb::OutputFd, &str)> = if p.stdio.terminal {
            vec![(pb::OutputFd::Stdout, p.stdio.stdout.as_str())]
        } else {
            vec![
                (pb::OutputFd::Stdout, p.stdio.stdout.as_str()),
                (pb::OutputFd::Stderr, p.stdio.stderr.as_str()),
            ]
        };
        for (fd, path) in outputs {
            let fifo = if path.is_empty() {
                None
            } else {
                Some(stdio::open_output_fifo(Path::new(path))?)
            };
            let agent = vm.agent.clone();
            let (cid, eid) = (p.container_id.clone(), p.exec_id.clone());
            p.add_output_task(tokio::spawn(async move {
                let req = pb::ProcessOutputRequest {
                    container_id: cid.clone(),
                    exec_id: eid.clone(),
                    fd: fd as i32,
                };
                let result = match agent.client().process_output(req).await {
                    Ok(resp) => {
                        use futures::StreamExt;
                        let stream = resp.into_inner().map(|r| r.map(|c| c.data));
                        stdio::copy_output(stream, fifo).await
                    }
                    Err(s) => Err(Error::from_agent("ProcessOutput", s)),
                };
                match result {
                    Ok(bytes) => tracing::debug!(container_id = %cid, exec_id = %eid, ?fd, bytes, "output copied"),
                    Err(e) => tracing::warn!(container_id = %cid, exec_id = %eid, ?fd, error = %e, "output copy ended with an error"),
                }
            }));
        }
        if !p.stdio.stdin.is_empty() {
            let input = stdio::open_input_fifo(Path::new(&p.stdio.stdin))?;
            let (close_tx, close_rx) = oneshot::channel();
            p.set_stdin_closer(close_tx);
            let mut sink = AgentStdin {
                agent: vm.agent.clone(),
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = stdio::pump_stdin(input, &mut sink, close_rx).await {
                    tracing::warn!(container_id = %sink.container_id, exec_id = %sink.exec_id, error = %e, "stdin copy ended with an error");
                }
            });
        }
        Ok(())
    }

    /// Waits for a guest process to exit, lets its output drain, then records the exit.
    fn spawn_waiter(&self, vm: Arc<Vm>, p: Arc<Process>) {
        let service = self.clone();
        tokio::spawn(async move {
            let info = loop {
                let req = pb::ProcessRequest {
                    container_id: p.container_id.clone(),
                    exec_id: p.exec_id.clone(),
                };
                match vm.agent.client().wait_process(req).await {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        break ExitInfo {
                            status: r.exit_status as u32,
                            at: events::timestamp_from_unix_nanos(r.exited_at_unix_nanos),
                        };
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        tracing::warn!(container_id = %p.container_id, exec_id = %p.exec_id, "the agent no longer knows the process");
                        break ExitInfo {
                            status: VM_GONE_EXIT_STATUS,
                            at: events::now(),
                        };
                    }
                    Err(s) => {
                        if vm.exit().is_some() {
                            // The VM watcher records the exit of every process.
                            return;
                        }
                        tracing::debug!(container_id = %p.container_id, exec_id = %p.exec_id, error = %s, "WaitProcess failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            p.drain_output().await;
            service.finish(&p, info);
        });
    }

    /// When the VMM exits, every process still running in it has exited too.
    fn watch_vm(&self, vm: Arc<Vm>) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = vm.wait_exit().await;
            if !vm.is_stopping() {
                tracing::error!(
                    sandbox_id = %vm.sandbox_id,
                    status = exit.status,
                    reason = %exit.reason,
                    console = %vm.console_tail(),
                    "the pod VM died"
                );
            }
            let procs: Vec<(Arc<Process>, Option<u32>, bool)> = {
                let containers = lock(&service.inner.containers);
                containers
                    .values()
                    .flat_map(|c| {
                        let sandbox = c.role == Role::Sandbox;
                        std::iter::once((c.init.clone(), c.kill_signal, sandbox))
                            .chain(c.execs.values().map(|e| (e.clone(), None, false)))
                    })
                    .collect()
            };
            let at = events::now();
            for (p, kill_signal, sandbox) in procs {
                let status = match (sandbox, kill_signal) {
                    (true, Some(sig)) => 128 + sig,
                    (true, None) if exit.status == 0 => 0,
                    _ => VM_GONE_EXIT_STATUS,
                };
                p.drain_output().await;
                service.finish(
                    &p,
                    ExitInfo {
                        status,
                        at: at.clone(),
                    },
                );
            }
        });
    }

    fn watch_oom(&self, vm: Arc<Vm>) {
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            loop {
                if vm.exit().is_some() {
                    return;
                }
                match vm.agent.client().oom_events(pb::Empty {}).await {
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        while let Ok(Some(ev)) = stream.message().await {
                            tracing::warn!(container_id = %ev.container_id, "OOM kill in the guest");
                            events.oom(&ev.container_id);
                        }
                    }
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        tracing::warn!(error = %s, "the agent has no OOM events; not watching");
                        return;
                    }
                    Err(s) => {
                        tracing::debug!(error = %s, "OomEvents failed; retrying");
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    // ---- start / exec -----------------------------------------------------------------

    async fn do_start(&self, req: api::StartRequest) -> Result<u32> {
        let p = self.process(&req.id, &req.exec_id)?;
        let (role, in_guest) = self.container_role(&req.id)?;
        if !p.transition(Status::Created, Status::Starting) {
            return Err(Error::FailedPrecondition(format!(
                "process {}/{} is {:?}, not created",
                req.id,
                req.exec_id,
                p.status()
            )));
        }
        let result = if !in_guest {
            // The sandbox: the VM is already running.
            debug_assert_eq!(role, Role::Sandbox);
            Ok(())
        } else if req.exec_id.is_empty() {
            let vm = self.vm()?;
            vm.agent
                .client()
                .start_container(vm.agent.request(pb::ContainerRequest {
                    container_id: req.id.clone(),
                }))
                .await
                .map(|_| ())
                .map_err(|s| Error::from_agent("StartContainer", s))
        } else {
            self.start_exec(&p).await
        };
        if let Err(e) = result {
            p.transition(Status::Starting, Status::Created);
            return Err(e);
        }
        p.transition(Status::Starting, Status::Running);
        let pid = p.pid();
        if req.exec_id.is_empty() {
            self.inner.events.start(&req.id, pid);
        } else {
            self.inner.events.exec_started(&req.id, &req.exec_id, pid);
        }
        tracing::info!(container_id = %req.id, exec_id = %req.exec_id, pid, "process started");
        Ok(pid)
    }

    async fn start_exec(&self, p: &Arc<Process>) -> Result<()> {
        let vm = self.vm()?;
        let spec = p
            .exec_spec
            .clone()
            .ok_or_else(|| Error::Other("exec without a process spec".into()))?;
        let resp = vm
            .agent
            .client()
            .exec_process(vm.agent.request(pb::ExecProcessRequest {
                container_id: p.container_id.clone(),
                exec_id: p.exec_id.clone(),
                oci_process_json: spec,
                stdio: Some(pb::Stdio {
                    terminal: p.stdio.terminal,
                    stdin: !p.stdio.stdin.is_empty(),
                }),
            }))
            .await
            .map_err(|s| Error::from_agent("ExecProcess", s))?;
        p.set_pid(resp.into_inner().pid);
        // The process runs already; its output waits in its pipes until the streams attach.
        if let Err(e) = self.attach_stdio(&vm, p) {
            let _ = vm
                .agent
                .client()
                .signal_process(vm.agent.request(pb::SignalProcessRequest {
                    container_id: p.container_id.clone(),
                    exec_id: p.exec_id.clone(),
                    signal: libc::SIGKILL as u32,
                    all: false,
                }))
                .await;
            self.spawn_waiter(vm, p.clone());
            return Err(e);
        }
        self.spawn_waiter(vm, p.clone());
        Ok(())
    }

    fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        spec::check_id("exec", &req.exec_id)?;
        let spec_any = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        let process_json = spec::guest_process(&spec_any.value)?;
        let mut containers = lock(&self.inner.containers);
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFound(format!("container {}", req.id)))?;
        if !c.in_guest {
            return Err(Error::FailedPrecondition(format!(
                "container {} is the pod sandbox, which has no processes to exec into",
                req.id
            )));
        }
        if c.init.status() != Status::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} of container {}",
                req.exec_id, req.id
            )));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs.insert(
            req.exec_id.clone(),
            Arc::new(Process::new(
                &req.id,
                &req.exec_id,
                stdio,
                Some(process_json),
            )),
        );
        drop(containers);
        self.inner.events.exec_added(&req.id, &req.exec_id);
        Ok(())
    }

    // ---- kill / delete ----------------------------------------------------------------

    async fn do_kill(&self, req: api::KillRequest) -> Result<()> {
        let p = self.process(&req.id, &req.exec_id)?;
        let (role, _) = self.container_role(&req.id)?;
        if req.signal == 0 || req.signal > 64 {
            return Err(Error::InvalidArgument(format!(
                "signal {} is not valid",
                req.signal
            )));
        }
        if p.status() == Status::Stopped {
            return Err(Error::NotFound(format!(
                "process {}/{} already finished",
                req.id, req.exec_id
            )));
        }
        if role == Role::Sandbox {
            // The sandbox's process is the VM: killing it stops the VM.
            if let Some(c) = lock(&self.inner.containers).get_mut(&req.id) {
                c.kill_signal.get_or_insert(req.signal);
            }
            let vm = self.vm()?;
            let force = req.signal == libc::SIGKILL as u32;
            tracing::info!(container_id = %req.id, signal = req.signal, "stopping the pod VM");
            tokio::spawn(async move {
                vm.stop(force).await;
            });
            return Ok(());
        }
        let vm = self.vm()?;
        match vm
            .agent
            .client()
            .signal_process(vm.agent.request(pb::SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(_) if vm.exit().is_some() => Err(Error::NotFound(format!(
                "process {}/{} already finished (the pod VM is gone)",
                req.id, req.exec_id
            ))),
            Err(s) => Err(Error::from_agent("SignalProcess", s)),
        }
    }

    async fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let p = self.process(&req.id, &req.exec_id)?;
            match p.status() {
                Status::Stopped | Status::Created => {}
                s => {
                    return Err(Error::FailedPrecondition(format!(
                        "exec {} is {s:?}; kill it first",
                        req.exec_id
                    )))
                }
            }
            if let Some(c) = lock(&self.inner.containers).get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            self.inner.events.exec_deleted(&req.id, &req.exec_id);
            let exit = p.exit().unwrap_or(ExitInfo {
                status: 0,
                at: events::now(),
            });
            return Ok(api::DeleteResponse {
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: Some(exit.at).into(),
                ..Default::default()
            });
        }

        let _guard = self.inner.lifecycle.lock().await;
        let p = self.process(&req.id, "")?;
        match p.status() {
            Status::Stopped | Status::Created => {}
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is {s:?}; kill it first",
                    req.id
                )))
            }
        }
        let mut container = lock(&self.inner.containers)
            .remove(&req.id)
            .ok_or_else(|| Error::NotFound(format!("container {}", req.id)))?;
        let vm = lock(&self.inner.vm).clone();
        if let Some(vm) = &vm {
            if container.in_guest && vm.exit().is_none() {
                let removed = vm
                    .agent
                    .client()
                    .remove_container(vm.agent.request(pb::RemoveContainerRequest {
                        container_id: req.id.clone(),
                        timeout_ms: REMOVE_TIMEOUT_MS,
                    }))
                    .await;
                if let Err(s) = removed {
                    if s.code() != tonic::Code::NotFound {
                        tracing::warn!(container_id = %req.id, error = %s, "RemoveContainer failed");
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
                    at: events::now(),
                };
                p.record_exit(info.clone());
                info
            }
        };
        self.inner
            .events
            .delete(&req.id, p.pid(), exit.status, exit.at.clone());
        tracing::info!(container_id = %req.id, exit_status = exit.status, "container deleted");
        Ok(api::DeleteResponse {
            pid: p.pid(),
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    // ---- the rest ---------------------------------------------------------------------

    fn guest_container(&self, id: &str) -> Result<Arc<Vm>> {
        let (_, in_guest) = self.container_role(id)?;
        if !in_guest {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is the pod sandbox (the VM itself)"
            )));
        }
        self.vm()
    }

    async fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let p = self.process(id, "")?;
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        if role == Role::Sandbox {
            if pause {
                vm.api.pause().await?
            } else {
                vm.api.resume().await?
            }
        } else {
            let req = vm.agent.request(pb::ContainerRequest {
                container_id: id.to_string(),
            });
            if pause {
                vm.agent
                    .client()
                    .pause_container(req)
                    .await
                    .map_err(|s| Error::from_agent("PauseContainer", s))?;
            } else {
                vm.agent
                    .client()
                    .resume_container(req)
                    .await
                    .map_err(|s| Error::from_agent("ResumeContainer", s))?;
            }
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

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse> {
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        let processes = if role == Role::Sandbox {
            vec![containerd_shim_protos::api::ProcessInfo {
                pid: vm.pid,
                ..Default::default()
            }]
        } else {
            vm.agent
                .client()
                .list_processes(vm.agent.request(pb::ContainerRequest {
                    container_id: id.to_string(),
                }))
                .await
                .map_err(|s| Error::from_agent("ListProcesses", s))?
                .into_inner()
                .processes
                .into_iter()
                .map(|p| containerd_shim_protos::api::ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect()
        };
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn do_stats(&self, id: &str) -> Result<Any> {
        let (role, _) = self.container_role(id)?;
        let vm = self.vm()?;
        let m = if role == Role::Sandbox {
            metrics::for_vmm_process(vm.pid)?
        } else {
            let stats = vm
                .agent
                .client()
                .stats_container(vm.agent.request(pb::ContainerRequest {
                    container_id: id.to_string(),
                }))
                .await
                .map_err(|s| Error::from_agent("StatsContainer", s))?
                .into_inner();
            metrics::from_agent(&stats)
        };
        metrics::to_any(&m)
    }

    async fn do_update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let vm = self.guest_container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
        let json = spec::guest_resources(&resources.value)?;
        vm.agent
            .client()
            .update_container(vm.agent.request(pb::UpdateContainerRequest {
                container_id: req.id.clone(),
                oci_linux_resources_json: json,
            }))
            .await
            .map_err(|s| Error::from_agent("UpdateContainer", s))?;
        Ok(())
    }

    async fn do_resize(&self, req: api::ResizePtyRequest) -> Result<()> {
        let p = self.process(&req.id, &req.exec_id)?;
        if !p.stdio.terminal {
            return Err(Error::FailedPrecondition(format!(
                "process {}/{} has no terminal",
                req.id, req.exec_id
            )));
        }
        if req.width > u16::MAX as u32 || req.height > u16::MAX as u32 {
            return Err(Error::InvalidArgument("terminal size out of range".into()));
        }
        let vm = self.guest_container(&req.id)?;
        vm.agent
            .client()
            .resize_tty(vm.agent.request(pb::ResizeTtyRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                rows: req.height,
                columns: req.width,
            }))
            .await
            .map_err(|s| Error::from_agent("ResizeTty", s))?;
        Ok(())
    }

    fn do_state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let bundle = lock(&self.inner.containers)
            .get(&req.id)
            .map(|c| c.bundle.clone())
            .unwrap_or_default();
        let exit = p.exit();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle,
            pid: p.pid(),
            status: p.status().to_proto().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn do_shutdown(&self) {
        let _guard = self.inner.lifecycle.lock().await;
        if !lock(&self.inner.containers).is_empty() {
            return;
        }
        let vm = lock(&self.inner.vm).take();
        if let Some(vm) = vm {
            vm.destroy().await;
        }
        tracing::info!("last container gone; shim exits");
        self.inner.exit.signal();
    }
}

/// Copies a host directory's regular files into a guest directory (a tmpfs storage), keeping
/// the relative layout. Bounded in file count and bytes.
async fn copy_dir(vm: &Vm, host: &Path, guest_root: &str) -> Result<()> {
    let mut stack: Vec<PathBuf> = vec![host.to_path_buf()];
    let (mut files, mut bytes) = (0usize, 0u64);
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("read {}", dir.display())))?;
            let ft = entry
                .file_type()
                .map_err(Error::io(format!("stat {}", entry.path().display())))?;
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path.strip_prefix(host).map_err(|_| {
                    Error::Other(format!("{} escapes {}", path.display(), host.display()))
                })?;
                let rel = rel.to_str().ok_or_else(|| {
                    Error::InvalidArgument(format!("{} is not UTF-8", path.display()))
                })?;
                files += 1;
                bytes += vm.copy_file(&path, &format!("{guest_root}/{rel}")).await?;
                if files > MAX_DIR_FILES || bytes > MAX_DIR_BYTES {
                    return Err(Error::InvalidArgument(format!(
                        "host directory {} is too big to copy into the pod VM \
                         (more than {MAX_DIR_FILES} files or {MAX_DIR_BYTES} bytes)",
                        host.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The agent's WriteStdin/CloseStdin for one process.
struct AgentStdin {
    agent: crate::vm::agent_client::Agent,
    container_id: String,
    exec_id: String,
}

impl stdio::StdinSink for AgentStdin {
    async fn write(&mut self, data: Vec<u8>) -> Result<usize> {
        // No deadline: a process that does not read its stdin back-pressures us, as a pipe does.
        let resp = self
            .agent
            .client()
            .write_stdin(pb::WriteStdinRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
                data,
            })
            .await
            .map_err(|s| Error::from_agent("WriteStdin", s))?;
        Ok(resp.into_inner().written as usize)
    }

    async fn close(&mut self) -> Result<()> {
        self.agent
            .client()
            .close_stdin(self.agent.request(pb::ProcessRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            }))
            .await
            .map_err(|s| Error::from_agent("CloseStdin", s))
            .map(|_| ())
    }
}

fn log_err<T>(call: &str, id: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::warn!(call, container_id = %id, error = %e, "request failed");
        e.into()
    })
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let pid = log_err("create", &id, self.do_create(req).await)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let id = req.id.clone();
        let pid = log_err("start", &id, self.do_start(req).await)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(&req)?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        log_err("pids", &req.id, self.do_pids(&req.id).await)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        log_err("kill", &id, self.do_kill(req).await)?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        log_err("exec", &id, self.do_exec(req))?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        log_err("resize_pty", &id, self.do_resize(req).await)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let p = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let id = req.id.clone();
        log_err("update", &id, self.do_update(req).await)?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let info = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let id = req.id.clone();
        log_err("delete", &id, self.do_delete(req).await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        log_err("pause", &req.id, self.do_pause(&req.id, true).await)?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        log_err("resume", &req.id, self.do_pause(&req.id, false).await)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let any = log_err("stats", &req.id, self.do_stats(&req.id).await)?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by the kata-like runtime",
        ))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.vm).as_ref().map(|vm| vm.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_shutdown().await;
        Ok(api::Empty::default())
    }
}
