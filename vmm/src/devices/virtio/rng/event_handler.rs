//! Filling the guest's buffers with random bytes.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::device::{Rng, REQUEST_QUEUE};
use crate::devices::virtio::queue;
use crate::vstate::memory::GuestMemoryMmap;

/// Most bytes handed out per request; the guest asks again for more.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

fn getrandom(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into `buf[filled..]`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            return false;
        }
        filled += n as usize;
    }
    true
}

impl Rng {
    pub fn process_requests(&mut self) {
        queue::drain_queue(self, REQUEST_QUEUE, Self::fill_request);
    }

    /// Fills one chain's device-writable buffers; returns the bytes written. A read-only or
    /// out-of-range buffer ends the request there and counts it invalid.
    fn fill_request(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        self.metrics.requests += 1;
        let mut buf = Vec::new();
        let mut written = 0u32;
        let mut valid = true;
        for d in descs {
            if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize) {
                valid = false;
                break;
            }
            let n = d.len().min(MAX_BYTES_PER_REQUEST - written);
            if n == 0 {
                break;
            }
            buf.resize(n as usize, 0);
            if !getrandom(&mut buf) || mem.write_slice(&buf, d.addr()).is_err() {
                valid = false;
                break;
            }
            written += n;
        }
        if !valid {
            self.metrics.invalid_requests += 1;
        }
        self.metrics.bytes += u64::from(written);
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::VirtioDevice;
    use vm_memory::GuestAddress;

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut rng = Rng::new();
        let irq = activate(&mut rng, &mem, &[&q]);
        q.add_chain(&[TestDesc::write(0x10_0000, 256)]);
        rng.process_queue(0);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used_elem(0).1, 256);
        let mut got = [0u8; 256];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got.iter().any(|b| *b != 0));
        assert_eq!(irq.evt.read().unwrap(), 1);
    }

    #[test]
    fn caps_huge_requests_and_rejects_read_only_buffers() {
        let mem = test_memory();
        let mut q = TestQueue::new(&mem, 0x1_0000, 8);
        let mut rng = Rng::new();
        activate(&mut rng, &mem, &[&q]);
        q.add_chain(&[TestDesc::write(0x10_0000, 1 << 20)]);
        q.add_chain(&[TestDesc::read(0x10_0000, 16)]);
        q.add_chain(&[TestDesc::write(0xfff_0000, 16)]);
        rng.process_queue(0);
        assert_eq!(q.used_idx(), 3);
        assert_eq!(q.used_elem(0).1, MAX_BYTES_PER_REQUEST);
        assert_eq!(q.used_elem(1).1, 0);
        assert_eq!(q.used_elem(2).1, 0);
        assert_eq!(rng.metrics.invalid_requests, 2);
        assert!(!rng.is_broken());
    }
}
