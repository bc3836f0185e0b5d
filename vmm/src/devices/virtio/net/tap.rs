//! TAP devices: opened by name, or inherited as an fd from the shim.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_VNET_HDR: libc::c_short = 0x4000;

use kata_like_vmm_contract::tap::{IfReq, IFF_TAP};

pub struct Tap {
    file: File,
    /// The TAP carries a virtio-net header before each frame (IFF_VNET_HDR).
    pub vnet_hdr: bool,
}

impl Tap {
    /// Opens (or creates) TAP `name`, without packet info or vnet headers.
    pub fn open_named(name: &str) -> io::Result<Self> {
        Ok(Tap {
            file: kata_like_vmm_contract::tap::open_tap(name)?,
            vnet_hdr: false,
        })
    }

    /// Takes over an inherited TAP fd. Its flags decide whether frames carry vnet headers.
    pub fn from_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: F_GETFD only checks that the fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the caller hands us ownership of an open fd.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::new(0);
        // SAFETY: TUNGETIFF fills a struct ifreq.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fd is not a TAP device",
            ));
        }
        if req.flags & IFF_TAP == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fd is a TUN, not a TAP device",
            ));
        }
        let vnet_hdr = req.flags & IFF_VNET_HDR != 0;
        if vnet_hdr {
            let size: libc::c_int = super::packet::VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int.
            if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &size) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: plain fcntl on our fd.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Ok(Tap { file, vnet_hdr })
    }

    /// Wraps any non-blocking fd-like file (tests use a socketpair).
    pub fn from_file(file: File, vnet_hdr: bool) -> Self {
        Tap { file, vnet_hdr }
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
