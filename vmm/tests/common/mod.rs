//! Shared helpers for the VMM's integration tests: hand-assembled guests packed as tiny
//! ELF kernels, and running the VMM binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the tiny kernels load and start.
pub const LOAD_ADDR: u64 = 0x10_0000;

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

/// Packs `code` into an ELF64 image loaded at `LOAD_ADDR`. With `pvh` the image carries a
/// Xen PVH entry note (32-bit protected mode entry); without, the VMM enters at e_entry in
/// 64-bit long mode.
pub fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off = 0x1000u64;
    let note_off = 0x200u64;
    let mut f = vec![0u8; code_off as usize + code.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut ph = |i: usize, p_type: u32, off: u64, addr: u64, size: u64| {
        let b = 64 + i * 56;
        f[b..b + 4].copy_from_slice(&p_type.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&7u32.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
        f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
        f[b + 32..b + 40].copy_from_slice(&size.to_le_bytes());
        f[b + 40..b + 48].copy_from_slice(&size.to_le_bytes());
        f[b + 48..b + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    ph(0, 1, code_off, LOAD_ADDR, code.len() as u64);
    if pvh {
        ph(1, 4, note_off, 0, 20);
    }
    if pvh {
        let n = note_off as usize;
        f[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
        f[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
        f[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        f[n + 12..n + 16].copy_from_slice(b"Xen\0");
        f[n + 16..n + 20].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    }
    f[code_off as usize..].copy_from_slice(code);
    f
}

pub fn write_kernel(dir: &Path, name: &str, code: &[u8], pvh: bool) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, tiny_elf(code, pvh)).unwrap();
    p
}

pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kata-like-vmm"))
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

/// Writes descriptor `i` of the table at `ring`.
pub fn virtio_desc(a: &mut Asm, ring: u32, i: u32, addr: u32, len: u32, flags: u16, next: u16) {
    let d = ring + 16 * i;
    a.store32(d, addr)
        .store32(d + 4, 0)
        .store32(d + 8, len)
        .store32(d + 12, u32::from(flags) | (u32::from(next) << 16));
}
