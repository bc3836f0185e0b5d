//! Parsing virtio-blk requests out of a descriptor chain. Everything here is guest-controlled:
//! each descriptor's direction, length and address range is checked before the device
//! touches a byte, and data lengths are bounded so that no request can make the VMM
//! allocate or copy more than `MAX_REQUEST_BYTES`.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u32 = 16;
/// Length of the VIRTIO_BLK_T_GET_ID answer.
pub const DEVICE_ID_LEN: u32 = 20;
/// Largest data payload accepted in one request (Linux sends at most seg_max * 4 KiB).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetDeviceId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetDeviceId,
            other => RequestType::Unsupported(other),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("descriptor chain has fewer than two descriptors")]
    ChainTooShort,
    #[error("request header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("status descriptor is read-only or empty")]
    BadStatus,
    #[error("data descriptor has the wrong direction for this request type")]
    WrongDirection,
    #[error("descriptor points outside guest memory")]
    OutOfRange,
    #[error("data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("data length exceeds {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("sector range past the end of the drive")]
    PastEnd,
    #[error("GET_ID buffer is empty")]
    EmptyIdBuffer,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    pub sector: u64,
    /// Data buffers in order: (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u32,
    pub status_addr: GuestAddress,
}

/// Finds where to write the status byte of a chain that failed to parse, if the chain's
/// last descriptor is a usable status descriptor.
pub fn status_address<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
) -> Option<GuestAddress> {
    let last = descs.last()?;
    (last.is_write_only() && last.len() >= 1 && mem.check_range(last.addr(), 1))
        .then_some(last.addr())
}

impl Request {
    /// Parses `descs` (one chain, in order). `capacity` is the drive size in sectors.
    pub fn parse<M: GuestMemoryBackend>(
        descs: &[Descriptor],
        mem: &M,
        capacity: u64,
    ) -> Result<Request, Error> {
        if descs.len() < 2 {
            return Err(Error::ChainTooShort);
        }
        let header = descs[0];
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(Error::BadHeader);
        }
        let request_type: u32 = mem.read_obj(header.addr()).map_err(|_| Error::OutOfRange)?;
        let sector: u64 = mem
            .read_obj(header.addr().checked_add(8).ok_or(Error::OutOfRange)?)
            .map_err(|_| Error::OutOfRange)?;
        let request_type = RequestType::from(request_type);

        let status = descs[descs.len() - 1];
        if !status.is_write_only() || status.len() < 1 {
            return Err(Error::BadStatus);
        }
        if !mem.check_range(status.addr(), 1) {
            return Err(Error::OutOfRange);
        }

        let device_writes = matches!(request_type, RequestType::In | RequestType::GetDeviceId);
        let mut data = Vec::with_capacity(descs.len() - 2);
        let mut data_len: u64 = 0;
        for d in &descs[1..descs.len() - 1] {
            if matches!(
                request_type,
                RequestType::In | RequestType::Out | RequestType::GetDeviceId
            ) && d.is_write_only() != device_writes
            {
                return Err(Error::WrongDirection);
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err(Error::OutOfRange);
            }
            data_len += u64::from(d.len());
            if data_len > u64::from(MAX_REQUEST_BYTES) {
                return Err(Error::TooLarge);
            }
            data.push((d.addr(), d.len()));
        }

        match request_type {
            RequestType::In | RequestType::Out => {
                if !data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(Error::PartialSector(data_len));
                }
                let end = sector
                    .checked_add(data_len >> SECTOR_SHIFT)
                    .ok_or(Error::PastEnd)?;
                if end > capacity {
                    return Err(Error::PastEnd);
                }
            }
            RequestType::GetDeviceId if data_len == 0 => return Err(Error::EmptyIdBuffer),
            _ => {}
        }
        Ok(Request {
            request_type,
            sector,
            data,
            data_len: data_len as u32,
            status_addr: status.addr(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{descriptor as desc, test_memory};

    fn header(mem: &crate::vstate::memory::GuestMemoryMmap, t: u32, sector: u64) -> Descriptor {
        mem.write_obj(t, GuestAddress(0x1000)).unwrap();
        mem.write_obj(sector, GuestAddress(0x1008)).unwrap();
        desc(0x1000, 16, false)
    }

    #[test]
    fn parses_a_read_request() {
        let mem = test_memory();
        let descs = [
            header(&mem, 0, 4),
            desc(0x2000, 1024, true),
            desc(0x3000, 1, true),
        ];
        let r = Request::parse(&descs, &mem, 8).unwrap();
        assert_eq!(r.request_type, RequestType::In);
        assert_eq!(r.sector, 4);
        assert_eq!(r.data, vec![(GuestAddress(0x2000), 1024)]);
        assert_eq!(r.status_addr, GuestAddress(0x3000));
    }

    #[test]
    fn rejects_reads_past_the_end_and_overflowing_sectors() {
        let mem = test_memory();
        let descs = [
            header(&mem, 0, 7),
            desc(0x2000, 1024, true),
            desc(0x3000, 1, true),
        ];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::PastEnd));
        let descs = [
            header(&mem, 0, u64::MAX),
            desc(0x2000, 512, true),
            desc(0x3000, 1, true),
        ];
        assert_eq!(Request::parse(&descs, &mem, u64::MAX), Err(Error::PastEnd));
    }

    #[test]
    fn rejects_wrong_directions() {
        let mem = test_memory();
        let descs = [
            header(&mem, 1, 0),
            desc(0x2000, 512, true),
            desc(0x3000, 1, true),
        ];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::WrongDirection));
        let descs = [
            header(&mem, 0, 0),
            desc(0x2000, 512, false),
            desc(0x3000, 1, true),
        ];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::WrongDirection));
        let descs = [
            header(&mem, 0, 0),
            desc(0x2000, 512, true),
            desc(0x3000, 1, false),
        ];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::BadStatus));
        let descs = [desc(0x1000, 16, true), desc(0x3000, 1, true)];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::BadHeader));
    }

    #[test]
    fn rejects_out_of_range_huge_and_partial_buffers() {
        let mem = test_memory();
        let descs = [
            header(&mem, 0, 0),
            desc(0xfff_fe00, 1024, true),
            desc(0x3000, 1, true),
        ];
        assert_eq!(
            Request::parse(&descs, &mem, 1 << 30),
            Err(Error::OutOfRange)
        );
        let descs = [
            header(&mem, 0, 0),
            desc(0x2000, u32::MAX, true),
            desc(0x3000, 1, true),
        ];
        assert!(Request::parse(&descs, &mem, 1 << 40).is_err());
        let descs = [
            header(&mem, 1, 0),
            desc(0x2000, 100, false),
            desc(0x3000, 1, true),
        ];
        assert_eq!(
            Request::parse(&descs, &mem, 8),
            Err(Error::PartialSector(100))
        );
        let descs = [desc(0x3000, 1, true)];
        assert_eq!(Request::parse(&descs, &mem, 8), Err(Error::ChainTooShort));
    }

    #[test]
    fn flush_and_get_id() {
        let mem = test_memory();
        let descs = [header(&mem, 4, 0), desc(0x3000, 1, true)];
        assert_eq!(
            Request::parse(&descs, &mem, 0).unwrap().request_type,
            RequestType::Flush
        );
        let descs = [
            header(&mem, 8, 0),
            desc(0x2000, 20, true),
            desc(0x3000, 1, true),
        ];
        assert_eq!(Request::parse(&descs, &mem, 0).unwrap().data_len, 20);
        let descs = [header(&mem, 99, 0), desc(0x3000, 1, true)];
        assert_eq!(
            Request::parse(&descs, &mem, 0).unwrap().request_type,
            RequestType::Unsupported(99)
        );
    }
}
