//! One vsock stream: a guest port on one side, a Unix stream on the other, with the
//! virtio-vsock credit accounting in between.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

/// Bytes of guest data we accept per connection before it must wait for a credit update.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line accepted from a host client.
pub const MAX_CONNECT_LINE: usize = 32;

/// The host stream failed, closed, or the peer broke the protocol: the connection is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("vsock stream failed")]
pub struct StreamError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host client accepted; waiting for its `CONNECT <port>\n` line.
    AwaitingConnectLine,
    /// REQUEST sent to the guest; waiting for RESPONSE or RST.
    Connecting,
    Established,
    /// We sent SHUTDOWN (host side closed); waiting for the guest's RST.
    Closing,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Our port (the host side) and the guest's port.
    pub local_port: u32,
    pub peer_port: u32,
    pub connect_line: Vec<u8>,
    /// Guest data accepted but not yet written to the stream (bounded by CONN_BUF_ALLOC).
    pub to_stream: Vec<u8>,
    /// Bytes of guest data written to the stream (our fwd_cnt).
    pub fwd_cnt: u32,
    /// fwd_cnt last reported to the guest.
    pub last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest (our tx_cnt) and the guest's buffer/forward counters.
    pub rx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// The stream has data we have not read yet (epoll said so).
    pub readable: bool,
    pub stream_eof: bool,
    /// Host-initiated connections answer `OK <port>\n` once the guest accepts.
    pub host_initiated: bool,
}

impl Connection {
    pub fn new(
        stream: UnixStream,
        state: State,
        local_port: u32,
        peer_port: u32,
        host_initiated: bool,
    ) -> Self {
        Connection {
            stream,
            state,
            local_port,
            peer_port,
            connect_line: Vec::new(),
            to_stream: Vec::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            stream_eof: false,
            host_initiated,
        }
    }

    /// How many more bytes the guest can take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Accepts guest data. Err if the guest overran the credit we gave it or the stream
    /// is broken.
    pub fn send_to_stream(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if self.to_stream.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(StreamError);
        }
        self.to_stream.extend_from_slice(data);
        self.flush_to_stream()
    }

    /// Writes what it can of the pending guest data.
    pub fn flush_to_stream(&mut self) -> Result<(), StreamError> {
        while !self.to_stream.is_empty() {
            match self.stream.write(&self.to_stream) {
                Ok(0) => return Err(StreamError),
                Ok(n) => {
                    self.to_stream.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(StreamError),
            }
        }
        Ok(())
    }

    /// Reads stream data for the guest: Ok(None) when nothing is there now, Ok(Some(empty))
    /// at EOF.
    pub fn read_from_stream(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; max];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no payload after it is consumed).
    /// Ok(Some(port)) when complete, Ok(None) when more is needed, Err on a bad line.
    pub fn read_connect_line(&mut self) -> Result<Option<u32>, StreamError> {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Err(StreamError),
                Ok(_) => {
                    if b[0] == b'\n' {
                        return parse_connect_line(&self.connect_line)
                            .map(Some)
                            .ok_or(StreamError);
                    }
                    self.connect_line.push(b[0]);
                    if self.connect_line.len() > MAX_CONNECT_LINE {
                        return Err(StreamError);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(StreamError),
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
    }

    #[test]
    fn credit_accounts_for_bytes_in_flight() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established, 1, 2, false);
        c.peer_buf_alloc = 1000;
        c.rx_cnt = 600;
        c.peer_fwd_cnt = 100;
        assert_eq!(c.peer_credit(), 500);
        c.rx_cnt = u32::MAX;
        c.peer_fwd_cnt = u32::MAX - 1000;
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_overrunning_its_credit_is_an_error() {
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, State::Established, 1, 2, false);
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..64 {
            if c.send_to_stream(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(c.to_stream.len() <= CONN_BUF_ALLOC as usize);
    }
}
