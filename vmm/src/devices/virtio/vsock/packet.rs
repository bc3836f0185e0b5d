//! virtio-vsock packets: the 44-byte header and payload, parsed out of guest descriptor
//! chains (guest-controlled: directions, ranges and lengths are checked, payloads bounded).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::devices::virtio::chain::{scatter, writable_len, ChainError};

pub const HDR_LEN: usize = 44;
/// Largest payload accepted from the guest in one packet (Linux sends at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const HOST_CID: u64 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("a transmit descriptor is device-writable")]
    WriteOnlyTx,
    #[error("a receive descriptor is device-readable")]
    ReadOnlyRx,
    #[error("descriptor outside guest memory")]
    OutOfRange,
    #[error("chain shorter than the vsock header")]
    TooShort,
    #[error("payload length {0} is larger than allowed or than the chain")]
    BadLength(u32),
    #[error("receive chain holds {0} bytes, packet needs {1}")]
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

/// A packet from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub data: Vec<u8>,
}

/// Parses a transmit chain: header, then exactly `hdr.len` payload bytes.
pub fn parse_tx<M: GuestMemoryBackend>(descs: &[Descriptor], mem: &M) -> Result<TxPacket, Error> {
    let mut bytes = Vec::new();
    let limit = HDR_LEN + MAX_PKT_DATA as usize;
    for d in descs {
        if d.is_write_only() {
            return Err(Error::WriteOnlyTx);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(Error::OutOfRange);
        }
        let take = (d.len() as usize).min(limit - bytes.len());
        let start = bytes.len();
        bytes.resize(start + take, 0);
        mem.read_slice(&mut bytes[start..], d.addr())
            .map_err(|_| Error::OutOfRange)?;
        if bytes.len() == limit {
            break;
        }
    }
    let Some(hdr_bytes) = bytes
        .get(..HDR_LEN)
        .and_then(|b| <&[u8; HDR_LEN]>::try_from(b).ok())
    else {
        return Err(Error::TooShort);
    };
    let hdr = Header::from_bytes(hdr_bytes);
    if hdr.len > MAX_PKT_DATA || HDR_LEN + hdr.len as usize > bytes.len() {
        return Err(Error::BadLength(hdr.len));
    }
    let data = bytes[HDR_LEN..HDR_LEN + hdr.len as usize].to_vec();
    Ok(TxPacket { hdr, data })
}

/// Total bytes a receive chain can hold, or an error if it is unusable.
pub fn rx_capacity<M: GuestMemoryBackend>(descs: &[Descriptor], mem: &M) -> Result<usize, Error> {
    let capacity = writable_len(descs, mem)?;
    if capacity < HDR_LEN {
        return Err(Error::BufferTooSmall(capacity, HDR_LEN));
    }
    Ok(capacity)
}

/// Writes header + payload into a receive chain (already checked by `rx_capacity`).
pub fn write_rx<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    hdr: &Header,
    data: &[u8],
) -> Result<u32, Error> {
    let capacity = rx_capacity(descs, mem)?;
    let total = HDR_LEN + data.len();
    if capacity < total {
        return Err(Error::BufferTooSmall(capacity, total));
    }
    scatter(descs, mem, &[&hdr.to_bytes(), data])?;
    Ok(total as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{descriptor as d, test_memory};
    use vm_memory::GuestAddress;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5000,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn tx_with_split_header_and_payload() {
        let mem = test_memory();
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x2000)).unwrap();
        let p = parse_tx(&[d(0x1000, 44, false), d(0x2000, 5, false)], &mem).unwrap();
        assert_eq!(p.hdr, sample());
        assert_eq!(p.data, b"hello");
    }

    #[test]
    fn tx_rejects_lies_about_length() {
        let mem = test_memory();
        let mut h = sample();
        h.len = 100;
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            parse_tx(&[d(0x1000, 44, false), d(0x2000, 5, false)], &mem),
            Err(Error::BadLength(100))
        );
        h.len = u32::MAX;
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            parse_tx(&[d(0x1000, 44, false), d(0x2000, u32::MAX, false)], &mem).unwrap_err(),
            Error::OutOfRange
        );
        assert_eq!(
            parse_tx(&[d(0x1000, 20, false)], &mem),
            Err(Error::TooShort)
        );
        assert_eq!(
            parse_tx(&[d(0x1000, 44, true)], &mem),
            Err(Error::WriteOnlyTx)
        );
    }

    #[test]
    fn rx_writes_across_descriptors() {
        let mem = test_memory();
        let h = sample();
        let n = write_rx(
            &[d(0x1000, 30, true), d(0x2000, 100, true)],
            &mem,
            &h,
            b"hello",
        )
        .unwrap();
        assert_eq!(n, 49);
        let mut a = [0u8; 30];
        let mut b = [0u8; 19];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        let all = [&a[..], &b[..]].concat();
        assert_eq!(Header::from_bytes(all[..44].try_into().unwrap()), h);
        assert_eq!(&all[44..], b"hello");
        assert!(write_rx(&[d(0x1000, 40, true)], &mem, &h, b"").is_err());
        assert!(write_rx(&[d(0x1000, 60, false)], &mem, &h, b"").is_err());
    }
}
