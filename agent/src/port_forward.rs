//! Port forwarding in the guest (CRI PortForward, `kubectl port-forward`).
//!
//! containerd serves PortForward by dialing `127.0.0.1:PORT` in the pod's network namespace on
//! the host; the shim catches those connections there and sends each one here as a
//! `PortForward` call (see shim/src/pod/port_forward.rs). The agent dials the same address in
//! the guest, which is the pod's network namespace (every container joins the agent's, see
//! container/spec.rs), so a server that listens only on the guest's loopback is reached exactly
//! as kubelet reaches it in a runc pod.
//!
//! What this grants: only the host may call the agent (server.rs refuses any other vsock peer),
//! and a call can only reach TCP ports of 127.0.0.1 in the guest, which is what port-forward
//! gives a runc pod's user. Calls are bounded ([`MAX_PORT_FORWARDS`] at once) so that a flood of
//! forwarded connections cannot exhaust the guest.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use kata_like_protocol::relay::{self, Chunk, RelayError, RelayStats};
use kata_like_protocol::MAX_PORT_FORWARDS;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;

use crate::error::Error;

/// The guest address port-forward connections are made to (as containerd's, on IPv4 loopback).
pub const FORWARD_ADDRESS: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The agent's port forwards: at most [`MAX_PORT_FORWARDS`] open at once.
pub struct PortForwards {
    slots: Arc<Semaphore>,
}

impl Default for PortForwards {
    fn default() -> Self {
        Self::with_limit(MAX_PORT_FORWARDS)
    }
}

/// One forwarded connection, dialed and holding its slot until its relay ends.
pub struct ForwardedConnection {
    port: u16,
    socket: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// Checks a requested port: a TCP port number other than 0.
pub fn check_port(port: u32) -> Result<u16, Error> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::invalid_argument(format!(
            "PortForward: port {port} is not a TCP port (1..65535); name the port the \
             container's server listens on"
        ))),
    }
}

impl PortForwards {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
        }
    }

    /// Takes a slot and dials `127.0.0.1:port` in the guest.
    pub async fn open(&self, port: u32) -> Result<ForwardedConnection, Error> {
        let port = check_port(port)?;
        let slot = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            Error::resource_exhausted(format!(
                "PortForward: {MAX_PORT_FORWARDS} forwarded connections are open already; close \
                 some first"
            ))
        })?;
        let address = SocketAddrV4::new(FORWARD_ADDRESS, port);
        let socket = TcpStream::connect(address).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Error::not_found(format!(
                    "PortForward: nothing listens on {address} in the pod (connection refused)"
                ))
            } else {
                Error::internal(format!("PortForward: cannot connect to {address}: {e}"))
            }
        })?;
        let _ = socket.set_nodelay(true);
        Ok(ForwardedConnection {
            port,
            socket,
            _slot: slot,
        })
    }
}

impl ForwardedConnection {
    /// Relays until both directions closed or one failed; logs the outcome. `to_guest` is the
    /// host's side of the call: its clean end is the host's half-close.
    pub async fn relay<S, E>(self, to_guest: S, from_guest: mpsc::Sender<Chunk>)
    where
        S: Stream<Item = Result<Chunk, E>> + Unpin,
        E: std::fmt::Display,
    {
        let port = self.port;
        match relay::relay(self.socket, to_guest, from_guest).await {
            Ok(RelayStats {
                to_socket,
                from_socket,
            }) => tracing::debug!(
                port,
                to_guest = to_socket,
                from_guest = from_socket,
                "port forward closed"
            ),
            Err(RelayError::PeerGone) => {
                tracing::debug!(port, "port forward: the host went away")
            }
            Err(error) => tracing::info!(port, %error, "port forward ended early"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_tcp_port_numbers_are_accepted() {
        assert_eq!(check_port(1).unwrap(), 1);
        assert_eq!(check_port(65535).unwrap(), 65535);
        for bad in [0, 65536, u32::MAX] {
            let err = check_port(bad).unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
            assert!(err.message().contains(&bad.to_string()), "{err}");
        }
    }

    #[tokio::test]
    async fn a_port_nothing_listens_on_is_not_found() {
        // A port bound but not listening: connecting to it is refused.
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        drop(socket);
        let Err(err) = PortForwards::default().open(u32::from(port)).await else {
            panic!("nothing listens on {port}: the open must fail");
        };
        assert_eq!(err.kind(), crate::error::ErrorKind::NotFound, "{err}");
    }

    #[tokio::test]
    async fn forwards_beyond_the_limit_are_refused_until_one_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = u32::from(listener.local_addr().expect("addr").port());
        let forwards = PortForwards::with_limit(2);
        let first = forwards.open(port).await.expect("first");
        let _second = forwards.open(port).await.expect("second");
        let Err(err) = forwards.open(port).await else {
            panic!("a third forward must be refused");
        };
        assert_eq!(err.kind(), crate::error::ErrorKind::ResourceExhausted);
        // The first one's relay ends (the host closes both sides): its slot comes back.
        let (accepted, _) = listener.accept().await.expect("accept");
        let (tx, mut rx) = mpsc::channel(4);
        let host = tokio_stream::iter(vec![Ok::<_, String>(Chunk::Data(b"hi".to_vec()))]);
        let server = tokio::spawn(async move {
            let mut accepted = accepted;
            let mut got = Vec::new();
            accepted.read_to_end(&mut got).await.expect("read");
            accepted.write_all(b"bye").await.expect("write");
            got
        });
        let relay = tokio::spawn(first.relay(host, tx));
        assert_eq!(rx.recv().await, Some(Chunk::Data(b"bye".to_vec())));
        assert_eq!(rx.recv().await, Some(Chunk::Eof));
        relay.await.expect("relay");
        assert_eq!(server.await.expect("server"), b"hi");
        forwards.open(port).await.expect("a slot is free again");
    }
}
