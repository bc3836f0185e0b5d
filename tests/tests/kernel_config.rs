//! The guest kernel: built from guest.config, every requested option present, bootable via PVH.

use std::path::PathBuf;
use std::process::Command;

use kata_like_tests::{elf, repo_root};

/// Builds the kernel (cached: instant after the first time) and returns its directory.
fn built_kernel_dir() -> PathBuf {
    let out = Command::new(repo_root().join("kernel-config/build"))
        .output()
        .expect("kernel-config/build runs");
    assert!(
        out.status.success(),
        "kernel build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    let vmlinux = PathBuf::from(stdout.lines().last().expect("a path line"));
    vmlinux.parent().expect("cache dir").to_path_buf()
}

fn check_config(config: &std::path::Path) -> std::process::Output {
    Command::new(repo_root().join("kernel-config/check-config"))
        .arg(config)
        .output()
        .expect("check-config runs")
}

#[test]
fn built_config_has_every_option_of_the_fragment() {
    let dir = built_kernel_dir();
    let out = check_config(&dir.join("config"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check-config failed:\n{stdout}");
    assert!(stdout.contains("options present"), "{stdout}");
}

#[test]
fn check_fails_when_an_option_of_the_fragment_is_missing() {
    let dir = built_kernel_dir();
    let config = std::fs::read_to_string(dir.join("config")).expect("built config");
    // Drop an option the fragment asks for, as olddefconfig does when a dependency is missing.
    let dropped = "CONFIG_VIRTIO_VSOCKETS=y";
    assert!(config.lines().any(|l| l == dropped));
    let edited: String = config
        .lines()
        .filter(|l| *l != dropped)
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = std::env::temp_dir().join(format!("kata-like-config-{}", std::process::id()));
    std::fs::write(&tmp, edited).expect("write edited config");
    let out = check_config(&tmp);
    let _ = std::fs::remove_file(&tmp);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("missing: CONFIG_VIRTIO_VSOCKETS=y"),
        "{stdout}"
    );
}

#[test]
fn vmlinux_is_an_uncompressed_elf_with_a_pvh_entry_note() {
    let dir = built_kernel_dir();
    let image = std::fs::read(dir.join("vmlinux")).expect("vmlinux");
    let notes = elf::notes(&image).expect("vmlinux is ELF64");
    let pvh = notes
        .iter()
        .find(|n| n.name == "Xen" && n.kind == elf::XEN_ELFNOTE_PHYS32_ENTRY)
        .expect("a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)");
    // A 32-bit physical address, stored as a 4- or (since Linux 6.x) 8-byte little-endian word.
    assert!(
        matches!(pvh.desc.len(), 4 | 8),
        "PVH entry note of {} bytes",
        pvh.desc.len()
    );
    let mut word = [0u8; 8];
    word[..pvh.desc.len()].copy_from_slice(&pvh.desc);
    let entry = u64::from_le_bytes(word);
    assert!(
        entry != 0 && entry < (1 << 32),
        "PVH entry {entry:#x} is not a 32-bit physical address"
    );
}
