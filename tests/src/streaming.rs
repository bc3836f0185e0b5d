//! A client of containerd's CRI streaming server, speaking what kubectl speaks: the Kubernetes
//! channel protocol over WebSocket (`v4.channel.k8s.io`), for the URLs that CRI Exec, Attach
//! and PortForward return (containerd 1.6, pkg/cri/streaming: remotecommand/websocket.go and
//! portforward/websocket.go).
//!
//! Every binary message is one channel byte then the channel's bytes. Exec and attach use
//! channels 0 stdin, 1 stdout, 2 stderr, 3 error (a `metav1.Status` in JSON when the process
//! ended), 4 resize (`{"Width":W,"Height":H}`). PortForward with `?port=P&port=Q...` uses two
//! channels per port, data (2i) and error (2i+1), each starting with the port (2 bytes, little
//! endian).
//!
//! The test containerd runs in a network namespace of its own (containerd.rs) with its streaming
//! server on 127.0.0.1 there: the connection is made from inside that namespace.

use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The channel protocol of `kubectl exec`/`attach`/`port-forward` over WebSocket.
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;

/// A WebSocket to the streaming server, split into channels.
pub struct ChannelSocket {
    ws: WebSocketStream<TcpStream>,
}

/// Connects a TCP socket to `addr` from inside the network namespace at `netns` (a thread of
/// its own enters it; the socket stays in that namespace).
fn connect_in_netns(netns: &Path, addr: &str) -> std::io::Result<StdTcpStream> {
    let netns = std::fs::File::open(netns)?;
    let addr = addr.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this (short-lived) thread.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        StdTcpStream::connect(addr)
    })
    .join()
    .map_err(|_| std::io::Error::other("connect thread panicked"))?
}

/// `http://HOST:PORT/PATH` into (HOST:PORT, /PATH).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("streaming URL {url:?} is not http://"));
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

impl ChannelSocket {
    /// Opens the WebSocket of a streaming `url` (plus `query`, e.g. `?port=8080`) from the
    /// network namespace `netns`.
    pub async fn connect(netns: &Path, url: &str, query: &str) -> ChannelSocket {
        let (host, path) = split_url(url);
        let tcp = connect_in_netns(netns, &host)
            .unwrap_or_else(|e| panic!("connect to the streaming server {host}: {e}"));
        tcp.set_nonblocking(true).expect("nonblocking");
        let tcp = TcpStream::from_std(tcp).expect("tokio socket");
        let mut request = format!("ws://{host}{path}{query}")
            .into_client_request()
            .expect("websocket request");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(CHANNEL_PROTOCOL),
        );
        let (ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .unwrap_or_else(|e| panic!("websocket handshake with {url}{query}: {e}"));
        ChannelSocket { ws }
    }

    /// Sends `data` on `channel`.
    pub async fn send(&mut self, channel: u8, data: &[u8]) {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel);
        frame.extend_from_slice(data);
        self.ws
            .send(Message::binary(frame))
            .await
            .expect("websocket send");
    }

    /// Sends a terminal size on the resize channel.
    pub async fn resize(&mut self, width: u16, height: u16) {
        let size = format!(r#"{{"Width":{width},"Height":{height}}}"#);
        self.send(RESIZE, size.as_bytes()).await;
    }

    /// The next (channel, bytes) message; None once the server closed the WebSocket. Empty
    /// messages (the server's "ready" signal) are returned too.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(data)) => {
                    let (&channel, rest) = data.split_first()?;
                    return Some((channel, rest.to_vec()));
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                // containerd may drop the TCP connection right after its last frame.
                Err(_) => return None,
            }
        }
    }

    /// Closes the WebSocket from our side.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Splits into a sender and a receiver, for writing while reading.
    pub fn split(
        self,
    ) -> (
        futures::stream::SplitSink<WebSocketStream<TcpStream>, Message>,
        futures::stream::SplitStream<WebSocketStream<TcpStream>>,
    ) {
        self.ws.split()
    }
}

/// A binary channel message (for a split sender).
pub fn channel_message(channel: u8, data: &[u8]) -> Message {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(data);
    Message::binary(frame)
}

/// The exit code in a v4 error-channel status: 0 for `"status":"Success"`, the `ExitCode`
/// cause of a `NonZeroExitCode` failure otherwise; panics on anything else (an error of the
/// runtime, with its message).
pub fn exit_code_of_status(status_json: &[u8]) -> i32 {
    let status: serde_json::Value = serde_json::from_slice(status_json).unwrap_or_else(|e| {
        panic!(
            "error channel is not a JSON status ({e}): {}",
            String::from_utf8_lossy(status_json)
        )
    });
    if status["status"] == "Success" {
        return 0;
    }
    assert_eq!(
        status["reason"], "NonZeroExitCode",
        "the exec failed in the runtime: {status}"
    );
    status["details"]["causes"]
        .as_array()
        .and_then(|causes| causes.iter().find(|c| c["reason"] == "ExitCode"))
        .and_then(|c| c["message"].as_str())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no ExitCode cause in {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_urls_split_into_address_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:36789/exec/AbC-d_"),
            ("127.0.0.1:36789".to_string(), "/exec/AbC-d_".to_string())
        );
    }

    #[test]
    fn exit_codes_come_from_the_v4_status() {
        assert_eq!(
            exit_code_of_status(br#"{"metadata":{},"status":"Success"}"#),
            0
        );
        let failure = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 5], exit code 5","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"5"}]}}"#;
        assert_eq!(exit_code_of_status(failure), 5);
    }
}
