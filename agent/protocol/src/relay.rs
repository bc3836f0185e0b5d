//! The byte relay of `PortForward`, shared by both ends: the agent relays between a guest TCP
//! connection and the call's streams, the shim between a host TCP connection and the same call
//! seen from the other side. Both need the same rules, so they live here once:
//! - bytes are copied exactly, in order, both ways;
//! - a half-close travels: the socket's EOF becomes [`Chunk::Eof`] on `outbound`, and an inbound
//!   [`Chunk::Eof`] (or the inbound stream's clean end) shuts the socket's write side, while the
//!   other direction goes on;
//! - the relay ends once both directions have closed, or at the first failure of either (a peer
//!   that went away), which drops the socket (the other side sees a reset or EOF, never a hang).

use std::fmt::Display;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

/// Largest chunk read from the socket at once (well below the gRPC message limit).
pub const RELAY_CHUNK_BYTES: usize = 32 * 1024;

/// One step of one direction of a relayed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Data(Vec<u8>),
    /// The sender closed its side: no data follows in this direction.
    Eof,
}

/// Why a relay ended before both directions closed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the forwarded socket failed: {0}")]
    Socket(#[from] std::io::Error),
    #[error("the other end of the forward failed: {0}")]
    Peer(String),
    #[error("the other end of the forward stopped reading")]
    PeerGone,
}

/// Bytes moved by a relay that ended cleanly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// From `inbound` into the socket.
    pub to_socket: u64,
    /// From the socket onto `outbound`.
    pub from_socket: u64,
}

/// Relays between `socket` and the two sides of a stream call (see the module doc). A clean end
/// of `inbound` counts as its EOF; nothing after an inbound EOF is read.
pub async fn relay<S, E>(
    mut socket: TcpStream,
    mut inbound: S,
    outbound: mpsc::Sender<Chunk>,
) -> Result<RelayStats, RelayError>
where
    S: Stream<Item = Result<Chunk, E>> + Unpin,
    E: Display,
{
    let (mut reader, mut writer) = socket.split();
    let from_socket = async {
        let mut total = 0u64;
        let mut buf = vec![0u8; RELAY_CHUNK_BYTES];
        loop {
            let n = tokio::select! {
                read = reader.read(&mut buf) => read?,
                // The receiver went away while the socket is quiet: stop instead of waiting.
                _ = outbound.closed() => return Err(RelayError::PeerGone),
            };
            let chunk = if n == 0 {
                Chunk::Eof
            } else {
                Chunk::Data(buf[..n].to_vec())
            };
            outbound
                .send(chunk)
                .await
                .map_err(|_| RelayError::PeerGone)?;
            if n == 0 {
                return Ok::<u64, RelayError>(total);
            }
            total += n as u64;
        }
    };
    let to_socket = async {
        let mut total = 0u64;
        loop {
            match inbound.next().await {
                Some(Ok(Chunk::Data(data))) => {
                    writer.write_all(&data).await?;
                    total += data.len() as u64;
                }
                Some(Ok(Chunk::Eof)) | None => {
                    writer.shutdown().await?;
                    return Ok::<u64, RelayError>(total);
                }
                Some(Err(e)) => return Err(RelayError::Peer(e.to_string())),
            }
        }
    };
    let (from_socket, to_socket) = tokio::try_join!(from_socket, to_socket)?;
    Ok(RelayStats {
        to_socket,
        from_socket,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::ReceiverStream;

    /// A connected pair of loopback TCP sockets: (the relay's, the server's).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn bytes_cross_exactly_and_the_host_half_close_still_lets_the_answer_through() {
        let (relay_end, mut server) = socket_pair().await;
        let (in_tx, in_rx) = mpsc::channel::<Result<Chunk, String>>(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let relay = tokio::spawn(relay(relay_end, ReceiverStream::new(in_rx), out_tx));
        let request = pattern(200_000, 7);
        let sender = {
            let request = request.clone();
            tokio::spawn(async move {
                for part in request.chunks(10_000) {
                    in_tx
                        .send(Ok(Chunk::Data(part.to_vec())))
                        .await
                        .expect("send");
                }
                in_tx.send(Ok(Chunk::Eof)).await.expect("send eof");
            })
        };
        // The server reads to EOF (the host's half-close), then answers: an echo server that
        // only answers after EOF proves the write side alone was shut.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server read");
        assert_eq!(got, request);
        let answer = pattern(100_000, 3);
        server.write_all(&answer).await.expect("server write");
        drop(server);
        let mut back = Vec::new();
        while let Chunk::Data(d) = out_rx.recv().await.expect("relay ended without Eof") {
            back.extend_from_slice(&d);
        }
        assert_eq!(back, answer);
        sender.await.expect("sender");
        let stats = relay.await.expect("join").expect("relay");
        assert_eq!(stats.to_socket, request.len() as u64);
        assert_eq!(stats.from_socket, answer.len() as u64);
    }

    #[tokio::test]
    async fn the_server_half_close_arrives_as_eof_while_the_host_keeps_sending() {
        let (relay_end, mut server) = socket_pair().await;
        let (in_tx, in_rx) = mpsc::channel::<Result<Chunk, String>>(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let relay = tokio::spawn(relay(relay_end, ReceiverStream::new(in_rx), out_tx));
        server.write_all(b"banner").await.expect("write");
        server.shutdown().await.expect("server half-close");
        assert_eq!(out_rx.recv().await, Some(Chunk::Data(b"banner".to_vec())));
        assert_eq!(out_rx.recv().await, Some(Chunk::Eof));
        // The host's direction still works after the server's half-close.
        in_tx
            .send(Ok(Chunk::Data(b"late".to_vec())))
            .await
            .expect("send");
        drop(in_tx);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"late");
        relay.await.expect("join").expect("relay");
    }

    #[tokio::test]
    async fn a_failed_peer_ends_the_relay_and_closes_the_socket() {
        let (relay_end, mut server) = socket_pair().await;
        let (in_tx, in_rx) = mpsc::channel::<Result<Chunk, String>>(4);
        let (out_tx, _out_rx) = mpsc::channel(4);
        let relay = tokio::spawn(relay(relay_end, ReceiverStream::new(in_rx), out_tx));
        in_tx
            .send(Err("the host reset the stream".to_string()))
            .await
            .expect("send");
        let err = relay.await.expect("join").expect_err("must fail");
        assert!(
            err.to_string().contains("the host reset the stream"),
            "{err}"
        );
        let mut rest = Vec::new();
        // The socket was dropped: the server sees EOF (or a reset), not a hang.
        let _ = server.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_receiver_that_went_away_ends_the_relay_while_the_socket_is_quiet() {
        let (relay_end, _server) = socket_pair().await;
        let (_in_tx, in_rx) = mpsc::channel::<Result<Chunk, String>>(4);
        let (out_tx, out_rx) = mpsc::channel(4);
        let relay = tokio::spawn(relay(relay_end, ReceiverStream::new(in_rx), out_tx));
        drop(out_rx);
        let err = relay.await.expect("join").expect_err("must fail");
        assert!(matches!(err, RelayError::PeerGone), "{err}");
    }
}
