//! The pod VM: its state dir, the VMM process, the agent link, drive slots with the storages in
//! them, and its end (clean stop, death, or cleanup after a crashed shim).
//!
//! State dir `<state_dir>/<hash of namespace and sandbox id>/`: `vmm.pid`, `jail/` (with `api.sock` and
//! `vsock.sock`), `console.log`, `vmm.log`, `network.json` (what was connected in the pod's
//! network namespace), scratch images. `delete` and a restarted shim use it to kill a VMM left
//! behind, undo the network connection and remove everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_like_protocol as pb;
use kata_like_vmm_contract::{DeviceCounters, DeviceMetrics, VmMetrics};
use tokio::sync::watch;

use crate::config::{Config, VmShape};
use crate::error::{Error, Result};
use crate::vm::agent_client::{Agent, PodIdentity};
use crate::vm::cgroup::{self, HostCgroup, PodCgroup};
use crate::vm::console_log::{self, RotatingLog};
use crate::vm::network::{self, PodNetwork};
use crate::vm::shared_fs::{self, SharedFs};
use crate::vm::storage::{storage_mount_point, LayerImage};
use crate::vm::vmm_client::{self as vmm, VmmApi, VmmPaths};
use crate::vm::vmm_ids;

/// How the VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code, or 128 + signal when the VMM was killed by a signal.
    pub status: i32,
    pub reason: String,
}

/// Bytes of the console log kept in the shim's log when the VM dies.
const CONSOLE_TAIL_BYTES: u64 = 4096;
/// How long the console drain may take to read what a VMM that ended left in the pipe (a
/// guard: it reads at most a pipe's worth).
const CONSOLE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful stop may take before the VMM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn state_dir_for(config: &Config, namespace: &str, sandbox_id: &str) -> Result<PathBuf> {
    Ok(config
        .state_dir
        .join(state_dir_name(namespace, sandbox_id)?))
}

/// The state dir's name: a short hash of namespace and sandbox id. Sockets live two levels
/// below it and a Unix socket path must stay under 108 bytes, which a 64-hex-digit container id
/// under a test's state dir would exceed.
pub fn state_dir_name(namespace: &str, sandbox_id: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    crate::ids::check_id("namespace", namespace)?;
    crate::ids::check_id("sandbox", sandbox_id)?;
    let digest = Sha256::digest(format!("{namespace}/{sandbox_id}").as_bytes());
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Kills whatever an earlier shim left in a state dir, undoes its network connection and
/// removes it. The VMM goes first: its end closes the TAPs. A network that could not be undone
/// keeps the state dir (and its record) for the next attempt.
pub fn cleanup_state_dir(state_dir: &Path) -> Result<()> {
    if !state_dir.exists() {
        return Ok(());
    }
    let paths = VmmPaths::new(state_dir);
    if let Some(pid) = vmm::kill_recorded(&paths)? {
        tracing::warn!(pid, state_dir = %state_dir.display(), "killed a VMM left behind");
    }
    network::disconnect_recorded(state_dir)?;
    // Before anything is removed: a volume still bound there would lose its host files.
    shared_fs::cleanup(state_dir)?;
    // Once the VMM is gone: the shim leaves the cgroup, which is then empty and removed.
    cgroup::leave_recorded(state_dir)?;
    // After the VMM's end: the id is free for another pod only once nothing runs as it.
    vmm_ids::release(state_dir)?;
    std::fs::remove_dir_all(state_dir)
        .map_err(Error::io(format!("remove {}", state_dir.display())))?;
    Ok(())
}

/// What occupies a drive slot.
#[derive(Debug)]
struct Slot {
    storage_id: String,
    users: usize,
}

#[derive(Debug, Default)]
struct Storages {
    /// slot index -> storage in it.
    slots: HashMap<u32, Slot>,
    /// tmpfs storages (shared directories) -> users.
    tmpfs: HashMap<String, usize>,
    /// Host directories on the shared file system (virtio-fs) -> users.
    shared_dirs: HashMap<String, usize>,
}

/// Where the pod VM attaches on the node, from the sandbox's OCI spec.
#[derive(Debug, Default, Clone, Copy)]
pub struct PodHost<'a> {
    /// The pod's network namespace, whose interfaces become the VM's NICs.
    pub netns: Option<&'a Path>,
    /// The sandbox's host cgroup, which the shim, the VMM and its helpers join.
    pub cgroup: Option<&'a HostCgroup>,
    /// The pod's log directory (kubelet's, from CRI): the guest console is kept there too, so it
    /// lives as long as the pod's container logs. Unchecked: outside data.
    pub pod_log_dir: Option<&'a Path>,
}

/// A running pod VM.
pub struct Vm {
    pub sandbox_id: String,
    pub state_dir: PathBuf,
    pub pid: u32,
    /// The VM's guest memory, as booted.
    pub memory_mib: u32,
    /// The pod's host cgroup, holding the shim, the VMM and its helpers.
    pub cgroup: Option<PodCgroup>,
    pub api: VmmApi,
    pub agent: Agent,
    /// The pod's virtiofsd, serving its host volumes.
    pub shared_fs: SharedFs,
    paths: VmmPaths,
    slot_count: u32,
    exited: watch::Receiver<Option<VmExit>>,
    storages: tokio::sync::Mutex<Storages>,
    /// Set once a stop was asked for: the VM's end is then expected, not a failure.
    stopping: Mutex<bool>,
    /// The task copying the console pipe into the rotated console log; ends with the VMM.
    console_drain: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("sandbox_id", &self.sandbox_id)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Vm {
    /// Boots the pod VM and waits for its agent; on any failure nothing is left running.
    pub async fn start(
        config: &Config,
        shape: &VmShape,
        namespace: &str,
        sandbox_id: &str,
        identity: &PodIdentity,
        host: &PodHost<'_>,
    ) -> Result<Arc<Vm>> {
        let state_dir = state_dir_for(config, namespace, sandbox_id)?;
        // A state dir left by a shim that died is cleaned before reuse.
        cleanup_state_dir(&state_dir)?;
        std::fs::create_dir_all(&state_dir)
            .map_err(Error::io(format!("create {}", state_dir.display())))?;
        let booted = Vm::boot(config, shape, &state_dir, sandbox_id, identity, host);
        match booted.await {
            Ok(vm) => Ok(vm),
            Err(e) => {
                let tail = console_log::tail(&state_dir.join("console.log"), CONSOLE_TAIL_BYTES);
                let vmm_log = console_log::tail(&state_dir.join("vmm.log"), CONSOLE_TAIL_BYTES);
                if let Err(ce) = cleanup_state_dir(&state_dir) {
                    tracing::error!(sandbox_id, error = %ce, "cleanup after a failed boot");
                }
                Err(match e {
                    Error::VmGone(m) | Error::Agent(m) => Error::VmGone(format!(
                        "{m}; VMM log: {vmm_log:?}; guest console: {tail:?}"
                    )),
                    other => other,
                })
            }
        }
    }

    async fn boot(
        config: &Config,
        shape: &VmShape,
        state_dir: &Path,
        sandbox_id: &str,
        identity: &PodIdentity,
        host: &PodHost<'_>,
    ) -> Result<Arc<Vm>> {
        for (what, path) in [("VMM", &config.vmm.path), ("kernel", &config.vmm.kernel)] {
            if !path.exists() {
                return Err(Error::InvalidConfig(format!(
                    "{what} {} does not exist",
                    path.display()
                )));
            }
        }
        if let Some(initrd) = &config.vmm.initrd {
            if !initrd.exists() {
                return Err(Error::InvalidConfig(format!(
                    "initramfs {} does not exist",
                    initrd.display()
                )));
            }
        }
        let paths = VmmPaths::new(state_dir);
        let started = std::time::Instant::now();
        // First: the VMM, its threads and helpers started from now on inherit the cgroup.
        let cgroup = match host.cgroup {
            Some(request) if cgroup::is_cgroup2(Path::new(cgroup::CGROUP_ROOT)) => {
                let joined = PodCgroup::enter(Path::new(cgroup::CGROUP_ROOT), request, state_dir)?;
                tracing::info!(sandbox_id, cgroup = %joined.dir.display(), "shim in the pod's cgroup");
                Some(joined)
            }
            Some(request) => {
                tracing::warn!(
                    sandbox_id,
                    cgroups_path = %request.cgroups_path,
                    "no cgroup v2 hierarchy at /sys/fs/cgroup: the pod VM runs outside the pod's cgroup"
                );
                None
            }
            None => None,
        };
        let network = match host.netns {
            Some(netns) => {
                let (netns, sid) = (netns.to_path_buf(), sandbox_id.to_string());
                let network =
                    tokio::task::spawn_blocking(move || PodNetwork::connect(&netns, &sid))
                        .await
                        .map_err(|e| Error::Other(format!("connecting the pod network: {e}")))??;
                // Recorded before anything else can fail: the failure path's state dir cleanup
                // undoes it.
                network::save_record(state_dir, &network.record)?;
                Some(network)
            }
            None => None,
        };
        let (nics, setup) = match network {
            Some(n) => (n.nics, n.setup),
            None => (Vec::new(), pb::SetupNetworkRequest::default()),
        };
        let console = RotatingLog::create(
            &paths.console_log,
            config.console_log.max_bytes,
            config.console_log.files,
        )
        .map_err(Error::io(format!("create {}", paths.console_log.display())))?;
        let mut console_logs = vec![console];
        if let Some(dir) = host.pod_log_dir {
            match console_log::create_kept(
                dir,
                config.console_log.max_bytes,
                config.console_log.files,
            ) {
                Ok(kept) => {
                    tracing::info!(sandbox_id, path = %kept.path().display(), "guest console kept with the pod's logs");
                    console_logs.push(kept);
                }
                Err(e) => tracing::warn!(
                    sandbox_id,
                    pod_log_dir = %dir.display(),
                    error = %e,
                    "the guest console is not kept with the pod's logs (only in the pod's state dir, deleted with the pod): fix the pod's log directory ({})",
                    console_log::SANDBOX_LOG_DIRECTORY_ANNOTATION
                ),
            }
        }
        // The pod's own uid/gid for the jailed VMM, released by the state dir cleanup.
        let jail_id = if config.jail.enabled {
            let id = vmm_ids::lease(config.jail.id_range, state_dir)?;
            tracing::info!(sandbox_id, uid = id, gid = id, "VMM id leased");
            Some(id)
        } else {
            None
        };
        // Started for every pod: devices are fixed at boot, and volumes come with containers.
        let shared_fs = SharedFs::start(config, state_dir, sandbox_id).await?;
        let spawned = vmm::spawn(config, shape, &paths, &nics, jail_id);
        // The VMM holds the TAPs now; with the shim's copies closed, they end with it.
        drop(nics);
        let (mut child, console_pipe) = match spawned {
            Ok(s) => s,
            Err(e) => {
                shared_fs.stop().await;
                return Err(e);
            }
        };
        let console_drain = tokio::spawn(console_log::drain(
            console_pipe,
            console_logs,
            sandbox_id.to_string(),
        ));
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit_rx) = watch::channel(None);
        let sid = sandbox_id.to_string();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    let code = status
                        .code()
                        .or_else(|| status.signal().map(|s| 128 + s))
                        .unwrap_or(255);
                    VmExit {
                        status: code,
                        reason: format!("VMM {status}"),
                    }
                }
                Err(e) => VmExit {
                    status: 255,
                    reason: format!("waiting for the VMM failed: {e}"),
                },
            };
            tracing::info!(sandbox_id = %sid, status = exit.status, reason = %exit.reason, "VMM exited");
            let _ = exit_tx.send(Some(exit));
        });
        let agent = Agent::new(
            &paths.vsock_sock,
            Duration::from_millis(config.vmm.agent_call_timeout_ms),
        )?;
        let vm = Arc::new(Vm {
            sandbox_id: sandbox_id.to_string(),
            state_dir: state_dir.to_path_buf(),
            pid,
            memory_mib: shape.memory_mib,
            cgroup,
            api: VmmApi::new(&paths.api_sock),
            agent,
            shared_fs,
            paths,
            slot_count: config.vmm.drive_slots,
            exited: exit_rx,
            storages: tokio::sync::Mutex::new(Storages::default()),
            stopping: Mutex::new(false),
            console_drain: Mutex::new(Some(console_drain)),
        });
        let watch = vm.exited.clone();
        let health = vm
            .agent
            .wait_ready(
                Duration::from_millis(config.vmm.boot_timeout_ms),
                || match &*watch.borrow() {
                    Some(exit) => Err(exit.reason.clone()),
                    None => Ok(()),
                },
            )
            .await;
        let health = match health {
            Ok(h) => h,
            Err(e) => {
                let e = match e {
                    // The VM runs but its agent never answered: say where the guest was.
                    Error::Agent(m) => {
                        Error::Agent(format!("{m}; {}", vm.stuck_guest_report().await))
                    }
                    other => other,
                };
                vm.kill();
                vm.wait_exit().await;
                vm.console_flushed().await;
                return Err(e);
            }
        };
        tracing::info!(
            sandbox_id,
            pid,
            agent_version = %health.agent_version,
            boot_ms = started.elapsed().as_millis() as u64,
            "pod VM is up"
        );
        let setup = async {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            vm.agent.set_time(now).await?;
            // Always: with no interface it still brings the guest's `lo` up.
            vm.agent.setup_network(setup).await?;
            vm.agent.create_sandbox(sandbox_id, identity).await?;
            Ok::<(), Error>(())
        };
        if let Err(e) = setup.await {
            vm.kill();
            vm.wait_exit().await;
            vm.console_flushed().await;
            return Err(e);
        }
        Ok(vm)
    }

    /// For a VM whose agent never answered: pauses it, which makes every vCPU log its
    /// registers to the VMM log (kept in the error), and summarises the devices' state.
    async fn stuck_guest_report(&self) -> String {
        // Metrics first: the VMM answers them at once, while a pause waits for every vCPU
        // to park, and a VMM that cannot pause would not answer the metrics after it either.
        let metrics = match self.api.metrics().await {
            Ok(m) => format!("VM at the timeout: {}", describe_vm_metrics(&m)),
            Err(e) => return format!("VM metrics unavailable: {e}"),
        };
        match self.api.pause().await {
            Ok(()) => format!("{metrics}; vCPU registers are in the VMM log"),
            Err(e) => format!("{metrics}; pausing it failed: {e}"),
        }
    }

    /// The VM's end, once it happened.
    pub fn exit(&self) -> Option<VmExit> {
        self.exited.borrow().clone()
    }

    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exited.clone()
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails when the VM is gone, with how it ended.
    pub fn check_alive(&self) -> Result<()> {
        match self.exit() {
            Some(exit) => Err(Error::VmGone(exit.reason)),
            None => Ok(()),
        }
    }

    /// Waits for the VMM process to end.
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exited.clone();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return VmExit {
                    status: 255,
                    reason: "VMM watcher ended".into(),
                };
            }
        }
    }

    /// SIGKILL to the VMM (it is our child: the waiter task reaps it).
    pub fn kill(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if self.exit().is_none() && self.pid != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Stops the VM: a clean guest poweroff through the VMM API (forced when `force`), then
    /// SIGKILL if it has not ended in time.
    pub async fn stop(&self, force: bool) -> VmExit {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if self.exit().is_none() {
            let timeout_ms = STOP_TIMEOUT.as_millis() as u64;
            if let Err(e) = self.api.stop(force, timeout_ms).await {
                tracing::warn!(sandbox_id = %self.sandbox_id, error = %e, "VMM stop request failed; killing it");
                self.kill();
            }
        }
        match tokio::time::timeout(STOP_TIMEOUT * 2, self.wait_exit()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(sandbox_id = %self.sandbox_id, "VMM did not stop in time; killing it");
                self.kill();
                self.wait_exit().await
            }
        }
    }

    /// Once the VMM has ended: waits (bounded) until the console drain has copied what the
    /// VMM left in the pipe, so that the console log and its tail are complete.
    pub async fn console_flushed(&self) {
        let drain = self
            .console_drain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(drain) = drain {
            if tokio::time::timeout(CONSOLE_FLUSH_TIMEOUT, drain)
                .await
                .is_err()
            {
                tracing::warn!(sandbox_id = %self.sandbox_id, "the guest console pipe stayed open after the VMM ended");
            }
        }
    }

    /// Stops the VM if needed and removes the state dir.
    pub async fn destroy(&self) -> VmExit {
        let exit = self.stop(true).await;
        self.shared_fs.stop().await;
        // The drain writes into the state dir until the pipe ends.
        self.console_flushed().await;
        if let Err(e) = cleanup_state_dir(&self.state_dir) {
            tracing::error!(sandbox_id = %self.sandbox_id, error = %e, "removing the state dir failed");
        }
        exit
    }

    /// The last bytes of the guest console, for error messages and the shim log.
    pub fn console_tail(&self) -> String {
        console_log::tail(&self.paths.console_log, CONSOLE_TAIL_BYTES)
    }

    /// Puts a layer image into a free drive slot and has the agent mount it; a layer already
    /// attached for another container of the pod is shared. Returns the guest mount point.
    pub async fn attach_layer(
        &self,
        storage_id: &str,
        image: Option<LayerImage>,
    ) -> Result<String> {
        let mut storages = self.storages.lock().await;
        if let Some(slot) = storages
            .slots
            .values_mut()
            .find(|s| s.storage_id == storage_id)
        {
            slot.users += 1;
            return Ok(storage_mount_point(storage_id));
        }
        let image = image.ok_or_else(|| {
            Error::Other(format!(
                "layer {storage_id} is not attached and no image was given"
            ))
        })?;
        let index = (0..self.slot_count)
            .find(|i| !storages.slots.contains_key(i))
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "all {} drive slots of the pod VM are in use (vmm.drive_slots); \
                     the pod's containers use too many distinct image layers",
                    self.slot_count
                ))
            })?;
        let slot_id = vmm::slot_id(index);
        use std::os::fd::AsFd;
        self.api
            .set_drive(&slot_id, image.file.as_fd(), true)
            .await?;
        let added = self
            .agent
            .add_storage(pb::AddStorageRequest {
                storage_id: storage_id.to_string(),
                source: Some(pb::add_storage_request::Source::BlockSerial(
                    slot_id.clone(),
                )),
                fs_type: "erofs".into(),
                options: vec!["ro".into()],
                wait_ms: 10_000,
            })
            .await;
        let mount_point = match added {
            Ok(mount_point) => mount_point,
            Err(e) => {
                let _ = self.api.clear_drive(&slot_id).await;
                return Err(e);
            }
        };
        storages.slots.insert(
            index,
            Slot {
                storage_id: storage_id.to_string(),
                users: 1,
            },
        );
        Ok(mount_point)
    }

    /// Drops one user of a layer; the last one unmounts it and empties its slot.
    pub async fn release_layer(&self, storage_id: &str) -> Result<()> {
        let mut storages = self.storages.lock().await;
        let Some((&index, slot)) = storages
            .slots
            .iter_mut()
            .find(|(_, s)| s.storage_id == storage_id)
        else {
            return Ok(());
        };
        slot.users -= 1;
        if slot.users > 0 {
            return Ok(());
        }
        storages.slots.remove(&index);
        if self.exit().is_some() {
            return Ok(());
        }
        self.agent.remove_storage(storage_id).await?;
        self.api.clear_drive(&vmm::slot_id(index)).await
    }

    /// A guest tmpfs standing in for a host directory, shared by the pod's containers.
    pub async fn attach_tmpfs(&self, storage_id: &str) -> Result<(String, bool)> {
        let mut storages = self.storages.lock().await;
        if let Some(users) = storages.tmpfs.get_mut(storage_id) {
            *users += 1;
            return Ok((storage_mount_point(storage_id), false));
        }
        let mount_point = self.add_tmpfs_storage(storage_id, vec![]).await?;
        storages.tmpfs.insert(storage_id.to_string(), 1);
        Ok((mount_point, true))
    }

    /// Has the agent mount a fresh tmpfs storage with these options; returns its mount point.
    async fn add_tmpfs_storage(&self, storage_id: &str, options: Vec<String>) -> Result<String> {
        self.agent
            .add_storage(pb::AddStorageRequest {
                storage_id: storage_id.to_string(),
                source: Some(pb::add_storage_request::Source::Tmpfs(true)),
                fs_type: "tmpfs".into(),
                options,
                wait_ms: 0,
            })
            .await
    }

    /// A guest tmpfs that lives as long as the pod VM (a memory emptyDir), mounted with
    /// `options` (size, mode, uid, gid) the first time; later calls return its mount point.
    /// No container releases it: it goes with the VM.
    pub async fn attach_pod_tmpfs(&self, storage_id: &str, options: Vec<String>) -> Result<String> {
        let mut storages = self.storages.lock().await;
        if storages.tmpfs.contains_key(storage_id) {
            return Ok(storage_mount_point(storage_id));
        }
        let mount_point = self.add_tmpfs_storage(storage_id, options).await?;
        // The pod's own reference: no container's release brings it to zero.
        storages.tmpfs.insert(storage_id.to_string(), 1);
        Ok(mount_point)
    }

    /// Whether a tmpfs storage is still attached (some container still uses it).
    pub async fn has_tmpfs(&self, storage_id: &str) -> bool {
        self.storages.lock().await.tmpfs.contains_key(storage_id)
    }

    pub async fn release_tmpfs(&self, storage_id: &str) -> Result<()> {
        let mut storages = self.storages.lock().await;
        let Some(users) = storages.tmpfs.get_mut(storage_id) else {
            return Ok(());
        };
        *users -= 1;
        if *users > 0 {
            return Ok(());
        }
        storages.tmpfs.remove(storage_id);
        if self.exit().is_some() {
            return Ok(());
        }
        self.agent.remove_storage(storage_id).await
    }

    /// Makes host directory `host` a guest storage on the shared file system (hostPath, disk
    /// emptyDir): the same files on both sides. Counted per user, like `attach_tmpfs`.
    pub async fn attach_shared_dir(
        &self,
        storage_id: &str,
        host: &Path,
        read_only: bool,
    ) -> Result<String> {
        let mut storages = self.storages.lock().await;
        if let Some(users) = storages.shared_dirs.get_mut(storage_id) {
            *users += 1;
            return Ok(storage_mount_point(storage_id));
        }
        self.shared_fs.add_dir(storage_id, host, read_only)?;
        let added = self
            .agent
            .add_storage(pb::AddStorageRequest {
                storage_id: storage_id.to_string(),
                source: Some(pb::add_storage_request::Source::SharedFsDir(
                    storage_id.to_string(),
                )),
                fs_type: "virtiofs".into(),
                options: if read_only { vec!["ro".into()] } else { vec![] },
                wait_ms: 0,
            })
            .await;
        match added {
            Ok(mount_point) => {
                storages.shared_dirs.insert(storage_id.to_string(), 1);
                Ok(mount_point)
            }
            Err(e) => {
                if let Err(undo) = self.shared_fs.remove_dir(storage_id) {
                    tracing::error!(sandbox_id = %self.sandbox_id, storage_id, error = %undo, "unsharing a volume failed");
                }
                Err(e)
            }
        }
    }

    pub async fn release_shared_dir(&self, storage_id: &str) -> Result<()> {
        let mut storages = self.storages.lock().await;
        let Some(users) = storages.shared_dirs.get_mut(storage_id) else {
            return Ok(());
        };
        *users -= 1;
        if *users > 0 {
            return Ok(());
        }
        storages.shared_dirs.remove(storage_id);
        let removed = if self.exit().is_some() {
            Ok(())
        } else {
            self.agent.remove_storage(storage_id).await
        };
        self.shared_fs.remove_dir(storage_id)?;
        removed
    }

    /// Copies one host file into the guest, in chunks the agent accepts.
    pub async fn copy_file(&self, host: &Path, guest: &str) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        use tokio::io::AsyncReadExt;
        const CHUNK: usize = 1024 * 1024;
        const MAX_FILE: u64 = 64 * 1024 * 1024;
        let mut file = tokio::fs::File::open(host)
            .await
            .map_err(Error::io(format!("open {}", host.display())))?;
        let meta = file
            .metadata()
            .await
            .map_err(Error::io(format!("stat {}", host.display())))?;
        if meta.len() > MAX_FILE {
            return Err(Error::InvalidArgument(format!(
                "{} is larger than {MAX_FILE} bytes and cannot be copied into the pod VM",
                host.display()
            )));
        }
        let size = meta.len();
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(Error::io(format!("read {}", host.display())))?;
            if n == 0 && offset > 0 {
                break;
            }
            self.agent
                .copy_file(pb::CopyFileRequest {
                    path: guest.to_string(),
                    data: buf[..n].to_vec(),
                    offset,
                    file_size: size,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    create_parents: true,
                })
                .await?;
            offset += n as u64;
            if n == 0 || offset >= size {
                break;
            }
        }
        Ok(offset)
    }
}

/// One line from the VMM's metrics: how much the guest printed, and how far each virtio device
/// got (its status register: 0 never probed, 0xf driver ready) with vsock's traffic, the
/// agent's only channel.
pub fn describe_vm_metrics(m: &VmMetrics) -> String {
    let mut parts = vec![format!("console {} bytes", m.console_bytes)];
    fn is_block(d: &DeviceMetrics) -> bool {
        matches!(d.counters, DeviceCounters::Block { .. })
    }
    let mut block_statuses_seen: Vec<u32> = Vec::new();
    for d in &m.devices {
        let status = d.status;
        if is_block(d) {
            // A pod VM has many drive slots: one entry per status, with how many have it.
            if !block_statuses_seen.contains(&status) {
                block_statuses_seen.push(status);
                let n = m
                    .devices
                    .iter()
                    .filter(|o| is_block(o) && o.status == status)
                    .count();
                parts.push(format!("{n} block status {status:#x}"));
            }
            continue;
        }
        let mut part = format!("{} status {status:#x}", d.counters.kind());
        if let DeviceCounters::Vsock {
            open_connections,
            counters,
        } = &d.counters
        {
            part.push_str(&format!(
                " rx {} tx {} packets, {open_connections} open connections, {} resets",
                counters.rx_packets, counters.tx_packets, counters.resets_sent,
            ));
        }
        parts.push(part);
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dirs_are_per_namespace_and_sandbox_and_refuse_bad_ids() {
        let config = Config::default();
        let dir = state_dir_for(&config, "k8s.io", "abc").expect("ok");
        assert!(dir.starts_with("/run/kata-like"));
        assert_eq!(dir.file_name().map(|n| n.len()), Some(16));
        assert_ne!(dir, state_dir_for(&config, "default", "abc").expect("ok"));
        assert!(state_dir_for(&config, "..", "abc").is_err());
        assert!(state_dir_for(&config, "k8s.io", "a/b").is_err());
    }

    #[test]
    fn cleanup_removes_the_state_dir_and_spares_foreign_pids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("pod");
        std::fs::create_dir_all(state.join("jail")).expect("mkdir");
        // A pid file naming a live process that is not this sandbox's VMM (our own test
        // process): it must not be killed.
        std::fs::write(state.join("vmm.pid"), std::process::id().to_string()).expect("write");
        cleanup_state_dir(&state).expect("cleanup");
        assert!(!state.exists());
        cleanup_state_dir(&state).expect("idempotent");
    }

    #[tokio::test]
    async fn a_missing_kernel_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = boot_config(
            dir.path(),
            "/bin/true".into(),
            "/nonexistent/vmlinux".into(),
        );
        let err = failed_start(&config).await;
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn vm_metrics_read_as_one_line_with_drive_slots_grouped() {
        let m: VmMetrics = serde_json::from_value(serde_json::json!({
            "console_bytes": 1234,
            "devices": [
                {"type": "block", "id": "slot0", "status": 15},
                {"type": "block", "id": "slot1", "status": 0},
                {"type": "block", "id": "slot2", "status": 15},
                {"type": "vsock", "status": 15, "rx_packets": 3, "tx_packets": 2,
                 "open_connections": 1, "resets_sent": 1},
                {"type": "rng", "status": 7},
            ]
        }))
        .expect("metrics");
        assert_eq!(
            describe_vm_metrics(&m),
            "console 1234 bytes, 2 block status 0xf, 1 block status 0x0, \
             vsock status 0xf rx 3 tx 2 packets, 1 open connections, 1 resets, rng status 0x7"
        );
        assert_eq!(
            describe_vm_metrics(&VmMetrics::default()),
            "console 0 bytes"
        );
    }

    /// A configuration for boot tests: state under `state_dir`, no initramfs.
    fn boot_config(state_dir: &Path, vmm: PathBuf, kernel: PathBuf) -> Config {
        let mut config = Config {
            state_dir: state_dir.to_path_buf(),
            ..Default::default()
        };
        config.vmm.path = vmm;
        config.vmm.kernel = kernel;
        config.vmm.initrd = None;
        // Every pod VM starts its virtiofsd first: the one tests/install-deps builds.
        config.virtiofsd = std::env::var_os("KATA_LIKE_VIRTIOFSD")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/kata-like/virtiofsd/bin/virtiofsd")
            });
        config
    }

    /// What a pod left in the configured state dir: anything but the VMM id leases' directory
    /// with its lock file.
    fn left_in_state_dir(state: &Path) -> Vec<String> {
        let mut left = Vec::new();
        for entry in std::fs::read_dir(state).expect("state dir").flatten() {
            if entry.file_name() == vmm_ids::LEASE_DIR {
                for lease in std::fs::read_dir(entry.path()).expect("leases").flatten() {
                    if lease.file_name() != ".lock" {
                        left.push(lease.path().display().to_string());
                    }
                }
            } else {
                left.push(entry.path().display().to_string());
            }
        }
        left
    }

    /// Starts a 1-vCPU, 128 MiB pod VM that must fail; the error's text.
    async fn failed_start(config: &Config) -> String {
        let shape = VmShape {
            vcpus: 1,
            memory_mib: 128,
            debug_console: false,
        };
        Vm::start(
            config,
            &shape,
            "default",
            "pod1",
            &PodIdentity::default(),
            &PodHost::default(),
        )
        .await
        .unwrap_err()
        .to_string()
    }

    /// The VMM built beside this test binary (target/<profile>/): test.sh builds every binary
    /// before it runs the tests.
    fn built_vmm() -> PathBuf {
        let exe = std::env::current_exe().expect("test binary path");
        match exe.parent().and_then(Path::parent) {
            Some(dir) if dir.join("kata-like-vmm").exists() => dir.join("kata-like-vmm"),
            _ => panic!(
                "no kata-like-vmm beside {}: run cargo build --workspace --bins first",
                exe.display()
            ),
        }
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_is_reported_with_where_the_guest_was() {
        // A real VMM and a guest that spins at its first instruction (`jmp $`): the VM runs,
        // and no agent ever answers. Tiny guests run on any KVM.
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("spin.elf");
        std::fs::write(
            &kernel,
            kata_like_vmm::test_guest::tiny_elf(&[0xeb, 0xfe], true),
        )
        .expect("write");
        let mut config = boot_config(&dir.path().join("state"), built_vmm(), kernel);
        config.vmm.boot_timeout_ms = 500;
        config.jail.enabled = false;
        let started = std::time::Instant::now();
        let err = failed_start(&config).await;
        assert!(err.contains("did not answer within 500ms"), "{err}");
        // The boot timeout holds although each agent call may wait 5 s for a CONNECT.
        assert!(started.elapsed() < Duration::from_secs(4), "{err}");
        assert!(err.contains("VM at the timeout: console 0 bytes"), "{err}");
        assert!(
            err.contains("vsock status 0x0 rx 0 tx 0 packets"),
            "the guest never probed the vsock device: {err}"
        );
        let rip = format!("rip={:#x} ", kata_like_vmm::test_guest::TINY_ELF_LOAD_ADDR);
        assert!(err.contains("vCPU paused") && err.contains(&rip), "{err}");
        assert_eq!(
            left_in_state_dir(&dir.path().join("state")),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn a_vmm_that_dies_during_boot_is_reported_with_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake_vmm = dir.path().join("vmm.sh");
        std::fs::write(
            &fake_vmm,
            "#!/bin/sh\necho 'kvm: no such device' >&2\nexit 1\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake_vmm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = boot_config(&dir.path().join("state"), fake_vmm, "/bin/sh".into());
        let err = failed_start(&config).await;
        assert!(err.contains("exit status: 1"), "{err}");
        assert!(err.contains("kvm: no such device"), "{err}");
        assert_eq!(
            left_in_state_dir(&dir.path().join("state")),
            Vec::<String>::new()
        );
    }
}
