//! virtio-vsock device state: the guest CID, the host Unix socket and the connections.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, State, CONN_BUF_ALLOC};
use super::metrics::VsockMetrics;
use super::packet::{Header, HOST_CID, OP_REQUEST, TYPE_STREAM};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, DeviceSnapshot, DeviceState, VirtioDevice,
    DEVICE_TOKEN_BASE, TYPE_VSOCK,
};
use kata_like_vmm_contract::DeviceCounters;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const LISTENER_TOKEN: u32 = DEVICE_TOKEN_BASE;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Most simultaneous connections; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// First host-side port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (local/host port, peer/guest port)
pub type ConnKey = (u32, u32);

pub struct Vsock {
    pub(super) cid: u64,
    /// Path of the host socket as seen by the VMM after jailing; guest-initiated connections
    /// to port P go to `<uds_path>_<P>`.
    pub(super) uds_path: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) state: DeviceState,
    pub(super) conns: HashMap<ConnKey, (u32, Connection)>,
    pub(super) token_keys: HashMap<u32, ConnKey>,
    /// Host clients that have not sent their CONNECT line yet, by token.
    pub(super) accepting: HashMap<u32, Connection>,
    pub(super) next_token: u32,
    pub(super) next_local_port: u32,
    /// Control packets waiting for receive buffers.
    pub(super) control: VecDeque<Header>,
    pub metrics: VsockMetrics,
}

impl Vsock {
    /// `listener` is the bound host socket; `uds_path` its path as the VMM sees it.
    pub fn new(cid: u64, listener: UnixListener, uds_path: PathBuf) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            cid,
            uds_path,
            listener,
            state: DeviceState::new(0, &QUEUE_SIZES),
            conns: HashMap::new(),
            token_keys: HashMap::new(),
            accepting: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            metrics: VsockMetrics::default(),
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub(super) fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(LISTENER_TOKEN + 1);
            if !self.token_keys.contains_key(&t) && !self.accepting.contains_key(&t) {
                return t;
            }
        }
    }

    pub(super) fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == p) {
                return p;
            }
        }
    }

    /// A header from the host to the guest for connection `key`.
    pub(super) fn header(
        &self,
        key: ConnKey,
        op: u16,
        flags: u32,
        len: u32,
        fwd_cnt: u32,
    ) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Tracks a new connection and watches its stream.
    pub(super) fn insert_connection(
        &mut self,
        key: ConnKey,
        conn: Connection,
        token: u32,
        events: EventSet,
    ) {
        if let Some(a) = self.state.active.as_ref() {
            if a.events
                .add(conn.stream.as_raw_fd(), token, events)
                .is_err()
            {
                tracing::warn!("cannot watch a vsock stream");
            }
        }
        self.token_keys.insert(token, key);
        self.conns.insert(key, (token, conn));
        self.metrics.connections_opened += 1;
    }

    pub(super) fn remove_connection(&mut self, key: ConnKey) {
        if let Some((token, conn)) = self.conns.remove(&key) {
            if let Some(a) = self.state.active.as_ref() {
                a.events.remove(conn.stream.as_raw_fd());
            }
            self.token_keys.remove(&token);
            self.metrics.connections_closed += 1;
        }
    }

    /// Opens a connection to guest `port` from inside the VMM (the API's graceful stop).
    /// Returns the host end of the stream.
    pub fn connect_internal(&mut self, port: u32) -> std::io::Result<UnixStream> {
        if self.state.active.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "vsock not active",
            ));
        }
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let local = self.alloc_local_port();
        let token = self.alloc_token();
        let key = (local, port);
        self.insert_connection(
            key,
            Connection::new(ours, State::Connecting, local, port, false),
            token,
            EventSet::empty(),
        );
        let hdr = self.header(key, OP_REQUEST, 0, 0, 0);
        self.control.push_back(hdr);
        self.process_rx();
        Ok(theirs)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn device_state(&self) -> &DeviceState {
        &self.state
    }
    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state
            .activate(ctx, Some((self.listener.as_raw_fd(), LISTENER_TOKEN)))
    }
    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }
    fn process_event(&mut self, sub: u32, events: u32) {
        self.handle_fd_event(sub, events);
    }
    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_connection(k);
        }
        if let Some(a) = self.state.reset() {
            a.events.remove(self.listener.as_raw_fd());
            for c in self.accepting.values() {
                a.events.remove(c.stream.as_raw_fd());
            }
        }
        self.accepting.clear();
        self.control.clear();
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Vsock { cid: self.cid }
    }
    /// The device keeps the CID it was started with: the guest reads it again on the
    /// transport reset `restored` sends.
    fn restore(&mut self, snapshot: &DeviceSnapshot) -> Result<(), String> {
        match snapshot {
            DeviceSnapshot::Vsock { .. } => Ok(()),
            other => Err(format!(
                "vsock device: the snapshot has {other:?} in its slot"
            )),
        }
    }
    fn restored(&mut self) {
        self.send_transport_reset();
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Vsock {
            open_connections: self.conns.len(),
            counters: self.metrics.clone(),
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
