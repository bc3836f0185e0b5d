//! Harness of kata-like's end-to-end tests.
//!
//! Tests that need a KVM able to boot Linux are `#[ignore]`d; `tests/run-e2e` runs them where
//! such a KVM exists (directly, or inside the KVM test host) after setting the `KATA_LIKE_*`
//! variables that [`artifact`] reads. They fail, never skip, when an artifact is missing.

pub mod atomic_writer;
pub mod elf;

use std::path::{Path, PathBuf};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

/// The path an end-to-end artifact variable names (`KATA_LIKE_KERNEL`, `KATA_LIKE_INITRD`,
/// `KATA_LIKE_VMM`, ...). Panics with a clear message when it is unset or names no file,
/// so that a misconfigured run fails instead of passing vacuously.
pub fn artifact(var: &str) -> PathBuf {
    let value = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run the end-to-end tests through tests/run-e2e")
    });
    let path = PathBuf::from(value);
    assert!(
        path.is_file(),
        "{var}={} does not name a file: build it first (test.sh does)",
        path.display()
    );
    path
}

pub mod console;

/// A private containerd with the kata-like runtime, test images, CNI (see the module).
pub mod containerd;
/// A CRI client acting as kubelet.
pub mod cri;
/// Pod fixtures: a clean node, kata-like pods and their containers, built and started.
pub mod pod;
/// A WebSocket client of containerd's CRI streaming server (exec, attach, port-forward).
pub mod streaming;
