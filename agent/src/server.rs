//! Listening and serving: vsock in the guest, a Unix socket on the host.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kata_like_protocol::agent_server::AgentServer;
use kata_like_protocol::{AGENT_VSOCK_PORT, MAX_MESSAGE_BYTES, POWER_VSOCK_PORT};
use tokio_stream::StreamExt;

use crate::agent::Agent;
use crate::rpc::Service;

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Self::Vsock)
                .map_err(|_| format!("bad vsock port {port:?}"));
        }
        Err(format!(
            "--listen takes unix:/path or vsock:PORT, not {s:?}"
        ))
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self::Vsock(AGENT_VSOCK_PORT)
    }
}

/// Serves until a shutdown is requested; returns the requested exit status.
pub async fn serve(
    agent: Arc<Agent>,
    listen: Listen,
    on_ready: impl FnOnce(),
) -> std::io::Result<u8> {
    let service = AgentServer::new(Service {
        agent: Arc::clone(&agent),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service);
    let mut shutdown = agent.shutdown.subscribe();
    let stop = async move {
        let _ = shutdown.wait_for(|s| s.is_some()).await;
    };
    let server = match &listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            on_ready();
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
        }
        Listen::Vsock(port) => {
            let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
            let listener = tokio_vsock::VsockListener::bind(addr)?;
            // Accept errors (a peer that went away) must not end the server; a peer other
            // than the host is dropped here, before tonic reads a byte from it.
            let gate_agent = Arc::clone(&agent);
            let port = *port;
            let incoming = listener.incoming().filter_map(move |accepted| {
                let stream = accepted.ok()?;
                accept_from_host_only(&gate_agent, port, stream).map(Ok::<_, std::io::Error>)
            });
            spawn_power_port(Arc::clone(&agent));
            on_ready();
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
        }
    };
    let mut shutdown = agent.shutdown.subscribe();
    let status = tokio::select! {
        result = shutdown.wait_for(|s| s.is_some()) => {
            result.map(|s| s.unwrap_or(0)).unwrap_or(0)
        }
        result = server => {
            match result {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
    };
    // Give the Shutdown reply a moment to leave; streams (output, OOM events) would otherwise
    // hold a graceful shutdown forever.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(status)
}

/// vsock port 1025: any connection asks for a clean shutdown.
fn spawn_power_port(agent: Arc<Agent>) {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, POWER_VSOCK_PORT);
    match tokio_vsock::VsockListener::bind(addr) {
        Ok(listener) => {
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // A peer that went away before the accept; don't spin on a lasting error.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if accept_from_host_only(&agent, POWER_VSOCK_PORT, stream).is_some() {
                        tracing::info!("power port connection from the host: shutting down");
                        agent.shutdown.send_replace(Some(0));
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen on the power port"),
    }
}

/// Whether a vsock peer may talk to the agent: only the host (VMADDR_CID_HOST) may. Anything
/// else (a process in the guest through vsock loopback, CID 1 or the guest's own CID; a peer
/// claiming the hypervisor's CID 0) could otherwise create containers or power the pod off
/// (issue 12).
pub fn vsock_peer_allowed(peer_cid: u32) -> bool {
    peer_cid == tokio_vsock::VMADDR_CID_HOST
}

/// Returns the stream if its peer is the host; otherwise drops (closes) it at once and logs the
/// peer. A peer whose address cannot be read is refused too.
fn accept_from_host_only(
    agent: &Agent,
    port: u32,
    stream: tokio_vsock::VsockStream,
) -> Option<tokio_vsock::VsockStream> {
    let peer = stream.peer_addr();
    if let Ok(addr) = &peer {
        if vsock_peer_allowed(addr.cid()) {
            return Some(stream);
        }
    }
    // try_read: the sandbox id is only for the log; never wait on the lock in the accept loop.
    let pod_id = agent
        .sandbox
        .try_read()
        .ok()
        .and_then(|sandbox| sandbox.as_ref().map(|s| s.id.clone()))
        .unwrap_or_default();
    match peer {
        Ok(addr) => tracing::warn!(
            pod_id,
            port,
            peer_cid = addr.cid(),
            peer_port = addr.port(),
            "refused a vsock connection that is not from the host (only CID 2 may talk to the agent)"
        ),
        Err(error) => tracing::warn!(
            pod_id,
            port,
            %error,
            "refused a vsock connection whose peer address cannot be read"
        ),
    }
    drop(stream);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        assert_eq!(
            "unix:/tmp/a.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/tmp/a.sock".into())
        );
        assert!("tcp:1".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }

    #[test]
    fn only_the_host_cid_may_connect_to_the_agent() {
        assert!(vsock_peer_allowed(2), "the host (VMADDR_CID_HOST)");
        for cid in [0, 1, 3, 4, 1000, u32::MAX - 1, u32::MAX] {
            assert!(
                !vsock_peer_allowed(cid),
                "CID {cid} (hypervisor, loopback, a guest, any) must be refused"
            );
        }
    }
}
