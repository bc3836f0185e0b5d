//! vhost-user-fs device state: the connection to the backend, negotiated before the jail, and
//! the config space the guest reads.

use std::any::Any;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vmm_sys_util::eventfd::EventFd;

use super::metrics::FsMetrics;
use crate::devices::virtio::{
    DeviceSnapshot, DeviceState, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};
use kata_like_vmm_contract::limits::MAX_FS_TAG_LEN;
use kata_like_vmm_contract::DeviceCounters;

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the one request queue.
pub const HIPRIO_QUEUE: usize = 0;
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// virtiofsd accepts up to 32768; 1024 is what Cloud Hypervisor and QEMU default to.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
/// The virtio features this frontend can pass through: the backend walks the rings, so only
/// ring layouts both our transport and the backend handle.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC);

#[derive(Debug, thiserror::Error)]
pub enum FsBackendError {
    #[error("connecting to the vhost-user-fs backend at {0}: {1} (is virtiofsd running and listening there?)")]
    Connect(String, std::io::Error),
    #[error("vhost-user handshake with the backend at {0}: {1}")]
    Handshake(String, vhost::Error),
    #[error("the vhost-user-fs backend at {0} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1(String),
    #[error("creating the device's eventfds: {0}")]
    EventFd(std::io::Error),
}

pub struct Fs {
    pub(super) state: DeviceState,
    /// The config space: tag (NUL-padded) then num_request_queues (little endian).
    config: [u8; MAX_FS_TAG_LEN + 4],
    pub(super) tag: String,
    pub(super) backend: Frontend,
    /// A second handle on the backend's socket, watched for hang-up (backend death).
    pub(super) socket: UnixStream,
    /// The virtio features the backend offered (VHOST_USER_F_PROTOCOL_FEATURES included).
    pub(super) backend_features: u64,
    /// One per queue: written when the guest notifies the queue; the backend reads it.
    pub(super) kick_evts: Vec<EventFd>,
    /// One per queue: the backend writes it after using buffers; we raise the interrupt.
    pub(super) call_evts: Vec<EventFd>,
    /// Set once the backend's socket hung up: from then on requests get an error reply.
    pub(super) backend_dead: bool,
    pub metrics: FsMetrics,
}

impl Fs {
    /// Connects to the backend at `socket` and negotiates what does not depend on the driver
    /// (ownership, protocol features). Runs before the jail: the socket may be outside it.
    pub fn connect(tag: &str, socket: &Path) -> Result<Self, FsBackendError> {
        let name = socket.display().to_string();
        let stream =
            UnixStream::connect(socket).map_err(|e| FsBackendError::Connect(name.clone(), e))?;
        let watch = stream
            .try_clone()
            .map_err(|e| FsBackendError::Connect(name.clone(), e))?;
        let mut backend = Frontend::from_stream(stream, QUEUE_SIZES.len() as u64);
        let handshake = |e| FsBackendError::Handshake(name.clone(), e);
        backend.set_owner().map_err(handshake)?;
        let backend_features = backend.get_features().map_err(handshake)?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsBackendError::NoVersion1(name));
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = backend.get_protocol_features().map_err(handshake)?;
            backend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(handshake)?;
        }
        Self::with_backend(tag, backend, watch, backend_features)
    }

    fn with_backend(
        tag: &str,
        backend: Frontend,
        socket: UnixStream,
        backend_features: u64,
    ) -> Result<Self, FsBackendError> {
        let mut config = [0u8; MAX_FS_TAG_LEN + 4];
        let tag_bytes = tag.as_bytes();
        let tag_len = tag_bytes.len().min(MAX_FS_TAG_LEN);
        config[..tag_len].copy_from_slice(&tag_bytes[..tag_len]);
        config[MAX_FS_TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let evts = || {
            QUEUE_SIZES
                .iter()
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<Result<Vec<_>, _>>()
                .map_err(FsBackendError::EventFd)
        };
        Ok(Fs {
            state: DeviceState::new(backend_features & PASSED_FEATURES, &QUEUE_SIZES),
            config,
            tag: tag.to_string(),
            backend,
            socket,
            backend_features,
            kick_evts: evts()?,
            call_evts: evts()?,
            backend_dead: false,
            metrics: FsMetrics::default(),
        })
    }

    /// A device on a backend the caller already connected (unit tests: a fake backend).
    #[cfg(test)]
    pub(super) fn from_connected(
        tag: &str,
        stream: UnixStream,
        backend_features: u64,
    ) -> Result<Self, FsBackendError> {
        let watch = stream
            .try_clone()
            .map_err(|e| FsBackendError::Connect("test".into(), e))?;
        Self::with_backend(
            tag,
            Frontend::from_stream(stream, QUEUE_SIZES.len() as u64),
            watch,
            backend_features,
        )
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn device_state(&self) -> &DeviceState {
        &self.state
    }
    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        ctx: crate::devices::virtio::ActivateContext,
    ) -> Result<(), crate::devices::virtio::ActivateError> {
        self.activate_backend(ctx)
    }
    fn process_queue(&mut self, index: usize) {
        self.forward_kick(index);
    }
    fn process_event(&mut self, sub: u32, events: u32) {
        self.handle_event(sub, events);
    }
    fn reset(&mut self) {
        self.reset_backend();
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Fs {
            tag: self.tag.clone(),
        }
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Fs {
            tag: self.tag.clone(),
            counters: self.metrics.clone(),
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
