//! The shim binary's process model as containerd runs it:
//! - `start`: run by containerd for every new container with the bundle as cwd. The pod's
//!   containers are grouped on `io.kubernetes.cri.sandbox-id`: if the pod's shim already
//!   listens, its address is returned; otherwise a new shim process is spawned to serve it.
//! - serve (no action): the long-lived shim serving the task API on its socket.
//! - `delete`: run by containerd when a shim died; kills and removes what the dead shim left
//!   (VMM, state dir, socket) for the container in the cwd bundle.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;

use crate::pod::spec::{self, Bundle, Role};
use crate::pod::STATE_DIR_FILE;
use crate::task::events::Events;
use crate::task::service::Service;

pub const RUNTIME_ID: &str = "io.containerd.kata-like.v2";

pub struct KataLikeShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for KataLikeShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        KataLikeShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        let bundle = Bundle::load(
            &std::env::current_dir().map_err(|e| ShimError::Other(format!("cwd: {e}")))?,
        )
        .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let grouping = spec::grouping_id(&opts.id, &bundle)
            .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        // The pod's shim is running already: join it, no new process.
        let socket = address.trim_start_matches("unix://");
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            write_address(&address)?;
            return Ok(address);
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_address(&address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let cwd = std::env::current_dir().map_err(|e| ShimError::Other(format!("cwd: {e}")))?;
        cleanup_after_dead_shim(&cwd, &self.id, &self.namespace);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(crate::pod::process::now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let events = Events::to_containerd(publisher, self.namespace.clone());
        Service::new(&self.namespace, Arc::new(events), self.exit.clone())
    }
}

fn write_address(address: &str) -> Result<(), ShimError> {
    std::fs::write("address", address)
        .map_err(|e| ShimError::Other(format!("write address file: {e}")))
}

/// What `delete` does for one container of a dead shim: the VM owner's state dir (recorded in
/// the bundle at create) is cleaned, killing a VMM left running; the shim socket goes when
/// nothing listens on it any more.
pub fn cleanup_after_dead_shim(bundle_dir: &Path, id: &str, namespace: &str) {
    let role = Bundle::load(bundle_dir).and_then(|b| b.role());
    let owns_vm = matches!(role, Ok(Role::Sandbox) | Ok(Role::Standalone));
    if owns_vm {
        if let Ok(state_dir) = std::fs::read_to_string(bundle_dir.join(STATE_DIR_FILE)) {
            let state_dir = Path::new(state_dir.trim());
            // Only a state dir named after this very container, as the shim wrote it.
            let expected = crate::vm::vm::state_dir_name(namespace, id).ok();
            let name = state_dir.file_name().and_then(|n| n.to_str());
            if state_dir.is_absolute() && name.is_some() && name == expected.as_deref() {
                match crate::vm::vm::cleanup_state_dir(state_dir) {
                    Ok(()) => {
                        tracing::info!(container_id = id, namespace, "cleaned up after a dead shim")
                    }
                    Err(e) => {
                        tracing::error!(container_id = id, error = %e, "cleanup after a dead shim failed")
                    }
                }
            }
        }
    }
    if let Ok(address) = std::fs::read_to_string(bundle_dir.join("address")) {
        let socket = address.trim().trim_start_matches("unix://");
        if socket.starts_with(containerd_shim::SOCKET_ROOT)
            && std::os::unix::net::UnixStream::connect(socket).is_err()
        {
            let _ = std::fs::remove_file(socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(dir: &Path, role_annotations: &str, state_dir: &Path) {
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"annotations": {{{role_annotations}}}}}"#),
        )
        .expect("config.json");
        std::fs::write(dir.join(STATE_DIR_FILE), state_dir.display().to_string())
            .expect("state file");
    }

    #[test]
    fn delete_after_a_dead_shim_removes_the_pods_state() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir(&bundle).expect("mkdir");
        let name = crate::vm::vm::state_dir_name("k8s.io", "pod1").expect("name");
        let state = tmp.path().join("state").join(name);
        std::fs::create_dir_all(state.join("jail")).expect("mkdir");
        bundle_with(
            &bundle,
            r#""io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1""#,
            &state,
        );
        cleanup_after_dead_shim(&bundle, "pod1", "k8s.io");
        assert!(!state.exists());
    }

    #[test]
    fn delete_never_removes_a_directory_the_bundle_merely_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir(&bundle).expect("mkdir");
        // A hostile or stale bundle pointing elsewhere: not this container's state dir.
        let victim = tmp.path().join("precious");
        std::fs::create_dir(&victim).expect("mkdir");
        bundle_with(&bundle, "", &victim);
        cleanup_after_dead_shim(&bundle, "c1", "default");
        assert!(victim.exists());
        // An app container never owns the VM, whatever its state file says.
        let name = crate::vm::vm::state_dir_name("k8s.io", "c2").expect("name");
        let state = tmp.path().join(name);
        std::fs::create_dir(&state).expect("mkdir");
        bundle_with(
            &bundle,
            r#""io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1""#,
            &state,
        );
        cleanup_after_dead_shim(&bundle, "c2", "k8s.io");
        assert!(state.exists());
    }
}
