//! Opening a TAP interface: what `--net tap=NAME` does inside the VMM, and what the shim does in
//! the pod's network namespace before it hands the fd over with `--net fd=N`. One
//! implementation for both sides, so the fd the shim passes is exactly what the VMM expects.
//! (No well-kept crate opens a TAP without bringing an async runtime or a device abstraction
//! of its own; this is one ioctl.)

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use crate::limits::MAX_TAP_NAME_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as the TUN ioctls read and fill it (name and flags).
#[repr(C)]
pub struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    pub fn new(flags: libc::c_short) -> IfReq {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        }
    }
}

/// Opens (or creates, in the calling thread's network namespace) TAP `name`, without packet
/// info or vnet headers, non-blocking and close-on-exec. The interface lives as long as an fd
/// of it is open.
pub fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty()
        || name.len() > MAX_TAP_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid TAP name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq::new(IFF_TAP | IFF_NO_PI);
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which `IfReq` lays out, from memory we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tap_names_are_refused_before_any_ioctl() {
        for name in ["", "a/b", "sixteen-chars-xx", "tap 0"] {
            let err = open_tap(name).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
