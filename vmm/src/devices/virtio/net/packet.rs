//! Frames between descriptor chains and the TAP. Guest-controlled input: directions,
//! address ranges and lengths are all checked, and a frame never exceeds `MAX_FRAME_LEN`.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::devices::virtio::chain::{scatter, writable_len, ChainError};

/// `struct virtio_net_hdr_v1` (with num_buffers), always present with VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame without offloads (64 KiB payload + header, like Linux's TAP).
pub const MAX_FRAME_LEN: usize = 65_562;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("a transmit descriptor is device-writable")]
    WriteOnlyTx,
    #[error("a receive descriptor is device-readable")]
    ReadOnlyRx,
    #[error("descriptor outside guest memory")]
    OutOfRange,
    #[error("frame shorter than the virtio-net header")]
    TooShort,
    #[error("frame longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("receive buffers hold {0} bytes, the frame needs {1}")]
    BufferTooSmall(usize, usize),
}

impl From<ChainError> for Error {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::DeviceReadable => Error::ReadOnlyRx,
            ChainError::OutOfRange => Error::OutOfRange,
        }
    }
}

/// Gathers a transmit chain into `out`: virtio-net header followed by the frame.
pub fn read_tx_chain<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    out.clear();
    for d in descs {
        if d.is_write_only() {
            return Err(Error::WriteOnlyTx);
        }
        let len = d.len() as usize;
        if out.len() + len > VNET_HDR_LEN + MAX_FRAME_LEN {
            return Err(Error::TooLong);
        }
        if !mem.check_range(d.addr(), len) {
            return Err(Error::OutOfRange);
        }
        let start = out.len();
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|_| Error::OutOfRange)?;
    }
    if out.len() < VNET_HDR_LEN {
        return Err(Error::TooShort);
    }
    Ok(())
}

/// Scatters `packet` (header + frame) into a receive chain; returns the bytes written.
pub fn write_rx_chain<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    packet: &[u8],
) -> Result<u32, Error> {
    let capacity = writable_len(descs, mem)?;
    if capacity < packet.len() {
        return Err(Error::BufferTooSmall(capacity, packet.len()));
    }
    scatter(descs, mem, &[packet])?;
    Ok(packet.len() as u32)
}

/// A virtio-net header for a received frame: no offloads, one buffer.
pub fn rx_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[10] = 1; // num_buffers = 1
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{descriptor as d, test_memory};
    use vm_memory::GuestAddress;

    #[test]
    fn tx_gathers_all_buffers() {
        let mem = test_memory();
        mem.write_slice(&[1u8; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"frame", GuestAddress(0x2000)).unwrap();
        let mut out = Vec::new();
        read_tx_chain(&[d(0x1000, 12, false), d(0x2000, 5, false)], &mem, &mut out).unwrap();
        assert_eq!(&out[12..], b"frame");
        assert_eq!(out.len(), 17);
    }

    #[test]
    fn tx_rejects_bad_chains() {
        let mem = test_memory();
        let mut out = Vec::new();
        assert_eq!(
            read_tx_chain(&[d(0x1000, 12, true)], &mem, &mut out),
            Err(Error::WriteOnlyTx)
        );
        assert_eq!(
            read_tx_chain(&[d(0x1000, 4, false)], &mem, &mut out),
            Err(Error::TooShort)
        );
        assert_eq!(
            read_tx_chain(&[d(0xfff_ff00, 0x200, false)], &mem, &mut out),
            Err(Error::OutOfRange)
        );
        assert_eq!(
            read_tx_chain(&[d(0x1000, u32::MAX, false)], &mem, &mut out),
            Err(Error::TooLong)
        );
    }

    #[test]
    fn rx_scatters_and_checks_room() {
        let mem = test_memory();
        let packet: Vec<u8> = (0..40u8).collect();
        let n = write_rx_chain(&[d(0x1000, 16, true), d(0x2000, 64, true)], &mem, &packet).unwrap();
        assert_eq!(n, 40);
        let mut a = [0u8; 16];
        let mut b = [0u8; 24];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!([&a[..], &b[..]].concat(), packet);
        assert_eq!(
            write_rx_chain(&[d(0x1000, 16, true)], &mem, &packet),
            Err(Error::BufferTooSmall(16, 40))
        );
        assert_eq!(
            write_rx_chain(&[d(0x1000, 64, false)], &mem, &packet),
            Err(Error::ReadOnlyRx)
        );
    }
}
