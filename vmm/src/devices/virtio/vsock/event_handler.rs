//! vsock traffic: guest packets from the TX queue, host socket events, and packets to the
//! guest through the RX queue (control packets first, then stream data within credit).

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, State, CONN_BUF_ALLOC};
use super::device::{
    ConnKey, Vsock, EVENT_QUEUE, LISTENER_TOKEN, MAX_CONNECTIONS, RX_QUEUE, TX_QUEUE,
};
use super::packet::*;
use crate::devices::virtio::chain;
use crate::devices::virtio::queue::{self, Fill};

/// `virtio_vsock_event.id` of a transport reset (virtio 1.2, 5.10.6.7).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
use crate::vstate::memory::GuestMemoryMmap;

impl Vsock {
    /// Re-arms a connection's stream for what we currently want from it.
    fn rearm(&self, key: ConnKey) {
        let (Some((token, conn)), Some(active)) =
            (self.conns.get(&key), self.state.active.as_ref())
        else {
            return;
        };
        let mut ev = EventSet::empty();
        if conn.state == State::Established && !conn.readable && !conn.stream_eof {
            ev |= EventSet::IN;
        }
        if !conn.to_stream.is_empty() {
            ev |= EventSet::OUT;
        }
        let _ = active.events.modify(conn.stream.as_raw_fd(), *token, ev);
    }

    fn send_rst(&mut self, key: ConnKey) {
        let hdr = self.header(key, OP_RST, 0, 0, 0);
        self.control.push_back(hdr);
        self.metrics.resets_sent += 1;
    }

    fn reset_connection(&mut self, key: ConnKey) {
        self.send_rst(key);
        self.remove_connection(key);
    }

    /// Queues a credit update when the guest's view of our free space is getting stale.
    fn maybe_credit_update(&mut self, key: ConnKey, force: bool) {
        let Some((_, conn)) = self.conns.get_mut(&key) else {
            return;
        };
        if force || conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= CONN_BUF_ALLOC / 4 {
            conn.last_fwd_cnt_sent = conn.fwd_cnt;
            let fwd = conn.fwd_cnt;
            let hdr = self.header(key, OP_CREDIT_UPDATE, 0, 0, fwd);
            self.control.push_back(hdr);
        }
    }

    pub(super) fn handle_fd_event(&mut self, sub: u32, events: u32) {
        if sub == LISTENER_TOKEN {
            self.accept_clients();
        } else if let Some(mut conn) = self.accepting.remove(&sub) {
            match conn.read_connect_line() {
                Ok(None) => {
                    self.accepting.insert(sub, conn);
                }
                Ok(Some(port)) => {
                    if let Some(a) = self.state.active.as_ref() {
                        a.events.remove(conn.stream.as_raw_fd());
                    }
                    let local = self.alloc_local_port();
                    conn.local_port = local;
                    conn.peer_port = port;
                    conn.state = State::Connecting;
                    let key = (local, port);
                    self.insert_connection(key, conn, sub, EventSet::empty());
                    let hdr = self.header(key, OP_REQUEST, 0, 0, 0);
                    self.control.push_back(hdr);
                }
                Err(_) => {
                    tracing::debug!("bad CONNECT line on the vsock socket");
                    if let Some(a) = self.state.active.as_ref() {
                        a.events.remove(conn.stream.as_raw_fd());
                    }
                }
            }
        } else if let Some(key) = self.token_keys.get(&sub).copied() {
            let writable = events & EventSet::OUT.bits() != 0;
            let readable = events
                & (EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
                    .bits()
                != 0;
            let mut failed = false;
            if let Some((_, conn)) = self.conns.get_mut(&key) {
                if writable && conn.flush_to_stream().is_err() {
                    failed = true;
                }
                if readable && conn.state == State::Established {
                    conn.readable = true;
                }
            }
            if failed {
                self.reset_connection(key);
            } else {
                if writable {
                    self.maybe_credit_update(key, false);
                }
                self.rearm(key);
            }
        }
        self.process_rx();
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.accepting.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let token = self.alloc_token();
                    if let Some(a) = self.state.active.as_ref() {
                        if a.events
                            .add(stream.as_raw_fd(), token, EventSet::IN)
                            .is_err()
                        {
                            continue;
                        }
                    }
                    self.accepting.insert(
                        token,
                        Connection::new(stream, State::AwaitingConnectLine, 0, 0, true),
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock accept failed");
                    break;
                }
            }
        }
    }

    /// Handles every packet the guest sent, then sends the guest what they produced.
    pub fn process_tx(&mut self) {
        let handled = queue::drain_queue(self, TX_QUEUE, Self::receive_guest_packet);
        if handled > 0 && !self.state.broken {
            self.process_rx();
        }
    }

    /// Parses and handles one transmit chain; nothing is written back into it.
    fn receive_guest_packet(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        match parse_tx(descs, mem) {
            Ok(pkt) => {
                self.metrics.tx_packets += 1;
                self.handle_guest_packet(pkt);
            }
            Err(e) => {
                tracing::debug!(error = %e, "invalid vsock packet");
                self.metrics.invalid_packets += 1;
            }
        }
        0
    }

    fn handle_guest_packet(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            self.metrics.invalid_packets += 1;
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.send_rst(key);
            }
            return;
        }
        let Some((_, conn)) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, &hdr),
                OP_RST => {}
                _ => self.send_rst(key),
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match (hdr.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                let ok = !conn.host_initiated || {
                    let line = format!("OK {}\n", conn.local_port);
                    std::io::Write::write_all(&mut &conn.stream, line.as_bytes()).is_ok()
                };
                if ok {
                    self.rearm(key);
                } else {
                    self.reset_connection(key);
                }
            }
            (OP_RW, State::Established) | (OP_RW, State::Closing) => {
                self.metrics.tx_bytes += pkt.data.len() as u64;
                if conn.send_to_stream(&pkt.data).is_err() {
                    self.reset_connection(key);
                } else {
                    self.maybe_credit_update(key, false);
                    self.rearm(key);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.maybe_credit_update(key, true),
            (OP_SHUTDOWN, _) => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    let _ = conn.flush_to_stream();
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.reset_connection(key);
                }
            }
            (OP_RST, _) => self.remove_connection(key),
            _ => {
                self.metrics.invalid_packets += 1;
                self.reset_connection(key);
            }
        }
    }

    /// The guest connects to host port `key.0`: dial `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.send_rst(key);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let mut conn = Connection::new(stream, State::Established, key.0, key.1, false);
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                let token = self.alloc_token();
                self.insert_connection(key, conn, token, EventSet::IN);
                let resp = self.header(key, OP_RESPONSE, 0, 0, 0);
                self.control.push_back(resp);
            }
            Err(e) => {
                tracing::debug!(path, error = %e, "guest-initiated vsock connection refused");
                self.send_rst(key);
            }
        }
    }

    /// A readable established connection the guest has credit for.
    fn next_data_source(&self) -> Option<ConnKey> {
        self.conns
            .iter()
            .find(|(_, (_, c))| {
                c.readable && c.state == State::Established && !c.stream_eof && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
    }

    /// Tells the guest that every connection it had is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    /// on the event queue, as Firecracker does after a restore): the restored device has none
    /// of them, and the driver then drops its sockets and reads the CID again.
    pub fn send_transport_reset(&mut self) {
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let pending = std::cell::Cell::new(true);
        let outcome = queue::fill_queue(
            self,
            EVENT_QUEUE,
            1,
            |_| pending.get(),
            |dev, mem, descs| {
                pending.set(false);
                match chain::writable_len(descs, mem) {
                    Ok(room) if room >= event.len() => {
                        match chain::scatter(descs, mem, &[&event]) {
                            Ok(n) => Fill::Used(n as u32),
                            Err(_) => Fill::Used(0),
                        }
                    }
                    _ => {
                        dev.metrics.invalid_packets += 1;
                        Fill::Used(0)
                    }
                }
            },
        );
        if outcome.used == 0 {
            tracing::warn!("no vsock event buffer from the driver: the guest was not told of the transport reset");
        }
    }

    /// Fills guest receive buffers: control packets first, then stream data.
    pub fn process_rx(&mut self) {
        queue::fill_queue(
            self,
            RX_QUEUE,
            usize::MAX,
            Self::has_packet_for_guest,
            Self::fill_rx_chain,
        );
    }

    fn has_packet_for_guest(&mut self) -> bool {
        !self.control.is_empty() || self.next_data_source().is_some()
    }

    /// Writes the next packet for the guest into one receive chain. An unusable chain is
    /// completed empty and counted; a chain seen when a stream turns out to have nothing to
    /// read goes back to the driver's ring.
    fn fill_rx_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Fill {
        let capacity = match rx_capacity(descs, mem) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "unusable vsock receive buffer");
                self.metrics.invalid_packets += 1;
                return Fill::Used(0);
            }
        };
        let (hdr, data) = if let Some(hdr) = self.control.pop_front() {
            (hdr, Vec::new())
        } else {
            let Some(key) = self.next_data_source() else {
                return Fill::PutBack;
            };
            let Some((_, conn)) = self.conns.get_mut(&key) else {
                return Fill::PutBack;
            };
            let max = (capacity - HDR_LEN)
                .min(conn.peer_credit() as usize)
                .min(MAX_PKT_DATA as usize);
            match conn.read_from_stream(max) {
                Ok(Some(data)) if !data.is_empty() => {
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(data.len() as u32);
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    let fwd = conn.fwd_cnt;
                    let hdr = self.header(key, OP_RW, 0, data.len() as u32, fwd);
                    self.metrics.rx_bytes += data.len() as u64;
                    (hdr, data)
                }
                Ok(Some(_)) => {
                    // Host side closed: tell the guest, wait for its RST.
                    conn.stream_eof = true;
                    conn.state = State::Closing;
                    let fwd = conn.fwd_cnt;
                    (
                        self.header(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, fwd),
                        Vec::new(),
                    )
                }
                Ok(None) => {
                    conn.readable = false;
                    self.rearm(key);
                    return Fill::PutBack;
                }
                Err(_) => {
                    self.remove_connection(key);
                    (self.header(key, OP_RST, 0, 0, 0), Vec::new())
                }
            }
        };
        match write_rx(descs, mem, &hdr, &data) {
            Ok(n) => {
                self.metrics.rx_packets += 1;
                Fill::Used(n)
            }
            Err(_) => {
                self.metrics.invalid_packets += 1;
                Fill::Used(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::VirtioDevice;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const PKT_ADDR: u64 = 0x10_0000;
    const RX_BUF: u64 = 0x20_0000;

    struct Harness {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        vsock: Vsock,
        dir: tempfile::TempDir,
        next_pkt: u64,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let mut vsock = Vsock::new(GUEST_CID, listener, path).unwrap();
            let mem = test_memory();
            let rx = TestQueue::new(&mem, 0x1_0000, 16);
            let tx = TestQueue::new(&mem, 0x2_0000, 16);
            let ev = TestQueue::new(&mem, 0x3_0000, 16);
            activate(&mut vsock, &mem, &[&rx, &tx, &ev]);
            Harness {
                mem,
                rx,
                tx,
                vsock,
                dir,
                next_pkt: PKT_ADDR,
            }
        }

        /// The guest sends a packet.
        fn guest_send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
            self.guest_send_flags(op, 0, src_port, dst_port, data);
        }

        fn guest_send_flags(
            &mut self,
            op: u16,
            flags: u32,
            src_port: u32,
            dst_port: u32,
            data: &[u8],
        ) {
            let hdr = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 65536,
                fwd_cnt: 0,
            };
            let at = self.next_pkt;
            self.next_pkt += 0x1000;
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(at))
                .unwrap();
            self.mem.write_slice(data, GuestAddress(at + 44)).unwrap();
            self.tx.add_chain(&[
                TestDesc::read(at, 44),
                TestDesc::read(at + 44, data.len() as u32),
            ]);
            self.vsock.process_queue(TX_QUEUE);
        }

        /// The guest posts one receive buffer and reads what arrives in it, if anything.
        fn guest_recv(&mut self) -> Option<(Header, Vec<u8>)> {
            let before = self.rx.used_idx();
            self.rx.add_chain(&[TestDesc::write(RX_BUF, 4096)]);
            self.vsock.process_queue(RX_QUEUE);
            if self.rx.used_idx() == before {
                return None;
            }
            let (_, len) = self.rx.used_elem(before);
            let mut buf = vec![0u8; len as usize];
            self.mem.read_slice(&mut buf, GuestAddress(RX_BUF)).unwrap();
            let hdr = Header::from_bytes(buf[..44].try_into().unwrap());
            Some((hdr, buf[44..].to_vec()))
        }
    }

    #[test]
    fn host_initiated_connection_exchanges_data() {
        let mut h = Harness::new();
        let mut client =
            std::os::unix::net::UnixStream::connect(h.dir.path().join("v.sock")).unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        h.vsock.process_event(LISTENER_TOKEN, EventSet::IN.bits());
        h.vsock
            .process_event(LISTENER_TOKEN + 1, EventSet::IN.bits());
        let (req, _) = h.guest_recv().expect("REQUEST for the guest");
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid),
            (OP_REQUEST, 1234, GUEST_CID)
        );
        let host_port = req.src_port;

        h.guest_send(OP_RESPONSE, 1234, host_port, b"");
        let mut ok = [0u8; 32];
        let n = client.read(&mut ok).unwrap();
        assert_eq!(
            std::str::from_utf8(&ok[..n]).unwrap(),
            format!("OK {host_port}\n")
        );

        client.write_all(b"to-guest").unwrap();
        h.vsock
            .process_event(LISTENER_TOKEN + 1, EventSet::IN.bits());
        let (rw, data) = h.guest_recv().expect("data for the guest");
        assert_eq!(rw.op, OP_RW);
        assert_eq!(data, b"to-guest");

        h.guest_send(OP_RW, 1234, host_port, b"to-host");
        let mut got = [0u8; 7];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to-host");

        // The guest closes: a full shutdown gets an RST and the host sees EOF.
        h.guest_send_flags(
            OP_SHUTDOWN,
            SHUTDOWN_RCV | SHUTDOWN_SEND,
            1234,
            host_port,
            b"",
        );
        assert_eq!(h.guest_recv().map(|(p, _)| p.op), Some(OP_RST));
        assert_eq!(client.read(&mut got).unwrap(), 0);
        assert!(h.vsock.conns.is_empty());
        assert_eq!(h.vsock.metrics.connections_closed, 1);
    }

    #[test]
    fn guest_initiated_connection_reaches_the_host_listener() {
        let mut h = Harness::new();
        let host =
            UnixListener::bind(format!("{}_5000", h.dir.path().join("v.sock").display())).unwrap();
        h.guest_send(OP_REQUEST, 777, 5000, b"");
        let (resp, _) = h.guest_recv().expect("RESPONSE");
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 5000, 777)
        );
        let (mut conn, _) = host.accept().unwrap();
        h.guest_send(OP_RW, 777, 5000, b"hello");
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(conn);
        // Host closed: the guest gets SHUTDOWN once the stream reports EOF.
        let key = (5000, 777);
        let token = h.vsock.conns[&key].0;
        h.vsock.process_event(token, EventSet::IN.bits());
        let (shut, _) = h.guest_recv().expect("SHUTDOWN");
        assert_eq!(shut.op, OP_SHUTDOWN);
        h.guest_send(OP_RST, 777, 5000, b"");
        assert!(h.vsock.conns.is_empty());
    }

    #[test]
    fn refused_and_bogus_packets_get_resets_not_panics() {
        let mut h = Harness::new();
        // No listener for port 6000.
        h.guest_send(OP_REQUEST, 1, 6000, b"");
        assert_eq!(h.guest_recv().unwrap().0.op, OP_RST);
        // Data for a connection that does not exist.
        h.guest_send(OP_RW, 1, 6000, b"zzz");
        assert_eq!(h.guest_recv().unwrap().0.op, OP_RST);
        // A payload length that lies about the chain.
        let bad = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            len: 60_000,
            type_: TYPE_STREAM,
            op: OP_RW,
            ..Default::default()
        };
        h.mem
            .write_slice(&bad.to_bytes(), GuestAddress(PKT_ADDR + 0x10_000))
            .unwrap();
        h.tx.add_chain(&[TestDesc::read(PKT_ADDR + 0x10_000, 44)]);
        h.vsock.process_queue(TX_QUEUE);
        assert_eq!(h.vsock.metrics.invalid_packets, 1);
        // Wrong source CID: dropped.
        let spoof = Header {
            src_cid: 99,
            dst_cid: HOST_CID,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Default::default()
        };
        h.mem
            .write_slice(&spoof.to_bytes(), GuestAddress(PKT_ADDR + 0x20_000))
            .unwrap();
        h.tx.add_chain(&[TestDesc::read(PKT_ADDR + 0x20_000, 44)]);
        h.vsock.process_queue(TX_QUEUE);
        assert_eq!(h.vsock.metrics.invalid_packets, 2);
        assert!(h.guest_recv().is_none());
        // That receive buffer is still posted: the next RST takes it.
        h.guest_send(OP_REQUEST, 2, 6001, b"");
        assert_eq!(h.rx.used_idx(), 3);
        // An unusable receive buffer (device-readable) is skipped and counted.
        h.rx.add_chain(&[TestDesc::read(RX_BUF, 4096)]);
        h.guest_send(OP_REQUEST, 3, 6002, b"");
        assert_eq!(h.vsock.metrics.invalid_packets, 3);
        assert_eq!(h.rx.used_elem(3).1, 0);
        assert!(!h.vsock.is_broken());
    }

    #[test]
    fn bad_connect_lines_are_dropped() {
        let mut h = Harness::new();
        let mut client =
            std::os::unix::net::UnixStream::connect(h.dir.path().join("v.sock")).unwrap();
        client.write_all(b"HELLO 1234\n").unwrap();
        h.vsock.process_event(LISTENER_TOKEN, EventSet::IN.bits());
        h.vsock
            .process_event(LISTENER_TOKEN + 1, EventSet::IN.bits());
        assert!(h.vsock.accepting.is_empty());
        assert!(h.vsock.conns.is_empty());
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "client sees EOF");
    }
}
