//! The gRPC service, the agent's RPC boundary: each method turns a request into a call on the
//! agent's state and the result into a response. Domain errors become `tonic::Status` here and
//! nowhere else (`impl From<Error> for Status`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kata_like_protocol::agent_server::Agent as AgentService;
use kata_like_protocol::relay::Chunk;
use kata_like_protocol::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent::{uptime_ms, Agent};
use crate::error::{Error, ErrorKind};
use crate::process::stdio::OutputStream;

/// Longest grace period a RemoveContainer may ask for.
const MAX_REMOVE_TIMEOUT_MS: u64 = 600_000;

pub struct Service {
    pub agent: Arc<Agent>,
}

type Reply<T> = Result<Response<T>, Status>;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match error.kind() {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::Internal => tonic::Code::Internal,
        };
        Status::new(code, error.message())
    }
}

/// An empty reply once a domain call succeeded.
fn done(result: Result<(), Error>) -> Reply<Empty> {
    result?;
    Ok(Response::new(Empty {}))
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
        done(self.agent.set_time(req.seconds, req.nanos))
    }

    async fn create_sandbox(&self, request: Request<CreateSandboxRequest>) -> Reply<Empty> {
        done(self.agent.create_sandbox(request.into_inner()).await)
    }

    async fn destroy_sandbox(&self, _: Request<Empty>) -> Reply<Empty> {
        done(self.agent.destroy_sandbox().await)
    }

    async fn setup_network(&self, request: Request<SetupNetworkRequest>) -> Reply<Empty> {
        done(crate::network::setup(&request.into_inner()).await)
    }

    async fn copy_file(&self, request: Request<CopyFileRequest>) -> Reply<Empty> {
        done(self.agent.copy_file(request.into_inner()).await)
    }

    async fn add_storage(&self, request: Request<AddStorageRequest>) -> Reply<AddStorageResponse> {
        let mount_point = self.agent.add_storage(&request.into_inner()).await?;
        Ok(Response::new(AddStorageResponse { mount_point }))
    }

    async fn remove_storage(&self, request: Request<RemoveStorageRequest>) -> Reply<Empty> {
        done(
            self.agent
                .remove_storage(&request.into_inner().storage_id)
                .await,
        )
    }

    async fn publish_volume_generation(
        &self,
        request: Request<PublishVolumeGenerationRequest>,
    ) -> Reply<Empty> {
        let req = request.into_inner();
        done(
            self.agent
                .publish_volume_generation(&req.storage_id, &req.generation)
                .await,
        )
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Reply<CreateContainerResponse> {
        let pid = self.agent.create_container(request.into_inner()).await?;
        Ok(Response::new(CreateContainerResponse { pid }))
    }

    async fn start_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        let id = request.into_inner().container_id;
        done(self.agent.containers.start(&id).await)
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Reply<ExecProcessResponse> {
        let pid = self.agent.containers.exec(request.into_inner()).await?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    async fn signal_process(&self, request: Request<SignalProcessRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        done(
            self.agent
                .containers
                .signal(&req.container_id, &req.exec_id, req.signal, req.all)
                .await,
        )
    }

    async fn wait_process(&self, request: Request<ProcessRequest>) -> Reply<WaitProcessResponse> {
        let req = request.into_inner();
        let process = self
            .agent
            .containers
            .process(&req.container_id, &req.exec_id)?;
        let exit = process.wait().await;
        Ok(Response::new(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: crate::cgroups::unix_nanos(exit.at),
        }))
    }

    async fn remove_container(&self, request: Request<RemoveContainerRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        let timeout = Duration::from_millis(u64::from(req.timeout_ms).min(MAX_REMOVE_TIMEOUT_MS));
        done(
            self.agent
                .containers
                .remove(&req.container_id, timeout)
                .await,
        )
    }

    async fn pause_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        let id = request.into_inner().container_id;
        done(self.agent.containers.pause(&id, true).await)
    }

    async fn resume_container(&self, request: Request<ContainerRequest>) -> Reply<Empty> {
        let id = request.into_inner().container_id;
        done(self.agent.containers.pause(&id, false).await)
    }

    async fn update_container(&self, request: Request<UpdateContainerRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        done(
            self.agent
                .containers
                .update(&req.container_id, &req.oci_linux_resources_json)
                .await,
        )
    }

    async fn list_processes(
        &self,
        request: Request<ContainerRequest>,
    ) -> Reply<ListProcessesResponse> {
        let id = request.into_inner().container_id;
        let list = self.agent.containers.list_processes(&id)?;
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
        let id = request.into_inner().container_id;
        let container = self.agent.containers.container(&id)?;
        Ok(Response::new(container.cgroup.stats()?))
    }

    // The output stream yields plain chunks (it ends rather than fails); gRPC wants results.
    type ProcessOutputStream =
        futures::stream::Map<OutputStream, fn(OutputChunk) -> Result<OutputChunk, Status>>;

    async fn process_output(
        &self,
        request: Request<ProcessOutputRequest>,
    ) -> Reply<Self::ProcessOutputStream> {
        let req = request.into_inner();
        let stream =
            self.agent
                .containers
                .attach_output(&req.container_id, &req.exec_id, req.fd)?;
        Ok(Response::new(stream.map(Ok as fn(_) -> _)))
    }

    async fn write_stdin(&self, request: Request<WriteStdinRequest>) -> Reply<WriteStdinResponse> {
        let req = request.into_inner();
        let written = self
            .agent
            .containers
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await?;
        Ok(Response::new(WriteStdinResponse {
            written: written as u32,
        }))
    }

    async fn close_stdin(&self, request: Request<ProcessRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        done(
            self.agent
                .containers
                .close_stdin(&req.container_id, &req.exec_id)
                .await,
        )
    }

    async fn resize_tty(&self, request: Request<ResizeTtyRequest>) -> Reply<Empty> {
        let req = request.into_inner();
        done(self.agent.containers.resize_tty(
            &req.container_id,
            &req.exec_id,
            req.rows,
            req.columns,
        ))
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

    type PortForwardStream = futures::stream::Map<
        ReceiverStream<Chunk>,
        fn(Chunk) -> Result<PortForwardResponse, Status>,
    >;

    async fn port_forward(
        &self,
        request: Request<Streaming<PortForwardRequest>>,
    ) -> Reply<Self::PortForwardStream> {
        let mut from_host = request.into_inner();
        let first = from_host.message().await?.ok_or_else(|| {
            Status::invalid_argument(
                "PortForward: the call ended before its first request named a port",
            )
        })?;
        let connection = self.agent.port_forwards.open(first.port).await?;
        // The first request's bytes, then every later request's; a failed stream (the host
        // reset the call) ends the relay.
        let to_guest =
            futures::stream::iter((!first.data.is_empty()).then(|| Ok(Chunk::Data(first.data))))
                .chain(from_host.map(|message| message.map(|m| Chunk::Data(m.data))))
                .boxed();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(connection.relay(to_guest, tx));
        Ok(Response::new(
            ReceiverStream::new(rx).map(port_forward_response as fn(_) -> _),
        ))
    }

    async fn shutdown(&self, _: Request<Empty>) -> Reply<Empty> {
        tracing::info!("shutdown requested");
        self.agent.shutdown.send_replace(Some(0));
        Ok(Response::new(Empty {}))
    }
}

/// One step from the guest's server as a PortForward response.
fn port_forward_response(chunk: Chunk) -> Result<PortForwardResponse, Status> {
    Ok(match chunk {
        Chunk::Data(data) => PortForwardResponse { data, eof: false },
        Chunk::Eof => PortForwardResponse {
            data: Vec::new(),
            eof: true,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_keep_their_message_and_map_to_their_grpc_code() {
        for (error, code) in [
            (Error::invalid_argument("bad"), tonic::Code::InvalidArgument),
            (Error::not_found("gone"), tonic::Code::NotFound),
            (Error::already_exists("twice"), tonic::Code::AlreadyExists),
            (
                Error::failed_precondition("not yet"),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::resource_exhausted("too big"),
                tonic::Code::ResourceExhausted,
            ),
            (Error::internal("broke"), tonic::Code::Internal),
        ] {
            let message = error.message().to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }
}
