//! virtio-console device state and config space.

use std::any::Any;

use super::metrics::ConsoleMetrics;
use crate::devices::console_sink::ConsoleOutput;
use crate::devices::virtio::{
    read_config_bytes, DeviceSnapshot, DeviceState, VirtioDevice, TYPE_CONSOLE,
};
use kata_like_vmm_contract::DeviceCounters;

/// Port 0's receive queue (host to guest). The host never sends input: the driver's buffers
/// stay with the device, which the spec allows.
pub const RECEIVE_QUEUE: usize = 0;
/// Port 0's transmit queue (guest to host): the console output.
pub const TRANSMIT_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [64, 256];

/// `struct virtio_console_config`: cols (u16), rows (u16), max_nr_ports (u32), emerg_wr (u32),
/// little-endian. Without VIRTIO_CONSOLE_F_SIZE, _MULTIPORT and _EMERG_WRITE the driver reads
/// none of it; it is still well-formed: no size, one port.
pub const CONFIG_SPACE: [u8; 12] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

pub struct Console {
    pub(super) state: DeviceState,
    pub(super) out: ConsoleOutput,
    /// Reused for every transmit chain (at most `MAX_CHAIN_BYTES`).
    pub(super) chain_buf: Vec<u8>,
    pub metrics: ConsoleMetrics,
}

impl Console {
    pub fn new(out: ConsoleOutput) -> Self {
        Console {
            state: DeviceState::new(0, &QUEUE_SIZES),
            out,
            chain_buf: Vec::new(),
            metrics: ConsoleMetrics::default(),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn device_state(&self) -> &DeviceState {
        &self.state
    }
    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&CONFIG_SPACE, offset, data);
    }
    // Writes to the config space (emerg_wr) are ignored: VIRTIO_CONSOLE_F_EMERG_WRITE is not
    // offered, so a driver that writes it breaks the protocol and gets nothing printed.
    fn process_queue(&mut self, index: usize) {
        if index == TRANSMIT_QUEUE {
            self.process_transmit();
        }
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Console { ports: 1 }
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Console(self.metrics.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console_sink::ConsoleSink;

    fn console() -> Console {
        Console::new(ConsoleOutput::new(ConsoleSink::Null).expect("sink"))
    }

    #[test]
    fn config_space_reads_one_port_and_no_size_and_ignores_writes() {
        let mut dev = console();
        let mut all = [0xffu8; 12];
        dev.read_config(0, &mut all);
        assert_eq!(all, CONFIG_SPACE);
        let mut ports = [0u8; 4];
        dev.read_config(4, &mut ports);
        assert_eq!(u32::from_le_bytes(ports), 1, "max_nr_ports");
        // emerg_wr is not offered: a write changes nothing.
        dev.write_config(8, &[b'x', 0, 0, 0]);
        dev.read_config(0, &mut all);
        assert_eq!(all, CONFIG_SPACE);
        // Beyond the config space (and offsets that would overflow) reads as zero.
        let mut beyond = [0xffu8; 4];
        dev.read_config(10, &mut beyond);
        assert_eq!(beyond, [0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0, 0, 0, 0]);
    }

    #[test]
    fn offers_no_device_features_and_two_queues() {
        let dev = console();
        assert_eq!(dev.device_type(), 3);
        assert_eq!(dev.avail_features(), 0);
        assert_eq!(dev.queue_max_sizes().len(), 2);
    }
}
