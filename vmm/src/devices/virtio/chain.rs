//! Checks and copies on device-writable descriptor chains, shared by the devices' request
//! and packet parsers (each maps `ChainError` into its own error type). Everything here is
//! guest-controlled: every descriptor's direction and address range is checked before a byte
//! is written.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("a descriptor the device must write is device-readable")]
    DeviceReadable,
    #[error("descriptor outside guest memory")]
    OutOfRange,
}

/// Total bytes the device may write into `descs`: every descriptor must be device-writable
/// and inside guest memory.
pub fn writable_len<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
) -> Result<usize, ChainError> {
    let mut capacity = 0usize;
    for d in descs {
        if !d.is_write_only() {
            return Err(ChainError::DeviceReadable);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(ChainError::OutOfRange);
        }
        capacity = capacity.saturating_add(d.len() as usize);
    }
    Ok(capacity)
}

/// Writes `parts` one after the other across `descs` (already checked by `writable_len` to
/// hold them); returns the bytes written.
pub fn scatter<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    parts: &[&[u8]],
) -> Result<usize, ChainError> {
    let mut parts = parts.iter().copied().filter(|p| !p.is_empty());
    let mut current = parts.next();
    let mut written = 0;
    for d in descs {
        let mut room = d.len() as usize;
        let mut addr = d.addr();
        while room > 0 {
            let Some(part) = current else {
                return Ok(written);
            };
            let n = room.min(part.len());
            mem.write_slice(&part[..n], addr)
                .map_err(|_| ChainError::OutOfRange)?;
            written += n;
            room -= n;
            addr = addr.checked_add(n as u64).ok_or(ChainError::OutOfRange)?;
            current = Some(&part[n..])
                .filter(|rest| !rest.is_empty())
                .or_else(|| parts.next());
        }
    }
    Ok(written)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatherError {
    #[error("a descriptor the device must read is device-writable")]
    DeviceWritable,
    #[error("descriptor outside guest memory")]
    OutOfRange,
    #[error("chain longer than {0} bytes")]
    TooLong(usize),
}

/// Copies a device-readable chain into `out` (cleared first): every descriptor must be
/// device-readable and inside guest memory, and the chain at most `max_len` bytes. Nothing is
/// copied before the whole chain is checked, so a refused chain costs no copying.
pub fn gather<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    mem: &M,
    max_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), GatherError> {
    out.clear();
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err(GatherError::DeviceWritable);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(GatherError::OutOfRange);
        }
        total = total.saturating_add(d.len() as usize);
        if total > max_len {
            return Err(GatherError::TooLong(max_len));
        }
    }
    out.reserve(total);
    for d in descs {
        let start = out.len();
        out.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|_| GatherError::OutOfRange)?;
    }
    Ok(())
}
