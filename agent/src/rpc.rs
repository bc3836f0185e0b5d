//! The gRPC service: validates each request and hands it to the agent's state.

use std::sync::Arc;
use std::time::Duration;

use kata_like_protocol::agent_server::Agent as AgentService;
use kata_like_protocol::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::container::check_id;

pub struct Service {
    pub agent: Arc<Agent>,
}

type Reply<T> = Result<Response<T>, Status>;

fn check_exec_id(exec_id: &str) -> Result<(), Status> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        check_id("exec id", exec_id)
    }
}

/// Guest CLOCK_BOOTTIME in milliseconds.
pub fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn health(&self, _: Request<HealthRequest>) -> Reply<HealthResponse> {
        Ok(Response::new(HealthResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
            uptime_ms: uptime_ms(),
        }))
    }

    async fn set_time(&self, request: Request<SetTimeRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        if req.seconds < 0 || req.nanos >= 1_000_000_000 {
            return Err(Status::invalid_argument("time out of range"));
        }
        if !self.agent.config.guest {
            return Err(Status::failed_precondition(
                "SetTime only changes the clock of a guest (the agent runs in host mode)",
            ));
        }
        let ts = nix::sys::time::TimeSpec::new(req.seconds, req.nanos as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| Status::internal(format!("clock_settime: {e}")))?;
        tracing::info!(seconds = req.seconds, "guest clock set");
        Ok(Response::new(Empty {}))
    }

    async fn create_sandbox(&self, request: Request<CreateSandboxRequest>) -> Reply<Empty> {
        self.agent.create_sandbox(request.into_inner()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn destroy_sandbox(&self, _: Request<Empty>) -> Reply<Empty> {
        self.agent.destroy_sandbox().await?;
        Ok(Response::new(Empty {}))
    }

    async fn setup_network(&self, request: Request<SetupNetworkRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        crate::network::setup(&req).await?;
        tracing::info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            "network set up"
        );
        Ok(Response::new(Empty {}))
    }

    async fn copy_file(&self, request: Request<CopyFileRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        // On the host the agent only writes below its state directory.
        let root = (!self.agent.config.guest).then(|| self.agent.config.state_dir.clone());
        tokio::task::spawn_blocking(move || crate::files::copy_chunk(&req, root.as_deref()))
            .await
            .map_err(|e| Status::internal(format!("copy task: {e}")))??;
        Ok(Response::new(Empty {}))
    }

    async fn add_storage(&self, request: Request<AddStorageRequest>) -> Reply<AddStorageResponse> {
        let req = request.into_inner();
        check_id("storage id", &req.storage_id)?;
        let mut storages = self.agent.storages.lock().await;
        if storages.contains_key(&req.storage_id) {
            return Err(Status::already_exists(format!(
                "storage {} exists",
                req.storage_id
            )));
        }
        let storage = crate::storage::add(&self.agent.storage_dir(), &req).await?;
        let mount_point = storage.mount_point.to_string_lossy().into_owned();
        storages.insert(req.storage_id.clone(), storage);
        tracing::info!(storage_id = %req.storage_id, mount_point, "storage added");
        Ok(Response::new(AddStorageResponse { mount_point }))
    }

    async fn remove_storage(&self, request: Request<RemoveStorageRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        check_id("storage id", &req.storage_id)?;
        let mut storages = self.agent.storages.lock().await;
        let Some(storage) = storages.get(&req.storage_id) else {
            return Err(Status::not_found(format!("no storage {}", req.storage_id)));
        };
        crate::storage::unmount_and_remove(&storage.mount_point)?;
        storages.remove(&req.storage_id);
        tracing::info!(storage_id = %req.storage_id, "storage removed");
        Ok(Response::new(Empty {}))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Reply<CreateContainerResponse> {
        let pid = self.agent.create_container(request.into_inner()).await?;
        Ok(Response::new(CreateContainerResponse { pid }))
    }

    async fn start_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        self.agent
            .start_container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Reply<ExecProcessResponse> {
        let pid = self.agent.exec_process(request.into_inner()).await?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    async fn signal_process(&self, request: Request<SignalProcessRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        self.agent
            .signal_process(&req.container_id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_process(&self, request: Request<ProcessRequest>) -> Reply<WaitProcessResponse> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        let process = self
            .agent
            .container(&req.container_id)?
            .process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(Response::new(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: crate::cgroups::unix_nanos(exit.at),
        }))
    }

    async fn remove_container(&self, request: Request<RemoveContainerRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        let timeout = Duration::from_millis(u64::from(req.timeout_ms).min(600_000));
        self.agent
            .remove_container(&req.container_id, timeout)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn pause_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        self.agent
            .pause_container(&request.into_inner().container_id, true)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn resume_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        self.agent
            .pause_container(&request.into_inner().container_id, false)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn update_container(&self, request: Request<UpdateContainerRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        self.agent
            .update_container(&req.container_id, &req.oci_linux_resources_json)
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn list_processes(
        &self,
        request: Request<ContainerRequest>,
    ) -> Reply<ListProcessesResponse> {
        let list = self
            .agent
            .list_processes(&request.into_inner().container_id)?;
        Ok(Response::new(ListProcessesResponse {
            processes: list
                .into_iter()
                .map(|(pid, command)| ProcessInfo { pid, command })
                .collect(),
        }))
    }

    async fn stats_container(
        &self,
        request: Request<ContainerRequest>,
    ) -> Reply<StatsContainerResponse> {
        let container = self.agent.container(&request.into_inner().container_id)?;
        Ok(Response::new(container.cgroup.stats()?))
    }

    type ProcessOutputStream = crate::process::stdio::OutputStream;

    async fn process_output(
        &self,
        request: Request<ProcessOutputRequest>,
    ) -> Reply<Self::ProcessOutputStream> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        let process = self
            .agent
            .container(&req.container_id)?
            .process(&req.exec_id)?;
        let pipe = match OutputFd::try_from(req.fd) {
            Ok(OutputFd::Stdout) => &process.stdio.stdout,
            Ok(OutputFd::Stderr) => &process.stdio.stderr,
            _ => return Err(Status::invalid_argument("fd must be STDOUT or STDERR")),
        };
        let stream = pipe.attach((req.container_id.clone(), req.exec_id.clone()))?;
        Ok(Response::new(stream))
    }

    async fn write_stdin(&self, request: Request<WriteStdinRequest>) -> Reply<WriteStdinResponse> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        if req.data.len() > 1024 * 1024 {
            return Err(Status::resource_exhausted("stdin writes are at most 1 MiB"));
        }
        let process = self
            .agent
            .container(&req.container_id)?
            .process(&req.exec_id)?;
        let written = process.stdio.write_stdin(&req.data).await?;
        Ok(Response::new(WriteStdinResponse {
            written: written as u32,
        }))
    }

    async fn close_stdin(&self, request: Request<ProcessRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        let process = self
            .agent
            .container(&req.container_id)?
            .process(&req.exec_id)?;
        process.stdio.close_stdin().await;
        Ok(Response::new(Empty {}))
    }

    async fn resize_tty(&self, request: Request<ResizeTtyRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        check_exec_id(&req.exec_id)?;
        let (Ok(rows), Ok(columns)) = (u16::try_from(req.rows), u16::try_from(req.columns)) else {
            return Err(Status::invalid_argument(
                "rows and columns must fit in 16 bits",
            ));
        };
        let process = self
            .agent
            .container(&req.container_id)?
            .process(&req.exec_id)?;
        process.stdio.resize(rows, columns)?;
        Ok(Response::new(Empty {}))
    }

    type OomEventsStream = ReceiverStream<Result<OomEvent, Status>>;

    async fn oom_events(&self, _: Request<Empty>) -> Reply<Self::OomEventsStream> {
        let mut events = self.agent.oom_events.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "OOM event subscriber lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn shutdown(&self, _: Request<Empty>) -> Reply<Empty> {
        tracing::info!("shutdown requested");
        self.agent.shutdown.send_replace(Some(0));
        Ok(Response::new(Empty {}))
    }
}
