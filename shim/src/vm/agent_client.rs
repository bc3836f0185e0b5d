//! The link to the guest agent: gRPC over the VMM's hybrid vsock Unix socket.
//!
//! Every HTTP/2 connection is one vsock stream: connect the Unix socket, write `CONNECT 1024\n`,
//! read `OK <port>\n`, then hand the stream to tonic. Ordinary calls carry a deadline; waits and
//! output streams have none (they end when the process does or the VM dies).
//!
//! [`Agent`] is the typed client: one method per RPC the shim makes, with the timeout table and
//! the one mapping of gRPC statuses to the shim's errors (`Rpc`). Nothing else in the shim
//! sees the generated client or builds a tonic request.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use kata_like_protocol as pb;
use kata_like_protocol::agent_client::AgentClient;
use kata_like_protocol::relay::Chunk;
use kata_like_protocol::{HealthRequest, HealthResponse, AGENT_VSOCK_PORT, MAX_MESSAGE_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// What makes the guest this pod, set through the agent's CreateSandbox once it is up.
#[derive(Clone, Debug, Default)]
pub struct PodIdentity {
    pub hostname: String,
    /// The pod's namespaced sysctls, applied guest-wide (the guest is the pod).
    pub sysctls: std::collections::HashMap<String, String>,
    /// Whether the pod has a shared pid namespace for its containers to join (CRI POD mode).
    pub shared_pid_namespace: bool,
}

/// Longest line the VMM may answer the CONNECT with.
const MAX_HANDSHAKE_LINE: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens one stream to a guest vsock port through the hybrid vsock socket.
pub async fn connect_vsock(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake_line(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to CONNECT from the VMM",
            )
        })??;
    match line.strip_prefix("OK ") {
        Some(port) if port.trim().parse::<u32>().is_ok() => Ok(stream),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("vsock port {port} refused: {line:?}"),
        )),
    }
}

/// Reads the handshake answer byte by byte, so that no byte of the gRPC stream that follows is
/// swallowed into a buffer.
async fn read_handshake_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut reader = BufReader::with_capacity(1, stream);
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the VMM closed the vsock connection during CONNECT (guest port not listening yet)",
            ));
        }
        let b = buf[0];
        reader.consume(1);
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "CONNECT answer too long",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The agent RPCs the shim makes. Their names are the ones in error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    SetTime,
    CreateSandbox,
    SetupNetwork,
    CopyFile,
    AddStorage,
    RemoveStorage,
    PublishVolumeGeneration,
    CreateContainer,
    StartContainer,
    ExecProcess,
    SignalProcess,
    WaitProcess,
    RemoveContainer,
    PauseContainer,
    ResumeContainer,
    UpdateContainer,
    ListProcesses,
    StatsContainer,
    ProcessOutput,
    WriteStdin,
    CloseStdin,
    ResizeTty,
    OomEvents,
    PortForward,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::SetTime => "SetTime",
            Rpc::CreateSandbox => "CreateSandbox",
            Rpc::SetupNetwork => "SetupNetwork",
            Rpc::CopyFile => "CopyFile",
            Rpc::AddStorage => "AddStorage",
            Rpc::RemoveStorage => "RemoveStorage",
            Rpc::PublishVolumeGeneration => "PublishVolumeGeneration",
            Rpc::CreateContainer => "CreateContainer",
            Rpc::StartContainer => "StartContainer",
            Rpc::ExecProcess => "ExecProcess",
            Rpc::SignalProcess => "SignalProcess",
            Rpc::WaitProcess => "WaitProcess",
            Rpc::RemoveContainer => "RemoveContainer",
            Rpc::PauseContainer => "PauseContainer",
            Rpc::ResumeContainer => "ResumeContainer",
            Rpc::UpdateContainer => "UpdateContainer",
            Rpc::ListProcesses => "ListProcesses",
            Rpc::StatsContainer => "StatsContainer",
            Rpc::ProcessOutput => "ProcessOutput",
            Rpc::WriteStdin => "WriteStdin",
            Rpc::CloseStdin => "CloseStdin",
            Rpc::ResizeTty => "ResizeTty",
            Rpc::OomEvents => "OomEvents",
            Rpc::PortForward => "PortForward",
        }
    }

    /// The timeout table: every call carries the configured deadline
    /// (`vmm.agent_call_timeout_ms`) except waits and streams, which end when the process
    /// does or the VM dies, and WriteStdin, which a process that does not read its stdin
    /// back-pressures, as a pipe does. (Health has its own per-attempt bound in `wait_ready`.)
    fn has_deadline(self) -> bool {
        !matches!(
            self,
            Rpc::WaitProcess
                | Rpc::ProcessOutput
                | Rpc::WriteStdin
                | Rpc::OomEvents
                | Rpc::PortForward
        )
    }

    /// The one mapping of an agent gRPC status onto the shim's errors, keeping the agent's
    /// message behind the RPC's name.
    fn error(self, status: tonic::Status) -> Error {
        let msg = format!("{}: {}", self.name(), status.message());
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted => {
                Error::InvalidArgument(msg)
            }
            tonic::Code::NotFound => Error::NotFound(msg),
            tonic::Code::AlreadyExists => Error::AlreadyExists(msg),
            tonic::Code::FailedPrecondition => Error::FailedPrecondition(msg),
            tonic::Code::Unimplemented => Error::Unimplemented(msg),
            code => Error::Agent(format!("{msg} ({code:?})")),
        }
    }
}

/// The typed client of the guest agent: one method per RPC the shim makes, each with its
/// deadline and error mapping. No other module sees the generated client or tonic requests.
#[derive(Clone, Debug)]
pub struct Agent {
    client: AgentClient<Channel>,
    call_timeout: Duration,
}

/// A guest process's exit as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    pub exit_status: i32,
    pub exited_at_unix_nanos: i64,
}

/// The agent's stream of OOM kills in the guest.
pub struct OomEvents(tonic::Streaming<pb::OomEvent>);

impl OomEvents {
    /// The id of the next container with an OOM kill; None when the stream ends or fails
    /// (the VM died or the agent went away).
    pub async fn next(&mut self) -> Option<String> {
        match self.0.message().await {
            Ok(Some(ev)) => Some(ev.container_id),
            _ => None,
        }
    }
}

impl Agent {
    /// Builds a lazily connecting client (no I/O happens here).
    pub fn new(vsock_uds: &Path, call_timeout: Duration) -> Result<Agent> {
        let uds: PathBuf = vsock_uds.to_path_buf();
        // The URI is never dialled: the connector below ignores it.
        let endpoint = Endpoint::from_static("http://kata-like-agent.vsock")
            .connect_timeout(HANDSHAKE_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(
            move |_: tonic::transport::Uri| {
                let uds = uds.clone();
                async move {
                    let stream = connect_vsock(&uds, AGENT_VSOCK_PORT).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            },
        ));
        let client = AgentClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Agent {
            client,
            call_timeout,
        })
    }

    /// Makes one call: wraps `message` with the RPC's deadline, maps a failure to the shim's
    /// error. `send` names the generated client's method.
    async fn call<T, R, F, Fut>(&self, rpc: Rpc, message: T, send: F) -> Result<R>
    where
        F: FnOnce(AgentClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut req = tonic::Request::new(message);
        if rpc.has_deadline() {
            req.set_timeout(self.call_timeout);
        }
        send(self.client.clone(), req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| rpc.error(s))
    }

    /// Sets the guest clock to `since_epoch` (time since the Unix epoch).
    pub async fn set_time(&self, since_epoch: Duration) -> Result<()> {
        let msg = pb::SetTimeRequest {
            seconds: since_epoch.as_secs() as i64,
            nanos: since_epoch.subsec_nanos(),
        };
        self.call(
            Rpc::SetTime,
            msg,
            |mut c, r| async move { c.set_time(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn create_sandbox(&self, sandbox_id: &str, identity: &PodIdentity) -> Result<()> {
        let msg = pb::CreateSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            hostname: identity.hostname.clone(),
            sysctls: identity.sysctls.clone(),
            shared_pid_namespace: identity.shared_pid_namespace,
            ..Default::default()
        };
        self.call(Rpc::CreateSandbox, msg, |mut c, r| async move {
            c.create_sandbox(r).await
        })
        .await
        .map(drop)
    }

    /// Writes one chunk of a file in the guest.
    /// The pod's interfaces, routes and neighbours (and `lo`, which the agent always brings up).
    pub async fn setup_network(&self, request: pb::SetupNetworkRequest) -> Result<()> {
        self.call(Rpc::SetupNetwork, request, |mut c, r| async move {
            c.setup_network(r).await
        })
        .await
        .map(drop)
    }

    pub async fn copy_file(&self, chunk: pb::CopyFileRequest) -> Result<()> {
        self.call(Rpc::CopyFile, chunk, |mut c, r| async move {
            c.copy_file(r).await
        })
        .await
        .map(drop)
    }

    /// Mounts a storage in the guest; returns its mount point.
    pub async fn add_storage(&self, storage: pb::AddStorageRequest) -> Result<String> {
        self.call(Rpc::AddStorage, storage, |mut c, r| async move {
            c.add_storage(r).await
        })
        .await
        .map(|resp| resp.mount_point)
    }

    pub async fn remove_storage(&self, storage_id: &str) -> Result<()> {
        let msg = pb::RemoveStorageRequest {
            storage_id: storage_id.to_string(),
        };
        self.call(Rpc::RemoveStorage, msg, |mut c, r| async move {
            c.remove_storage(r).await
        })
        .await
        .map(drop)
    }

    /// Makes a written generation of an atomic-writer volume current in the guest.
    pub async fn publish_volume_generation(
        &self,
        storage_id: &str,
        generation: &str,
    ) -> Result<()> {
        let msg = pb::PublishVolumeGenerationRequest {
            storage_id: storage_id.to_string(),
            generation: generation.to_string(),
        };
        self.call(Rpc::PublishVolumeGeneration, msg, |mut c, r| async move {
            c.publish_volume_generation(r).await
        })
        .await
        .map(drop)
    }

    /// Creates a container (not started yet); returns the guest pid of its init process.
    pub async fn create_container(&self, container: pb::CreateContainerRequest) -> Result<u32> {
        self.call(Rpc::CreateContainer, container, |mut c, r| async move {
            c.create_container(r).await
        })
        .await
        .map(|resp| resp.pid)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        self.call(
            Rpc::StartContainer,
            container_request(container_id),
            |mut c, r| async move { c.start_container(r).await },
        )
        .await
        .map(drop)
    }

    /// Starts an exec process (it runs at once); returns its guest pid.
    pub async fn exec_process(&self, exec: pb::ExecProcessRequest) -> Result<u32> {
        self.call(Rpc::ExecProcess, exec, |mut c, r| async move {
            c.exec_process(r).await
        })
        .await
        .map(|resp| resp.pid)
    }

    /// Signals one process, or with `all` every process of the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let msg = pb::SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
        };
        self.call(Rpc::SignalProcess, msg, |mut c, r| async move {
            c.signal_process(r).await
        })
        .await
        .map(drop)
    }

    /// Waits, without a deadline, for a process to exit.
    pub async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<ProcessExit> {
        self.call(
            Rpc::WaitProcess,
            process_request(container_id, exec_id),
            |mut c, r| async move { c.wait_process(r).await },
        )
        .await
        .map(|resp| ProcessExit {
            exit_status: resp.exit_status,
            exited_at_unix_nanos: resp.exited_at_unix_nanos,
        })
    }

    /// Removes a container, SIGKILLing processes left after `timeout_ms`.
    pub async fn remove_container(&self, container_id: &str, timeout_ms: u32) -> Result<()> {
        let msg = pb::RemoveContainerRequest {
            container_id: container_id.to_string(),
            timeout_ms,
        };
        self.call(Rpc::RemoveContainer, msg, |mut c, r| async move {
            c.remove_container(r).await
        })
        .await
        .map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        self.call(
            Rpc::PauseContainer,
            container_request(container_id),
            |mut c, r| async move { c.pause_container(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        self.call(
            Rpc::ResumeContainer,
            container_request(container_id),
            |mut c, r| async move { c.resume_container(r).await },
        )
        .await
        .map(drop)
    }

    /// Applies OCI `linux.resources` (JSON) to a container.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<()> {
        let msg = pb::UpdateContainerRequest {
            container_id: container_id.to_string(),
            oci_linux_resources_json: resources_json,
        };
        self.call(Rpc::UpdateContainer, msg, |mut c, r| async move {
            c.update_container(r).await
        })
        .await
        .map(drop)
    }

    /// The guest pids of a container's processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        self.call(
            Rpc::ListProcesses,
            container_request(container_id),
            |mut c, r| async move { c.list_processes(r).await },
        )
        .await
        .map(|resp| resp.processes.into_iter().map(|p| p.pid).collect())
    }

    pub async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse> {
        self.call(
            Rpc::StatsContainer,
            container_request(container_id),
            |mut c, r| async move { c.stats_container(r).await },
        )
        .await
    }

    /// One output of a process as a stream of chunks; it ends after the process's pipe
    /// reached EOF and every byte was sent.
    pub async fn process_output(
        &self,
        container_id: &str,
        exec_id: &str,
        fd: pb::OutputFd,
    ) -> Result<impl Stream<Item = Result<Vec<u8>>> + Unpin> {
        let msg = pb::ProcessOutputRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            fd: fd as i32,
        };
        let stream = self
            .call(Rpc::ProcessOutput, msg, |mut c, r| async move {
                c.process_output(r).await
            })
            .await?;
        Ok(stream.map(|chunk| {
            chunk
                .map(|c| c.data)
                .map_err(|s| Rpc::ProcessOutput.error(s))
        }))
    }

    /// Writes to a process's stdin; returns how many bytes its pipe took.
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<usize> {
        let msg = pb::WriteStdinRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            data,
        };
        self.call(Rpc::WriteStdin, msg, |mut c, r| async move {
            c.write_stdin(r).await
        })
        .await
        .map(|resp| resp.written as usize)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        self.call(
            Rpc::CloseStdin,
            process_request(container_id, exec_id),
            |mut c, r| async move { c.close_stdin(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<()> {
        let msg = pb::ResizeTtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            columns,
        };
        self.call(Rpc::ResizeTty, msg, |mut c, r| async move {
            c.resize_tty(r).await
        })
        .await
        .map(drop)
    }

    /// Subscribes to the guest's OOM kills.
    pub async fn oom_events(&self) -> Result<OomEvents> {
        self.call(Rpc::OomEvents, pb::Empty {}, |mut c, r| async move {
            c.oom_events(r).await
        })
        .await
        .map(OomEvents)
    }

    /// Opens one forwarded connection to `127.0.0.1:port` in the guest: `to_guest` carries the
    /// host's bytes (its [`Chunk::Eof`] or end is the host's half-close); the returned stream
    /// the guest server's, ending with [`Chunk::Eof`]. A call that ends without that EOF (the
    /// agent's relay failed) yields an error last, so the caller drops its connection instead of
    /// taking it for a clean close.
    pub async fn port_forward(
        &self,
        port: u16,
        to_guest: tokio::sync::mpsc::Receiver<Chunk>,
    ) -> Result<BoxStream<'static, Result<Chunk>>> {
        let first = pb::PortForwardRequest {
            port: u32::from(port),
            data: Vec::new(),
        };
        let rest = futures::stream::unfold(to_guest, |mut to_guest| async move {
            match to_guest.recv().await {
                Some(Chunk::Data(data)) => {
                    Some((pb::PortForwardRequest { port: 0, data }, to_guest))
                }
                Some(Chunk::Eof) | None => None,
            }
        });
        let requests = futures::stream::once(std::future::ready(first)).chain(rest);
        let replies = self
            .call(Rpc::PortForward, requests, |mut c, r| async move {
                c.port_forward(r).await
            })
            .await?;
        let unclosed = futures::stream::once(std::future::ready(Err(Error::Agent(format!(
            "PortForward to guest port {port}: the agent ended the call without closing the \
             connection (its side failed; see the agent's log on the VM console)"
        )))));
        Ok(replies
            .map(|reply| {
                reply
                    .map(|r| {
                        if r.eof {
                            Chunk::Eof
                        } else {
                            Chunk::Data(r.data)
                        }
                    })
                    .map_err(|s| Rpc::PortForward.error(s))
            })
            .chain(unclosed)
            .boxed())
    }

    /// Polls `Health` until the agent answers or `deadline` passes, giving up early when
    /// `vm_alive` says the VM is gone. Connection errors while the guest boots are expected.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        mut vm_alive: impl FnMut() -> std::result::Result<(), String>,
    ) -> Result<HealthResponse> {
        let start = Instant::now();
        let mut last_error = String::from("no attempt made");
        let mut delay = Duration::from_millis(10);
        while start.elapsed() < timeout {
            if let Err(why) = vm_alive() {
                return Err(Error::VmGone(format!(
                    "while waiting for the agent: {why}; last agent error: {last_error}"
                )));
            }
            // A CONNECT hangs until the guest's vsock driver is up, and tonic's request
            // timeout does not cover connecting: the attempt is bounded here, so that the
            // last one does not outlast the boot timeout.
            let attempt = timeout
                .saturating_sub(start.elapsed())
                .min(Duration::from_secs(5));
            let mut req = tonic::Request::new(HealthRequest {});
            req.set_timeout(attempt);
            match tokio::time::timeout(attempt, self.client.clone().health(req)).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => last_error = format!("{}: {}", status.code(), status.message()),
                Err(_) => last_error = format!("no answer within {attempt:?}"),
            }
            tokio::time::sleep(delay).await;
            // Short steps: every poll is one cheap vsock CONNECT, and each step of waiting
            // adds to the pod start.
            delay = (delay * 2).min(Duration::from_millis(40));
        }
        Err(Error::Agent(format!(
            "the agent did not answer within {timeout:?}: {last_error}"
        )))
    }
}

fn container_request(container_id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: container_id.to_string(),
    }
}

fn process_request(container_id: &str, exec_id: &str) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    async fn fake_hybrid_vsock(listener: UnixListener, answer: &'static str) -> String {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut req = vec![0u8; 13];
        conn.read_exact(&mut req).await.expect("read CONNECT");
        conn.write_all(answer.as_bytes()).await.expect("answer");
        conn.write_all(b"payload").await.expect("payload");
        String::from_utf8(req).expect("utf8")
    }

    #[tokio::test]
    async fn handshake_keeps_the_bytes_that_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(fake_hybrid_vsock(listener, "OK 1073741824\n"));
        let mut stream = connect_vsock(&sock, 1024).await.expect("connect");
        let mut payload = [0u8; 7];
        stream.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"payload");
        assert_eq!(server.await.expect("server"), "CONNECT 1024\n");
    }

    #[tokio::test]
    async fn refused_port_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(fake_hybrid_vsock(listener, "FAILURE\n"));
        let err = connect_vsock(&sock, 1024).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        server.await.expect("server");
    }

    #[test]
    fn agent_errors_name_the_rpc_and_keep_the_agents_code() {
        let e = Rpc::CreateContainer.error(tonic::Status::not_found("no such layer"));
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!(e.to_string(), "not found: CreateContainer: no such layer");
        let e = Rpc::CopyFile.error(tonic::Status::resource_exhausted("too big"));
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = Rpc::OomEvents.error(tonic::Status::unimplemented("no"));
        assert!(matches!(e, Error::Unimplemented(_)), "{e}");
        let e = Rpc::StartContainer.error(tonic::Status::internal("boom"));
        assert_eq!(e.to_string(), "agent: StartContainer: boom (Internal)");
    }

    #[test]
    fn waits_streams_and_stdin_writes_go_without_a_deadline() {
        for rpc in [
            Rpc::WaitProcess,
            Rpc::ProcessOutput,
            Rpc::WriteStdin,
            Rpc::OomEvents,
        ] {
            assert!(!rpc.has_deadline(), "{rpc:?}");
        }
        for rpc in [Rpc::CreateContainer, Rpc::CloseStdin, Rpc::RemoveContainer] {
            assert!(rpc.has_deadline(), "{rpc:?}");
        }
    }

    #[tokio::test]
    async fn waiting_for_a_dead_vm_fails_fast_with_the_reason() {
        let agent = Agent::new(Path::new("/nonexistent/vsock.sock"), Duration::from_secs(1))
            .expect("client");
        let mut calls = 0;
        let err = agent
            .wait_ready(Duration::from_secs(30), || {
                calls += 1;
                if calls > 2 {
                    Err("VMM exited with status 3".into())
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMM exited with status 3"), "{err}");
    }
}
