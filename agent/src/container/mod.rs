//! Containers: the agent's side of the OCI lifecycle (create, start, exec, signal, wait, remove,
//! pause/resume, update, list, stats). Forking work goes through the runtime helper
//! (`runtime.rs`); cgroup work through `cgroups.rs`.

pub mod devices;
pub mod spec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_like_protocol::{
    CreateContainerRequest, ExecProcessRequest, OomEvent, OutputFd, PidNamespaceMode,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::broadcast;

use crate::cgroups::ContainerCgroup;
use crate::error::{invalid, Error};
use crate::process::stdio::OutputStream;
use crate::process::{PreparedStdio, Process, StdioRequest};
use crate::reaper::{wait_exit, Reaper};
use crate::runtime::{run_helper, HelperStdio, RuntimeRequest};
use crate::storage;
use crate::validate::{check_exec_id, check_id};
use spec::{adapt_spec, parse_process, SpecContext};

/// Largest stdin write one request may carry.
const MAX_STDIN_WRITE: usize = 1024 * 1024;

/// Where a container is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Creating,
    Created,
    Running,
    Removing,
}

pub struct Container {
    pub id: String,
    /// `<state>/containers/<id>`: bundle (config.json), rootfs and upper mounts, exec specs.
    pub dir: PathBuf,
    pub cgroup: ContainerCgroup,
    /// Serializes lifecycle operations on this container.
    pub lifecycle: tokio::sync::Mutex<Lifecycle>,
    pub paused: AtomicBool,
    has_poststart_hooks: AtomicBool,
    has_poststop_hooks: AtomicBool,
    processes: Mutex<HashMap<String, Arc<Process>>>,
    oom_watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What a container takes from its sandbox. Defined here and filled in by the agent, so that
/// `container` does not depend on `sandbox` (nor on the agent that holds both).
pub struct SandboxContext<'a> {
    pub id: &'a str,
    /// "" when the pod has no hostname of its own.
    pub hostname: &'a str,
    /// Path of the shared pid namespace, if the sandbox has one.
    pub pid_ns: Option<PathBuf>,
    /// Files bind-mounted into every container that does not mount the path itself:
    /// (destination, source).
    pub files: &'a [(PathBuf, PathBuf)],
}

/// The agent's containers and what their lifecycle needs: the state directory (bundles,
/// libcontainer state, tty sockets), the reaper and the OOM event channel.
pub struct Containers {
    state_dir: PathBuf,
    reaper: Arc<Reaper>,
    oom_events: broadcast::Sender<OomEvent>,
    table: Mutex<HashMap<String, Arc<Container>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, Error> {
        lock(&self.processes).get(exec_id).cloned().ok_or_else(|| {
            Error::not_found(format!("container {} has no process {exec_id:?}", self.id))
        })
    }

    pub fn init(&self) -> Option<Arc<Process>> {
        lock(&self.processes).get("").cloned()
    }

    fn init_running(&self) -> bool {
        self.init().is_some_and(|p| p.exited().is_none())
    }
}

impl Containers {
    /// `state_dir` must hold the `containers`, `runtime` and `tty` directories.
    pub fn new(
        state_dir: PathBuf,
        reaper: Arc<Reaper>,
        oom_events: broadcast::Sender<OomEvent>,
    ) -> Self {
        Self {
            state_dir,
            reaper,
            oom_events,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.state_dir.join("containers")
    }
    /// libcontainer's state root.
    pub fn runtime_root(&self) -> PathBuf {
        self.state_dir.join("runtime")
    }
    pub fn tty_dir(&self) -> PathBuf {
        self.state_dir.join("tty")
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, Error> {
        check_id("container id", id)?;
        lock(&self.table)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no container {id}")))
    }

    pub fn all(&self) -> Vec<Arc<Container>> {
        lock(&self.table).values().cloned().collect()
    }

    /// A process of a container; `exec_id` "" is its init process.
    pub fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>, Error> {
        check_exec_id(exec_id)?;
        self.container(container_id)?.process(exec_id)
    }

    pub async fn create(
        &self,
        req: CreateContainerRequest,
        sandbox: &SandboxContext<'_>,
    ) -> Result<u32, Error> {
        check_id("container id", &req.container_id)?;
        let id = req.container_id.clone();
        let container = Arc::new(Container {
            id: id.clone(),
            dir: self.containers_dir().join(&id),
            cgroup: ContainerCgroup {
                path: PathBuf::from("/kata-like").join(sandbox.id).join(&id),
                name: id.clone(),
            },
            lifecycle: tokio::sync::Mutex::new(Lifecycle::Creating),
            paused: AtomicBool::new(false),
            has_poststart_hooks: AtomicBool::new(false),
            // Until the spec is known, assume hooks (the helper path is always correct).
            has_poststop_hooks: AtomicBool::new(true),
            processes: Mutex::new(HashMap::new()),
            oom_watch: Mutex::new(None),
        });
        {
            let mut map = lock(&self.table);
            if map.contains_key(&id) {
                return Err(Error::already_exists(format!("container {id} exists")));
            }
            map.insert(id.clone(), Arc::clone(&container));
        }
        let mut lifecycle = container.lifecycle.lock().await;
        match self.create_inner(sandbox, &container, &req).await {
            Ok(pid) => {
                *lifecycle = Lifecycle::Created;
                tracing::info!(container_id = %id, pid, "container created");
                Ok(pid)
            }
            Err(error) => {
                tracing::warn!(container_id = %id, %error, "create failed");
                self.cleanup(&container).await;
                lock(&self.table).remove(&id);
                Err(error)
            }
        }
    }

    /// The pid namespace a new container joins, as the shim resolved the CRI's mode: `None` for
    /// a new one of its own.
    fn pid_namespace(
        &self,
        req: &CreateContainerRequest,
        sandbox: &SandboxContext<'_>,
    ) -> Result<Option<PathBuf>, Error> {
        match PidNamespaceMode::try_from(req.pid_namespace) {
            Ok(PidNamespaceMode::Own) => Ok(None),
            Ok(PidNamespaceMode::Pod) => sandbox.pid_ns.clone().map(Some).ok_or_else(|| {
                Error::failed_precondition(
                    "the container asks for the pod's pid namespace, but the sandbox was \
                     created without one (CreateSandbox shared_pid_namespace)",
                )
            }),
            Ok(PidNamespaceMode::Target) => {
                let target = &req.pid_namespace_target;
                check_id("pid namespace target", target)?;
                let running = self
                    .container(target)?
                    .init()
                    .filter(|init| init.exited().is_none())
                    .ok_or_else(|| {
                        Error::failed_precondition(format!(
                            "pid namespace target {target} has no running init process"
                        ))
                    })?;
                Ok(Some(PathBuf::from(format!("/proc/{}/ns/pid", running.pid))))
            }
            Err(_) => Err(invalid(format!(
                "pid_namespace {} is not a known mode",
                req.pid_namespace
            ))),
        }
    }

    async fn create_inner(
        &self,
        sandbox: &SandboxContext<'_>,
        container: &Arc<Container>,
        req: &CreateContainerRequest,
    ) -> Result<u32, Error> {
        let rootfs_req = req
            .rootfs
            .as_ref()
            .ok_or_else(|| invalid("rootfs is required"))?;
        let lowers = storage::check_lower_dirs(&rootfs_req.lower_dirs, &self.state_dir)?;
        let stdio_req = req.stdio.unwrap_or_default();
        let stdio_req = StdioRequest {
            terminal: stdio_req.terminal,
            stdin: stdio_req.stdin,
        };
        // Validate the spec before touching anything (rootfs path is known in advance).
        let rootfs_path = container.dir.join("rootfs");
        let pid_ns = self.pid_namespace(req, sandbox)?;
        let ctx = SpecContext {
            container_id: &container.id,
            sandbox_id: sandbox.id,
            rootfs: &rootfs_path,
            state_dir: &self.state_dir,
            terminal: stdio_req.terminal,
            pid_ns,
            sandbox_hostname: Some(sandbox.hostname.to_string()).filter(|h| !h.is_empty()),
            // On a read-only rootfs a missing mount point cannot be created: inject the
            // sandbox files only where the image has them.
            sandbox_files: sandbox
                .files
                .iter()
                .filter(|(dest, _)| {
                    rootfs_req.writable
                        || lowers.iter().any(|l| {
                            l.join(dest.strip_prefix("/").unwrap_or(dest))
                                .symlink_metadata()
                                .is_ok()
                        })
                })
                .cloned()
                .collect(),
            guest_dev: Path::new("/dev"),
        };
        let spec = adapt_spec(&req.oci_spec_json, &ctx)?;
        let hooks = spec.hooks().as_ref();
        container.has_poststart_hooks.store(
            hooks.is_some_and(|h| is_non_empty(h.poststart())),
            Ordering::Relaxed,
        );
        container.has_poststop_hooks.store(
            hooks.is_some_and(|h| is_non_empty(h.poststop())),
            Ordering::Relaxed,
        );

        match std::fs::create_dir(&container.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::internal(format!(
                    "stale state of a container {} is in the way",
                    container.id
                )))
            }
            Err(e) => return Err(Error::internal(format!("creating container dir: {e}"))),
        }
        storage::mount_rootfs(
            &container.dir,
            &lowers,
            rootfs_req.writable,
            rootfs_req.upper_size_bytes,
        )?;
        let config = serde_json::to_vec(&spec)
            .map_err(|e| Error::internal(format!("encoding config.json: {e}")))?;
        std::fs::write(container.dir.join("config.json"), config)
            .map_err(|e| Error::internal(format!("writing config.json: {e}")))?;

        let mut stdio = PreparedStdio::prepare(stdio_req, &self.tty_dir())?;
        let request = RuntimeRequest::Create {
            id: container.id.clone(),
            root: self.runtime_root(),
            bundle: container.dir.clone(),
            console_socket: stdio.console_socket(),
        };
        let helper_stdio = stdio.helper_stdio();
        let response = run_helper(&self.reaper, &self.state_dir, &request, helper_stdio)
            .await
            .map_err(Error::internal);
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                stdio.abandon();
                return Err(e);
            }
        };
        let pid = match (response.pid, response.error) {
            (Some(pid), None) => pid,
            (_, error) => {
                stdio.abandon();
                return Err(runtime_error(error));
            }
        };
        let exit = self.reaper.claim(pid);
        let stdio = stdio.finish().await?;
        let process = Arc::new(Process {
            container_id: container.id.clone(),
            exec_id: String::new(),
            pid,
            exit,
            stdio,
        });
        lock(&container.processes).insert(String::new(), process);
        if let Some(task) = crate::cgroups::watch_oom(
            &container.cgroup,
            container.id.clone(),
            self.oom_events.clone(),
        ) {
            *lock(&container.oom_watch) = Some(task);
        }
        Ok(pid)
    }

    /// SIGKILLs every process of the container (cgroup members and the processes we track).
    fn kill_all(&self, container: &Container) {
        if let Ok(pids) = container.cgroup.pids() {
            for pid in pids {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        for process in lock(&container.processes).values() {
            self.reaper.with_live_pid(process.pid, |live| {
                if live {
                    // SAFETY: an unreaped child of ours: the pid cannot have been reused.
                    unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
                }
            });
        }
    }

    /// Undoes whatever part of a create or a container's life happened; never fails.
    async fn cleanup(&self, container: &Container) {
        // The runtime delete can race with exiting members of the cgroup; retry a few times.
        for attempt in 0..5 {
            if !self.runtime_root().join(&container.id).exists() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            if !container.has_poststop_hooks.load(Ordering::Relaxed) {
                // Without poststop hooks a delete does not fork (kill, cgroup and state
                // removal): run it here and save a helper exec on every container's end.
                let dir = self.runtime_root().join(&container.id);
                let result = tokio::task::spawn_blocking(move || {
                    let mut c = libcontainer::container::Container::load(dir)?;
                    c.delete(true)
                })
                .await;
                match result {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(container_id = %container.id, attempt, error = %e, "runtime delete failed")
                    }
                    Err(e) => {
                        tracing::warn!(container_id = %container.id, attempt, error = %e, "runtime delete task failed")
                    }
                }
                continue;
            }
            let request = RuntimeRequest::Delete {
                id: container.id.clone(),
                root: self.runtime_root(),
            };
            let result =
                run_helper(&self.reaper, &self.state_dir, &request, HelperStdio::null()).await;
            match result {
                Ok(r) if r.error.is_none() => break,
                Ok(r) => {
                    tracing::warn!(container_id = %container.id, attempt, error = r.error.unwrap_or_default(), "runtime delete failed")
                }
                Err(e) => {
                    tracing::warn!(container_id = %container.id, attempt, error = %e, "runtime delete failed")
                }
            }
        }
        if let Some(task) = lock(&container.oom_watch).take() {
            task.abort();
        }
        storage::unmount_rootfs(&container.dir);
        if container.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&container.dir) {
                tracing::warn!(container_id = %container.id, error = %e, "removing container dir");
            }
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), Error> {
        let container = self.container(id)?;
        let mut lifecycle = container.lifecycle.lock().await;
        if *lifecycle != Lifecycle::Created {
            return Err(Error::failed_precondition(format!(
                "container {id} is {lifecycle:?}, not Created"
            )));
        }
        if !container.init_running() {
            return Err(Error::failed_precondition(format!(
                "container {id}'s init process has exited"
            )));
        }
        if container.has_poststart_hooks.load(Ordering::Relaxed) {
            // Poststart hooks fork: run them from a helper.
            let request = RuntimeRequest::Start {
                id: id.to_string(),
                root: self.runtime_root(),
            };
            let response = run_helper(&self.reaper, &self.state_dir, &request, HelperStdio::null())
                .await
                .map_err(Error::internal)?;
            if response.error.is_some() {
                return Err(runtime_error(response.error));
            }
        } else {
            // Starting only writes to the init's notify socket and the state file: no fork, so
            // it can run here (one helper exec less on the start path).
            let dir = self.runtime_root().join(id);
            tokio::task::spawn_blocking(move || {
                let mut c = libcontainer::container::Container::load(dir)?;
                c.start()
            })
            .await
            .map_err(|e| Error::internal(format!("start task: {e}")))?
            .map_err(|e| runtime_error(Some(e.to_string())))?;
        }
        *lifecycle = Lifecycle::Running;
        tracing::info!(container_id = %id, "container started");
        Ok(())
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> Result<u32, Error> {
        let container = self.container(&req.container_id)?;
        check_id("exec id", &req.exec_id)?;
        let lifecycle = container.lifecycle.lock().await;
        if *lifecycle != Lifecycle::Running || !container.init_running() {
            return Err(Error::failed_precondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        if container.paused.load(Ordering::Relaxed) {
            return Err(Error::failed_precondition(format!(
                "container {} is paused",
                container.id
            )));
        }
        if lock(&container.processes).contains_key(&req.exec_id) {
            return Err(Error::already_exists(format!(
                "exec {} exists in container {}",
                req.exec_id, container.id
            )));
        }
        let stdio_req = req.stdio.unwrap_or_default();
        let stdio_req = StdioRequest {
            terminal: stdio_req.terminal,
            stdin: stdio_req.stdin,
        };
        let process = parse_process(&req.oci_process_json, stdio_req.terminal)?;
        let exec_dir = container.dir.join("exec");
        std::fs::create_dir_all(&exec_dir)
            .map_err(|e| Error::internal(format!("creating exec dir: {e}")))?;
        let process_path = exec_dir.join(format!("{}.json", req.exec_id));
        let json = serde_json::to_vec(&process)
            .map_err(|e| Error::internal(format!("encoding process: {e}")))?;
        std::fs::write(&process_path, json)
            .map_err(|e| Error::internal(format!("writing process: {e}")))?;

        let mut stdio = PreparedStdio::prepare(stdio_req, &self.tty_dir())?;
        let request = RuntimeRequest::Exec {
            id: container.id.clone(),
            root: self.runtime_root(),
            process: process_path.clone(),
            console_socket: stdio.console_socket(),
        };
        let helper_stdio = stdio.helper_stdio();
        let response = run_helper(&self.reaper, &self.state_dir, &request, helper_stdio).await;
        let _ = std::fs::remove_file(&process_path);
        let pid = match response {
            Ok(r) if r.error.is_none() && r.pid.is_some() => r.pid.unwrap_or_default(),
            Ok(r) => {
                stdio.abandon();
                return Err(runtime_error(r.error));
            }
            Err(e) => {
                stdio.abandon();
                return Err(Error::internal(e));
            }
        };
        let exit = self.reaper.claim(pid);
        let stdio = stdio.finish().await?;
        let process = Arc::new(Process {
            container_id: container.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            exit,
            stdio,
        });
        lock(&container.processes).insert(req.exec_id.clone(), process);
        tracing::info!(container_id = %container.id, exec_id = %req.exec_id, pid, "process started");
        Ok(pid)
    }

    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), Error> {
        check_exec_id(exec_id)?;
        let container = self.container(container_id)?;
        if signal > 64 {
            return Err(invalid(format!("signal {signal} is out of range")));
        }
        let raw_signal = signal as i32;
        if all {
            let pids = container.cgroup.pids()?;
            let kill_all = raw_signal == libc::SIGKILL;
            // Freeze first so nothing forks between listing and killing (as runc does).
            if kill_all {
                let _ = container.cgroup.freeze(true);
            }
            for pid in container.cgroup.pids().unwrap_or(pids) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid as i32, raw_signal) };
            }
            if kill_all && !container.paused.load(Ordering::Relaxed) {
                let _ = container.cgroup.freeze(false);
            }
            tracing::info!(container_id, signal, "signalled all processes");
            return Ok(());
        }
        let process = container.process(exec_id)?;
        // Under the reaper's lock the pid cannot be reaped (and reused) while we signal it.
        self.reaper.with_live_pid(process.pid, |live| {
            if !live {
                return Err(Error::not_found(format!(
                    "process {exec_id:?} of container {container_id} has already exited"
                )));
            }
            let sig = if raw_signal == 0 {
                None
            } else {
                Some(
                    Signal::try_from(raw_signal)
                        .map_err(|_| invalid(format!("signal {signal} is not a valid signal")))?,
                )
            };
            match sig {
                Some(sig) => nix::sys::signal::kill(Pid::from_raw(process.pid as i32), sig),
                None => nix::sys::signal::kill(Pid::from_raw(process.pid as i32), None),
            }
            .map_err(|e| Error::internal(format!("kill: {e}")))
        })?;
        tracing::info!(container_id, exec_id, signal, "signalled process");
        Ok(())
    }

    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        let container = self.container(id)?;
        let mut lifecycle = container.lifecycle.lock().await;
        if *lifecycle == Lifecycle::Removing {
            return Err(Error::failed_precondition(format!(
                "container {id} is being removed"
            )));
        }
        *lifecycle = Lifecycle::Removing;
        if let Some(init) = container.init() {
            if init.exited().is_none() {
                let _ = tokio::time::timeout(timeout, wait_exit(init.exit.clone())).await;
            }
        }
        if container.paused.swap(false, Ordering::Relaxed) {
            let _ = container.cgroup.freeze(false);
        }
        // Kill what is left and let the reaper collect the init before the runtime removes the
        // cgroup (a cgroup with unreaped members cannot be removed).
        self.kill_all(&container);
        if let Some(init) = container.init() {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), wait_exit(init.exit.clone())).await;
        }
        self.cleanup(&container).await;
        lock(&self.table).remove(id);
        tracing::info!(container_id = %id, "container removed");
        Ok(())
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), Error> {
        let container = self.container(id)?;
        let lifecycle = container.lifecycle.lock().await;
        if *lifecycle != Lifecycle::Running {
            return Err(Error::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        if container.paused.load(Ordering::Relaxed) == pause {
            return Err(Error::failed_precondition(format!(
                "container {id} is already {}",
                if pause { "paused" } else { "running" }
            )));
        }
        container.cgroup.freeze(pause)?;
        container.paused.store(pause, Ordering::Relaxed);
        tracing::info!(container_id = %id, paused = pause, "container freezer changed");
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), Error> {
        let container = self.container(id)?;
        let mut resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources_json)
                .map_err(|e| invalid(format!("oci_linux_resources_json: {e}")))?;
        let lifecycle = container.lifecycle.lock().await;
        if !matches!(*lifecycle, Lifecycle::Created | Lifecycle::Running) {
            return Err(Error::failed_precondition(format!(
                "container {id} is {lifecycle:?}"
            )));
        }
        // Device rules are fixed at creation, as with `runc update`: libcgroups re-applies the
        // device filter on every update, and an update without them (most are) would replace the
        // container's rules with the defaults.
        resources.set_devices(created_devices(&container.dir)?);
        container.cgroup.update(&resources)?;
        tracing::info!(container_id = %id, "container resources updated");
        Ok(())
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<(u32, String)>, Error> {
        let container = self.container(id)?;
        let mut list = Vec::new();
        for pid in container.cgroup.pids()? {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_default();
            list.push((pid, comm));
        }
        list.sort();
        Ok(list)
    }

    /// Writes all of `data` to a process's stdin (at most 1 MiB a request).
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, Error> {
        check_exec_id(exec_id)?;
        if data.len() > MAX_STDIN_WRITE {
            return Err(Error::resource_exhausted("stdin writes are at most 1 MiB"));
        }
        let process = self.process(container_id, exec_id)?;
        process.stdio.write_stdin(data).await
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), Error> {
        let process = self.process(container_id, exec_id)?;
        process.stdio.close_stdin().await;
        Ok(())
    }

    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), Error> {
        check_exec_id(exec_id)?;
        let (Ok(rows), Ok(columns)) = (u16::try_from(rows), u16::try_from(columns)) else {
            return Err(invalid("rows and columns must fit in 16 bits"));
        };
        let process = self.process(container_id, exec_id)?;
        process.stdio.resize(rows, columns)
    }

    /// Attaches a stream to a process's stdout or stderr (`fd`, the protocol's `OutputFd`).
    pub fn attach_output(
        &self,
        container_id: &str,
        exec_id: &str,
        fd: i32,
    ) -> Result<OutputStream, Error> {
        let process = self.process(container_id, exec_id)?;
        let pipe = match OutputFd::try_from(fd) {
            Ok(OutputFd::Stdout) => &process.stdio.stdout,
            Ok(OutputFd::Stderr) => &process.stdio.stderr,
            _ => return Err(invalid("fd must be STDOUT or STDERR")),
        };
        pipe.attach((container_id.to_string(), exec_id.to_string()))
    }
}

fn is_non_empty(hooks: &Option<Vec<oci_spec::runtime::Hook>>) -> bool {
    hooks.as_ref().is_some_and(|h| !h.is_empty())
}

/// The device cgroup rules of the container's adapted config.json.
fn created_devices(dir: &Path) -> Result<Option<Vec<oci_spec::runtime::LinuxDeviceCgroup>>, Error> {
    let spec = oci_spec::runtime::Spec::load(dir.join("config.json"))
        .map_err(|e| Error::internal(format!("reading the container's config.json: {e}")))?;
    Ok(spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().clone()))
}

fn runtime_error(error: Option<String>) -> Error {
    let message = error.unwrap_or_else(|| "the runtime returned no pid".into());
    // libcontainer reports spec problems it finds as errors too; they still are the guest's
    // failure to run the container as asked.
    Error::internal(format!("runtime: {message}"))
}

/// Used by tests of path layout.
pub fn container_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("containers").join(id)
}
