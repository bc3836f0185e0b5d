//! The transmit queue: each chain the guest sends is console output.

use virtio_queue::desc::split::Descriptor;

use super::device::{Console, TRANSMIT_QUEUE};
use crate::devices::virtio::chain::gather;
use crate::devices::virtio::queue;
use crate::vstate::memory::GuestMemoryMmap;

/// Largest transmit chain accepted: Linux sends at most a page per hvc write and 32 KiB per
/// write to a port device. A longer chain is refused whole, so a hostile driver cannot make
/// the VMM copy gigabytes of its memory per notification.
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;

impl Console {
    pub fn process_transmit(&mut self) {
        queue::drain_queue(self, TRANSMIT_QUEUE, Self::transmit_chain);
    }

    /// Writes one chain to the console sink. The device writes nothing into a transmit
    /// chain, so the used length is always 0. A chain with a device-writable or
    /// out-of-range descriptor, or over `MAX_CHAIN_BYTES`, is dropped and counted.
    fn transmit_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let mut buf = std::mem::take(&mut self.chain_buf);
        match gather(descs, mem, MAX_CHAIN_BYTES, &mut buf) {
            Ok(()) => {
                self.metrics.tx_chains += 1;
                self.metrics.tx_bytes += buf.len() as u64;
                self.out.write(&buf);
            }
            Err(e) => {
                self.metrics.invalid_chains += 1;
                tracing::debug!(error = %e, "virtio-console transmit chain dropped");
            }
        }
        self.chain_buf = buf;
        0
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek};
    use std::sync::atomic::Ordering;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::console_sink::{ConsoleOutput, ConsoleSink};
    use crate::devices::virtio::console::device::RECEIVE_QUEUE;
    use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::VirtioDevice;

    struct Fixture {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        dev: Console,
        log: File,
        irq: std::sync::Arc<crate::devices::virtio::IrqTrigger>,
    }

    fn fixture() -> Fixture {
        let mem = test_memory();
        let rx = TestQueue::new(&mem, 0x1_0000, 8);
        let tx = TestQueue::new(&mem, 0x2_0000, 8);
        let log = tempfile::tempfile().expect("tempfile");
        let out =
            ConsoleOutput::new(ConsoleSink::File(log.try_clone().expect("clone"))).expect("sink");
        let mut dev = Console::new(out);
        let irq = activate(&mut dev, &mem, &[&rx, &tx]);
        Fixture {
            mem,
            rx,
            tx,
            dev,
            log,
            irq,
        }
    }

    impl Fixture {
        fn put(&self, addr: u64, bytes: &[u8]) {
            self.mem
                .write_slice(bytes, GuestAddress(addr))
                .expect("guest write");
        }
        fn logged(&mut self) -> String {
            self.log.rewind().expect("rewind");
            let mut s = String::new();
            self.log.read_to_string(&mut s).expect("read");
            s
        }
    }

    #[test]
    fn transmitted_chains_reach_the_sink_in_order_and_complete_with_length_zero() {
        let mut f = fixture();
        f.put(0x10_0000, b"hello ");
        f.put(0x10_1000, b"wor");
        f.put(0x10_2000, b"ld\n");
        f.tx.add_chain(&[TestDesc::read(0x10_0000, 6)]);
        f.tx.add_chain(&[TestDesc::read(0x10_1000, 3), TestDesc::read(0x10_2000, 3)]);
        f.dev.process_queue(TRANSMIT_QUEUE);
        assert_eq!(f.logged(), "hello world\n");
        assert_eq!(f.tx.used_idx(), 2);
        assert_eq!(f.tx.used_elem(1).1, 0, "the device writes nothing back");
        assert_eq!(f.irq.evt.read().expect("irq"), 1);
        assert_eq!(f.dev.metrics.tx_chains, 2);
        assert_eq!(f.dev.metrics.tx_bytes, 12);
        assert_eq!(f.dev.out.counters.bytes.load(Ordering::Relaxed), 12);
        assert!(!f.dev.is_broken());
    }

    #[test]
    fn malformed_chains_are_dropped_counted_and_still_completed() {
        let mut f = fixture();
        f.put(0x10_0000, b"secret");
        f.put(0x10_1000, b"ok\n");
        // A device-writable buffer in a transmit chain (with valid bytes before it).
        f.tx.add_chain(&[TestDesc::read(0x10_0000, 6), TestDesc::write(0x10_1000, 3)]);
        // Outside guest memory (16 MiB), and straddling its end.
        f.tx.add_chain(&[TestDesc::read(0x1_0000_0000, 16)]);
        f.tx.add_chain(&[TestDesc::read((16 << 20) - 2, 16)]);
        // Longer than the device accepts, in one descriptor and summed over several.
        f.tx.add_chain(&[TestDesc::read(0x10_0000, MAX_CHAIN_BYTES as u32 + 1)]);
        f.tx.add_chain(&[
            TestDesc::read(0x10_0000, u32::MAX),
            TestDesc::read(0x10_0000, u32::MAX),
        ]);
        // And a good one after them all.
        f.tx.add_chain(&[TestDesc::read(0x10_1000, 3)]);
        f.dev.process_queue(TRANSMIT_QUEUE);
        assert_eq!(f.logged(), "ok\n", "nothing of a refused chain is printed");
        assert_eq!(f.tx.used_idx(), 6, "every chain goes back to the driver");
        assert_eq!(f.dev.metrics.invalid_chains, 5);
        assert_eq!(f.dev.metrics.tx_chains, 1);
        assert!(!f.dev.is_broken());
    }

    #[test]
    fn a_chain_of_exactly_the_limit_is_accepted() {
        let mut f = fixture();
        f.put(0x10_0000, &vec![b'a'; MAX_CHAIN_BYTES]);
        f.tx.add_chain(&[TestDesc::read(0x10_0000, MAX_CHAIN_BYTES as u32)]);
        f.dev.process_queue(TRANSMIT_QUEUE);
        assert_eq!(f.logged().len(), MAX_CHAIN_BYTES);
        assert_eq!(f.dev.metrics.invalid_chains, 0);
    }

    #[test]
    fn receive_buffers_are_kept_and_a_broken_ring_marks_the_device_broken() {
        let mut f = fixture();
        f.rx.add_chain(&[TestDesc::write(0x10_0000, 64)]);
        f.dev.process_queue(RECEIVE_QUEUE);
        assert_eq!(
            f.rx.used_idx(),
            0,
            "no input: receive buffers are never used"
        );
        // A queue index the device does not have is ignored.
        f.dev.process_queue(7);
        f.tx.set_avail_idx(100);
        f.dev.process_queue(TRANSMIT_QUEUE);
        assert!(f.dev.is_broken());
        assert_eq!(f.logged(), "");
    }

    #[test]
    fn a_sink_that_cannot_keep_up_drops_output_without_stalling_the_queue() {
        let mem = test_memory();
        let rx = TestQueue::new(&mem, 0x1_0000, 8);
        let mut tx = TestQueue::new(&mem, 0x2_0000, 8);
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: both fds are new; each is owned once.
        let (_reader, writer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let mut dev = Console::new(ConsoleOutput::new(ConsoleSink::File(writer)).expect("sink"));
        activate(&mut dev, &mem, &[&rx, &tx]);
        // Four 64 KiB chains into a 64 KiB pipe nobody reads: a blocking sink would hang here.
        for _ in 0..4 {
            tx.add_chain(&[TestDesc::read(0x10_0000, MAX_CHAIN_BYTES as u32)]);
        }
        dev.process_queue(TRANSMIT_QUEUE);
        assert_eq!(tx.used_idx(), 4);
        let counters = &dev.out.counters;
        assert_eq!(
            counters.bytes.load(Ordering::Relaxed),
            4 * MAX_CHAIN_BYTES as u64
        );
        assert!(counters.dropped_bytes.load(Ordering::Relaxed) >= 3 * MAX_CHAIN_BYTES as u64);
    }
}
