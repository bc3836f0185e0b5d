//! Virtio devices over the virtio-mmio transport (virtio 1.x, split queues).

pub mod block;
pub mod chain;
pub mod console;
pub mod device_state;
pub mod events;
pub mod fs;
pub mod irq;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::any::Any;

pub use device_state::{
    ActivateContext, ActivateError, ActiveState, DeviceSnapshot, DeviceState, QueueSnapshot,
};
pub use events::{decode_token, EventRegistrar, DEVICE_TOKEN_BASE, WORK_TOKEN};
pub use irq::{IrqTrigger, INT_CONFIG, INT_VRING};

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn avail_features(&self) -> u64 {
        self.device_state().avail_features
    }
    /// The state every device keeps alike (features, activation, broken); the provided
    /// methods below and the queue helpers in `queue.rs` work on it.
    fn device_state(&self) -> &DeviceState;
    fn device_state_mut(&mut self) -> &mut DeviceState;
    fn set_acked_features(&mut self, features: u64) {
        self.device_state_mut().acked_features = features;
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.device_state().queue_sizes
    }
    /// Reads the device's config space; a device without one reads as zeros.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK. Devices that watch their own fds override this to add them.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.device_state_mut().activate(ctx, None)
    }
    fn is_activated(&self) -> bool {
        self.device_state().active.is_some()
    }
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// A device-owned fd registered through `EventRegistrar` is ready.
    fn process_event(&mut self, _sub: u32, _events: u32) {}
    /// Back to the pre-activation state (driver reset). Devices that watch their own fds or
    /// hold traffic override this to drop them too.
    fn reset(&mut self) {
        self.device_state_mut().reset();
    }
    /// Set when the driver broke the protocol; the transport then asks for a reset.
    fn is_broken(&self) -> bool {
        self.device_state().broken
    }
    /// What the driver has seen of the device, for a snapshot.
    fn snapshot(&self) -> DeviceSnapshot;
    /// Takes the state of a snapshot (before activation). A snapshot of another kind of
    /// device, or one this device cannot take, is refused.
    fn restore(&mut self, snapshot: &DeviceSnapshot) -> Result<(), String> {
        if *snapshot == self.snapshot() {
            Ok(())
        } else {
            Err(format!(
                "the snapshot has {snapshot:?} where this VM has {:?}",
                self.snapshot()
            ))
        }
    }
    /// Runs once the restored device is active again (before the guest runs).
    fn restored(&mut self) {}
    /// The device's counters for the API's `metrics` op.
    fn metrics(&self) -> kata_like_vmm_contract::DeviceCounters;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Reads `data.len()` bytes at `offset` from a config space image; out-of-range bytes read
/// as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
