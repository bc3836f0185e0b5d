//! The virtio-mmio transport (version 2). Every register write from the guest is checked:
//! queue setup only before DRIVER_OK, features limited to what the device offers,
//! activation only with valid queues; a driver that breaks the rules gets DEVICE_NEEDS_RESET.
//!
//! Register accesses run on vCPU threads, whose seccomp filter allows KVM_RUN and eventfd
//! writes but no socket or epoll work. So the transport only records what the driver asked
//! for: device activation (which registers the device's fds with the event loop), device reset
//! (which closes them) and trapped queue notifications are handed to the VMM thread through
//! `work_evt` and the queue eventfds, and carried out there (`apply_pending`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use serde::{Deserialize, Serialize};

use super::{
    ActivateContext, DeviceSnapshot, EventRegistrar, IrqTrigger, QueueSnapshot, VirtioDevice,
    INT_CONFIG, VIRTIO_F_VERSION_1,
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

/// Device work a register write asked for, done later on the VMM thread.
enum Pending {
    Reset,
    Activate { ctx: ActivateContext, features: u64 },
}

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
    /// Resets and activations not yet applied to the device, in the driver's order.
    pending: Vec<Pending>,
    /// Signalled when `pending` gets work; the VMM thread then calls `apply_pending`.
    work_evt: EventFd,
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
            pending: Vec::new(),
            work_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Signalled when a register write left device work for the VMM thread.
    pub fn work_evt(&self) -> &EventFd {
        &self.work_evt
    }

    /// VMM thread: `work_evt` fired. Applies what the driver asked for since the last call.
    pub fn process_work(&mut self) {
        // Drain the counter first: work queued after this read signals again.
        let _ = self.work_evt.read();
        self.apply_pending();
    }

    /// Applies pending resets and activations to the device (VMM or API thread only: this
    /// registers and closes fds). Called before anything else touches the device, so the
    /// device state always follows the driver's register writes in order.
    pub fn apply_pending(&mut self) {
        for work in std::mem::take(&mut self.pending) {
            match work {
                Pending::Reset => self.device.reset(),
                Pending::Activate { ctx, features } => {
                    self.device.set_acked_features(features);
                    if let Err(e) = self.device.activate(ctx) {
                        tracing::warn!(
                            device_type = self.device.device_type(),
                            error = %e,
                            "device activation failed"
                        );
                        self.status |= STATUS_NEEDS_RESET;
                        self.irq.trigger(INT_CONFIG);
                    }
                }
            }
        }
    }

    fn push_work(&mut self, work: Pending) {
        self.pending.push(work);
        if let Err(e) = self.work_evt.write(1) {
            tracing::warn!(error = %e, "cannot signal device work to the VMM thread");
        }
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
        self.apply_pending();
        if !self.device.is_activated() || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.device.process_queue(index);
        self.check_broken();
    }

    pub fn process_event(&mut self, sub: u32, events: u32) {
        self.apply_pending();
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
        // An activation not applied yet never reaches the device; the device itself is reset
        // on the VMM thread (it closes the device's sockets).
        self.pending.retain(|w| matches!(w, Pending::Reset));
        if self.pending.is_empty() {
            self.push_work(Pending::Reset);
        }
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
        let features = self.acked_features;
        self.push_work(Pending::Activate { ctx, features });
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
                // Only reached when no ioeventfd matched: signal the queue's eventfd as KVM
                // would have, so that the VMM thread does the work.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!(error = %e, "cannot signal a queue notification");
                    }
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

/// One device slot in a snapshot: the transport registers as the driver left them, each
/// queue with the device's progress in it, and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub bad_queue_size: Vec<bool>,
    pub queues: Vec<QueueSnapshot>,
    /// The device had found the driver breaking the ring protocol.
    pub broken: bool,
    pub device: DeviceSnapshot,
}

impl MmioTransport {
    /// The slot's state (VMM thread, vCPUs parked, so no register write comes in between).
    pub fn snapshot(&mut self) -> TransportSnapshot {
        self.apply_pending();
        // Once active the device walks its own copies of the queues: they hold how far it got.
        let device_queues = self
            .device
            .device_state()
            .active
            .as_ref()
            .map(|a| &a.queues);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot::of(device_queues.and_then(|d| d.get(i)).unwrap_or(q)))
            .collect();
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status.load(Ordering::SeqCst),
            bad_queue_size: self.bad_queue_size.clone(),
            queues,
            broken: self.device.is_broken(),
            device: self.device.snapshot(),
        }
    }

    /// Puts a snapshot's state into this fresh slot (its registrar set, its interrupt wired)
    /// and, if the driver had the device running, activates the device again. Everything is
    /// checked as if the driver had written it.
    pub fn restore(&mut self, snap: &TransportSnapshot) -> Result<(), String> {
        let device_type = self.device.device_type();
        if snap.device_type != device_type {
            return Err(format!(
                "the snapshot has a device of type {} in this slot, the VM a device of type {device_type}: give the same devices in the same order as the VM that made it",
                snap.device_type
            ));
        }
        if snap.queues.len() != self.queues.len() || snap.bad_queue_size.len() != self.queues.len()
        {
            return Err(format!(
                "the snapshot's device of type {device_type} has {} queues, this one {}",
                snap.queues.len(),
                self.queues.len()
            ));
        }
        let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
        if snap.acked_features & !offered != 0 {
            return Err(format!(
                "the snapshot's driver acked features {:#x} this device of type {device_type} does not offer",
                snap.acked_features & !offered
            ));
        }
        let mut queues = Vec::with_capacity(snap.queues.len());
        for (q, max) in snap.queues.iter().zip(self.device.queue_max_sizes()) {
            if q.max_size != *max {
                return Err(format!(
                    "the snapshot's queue has {} entries at most, this device's {max}",
                    q.max_size
                ));
            }
            queues.push(q.to_queue()?);
        }
        self.device.restore(&snap.device)?;
        self.queues = queues;
        self.bad_queue_size = snap.bad_queue_size.clone();
        self.status = snap.status;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.acked_features = snap.acked_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        self.irq
            .status
            .store(snap.interrupt_status, Ordering::SeqCst);
        if snap.status & STATUS_DRIVER_OK != 0 && snap.status & STATUS_NEEDS_RESET == 0 {
            self.activate();
            self.apply_pending();
            if !self.device.is_activated() {
                return Err(format!(
                    "the snapshot's device of type {device_type} does not activate again (status {:#x})",
                    self.status
                ));
            }
            self.device.device_state_mut().broken = snap.broken;
            self.device.restored();
        }
        if self.device.snapshot() != snap.device {
            // A new backend the driver has not seen (another drive size): as `set_drive`.
            self.notify_config_change();
        } else if snap.interrupt_status != 0 {
            // Raised before the snapshot and not yet acknowledged: raise it again (the
            // driver reads the status, so a repeat is harmless).
            self.irq.trigger(0);
        }
        Ok(())
    }

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

    pub(super) fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(super) fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// The driver's init sequence up to FEATURES_OK, with VIRTIO_F_VERSION_1 acked.
    pub(super) fn features_ok(t: &mut MmioTransport) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    /// Drives the init sequence up to FEATURES_OK with queue 0 of `size` at 0x10000.
    fn negotiate(t: &mut MmioTransport, size: u32) {
        features_ok(t);
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
        // The register write only queued the activation for the VMM thread.
        assert!(!t.device().is_activated());
        assert_eq!(t.work_evt().read().unwrap(), 1, "VMM thread signalled");
        t.process_work();
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
        // Reset returns to the initial state (the device's own reset on the VMM thread).
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(t.device().is_activated());
        t.process_work();
        assert!(!t.device().is_activated());
    }

    /// What the driver does between two runs of the VMM thread is applied in order: reset
    /// then re-activation leaves the device active, activation then reset leaves it reset.
    #[test]
    fn queued_work_follows_the_driver_order() {
        let mut t = transport();
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, 0xf);
        t.process_work();
        assert!(t.device().is_activated());
        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, 0xf);
        t.process_work();
        assert!(t.device().is_activated());
        assert_eq!(read(&mut t, REG_STATUS), 0xf);

        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, 0xf);
        write(&mut t, REG_STATUS, 0);
        t.process_work();
        assert!(!t.device().is_activated());
        assert_eq!(read(&mut t, REG_STATUS), 0);
    }

    /// A notification that reaches the transport (no ioeventfd matched) is not processed on
    /// the vCPU thread: it signals the queue's eventfd, as KVM would have.
    #[test]
    fn trapped_notify_signals_the_queue_eventfd() {
        let mut t = transport();
        negotiate(&mut t, 16);
        write(&mut t, REG_STATUS, 0xf);
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        // Out of range: ignored.
        write(&mut t, REG_QUEUE_NOTIFY, 7);
        assert!(t.queue_evts()[0].read().is_err(), "nothing more signalled");
        // The queue work itself applies the pending activation first.
        assert!(!t.device().is_activated());
        t.process_queue(0);
        assert!(t.device().is_activated());
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

/// Snapshot and restore of a slot: the transport's registers and queues (shared by every
/// device) and each device's own state, through the JSON a state file holds.
#[cfg(test)]
mod snapshot_tests {
    use super::tests::{features_ok, read, write};
    use super::*;
    use crate::devices::virtio::block::device::Backing;
    use crate::devices::virtio::block::{Block, BlockConfig};
    use crate::devices::virtio::console::Console;
    use crate::devices::virtio::net::{Net, Tap};
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::virtio::INT_VRING;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::Epoll;

    fn slot(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> MmioTransport {
        let mut t = MmioTransport::new(device, mem.clone()).unwrap();
        t.set_registrar(EventRegistrar::new(Arc::new(Epoll::new().unwrap()), 0));
        t
    }

    /// The driver's init sequence with one `TestQueue` per device queue, up to DRIVER_OK
    /// applied on the "VMM thread".
    fn drive_to_ok(t: &mut MmioTransport, queues: &[&TestQueue]) {
        features_ok(t);
        for (i, q) in queues.iter().enumerate() {
            write(t, REG_QUEUE_SEL, i as u32);
            write(t, REG_QUEUE_NUM, u32::from(q.size));
            write(t, REG_QUEUE_DESC_LOW, q.desc as u32);
            write(t, REG_QUEUE_AVAIL_LOW, q.avail as u32);
            write(t, REG_QUEUE_USED_LOW, q.used as u32);
            write(t, REG_QUEUE_READY, 1);
        }
        write(t, REG_STATUS, 0xf);
        t.process_work();
        assert!(t.device().is_activated());
    }

    fn through_json(snap: &TransportSnapshot) -> TransportSnapshot {
        serde_json::from_str(&serde_json::to_string(snap).unwrap()).unwrap()
    }

    #[test]
    fn a_restored_slot_reads_as_the_driver_left_it_and_carries_on_in_its_queue() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x10000, 16);
        let mut t = slot(Box::new(Rng::new()), &mem);
        drive_to_ok(&mut t, &[&q]);
        q.add_chain(&[TestDesc::write(0x10_0000, 16)]);
        t.process_queue(0);
        assert_eq!(q.used_idx(), 1);
        t.notify_config_change();
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        let snap = t.snapshot();
        assert_eq!(
            snap.queues[0].next_avail, 1,
            "the device's progress is kept"
        );
        assert_eq!(snap.queues[0].next_used, 1);
        assert_eq!(snap.status, 0xf);
        assert_eq!(snap.config_generation, 1);
        assert_eq!(snap.interrupt_status, INT_VRING | INT_CONFIG);

        let mut restored = slot(Box::new(Rng::new()), &mem);
        restored.restore(&through_json(&snap)).unwrap();
        assert!(restored.device().is_activated());
        assert_eq!(restored.snapshot(), snap);
        assert_eq!(read(&mut restored, REG_STATUS), 0xf);
        assert_eq!(read(&mut restored, REG_QUEUE_READY), 1);
        assert_eq!(read(&mut restored, REG_CONFIG_GENERATION), 1);
        assert_eq!(read(&mut restored, REG_DEVICE_FEATURES), 1);
        assert_eq!(
            read(&mut restored, REG_INTERRUPT_STATUS),
            INT_VRING | INT_CONFIG
        );
        assert!(
            restored.irq().evt.read().is_ok(),
            "the pending interrupt is raised again"
        );
        // The next chain the driver publishes is the restored device's next one.
        q.add_chain(&[TestDesc::write(0x10_1000, 16)]);
        restored.process_queue(0);
        assert_eq!(q.used_idx(), 2);
        assert_ne!(mem.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap(), 0);
    }

    #[test]
    fn a_slot_the_driver_never_started_restores_inactive() {
        let mem = test_memory();
        let mut t = slot(Box::new(Rng::new()), &mem);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        let snap = t.snapshot();
        let mut restored = slot(Box::new(Rng::new()), &mem);
        restored.restore(&through_json(&snap)).unwrap();
        assert!(!restored.device().is_activated());
        assert_eq!(restored.snapshot(), snap);
    }

    #[test]
    fn a_snapshot_that_does_not_fit_the_slot_is_refused() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 0x10000, 16);
        let mut t = slot(Box::new(Rng::new()), &mem);
        drive_to_ok(&mut t, &[&q]);
        let snap = t.snapshot();
        let sink = crate::devices::console_sink::ConsoleOutput::new(
            crate::devices::console_sink::ConsoleSink::Null,
        )
        .unwrap();
        let err = slot(Box::new(Console::new(sink)), &mem)
            .restore(&snap)
            .unwrap_err();
        assert!(
            err.contains("type 4 in this slot, the VM a device of type 3"),
            "{err}"
        );

        let mut foreign_features = snap.clone();
        foreign_features.acked_features |= 1 << 40;
        let err = slot(Box::new(Rng::new()), &mem)
            .restore(&foreign_features)
            .unwrap_err();
        assert!(err.contains("does not offer"), "{err}");

        let mut bad_queue = snap.clone();
        bad_queue.queues[0].size = 6;
        let err = slot(Box::new(Rng::new()), &mem)
            .restore(&bad_queue)
            .unwrap_err();
        assert!(err.contains("queue state"), "{err}");

        let mut outside = snap;
        outside.queues[0].used_ring = 64 << 20;
        let mut t = slot(Box::new(Rng::new()), &mem);
        let err = t.restore(&outside).unwrap_err();
        assert!(err.contains("does not activate again"), "{err}");
    }

    fn drive(sectors: u64, read_only: bool) -> Block {
        let file = tempfile::tempfile().unwrap();
        file.set_len(sectors * 512).unwrap();
        Block::new(
            BlockConfig {
                id: "klrw".into(),
                read_only,
            },
            Some(Backing::new(file, read_only).unwrap()),
        )
    }

    #[test]
    fn a_drive_restores_onto_a_new_backing_and_tells_the_driver_its_new_size() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 0x10000, 16);
        let mut t = slot(Box::new(drive(8, false)), &mem);
        drive_to_ok(&mut t, &[&q]);
        let _ = t.irq().evt.read();
        let snap = through_json(&t.snapshot());
        assert_eq!(
            snap.device,
            DeviceSnapshot::Block {
                read_only: false,
                capacity_sectors: 8
            }
        );
        // Same size: nothing for the driver to notice.
        let mut same = slot(Box::new(drive(8, false)), &mem);
        same.restore(&snap).unwrap();
        assert_eq!(read(&mut same, REG_CONFIG_GENERATION), 0);
        // Another size: a config change, as `set_drive` gives.
        let mut bigger = slot(Box::new(drive(16, false)), &mem);
        bigger.restore(&snap).unwrap();
        assert_eq!(read(&mut bigger, REG_CONFIG_GENERATION), 1);
        assert_ne!(read(&mut bigger, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        let mut capacity = [0u8; 8];
        bigger.read(REG_CONFIG, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 16);
        // The read-only feature the driver acked cannot change under it.
        let err = slot(Box::new(drive(8, true)), &mem)
            .restore(&snap)
            .unwrap_err();
        assert!(err.contains("read-write, this one is read-only"), "{err}");
    }

    #[test]
    fn a_nic_keeps_the_mac_its_guest_knows() {
        let mem = test_memory();
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Tap::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(a)), false);
        let mut t = slot(Box::new(Net::new(tap, [2, 0, 0, 0, 0, 1])), &mem);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        let snap = through_json(&t.snapshot());
        assert_eq!(
            snap.device,
            DeviceSnapshot::Net {
                mac: [2, 0, 0, 0, 0, 1]
            }
        );
        let (c, _d) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Tap::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(c)), false);
        let mut restored = slot(Box::new(Net::new(tap, [2, 0, 0, 0, 0, 9])), &mem);
        restored.restore(&snap).unwrap();
        let mut mac = [0u8; 6];
        restored.read(REG_CONFIG, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn a_restored_vsock_tells_the_guest_its_transport_was_reset() {
        let mem = test_memory();
        let dir = tempfile::tempdir().unwrap();
        let vsock = |cid| {
            let path = dir.path().join(format!("v{cid}.sock"));
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            Box::new(Vsock::new(cid, listener, path).unwrap())
        };
        let rx = TestQueue::new(&mem, 0x10000, 16);
        let tx = TestQueue::new(&mem, 0x20000, 16);
        let mut event = TestQueue::new(&mem, 0x30000, 16);
        event.add_chain(&[TestDesc::write(0x10_0000, 4)]);
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
            .unwrap();
        let mut t = slot(vsock(3), &mem);
        drive_to_ok(&mut t, &[&rx, &tx, &event]);
        let snap = through_json(&t.snapshot());
        assert_eq!(snap.device, DeviceSnapshot::Vsock { cid: 3 });
        assert_eq!(event.used_idx(), 0);

        // A new pod's CID: the guest reads it again after the reset.
        let mut restored = slot(vsock(7), &mem);
        restored.restore(&snap).unwrap();
        assert_eq!(event.used_idx(), 1, "one event");
        assert_eq!(event.used_elem(0).1, 4);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0,
            "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
        );
        assert_ne!(read(&mut restored, REG_INTERRUPT_STATUS) & INT_VRING, 0);
        let mut cid = [0u8; 8];
        restored.read(REG_CONFIG, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 7);
    }

    #[test]
    fn a_console_round_trips() {
        let mem = test_memory();
        let sink = || {
            crate::devices::console_sink::ConsoleOutput::new(
                crate::devices::console_sink::ConsoleSink::Null,
            )
            .unwrap()
        };
        let rx = TestQueue::new(&mem, 0x10000, 16);
        let tx = TestQueue::new(&mem, 0x20000, 16);
        let mut t = slot(Box::new(Console::new(sink())), &mem);
        drive_to_ok(&mut t, &[&rx, &tx]);
        let snap = through_json(&t.snapshot());
        assert_eq!(snap.device, DeviceSnapshot::Console { ports: 1 });
        let mut restored = slot(Box::new(Console::new(sink())), &mem);
        restored.restore(&snap).unwrap();
        assert_eq!(restored.snapshot(), snap);
    }
}
