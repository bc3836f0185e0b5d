//! The agent's state (configuration, sandbox, containers, storages, the reaper) and the
//! operations that span more than one of them. The RPC layer (`rpc.rs`) calls into this module
//! and into the tables it holds; the domain modules below receive what they need from here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_like_protocol::{
    AddStorageRequest, CopyFileRequest, CreateContainerRequest, CreateSandboxRequest, OomEvent,
};
use tokio::sync::{broadcast, watch};

use crate::container::{Containers, SandboxContext};
use crate::error::Error;
use crate::port_forward::PortForwards;
use crate::reaper::Reaper;
use crate::sandbox::{Sandbox, SandboxEnv};
use crate::storage::Storage;
use crate::validate::check_id;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Root of everything the agent creates: storages, containers, runtime state, sandbox files.
    /// `/run/kata-like` in the guest; a test's temporary directory on the host.
    pub state_dir: PathBuf,
    /// PID 1 in the guest: allowed to change guest-wide state (hostname, sysctls, /etc files,
    /// clock, network) and to power the machine off. False on the host (tests, benchmarks),
    /// where such requests are validated but not applied to the host.
    pub guest: bool,
}

pub struct Agent {
    pub config: AgentConfig,
    pub reaper: Arc<Reaper>,
    pub sandbox: tokio::sync::RwLock<Option<Sandbox>>,
    pub containers: Containers,
    pub storages: tokio::sync::Mutex<HashMap<String, Storage>>,
    pub oom_events: broadcast::Sender<OomEvent>,
    pub started: Instant,
    /// Set to `Some(exit status)` when the agent should stop (Shutdown RPC, power port).
    pub shutdown: watch::Sender<Option<u8>>,
    /// Open PortForward connections (bounded).
    pub port_forwards: PortForwards,
}

/// Guest CLOCK_BOOTTIME in milliseconds.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

impl Agent {
    pub fn new(config: AgentConfig, reaper: Arc<Reaper>) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.state_dir)?;
        for dir in ["containers", "storage", "runtime", "tty", "sandbox"] {
            std::fs::create_dir_all(config.state_dir.join(dir))?;
        }
        let (oom_events, _) = broadcast::channel(1024);
        let (shutdown, _) = watch::channel(None);
        Ok(Arc::new(Self {
            containers: Containers::new(
                config.state_dir.clone(),
                Arc::clone(&reaper),
                oom_events.clone(),
            ),
            config,
            reaper,
            sandbox: tokio::sync::RwLock::new(None),
            storages: tokio::sync::Mutex::new(HashMap::new()),
            oom_events,
            started: Instant::now(),
            shutdown,
            port_forwards: PortForwards::default(),
        }))
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.config.state_dir.join("storage")
    }
    pub fn sandbox_dir(&self) -> PathBuf {
        self.config.state_dir.join("sandbox")
    }

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<(), Error> {
        crate::sandbox::validate(&req)?;
        let mut slot = self.sandbox.write().await;
        if let Some(existing) = slot.as_ref() {
            return Err(Error::already_exists(format!(
                "sandbox {} exists",
                existing.id
            )));
        }
        let env = SandboxEnv {
            reaper: &self.reaper,
            state_dir: &self.config.state_dir,
            dir: &self.sandbox_dir(),
            guest: self.config.guest,
        };
        *slot = Some(Sandbox::create(&req, &env).await?);
        Ok(())
    }

    pub async fn destroy_sandbox(&self) -> Result<(), Error> {
        if self.sandbox.read().await.is_none() {
            return Err(Error::failed_precondition("there is no sandbox"));
        }
        self.teardown().await;
        Ok(())
    }

    /// Creates a container in the sandbox; returns its init's pid.
    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<u32, Error> {
        check_id("container id", &req.container_id)?;
        // Held until the container exists, so the sandbox cannot go away under its creation.
        let sandbox = self.sandbox.read().await;
        let Some(sandbox) = sandbox.as_ref() else {
            return Err(Error::failed_precondition(
                "CreateSandbox must come before CreateContainer",
            ));
        };
        let context = SandboxContext {
            id: &sandbox.id,
            hostname: &sandbox.hostname,
            pid_ns: sandbox.pid_ns_path(),
            files: &sandbox.files,
        };
        self.containers.create(req, &context).await
    }

    /// Mounts a storage; returns its mount point.
    pub async fn add_storage(&self, req: &AddStorageRequest) -> Result<String, Error> {
        check_id("storage id", &req.storage_id)?;
        let mut storages = self.storages.lock().await;
        if storages.contains_key(&req.storage_id) {
            return Err(Error::already_exists(format!(
                "storage {} exists",
                req.storage_id
            )));
        }
        let storage = crate::storage::add(&self.storage_dir(), req).await?;
        let mount_point = storage.mount_point.to_string_lossy().into_owned();
        storages.insert(req.storage_id.clone(), storage);
        tracing::info!(storage_id = %req.storage_id, mount_point, "storage added");
        Ok(mount_point)
    }

    pub async fn remove_storage(&self, storage_id: &str) -> Result<(), Error> {
        check_id("storage id", storage_id)?;
        let mut storages = self.storages.lock().await;
        let Some(storage) = storages.get(storage_id) else {
            return Err(Error::not_found(format!("no storage {storage_id}")));
        };
        crate::storage::unmount_and_remove(&storage.mount_point)?;
        storages.remove(storage_id);
        tracing::info!(storage_id, "storage removed");
        Ok(())
    }

    /// Makes a written generation of an atomic-writer volume current (PublishVolumeGeneration).
    pub async fn publish_volume_generation(
        &self,
        storage_id: &str,
        generation: &str,
    ) -> Result<(), Error> {
        check_id("storage id", storage_id)?;
        // Held so that the storage cannot be removed under the swap.
        let storages = self.storages.lock().await;
        let Some(storage) = storages.get(storage_id) else {
            return Err(Error::not_found(format!("no storage {storage_id}")));
        };
        let root = storage.mount_point.clone();
        let generation = generation.to_string();
        tokio::task::spawn_blocking(move || {
            crate::atomic_volume::publish_generation(&root, &generation)
        })
        .await
        .map_err(|e| Error::internal(format!("publish task: {e}")))?
    }

    /// Writes one chunk of a file (CopyFile).
    pub async fn copy_file(&self, req: CopyFileRequest) -> Result<(), Error> {
        // On the host the agent only writes below its state directory.
        let root = (!self.config.guest).then(|| self.config.state_dir.clone());
        tokio::task::spawn_blocking(move || crate::files::copy_chunk(&req, root.as_deref()))
            .await
            .map_err(|e| Error::internal(format!("copy task: {e}")))?
    }

    /// Sets the guest's wall clock.
    pub fn set_time(&self, seconds: i64, nanos: u32) -> Result<(), Error> {
        if seconds < 0 || nanos >= 1_000_000_000 {
            return Err(Error::invalid_argument("time out of range"));
        }
        if !self.config.guest {
            return Err(Error::failed_precondition(
                "SetTime only changes the clock of a guest (the agent runs in host mode)",
            ));
        }
        let ts = nix::sys::time::TimeSpec::new(seconds, nanos as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| Error::internal(format!("clock_settime: {e}")))?;
        tracing::info!(seconds, "guest clock set");
        Ok(())
    }

    /// Kills and removes every container, unmounts every storage, forgets the sandbox.
    pub async fn teardown(&self) {
        for container in self.containers.all() {
            if let Err(error) = self.containers.remove(&container.id, Duration::ZERO).await {
                tracing::warn!(container_id = %container.id, %error, "teardown: remove failed");
            }
        }
        let mut storages = self.storages.lock().await;
        for (id, storage) in storages.drain() {
            if let Err(error) = crate::storage::unmount_and_remove(&storage.mount_point) {
                tracing::warn!(storage_id = %id, %error, "teardown: unmount failed");
                let _ = nix::mount::umount2(&storage.mount_point, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(&storage.mount_point);
            }
        }
        drop(storages);
        if let Some(sandbox) = self.sandbox.write().await.take() {
            sandbox.destroy(&self.reaper, &self.sandbox_dir()).await;
        }
    }
}
