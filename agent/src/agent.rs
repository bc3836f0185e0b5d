//! The agent's state: configuration, sandbox, containers, storages, and the reaper.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kata_like_protocol::OomEvent;
use tokio::sync::{broadcast, watch};

use crate::container::Container;
use crate::reaper::Reaper;
use crate::sandbox::Sandbox;
use crate::storage::Storage;

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
    pub containers: Mutex<HashMap<String, Arc<Container>>>,
    pub storages: tokio::sync::Mutex<HashMap<String, Storage>>,
    pub oom_events: broadcast::Sender<OomEvent>,
    pub started: Instant,
    /// Set to `Some(exit status)` when the agent should stop (Shutdown RPC, power port).
    pub shutdown: watch::Sender<Option<u8>>,
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
            config,
            reaper,
            sandbox: tokio::sync::RwLock::new(None),
            containers: Mutex::new(HashMap::new()),
            storages: tokio::sync::Mutex::new(HashMap::new()),
            oom_events,
            started: Instant::now(),
            shutdown,
        }))
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.config.state_dir.join("containers")
    }
    pub fn storage_dir(&self) -> PathBuf {
        self.config.state_dir.join("storage")
    }
    /// libcontainer's state root.
    pub fn runtime_root(&self) -> PathBuf {
        self.config.state_dir.join("runtime")
    }
    pub fn tty_dir(&self) -> PathBuf {
        self.config.state_dir.join("tty")
    }
    pub fn sandbox_dir(&self) -> PathBuf {
        self.config.state_dir.join("sandbox")
    }

    /// Kills and removes every container, unmounts every storage, forgets the sandbox.
    pub async fn teardown(&self) {
        for container in self.containers() {
            if let Err(e) = self
                .remove_container(&container.id, std::time::Duration::ZERO)
                .await
            {
                tracing::warn!(container_id = %container.id, error = %e.message(), "teardown: remove failed");
            }
        }
        let mut storages = self.storages.lock().await;
        for (id, storage) in storages.drain() {
            if let Err(e) = crate::storage::unmount_and_remove(&storage.mount_point) {
                tracing::warn!(storage_id = %id, error = %e.message(), "teardown: unmount failed");
                let _ = nix::mount::umount2(&storage.mount_point, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir(&storage.mount_point);
            }
        }
        drop(storages);
        if let Some(sandbox) = self.sandbox.write().await.take() {
            sandbox.destroy(self).await;
        }
    }
}
