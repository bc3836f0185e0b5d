//! The link to the guest agent: gRPC over the VMM's hybrid vsock Unix socket.
//!
//! Every HTTP/2 connection is one vsock stream: connect the Unix socket, write `CONNECT 1024\n`,
//! read `OK <port>\n`, then hand the stream to tonic. Ordinary calls carry a deadline; waits and
//! output streams have none (they end when the process does or the VM dies).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use kata_like_protocol::agent_client::AgentClient;
use kata_like_protocol::{HealthRequest, HealthResponse, AGENT_VSOCK_PORT, MAX_MESSAGE_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

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

/// A gRPC client of the agent plus the deadline for ordinary calls.
#[derive(Clone, Debug)]
pub struct Agent {
    client: AgentClient<Channel>,
    call_timeout: Duration,
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

    /// A client for one call.
    pub fn client(&self) -> AgentClient<Channel> {
        self.client.clone()
    }

    /// Wraps a message into a request with the ordinary deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.call_timeout);
        req
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
            match tokio::time::timeout(attempt, self.client().health(req)).await {
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
