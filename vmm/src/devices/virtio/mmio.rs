//! The virtio-mmio transport (version 2). Every register write from the guest is checked:
//! queue setup only before DRIVER_OK, features limited to what the device offers,
//! activation only with valid queues; a driver that breaks the rules gets DEVICE_NEEDS_RESET.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, EventRegistrar, IrqTrigger, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b4c_4d56; // "VMLK"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// The driver wrote a size that is zero, too large or not a power of two.
    bad_queue_size: Vec<bool>,
    irq: Arc<IrqTrigger>,
    registrar: Option<EventRegistrar>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for max in device.queue_max_sizes() {
            queues.push(Queue::new(*max).map_err(|e| std::io::Error::other(e.to_string()))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            bad_queue_size: vec![false; queue_evts.len()],
            queue_evts,
            irq: Arc::new(IrqTrigger::new()?),
            registrar: None,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// Where device-owned fds go once the device is active.
    pub fn set_registrar(&mut self, registrar: EventRegistrar) {
        self.registrar = Some(registrar);
    }

    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device's configuration changed (e.g. a drive got a backing file): bump the
    /// generation and tell the driver.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.irq.trigger(INT_CONFIG);
        }
    }

    /// Queue `index` was notified (through its ioeventfd or a trapped write).
    pub fn process_queue(&mut self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            // Drain the counter; a spurious wake just finds an empty queue.
            let _ = evt.read();
        }
        if !self.device.is_activated() || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.device.process_queue(index);
        self.check_broken();
    }

    pub fn process_event(&mut self, sub: u32, events: u32) {
        if !self.device.is_activated() || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.device.process_event(sub, events);
        self.check_broken();
    }

    fn check_broken(&mut self) {
        if self.device.is_broken() && self.status & STATUS_NEEDS_RESET == 0 {
            tracing::warn!(
                device_type = self.device.device_type(),
                "device marked broken: driver error"
            );
            self.status |= STATUS_NEEDS_RESET;
            self.irq.trigger(INT_CONFIG);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.bad_queue_size.iter_mut().for_each(|b| *b = false);
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.irq.status.store(0, Ordering::SeqCst);
    }

    fn activate(&mut self) {
        let mut bad = None;
        for (i, q) in self.queues.iter().enumerate() {
            let bad_size = self.bad_queue_size.get(i).copied().unwrap_or(true);
            if q.ready() && (bad_size || !q.is_valid(&self.mem)) {
                bad = Some(i);
            }
        }
        if let Some(i) = bad {
            tracing::warn!(queue = i, "driver set DRIVER_OK with an invalid queue");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let Some(events) = self.registrar.clone() else {
            self.status |= STATUS_NEEDS_RESET;
            return;
        };
        // The device gets its own copies; the transport keeps the driver's view for reads.
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    tracing::warn!(error = %e, "invalid queue state at DRIVER_OK");
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            irq: self.irq.clone(),
            events,
        };
        if let Err(e) = self.device.activate(ctx) {
            tracing::warn!(error = %e, "device activation failed");
            self.status |= STATUS_NEEDS_RESET;
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, in the order the spec gives.
        let added = value & !self.status;
        if value & self.status != self.status {
            tracing::warn!(
                old = self.status,
                new = value,
                "driver cleared status bits without reset"
            );
            return;
        }
        if added & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: leave FEATURES_OK unset so the driver sees it.
            tracing::warn!("driver did not accept VIRTIO_F_VERSION_1");
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        self.status = value;
        if added & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(self.acked_features);
        }
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.irq.status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let setup = self.queue_setup_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
                    let shift = match self.driver_features_sel {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    let mask = 0xffff_ffffu64 << shift;
                    self.acked_features =
                        (self.acked_features & !mask) | ((u64::from(value) << shift) & offered);
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if setup => {
                let sel = self.queue_sel as usize;
                if let Some(q) = self.queues.get_mut(sel) {
                    let valid =
                        value != 0 && value <= u32::from(q.max_size()) && value.is_power_of_two();
                    if valid {
                        q.set_size(value as u16);
                    }
                    // Remembered, and refused at DRIVER_OK: the driver lays out its rings for
                    // the size it wrote.
                    self.bad_queue_size[sel] = !valid;
                }
            }
            REG_QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW if setup => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH if setup => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_AVAIL_LOW if setup => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_AVAIL_HIGH if setup => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW if setup => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_USED_HIGH if setup => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => {
                // Only reached when no ioeventfd matched (or in tests): handle inline.
                if (value as usize) < self.queues.len() {
                    self.process_queue(value as usize);
                }
            }
            REG_INTERRUPT_ACK => {
                self.irq.status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            _ => tracing::debug!(offset, value, "ignored virtio-mmio register write"),
        }
    }
}

impl MmioTransport {
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::test_memory;
    use crate::devices::virtio::{INT_VRING, TYPE_RNG};
    use vmm_sys_util::epoll::Epoll;

    fn transport() -> MmioTransport {
        let mut t = MmioTransport::new(Box::new(Rng::new()), test_memory()).unwrap();
        t.set_registrar(EventRegistrar::new(Arc::new(Epoll::new().unwrap()), 0));
        t
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// Drives the init sequence up to FEATURES_OK with queue 0 of `size` at 0x10000.
    fn negotiate(t: &mut MmioTransport, size: u32) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, 0x10000);
        write(t, REG_QUEUE_AVAIL_LOW, 0x11000);
        write(t, REG_QUEUE_USED_LOW, 0x12000);
        write(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_the_device() {
        let mut t = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), TYPE_RNG);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 64);
        write(&mut t, REG_QUEUE_SEL, 5);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        // Unaligned or narrow register reads read as zero.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_init_activates_the_device() {
        let mut t = transport();
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, 0xf);
        assert_eq!(read(&mut t, REG_STATUS), 0xf);
        assert!(t.device().is_activated());
        // Queue setup is frozen after DRIVER_OK.
        write(&mut t, REG_QUEUE_NUM, 32);
        write(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1);
        // Interrupt status and ack.
        t.irq().trigger(INT_VRING | INT_CONFIG);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 3);
        write(&mut t, REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
        // Config change bumps the generation.
        let generation = read(&mut t, REG_CONFIG_GENERATION);
        t.notify_config_change();
        assert_eq!(read(&mut t, REG_CONFIG_GENERATION), generation + 1);
        // Reset returns to the initial state.
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert!(!t.device().is_activated());
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn driver_without_version_1_never_gets_features_ok() {
        let mut t = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK: the device asks for a reset and stays inactive.
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(!t.device().is_activated());
    }

    #[test]
    fn bad_queue_sizes_and_addresses_need_reset() {
        for (size, desc) in [
            (6, 0x10000u32),
            (0, 0x10000),
            (128, 0x10000),
            (16, 0xffff_f000),
        ] {
            let mut t = transport();
            negotiate(&mut t, size);
            write(&mut t, REG_QUEUE_DESC_LOW, desc);
            write(&mut t, REG_STATUS, 0xf);
            assert_ne!(
                read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET,
                0,
                "size {size} desc {desc:#x}"
            );
            assert!(!t.device().is_activated());
        }
    }

    #[test]
    fn clearing_status_bits_without_reset_is_ignored() {
        let mut t = transport();
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            read(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
    }
}
