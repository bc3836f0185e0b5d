//! The one place a virtio queue is walked: pop descriptor chains, hand each to the device,
//! put it in the used ring, interrupt the driver. Devices supply only what differs: how to
//! handle one chain and, for receive queues, whether they have anything to put in one.
//!
//! Guest-controlled input is checked here before a device sees it: `Queue::iter` refuses an
//! avail index more than a queue size ahead (the device is then marked broken), and the
//! descriptor chain iterator (virtio-queue) ends a chain at a loop (more descriptors than
//! the queue holds), at an index outside the table, at a nested or malformed indirect
//! table and where the total length overflows. Each device's parser then checks every
//! descriptor's direction and address range.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};

use super::irq::INT_VRING;
use super::VirtioDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// What a receive-side device did with the chain it was handed.
pub enum Fill {
    /// Completed with this many bytes written.
    Used(u32),
    /// Not used after all (nothing to send once the chain was seen): the chain goes back to
    /// the avail ring for next time.
    PutBack,
}

/// How a `fill_queue` run ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FillOutcome {
    /// Chains completed.
    pub used: usize,
    /// The device still had data when the driver had no buffers left.
    pub out_of_buffers: bool,
    /// The ring broke (the device is now marked broken).
    pub ring_error: bool,
}

/// Handles every chain the driver made available on queue `index`: `handle` runs each
/// (it returns how many bytes it wrote into the chain), then all are completed and the
/// driver interrupted if it wants to be. Returns how many chains were handled.
///
/// All chains are popped before the first is handled, as the devices always did: one
/// notification handles what the driver had published when it rang, and `handle` may
/// freely use the rest of the device.
pub fn drain_queue<D, H>(device: &mut D, index: usize, mut handle: H) -> usize
where
    D: VirtioDevice + ?Sized,
    H: FnMut(&mut D, &GuestMemoryMmap, &[Descriptor]) -> u32,
{
    let device_type = device.device_type();
    let state = device.device_state_mut();
    let Some(active) = state.active.as_mut() else {
        return 0;
    };
    let mem = active.mem.clone();
    let Some(queue) = active.queues.get_mut(index) else {
        return 0;
    };
    let chains: Vec<(u16, Vec<Descriptor>)> = match queue.iter(&mem) {
        Ok(iter) => iter
            .map(|chain| (chain.head_index(), chain.collect()))
            .collect(),
        Err(e) => {
            tracing::warn!(device_type, queue = index, error = %e, "invalid avail ring from the driver: device marked broken until the driver resets it");
            state.broken = true;
            return 0;
        }
    };
    if chains.is_empty() {
        return 0;
    }
    let handled = chains.len();
    let mut completed = Vec::with_capacity(handled);
    for (head, descs) in chains {
        let written = handle(device, &mem, &descs);
        completed.push((head, written));
    }
    match complete(device, index, &mem, &completed) {
        Ok(()) => notify(device, index),
        Err(e) => {
            tracing::warn!(device_type, queue = index, error = %e, "cannot write the used ring: device marked broken until the driver resets it");
        }
    }
    handled
}

/// Puts chains into the driver's receive queue `index` while `has_data` says the device has
/// something to send, at most `max_chains` of them. `fill` writes into one chain.
/// The driver is interrupted once at the end if any chain was used.
pub fn fill_queue<D, P, F>(
    device: &mut D,
    index: usize,
    max_chains: usize,
    mut has_data: P,
    mut fill: F,
) -> FillOutcome
where
    D: VirtioDevice + ?Sized,
    P: FnMut(&mut D) -> bool,
    F: FnMut(&mut D, &GuestMemoryMmap, &[Descriptor]) -> Fill,
{
    let device_type = device.device_type();
    let mut outcome = FillOutcome::default();
    for _ in 0..max_chains {
        if !has_data(device) {
            break;
        }
        let state = device.device_state_mut();
        let Some(active) = state.active.as_mut() else {
            outcome.out_of_buffers = true;
            break;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            outcome.out_of_buffers = true;
            break;
        };
        let chain = match queue.iter(&mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                tracing::warn!(device_type, queue = index, error = %e, "invalid avail ring from the driver: device marked broken until the driver resets it");
                state.broken = true;
                outcome.ring_error = true;
                return outcome;
            }
        };
        let Some(chain) = chain else {
            outcome.out_of_buffers = true;
            break;
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let written = match fill(device, &mem, &descs) {
            Fill::Used(written) => written,
            Fill::PutBack => {
                if let Some(queue) = queue_mut(device, index) {
                    queue.go_to_previous_position();
                }
                continue;
            }
        };
        if let Err(e) = complete(device, index, &mem, &[(head, written)]) {
            tracing::warn!(device_type, queue = index, error = %e, "cannot write the used ring: device marked broken until the driver resets it");
            outcome.ring_error = true;
            return outcome;
        }
        outcome.used += 1;
    }
    if outcome.used > 0 {
        notify(device, index);
    }
    outcome
}

fn queue_mut<D: VirtioDevice + ?Sized>(
    device: &mut D,
    index: usize,
) -> Option<&mut virtio_queue::Queue> {
    device
        .device_state_mut()
        .active
        .as_mut()
        .and_then(|a| a.queues.get_mut(index))
}

/// Adds `(head, written)` chains to the used ring. A used ring the device cannot write
/// marks the device broken.
fn complete<D: VirtioDevice + ?Sized>(
    device: &mut D,
    index: usize,
    mem: &GuestMemoryMmap,
    completed: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let state = device.device_state_mut();
    let Some(queue) = state.active.as_mut().and_then(|a| a.queues.get_mut(index)) else {
        return Ok(());
    };
    for (head, written) in completed {
        if let Err(e) = queue.add_used(mem, *head, *written) {
            state.broken = true;
            return Err(e);
        }
    }
    Ok(())
}

/// Raises the used-buffer interrupt unless the driver suppressed it.
fn notify<D: VirtioDevice + ?Sized>(device: &mut D, index: usize) {
    let state = device.device_state_mut();
    let Some(active) = state.active.as_mut() else {
        return;
    };
    let Some(queue) = active.queues.get_mut(index) else {
        return;
    };
    match queue.needs_notification(&active.mem) {
        Ok(true) => active.irq.trigger(INT_VRING),
        Ok(false) => {}
        Err(_) => state.broken = true,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};

    // The helpers need only a device's state: any device serves, handlers come as closures.

    fn interrupts(irq: &crate::devices::virtio::IrqTrigger) -> u64 {
        irq.evt.read().unwrap_or(0)
    }

    #[test]
    fn drain_hands_every_chain_to_the_device_completes_them_in_order_and_interrupts_once() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &mem, &[&q]);
        let first = q.add_chain(&[TestDesc::read(0x10_0000, 4), TestDesc::write(0x10_1000, 16)]);
        let second = q.add_chain(&[TestDesc::write(0x10_2000, 32)]);
        let mut seen = Vec::new();
        let handled = drain_queue(&mut dev, 0, |_, _mem, descs| {
            seen.push(descs.len());
            descs
                .iter()
                .filter(|x| x.is_write_only())
                .map(|x| x.len())
                .sum()
        });
        assert_eq!(handled, 2);
        assert_eq!(seen, vec![2, 1]);
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.used_elem(0), (u32::from(first), 16));
        assert_eq!(q.used_elem(1), (u32::from(second), 32));
        assert_eq!(interrupts(&irq), 1);
        assert!(!dev.is_broken());
    }

    #[test]
    fn drain_with_nothing_available_neither_completes_nor_interrupts() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &mem, &[&q]);
        assert_eq!(drain_queue(&mut dev, 0, |_, _, _| 0), 0);
        assert_eq!(q.used_idx(), 0);
        assert_eq!(interrupts(&irq), 0);
        // A queue index the device does not have is ignored, not a panic.
        assert_eq!(drain_queue(&mut dev, 5, |_, _, _| 0), 0);
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_breaks_the_device_and_hands_it_nothing() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &mem, &[&q]);
        q.set_avail_idx(9);
        let mut called = false;
        let handled = drain_queue(&mut dev, 0, |_, _, _| {
            called = true;
            0
        });
        assert_eq!(handled, 0);
        assert!(!called);
        assert!(dev.is_broken());
        assert_eq!(q.used_idx(), 0);
        assert_eq!(interrupts(&irq), 0);
    }

    #[test]
    fn fill_stops_when_the_device_has_no_more_data_and_interrupts_once() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &mem, &[&q]);
        for i in 0..4 {
            q.add_chain(&[TestDesc::write(0x10_0000 + i * 0x1000, 64)]);
        }
        let pending = Cell::new(2);
        let outcome = fill_queue(
            &mut dev,
            0,
            usize::MAX,
            |_| pending.get() > 0,
            |_, _, _| {
                pending.set(pending.get() - 1);
                Fill::Used(10)
            },
        );
        assert_eq!(
            outcome,
            FillOutcome {
                used: 2,
                out_of_buffers: false,
                ring_error: false
            }
        );
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.used_elem(1).1, 10);
        assert_eq!(interrupts(&irq), 1);
    }

    #[test]
    fn fill_reports_a_driver_out_of_buffers_and_respects_its_chain_limit() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        activate(&mut dev, &mem, &[&q]);
        q.add_chain(&[TestDesc::write(0x10_0000, 64)]);
        q.add_chain(&[TestDesc::write(0x10_1000, 64)]);
        let limited = fill_queue(&mut dev, 0, 1, |_| true, |_, _, _| Fill::Used(1));
        assert_eq!(limited.used, 1);
        assert!(!limited.out_of_buffers);
        let drained = fill_queue(&mut dev, 0, usize::MAX, |_| true, |_, _, _| Fill::Used(1));
        assert_eq!(drained.used, 1);
        assert!(drained.out_of_buffers, "the device still had data");
        assert_eq!(q.used_idx(), 2);
    }

    #[test]
    fn a_chain_put_back_is_offered_again_and_not_completed() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &mem, &[&q]);
        let head = q.add_chain(&[TestDesc::write(0x10_0000, 64)]);
        let mut offered = 0;
        let outcome = fill_queue(
            &mut dev,
            0,
            1,
            |_| true,
            |_, _, _| {
                offered += 1;
                Fill::PutBack
            },
        );
        assert_eq!(offered, 1);
        assert_eq!(outcome.used, 0);
        assert_eq!(q.used_idx(), 0);
        assert_eq!(interrupts(&irq), 0);
        let outcome = fill_queue(&mut dev, 0, 1, |_| true, |_, _, _| Fill::Used(7));
        assert_eq!(outcome.used, 1);
        assert_eq!(q.used_elem(0), (u32::from(head), 7));
    }

    #[test]
    fn fill_on_a_broken_avail_ring_marks_the_device_broken() {
        let mem = test_memory();
        let q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut dev = Rng::new();
        activate(&mut dev, &mem, &[&q]);
        q.set_avail_idx(200);
        let outcome = fill_queue(&mut dev, 0, 4, |_| true, |_, _, _| Fill::Used(1));
        assert!(outcome.ring_error);
        assert_eq!(outcome.used, 0);
        assert!(dev.is_broken());
    }
}
