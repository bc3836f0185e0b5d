//! Moving frames: TX queue -> TAP, TAP -> RX queue.

use std::io::ErrorKind;

use virtio_queue::desc::split::Descriptor;

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use super::packet::{read_tx_chain, rx_header, write_rx_chain, VNET_HDR_LEN};
use crate::devices::virtio::queue::{self, Fill};
use crate::vstate::memory::GuestMemoryMmap;

/// Frames moved per event before yielding to other devices.
const BATCH: usize = 256;

impl Net {
    pub fn process_tx(&mut self) {
        queue::drain_queue(self, TX_QUEUE, Self::transmit);
    }

    /// Sends one transmit chain's frame to the TAP; the chain is completed with nothing
    /// written whether the frame was sent, dropped or invalid.
    fn transmit(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let mut frame = std::mem::take(&mut self.tx_frame);
        match read_tx_chain(descs, mem, &mut frame) {
            Ok(()) => {
                let out = if self.tap.vnet_hdr {
                    &frame[..]
                } else {
                    &frame[VNET_HDR_LEN..]
                };
                match self.tap.write_frame(out) {
                    Ok(_) => {
                        self.metrics.tx_frames += 1;
                        self.metrics.tx_bytes += out.len() as u64;
                    }
                    // A full TAP drops the frame, as a real NIC would.
                    Err(_) => self.metrics.tap_errors += 1,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "invalid virtio-net tx chain");
                self.metrics.tx_invalid += 1;
            }
        }
        self.tx_frame = frame;
        0
    }

    /// Delivers frames from the TAP while the guest has receive buffers.
    pub fn process_rx(&mut self) {
        let outcome = queue::fill_queue(self, RX_QUEUE, BATCH, Self::next_rx_frame, Self::deliver);
        if outcome.out_of_buffers {
            // No receive buffer: the frame stays in `pending_rx`; stop reading the TAP until
            // the guest posts buffers (its RX notification calls us again).
            self.arm_tap(false);
        }
        if outcome.ring_error {
            // The device needs a reset; the frame cannot be delivered.
            self.pending_rx = None;
        }
        if self.pending_rx.is_none() && !self.state.broken {
            self.arm_tap(true);
        }
    }

    /// Whether a frame waits for a receive buffer: the one held back, or the next one the
    /// TAP has (header included), which is then held in `pending_rx`.
    fn next_rx_frame(&mut self) -> bool {
        if self.pending_rx.is_some() {
            return true;
        }
        let (hdr_room, header) = if self.tap.vnet_hdr {
            (0, None)
        } else {
            (VNET_HDR_LEN, Some(rx_header()))
        };
        let mut buf = std::mem::take(&mut self.buf);
        match self.tap.read_frame(&mut buf[hdr_room..]) {
            Ok(n) => {
                if let Some(h) = header {
                    buf[..VNET_HDR_LEN].copy_from_slice(&h);
                }
                self.pending_rx = Some(buf[..hdr_room + n].to_vec());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.metrics.tap_errors += 1,
        }
        self.buf = buf;
        self.pending_rx.is_some()
    }

    /// Writes the held frame into one receive chain; a chain that cannot take it drops the
    /// frame (and is completed with nothing written).
    fn deliver(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Fill {
        let Some(packet) = self.pending_rx.take() else {
            return Fill::PutBack;
        };
        match write_rx_chain(descs, mem, &packet) {
            Ok(written) => {
                self.metrics.rx_frames += 1;
                self.metrics.rx_bytes += (packet.len() - VNET_HDR_LEN.min(packet.len())) as u64;
                Fill::Used(written)
            }
            Err(e) => {
                tracing::debug!(error = %e, "frame dropped: bad receive buffer");
                self.metrics.rx_dropped += 1;
                Fill::Used(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tap::Tap;
    use super::*;
    use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};
    use crate::devices::virtio::VirtioDevice;
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    use std::os::unix::net::UnixDatagram;
    use vm_memory::{Bytes, GuestAddress};

    /// A Net whose "TAP" is one end of a datagram socketpair (frame boundaries kept).
    fn net_with_peer() -> (Net, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // SAFETY: we own the fd from into_raw_fd.
        let file = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
        (Net::new(Tap::from_file(file, false), [2, 0, 0, 0, 0, 1]), b)
    }

    #[test]
    fn tx_frames_reach_the_tap_without_the_header() {
        let mem = test_memory();
        let (mut net, peer) = net_with_peer();
        let rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut txq = TestQueue::new(&mem, 0x2_0000, 16);
        activate(&mut net, &mem, &[&rxq, &txq]);
        mem.write_slice(&[0u8; 12], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"hello-frame", GuestAddress(0x10_1000))
            .unwrap();
        txq.add_chain(&[TestDesc::read(0x10_0000, 12), TestDesc::read(0x10_1000, 11)]);
        net.process_queue(TX_QUEUE);
        let mut got = [0u8; 64];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"hello-frame");
        assert_eq!(txq.used_idx(), 1);
        assert_eq!(net.metrics.tx_frames, 1);
    }

    #[test]
    fn rx_frames_wait_for_buffers_then_arrive_with_a_header() {
        let mem = test_memory();
        let (mut net, peer) = net_with_peer();
        let mut rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let txq = TestQueue::new(&mem, 0x2_0000, 16);
        let irq = activate(&mut net, &mem, &[&rxq, &txq]);
        peer.send(b"incoming").unwrap();
        net.process_event(super::super::device::TAP_TOKEN, 1);
        assert!(net.pending_rx.is_some(), "no buffers yet: frame held");
        rxq.add_chain(&[TestDesc::write(0x10_0000, 2048)]);
        net.process_queue(RX_QUEUE);
        assert_eq!(rxq.used_idx(), 1);
        assert_eq!(rxq.used_elem(0).1, 12 + 8);
        let mut got = [0u8; 20];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[12..], b"incoming");
        assert_eq!(irq.evt.read().unwrap(), 1);
    }

    #[test]
    fn bad_rx_buffers_drop_the_frame_and_bad_tx_chains_are_counted() {
        let mem = test_memory();
        let (mut net, peer) = net_with_peer();
        let mut rxq = TestQueue::new(&mem, 0x1_0000, 16);
        let mut txq = TestQueue::new(&mem, 0x2_0000, 16);
        activate(&mut net, &mem, &[&rxq, &txq]);
        rxq.add_chain(&[TestDesc::read(0x10_0000, 2048)]);
        peer.send(b"x").unwrap();
        net.process_event(super::super::device::TAP_TOKEN, 1);
        assert_eq!(net.metrics.rx_dropped, 1);
        assert_eq!(rxq.used_elem(0).1, 0);
        txq.add_chain(&[TestDesc::write(0x10_0000, 64)]);
        txq.add_chain(&[TestDesc::read(0xffff_0000, 64)]);
        net.process_queue(TX_QUEUE);
        assert_eq!(net.metrics.tx_invalid, 2);
        assert_eq!(txq.used_idx(), 2);
        assert!(!net.is_broken());
    }
}
