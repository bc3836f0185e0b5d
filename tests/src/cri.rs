//! A CRI client acting as kubelet: the `k8s-cri` v1 API over containerd's Unix socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;

/// CRI's container states.
pub const CONTAINER_EXITED: i32 = cri::ContainerState::ContainerExited as i32;
pub const CONTAINER_RUNNING: i32 = cri::ContainerState::ContainerRunning as i32;

pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    pub async fn connect(socket: &Path) -> Cri {
        let socket: PathBuf = socket.to_path_buf();
        let channel =
            Endpoint::from_static("http://[::1]:1")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
                .expect("connect to containerd's CRI socket");
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(16 * 1024 * 1024),
            images: ImageServiceClient::new(channel),
        }
    }

    pub async fn version(&mut self) -> cri::VersionResponse {
        self.runtime
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .expect("CRI Version")
            .into_inner()
    }

    /// RunPodSandbox; returns the pod sandbox id.
    pub async fn run_pod(
        &mut self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id)
    }

    pub async fn create_container(
        &mut self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn container_status(&mut self, id: &str) -> cri::ContainerStatus {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status")
    }

    /// Polls ContainerStatus until the container has exited (bounded: a hang fails the test).
    pub async fn wait_exited(&mut self, id: &str, limit: Duration) -> cri::ContainerStatus {
        let start = Instant::now();
        loop {
            let status = self.container_status(id).await;
            if status.state == CONTAINER_EXITED {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "container {id} did not exit within {limit:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        Ok(self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            })
            .await?
            .into_inner())
    }

    /// `sh -c script` in `container` through ExecSync: its stdout; a non-zero exit fails the
    /// test with the script's output.
    pub async fn exec_sh(&mut self, container: &str, script: &str) -> String {
        let r = self
            .exec_sync(container, &["sh", "-c", script], 60)
            .await
            .unwrap_or_else(|e| panic!("ExecSync {script:?}: {e}"));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(
            r.exit_code,
            0,
            "{script:?} failed: {}{}",
            text(&r.stdout),
            text(&r.stderr)
        );
        text(&r.stdout)
    }

    pub async fn stop_container(&mut self, id: &str, timeout_s: i64) -> Result<(), tonic::Status> {
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            })
            .await
            .map(|_| ())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn stop_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn remove_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn pod_status(&mut self, id: &str) -> cri::PodSandboxStatus {
        self.runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a status")
    }

    pub async fn container_stats(
        &mut self,
        id: &str,
    ) -> Result<cri::ContainerStats, tonic::Status> {
        Ok(self
            .runtime
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await?
            .into_inner()
            .stats
            .unwrap_or_default())
    }

    /// ListContainerStats of one pod's containers.
    pub async fn list_container_stats(
        &mut self,
        pod_id: &str,
    ) -> Result<Vec<cri::ContainerStats>, tonic::Status> {
        Ok(self
            .runtime
            .list_container_stats(cri::ListContainerStatsRequest {
                filter: Some(cri::ContainerStatsFilter {
                    pod_sandbox_id: pod_id.into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .stats)
    }

    pub async fn pod_sandbox_stats(
        &mut self,
        pod_id: &str,
    ) -> Result<cri::PodSandboxStats, tonic::Status> {
        Ok(self
            .runtime
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await?
            .into_inner()
            .stats
            .unwrap_or_default())
    }

    /// Removes every pod (a failed earlier test may have left some), so that each test starts
    /// from an empty node.
    pub async fn remove_all_pods(&mut self) {
        for p in self.list_pods().await {
            let _ = self.teardown_pod_best_effort(&p.id).await;
        }
    }

    /// ListPodSandbox without a filter: every pod of the node, ready or not.
    pub async fn list_pods(&mut self) -> Vec<cri::PodSandbox> {
        self.runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items
    }

    /// ListContainers of one pod.
    async fn pod_containers(&mut self, pod_id: &str) -> Result<Vec<cri::Container>, tonic::Status> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod_id.into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers)
    }

    async fn teardown_pod_best_effort(&mut self, pod_id: &str) -> Result<(), tonic::Status> {
        for c in self.pod_containers(pod_id).await? {
            let _ = self.stop_container(&c.id, 1).await;
            let _ = self.remove_container(&c.id).await;
        }
        let _ = self.stop_pod(pod_id).await;
        self.remove_pod(pod_id).await
    }

    /// Stops and removes a pod with everything in it (what kubelet does on pod deletion).
    pub async fn teardown_pod(&mut self, pod_id: &str) {
        let containers = self.pod_containers(pod_id).await.expect("ListContainers");
        for c in containers {
            self.stop_container(&c.id, 5).await.expect("StopContainer");
            self.remove_container(&c.id).await.expect("RemoveContainer");
        }
        self.stop_pod(pod_id).await.expect("StopPodSandbox");
        self.remove_pod(pod_id).await.expect("RemovePodSandbox");
    }
}

/// The cgroup parent kubelet (cgroupfs driver) gives a BestEffort pod: its pod cgroup.
pub fn kubelet_cgroup_parent(pod_uid: &str) -> String {
    format!("/kubepods/besteffort/pod{pod_uid}")
}

/// A pod config as kubelet sends it, logging under `log_dir/<name>`, with kubelet's cgroup
/// parent (so containerd writes a realistic `linux.cgroupsPath`).
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    let uid = format!("uid-{name}-{}", std::process::id());
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(&uid).display().to_string(),
        dns_config: None,
        port_mappings: vec![],
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        annotations: HashMap::new(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: kubelet_cgroup_parent(&uid),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        windows: None,
    }
}

/// A busybox container running `cmd`.
pub fn container_config(name: &str, image: &str, cmd: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One line of a CRI container log file: "<time> <stream> <P|F> <text>".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: String,
    pub text: String,
}

/// Reads a CRI log file, joining partial lines.
pub fn read_log(path: &Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read container log {}: {e}", path.display()));
    let mut lines = Vec::new();
    let mut partial: HashMap<String, String> = HashMap::new();
    for raw in text.lines() {
        let mut parts = raw.splitn(4, ' ');
        let (_time, stream, tag, rest) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let acc = partial.entry(stream.clone()).or_default();
        acc.push_str(rest);
        if tag != "P" {
            lines.push(LogLine {
                stream: stream.clone(),
                text: std::mem::take(acc),
            });
        }
    }
    lines
}

/// Lines of one stream of a log.
pub fn stream_lines(log: &[LogLine], stream: &str) -> Vec<String> {
    log.iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.text.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_parsed_and_partials_joined() {
        let dir = std::env::temp_dir().join(format!("cri-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("c.log");
        std::fs::write(
            &path,
            "2024-01-01T00:00:00.1Z stdout F hello world\n\
             2024-01-01T00:00:00.2Z stderr P par\n\
             2024-01-01T00:00:00.3Z stderr F tial\n\
             2024-01-01T00:00:00.4Z stdout F \n",
        )
        .expect("write");
        let log = read_log(&path);
        assert_eq!(stream_lines(&log, "stdout"), vec!["hello world", ""]);
        assert_eq!(stream_lines(&log, "stderr"), vec!["partial"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
