//! Shared helpers for the VMM's integration tests: hand-assembled guests packed as tiny
//! ELF kernels, and running the VMM binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A minimal 32-bit x86 code emitter for the instructions the test guests use.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    /// mov dword [addr], imm
    pub fn store32(&mut self, addr: u32, imm: u32) -> &mut Self {
        self.code.extend_from_slice(&[0xc7, 0x05]);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.code.extend_from_slice(&imm.to_le_bytes());
        self
    }
    /// mov eax, dword [addr]
    pub fn load_eax(&mut self, addr: u32) -> &mut Self {
        self.code.push(0xa1);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// Spins until `dword [addr] & mask` is non-zero.
    pub fn wait_nonzero(&mut self, addr: u32, mask: u32) -> &mut Self {
        self.load_eax(addr);
        self.code.push(0xa9);
        self.code.extend_from_slice(&mask.to_le_bytes());
        self.code.extend_from_slice(&[0x74, 0xf4]); // jz back to the load (12 bytes)
        self
    }
    /// mov dword [addr], eax
    pub fn store_eax(&mut self, addr: u32) -> &mut Self {
        self.code.push(0xa3);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// mov dword [dst], dword [src] (through eax)
    pub fn copy32(&mut self, dst: u32, src: u32) -> &mut Self {
        self.load_eax(src).store_eax(dst)
    }
    /// Spins until the 16-bit value at `addr + 2` (a virtqueue ring's idx) is at least `n`.
    pub fn wait_idx_at_least(&mut self, ring: u32, n: u16) -> &mut Self {
        self.load_eax(ring);
        self.code.extend_from_slice(&[0xc1, 0xe8, 0x10]); // shr eax, 16
        self.code.push(0x3d); // cmp eax, imm32
        self.code.extend_from_slice(&u32::from(n).to_le_bytes());
        self.code.extend_from_slice(&[0x72, 0xf1]); // jb back to the load (15 bytes)
        self
    }
    /// Exits with `status` unless eax == `value`.
    pub fn exit_unless_eax(&mut self, value: u32, status: u8) -> &mut Self {
        self.code.push(0x3d); // cmp eax, imm32
        self.code.extend_from_slice(&value.to_le_bytes());
        self.code.extend_from_slice(&[0x74, 0x04]); // je over the exit
        self.mov_al(status).out_al(0xf4)
    }
    /// mov al, imm
    pub fn mov_al(&mut self, imm: u8) -> &mut Self {
        self.code.extend_from_slice(&[0xb0, imm]);
        self
    }
    /// out imm8, al
    pub fn out_al(&mut self, port: u8) -> &mut Self {
        self.code.extend_from_slice(&[0xe6, port]);
        self
    }
    /// Writes each byte of `s` to COM1 (mov dx, 0x3f8; mov al, b; out dx, al).
    pub fn serial_print(&mut self, s: &[u8]) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]);
        for b in s {
            self.code.extend_from_slice(&[0xb0, *b, 0xee]);
        }
        self
    }
    /// Exits with the low byte of eax.
    pub fn exit_with_al(&mut self) -> &mut Self {
        self.out_al(0xf4)
    }
    /// Exits with `status`.
    pub fn exit(&mut self, status: u8) -> &mut Self {
        self.mov_al(status).out_al(0xf4)
    }
    /// jmp $ (spin forever)
    pub fn spin(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
}

pub use kata_like_vmm::test_guest::tiny_elf;

pub fn write_kernel(dir: &Path, name: &str, code: &[u8], pvh: bool) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code, pvh)).unwrap();
    p
}

/// The VMM under test: this package's binary, or `KATA_LIKE_TEST_VMM` (e.g. an older build,
/// to show that a new test catches what it was written for).
pub fn vmm_bin() -> PathBuf {
    std::env::var_os("KATA_LIKE_TEST_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kata-like-vmm")))
}

/// `kata-like-vmm run --kernel <kernel>`, for the caller to add the rest of the arguments.
pub fn vmm_run_command(kernel: &Path) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run").arg("--kernel").arg(kernel);
    cmd
}

pub fn run_vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .arg("run")
        .args(args)
        .output()
        .unwrap()
}

/// Programs the virtio-mmio device at `base` with one queue (index 0) of `size` entries at
/// `ring` (descriptors, avail at +0x80, used at +0x100), then sets DRIVER_OK.
pub fn virtio_init(a: &mut Asm, base: u32, ring: u32, size: u32) {
    a.store32(base + 0x70, 3) // ACKNOWLEDGE | DRIVER
        .store32(base + 0x24, 1) // DriverFeaturesSel = 1
        .store32(base + 0x20, 1) // VIRTIO_F_VERSION_1
        .store32(base + 0x70, 0xb) // | FEATURES_OK
        .store32(base + 0x30, 0) // QueueSel
        .store32(base + 0x38, size)
        .store32(base + 0x80, ring)
        .store32(base + 0x90, ring + 0x80)
        .store32(base + 0xa0, ring + 0x100)
        .store32(base + 0x44, 1) // QueueReady
        .store32(base + 0x70, 0xf); // | DRIVER_OK
}

/// Sets up queue `sel` of the device at `base` with `size` entries at `ring` (descriptors,
/// avail at +0x80, used at +0x100). Between FEATURES_OK and DRIVER_OK.
pub fn virtio_queue(a: &mut Asm, base: u32, sel: u32, ring: u32, size: u32) {
    a.store32(base + 0x30, sel)
        .store32(base + 0x38, size)
        .store32(base + 0x80, ring)
        .store32(base + 0x90, ring + 0x80)
        .store32(base + 0xa0, ring + 0x100)
        .store32(base + 0x44, 1);
}

/// Writes descriptor `i` of the table at `ring`.
pub fn virtio_desc(a: &mut Asm, ring: u32, i: u32, addr: u32, len: u32, flags: u16, next: u16) {
    let d = ring + 16 * i;
    a.store32(d, addr)
        .store32(d + 4, 0)
        .store32(d + 8, len)
        .store32(d + 12, u32::from(flags) | (u32::from(next) << 16));
}

/// Sends `data` on `stream` with `fd` as one SCM_RIGHTS control message, as the shim passes a
/// drive's or a tap's file to the VMM's API socket.
pub fn send_with_fd(
    stream: &std::os::unix::net::UnixStream,
    data: &[u8],
    fd: std::os::unix::io::RawFd,
) {
    use std::os::unix::io::AsRawFd;
    let mut cmsg_buf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: a valid msghdr over live buffers (the iovec over `data`, the control buffer
    // large enough for CMSG_SPACE(4)) carrying one SCM_RIGHTS fd.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
        assert_eq!(
            libc::sendmsg(stream.as_raw_fd(), &msg, 0),
            data.len() as isize
        );
    }
}

/// Makes descriptor 0 the first available buffer of queue 0 of the device at `base` (avail
/// ring[0] = 0, avail idx = 1), notifies the queue and spins until the device used it.
pub fn virtio_submit_first(a: &mut Asm, base: u32, ring: u32) {
    a.store32(ring + 0x84, 0) // avail ring[0] = 0
        .store32(ring + 0x80, 1 << 16) // avail idx = 1
        .store32(base + 0x50, 0) // notify queue 0
        .wait_nonzero(ring + 0x100, 0xffff_0000); // used idx
}

/// Asserts the VMM's exit status, showing its stderr when it is another.
pub fn assert_exit_status(out: &Output, expected: i32) {
    assert_eq!(
        out.status.code(),
        Some(expected),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
