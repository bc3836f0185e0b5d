//! Where an installation lives: everything under one prefix (default `/opt/kata-like`), the
//! containerd drop-in next to containerd's configuration, and the install receipt that lets
//! `uninstall` undo exactly what `install` did.
//!
//! Paths are the node's view. `root` is where the node's file system is mounted for this
//! process: `/` on the node itself, `/host` in the DaemonSet's installer pod.

use std::path::{Path, PathBuf};

/// The payload: what `install` copies, relative to the payload directory and to the prefix.
pub const SHIM: &str = "bin/containerd-shim-kata-like-v2";
pub const VMM: &str = "bin/kata-like-vmm";
pub const TOOL: &str = "bin/kata-like";
/// The Rust virtiofsd: every pod's shared file system (hostPath, emptyDir volumes).
pub const VIRTIOFSD: &str = "bin/virtiofsd";
pub const KERNEL: &str = "share/kata-like/vmlinux";
pub const INITRAMFS: &str = "share/kata-like/initramfs.cpio";
pub const PAYLOAD: [&str; 6] = [SHIM, VMM, TOOL, VIRTIOFSD, KERNEL, INITRAMFS];
/// The shim's configuration, written by the first install and kept (operator's) afterwards.
pub const SHIM_CONFIG: &str = "etc/config.toml";
/// What the install did, for uninstall.
pub const RECEIPT: &str = "state/install.json";
/// containerd's main configuration file as it was before the first install.
pub const CONFIG_BACKUP: &str = "state/containerd-config.toml.orig";

pub const DEFAULT_PREFIX: &str = "/opt/kata-like";
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub prefix: PathBuf,
    pub containerd_config: PathBuf,
}

impl Layout {
    /// A node path as this process reaches it.
    pub fn host(&self, node_path: &Path) -> PathBuf {
        match node_path.strip_prefix("/") {
            Ok(rel) => self.root.join(rel),
            Err(_) => self.root.join(node_path),
        }
    }

    /// A file of the installation, node view.
    pub fn installed(&self, rel: &str) -> PathBuf {
        self.prefix.join(rel)
    }

    /// The drop-in: `<containerd config dir>/conf.d/kata-like.toml`, node view.
    pub fn drop_in(&self) -> PathBuf {
        self.containerd_config
            .parent()
            .unwrap_or(Path::new("/etc/containerd"))
            .join("conf.d")
            .join("kata-like.toml")
    }
}

/// Resolves a path given on the command line against the current directory.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths_are_reached_under_the_root() {
        let l = Layout {
            root: "/host".into(),
            prefix: "/opt/kata-like".into(),
            containerd_config: "/etc/containerd/config.toml".into(),
        };
        assert_eq!(
            l.host(&l.installed(SHIM)),
            PathBuf::from("/host/opt/kata-like/bin/containerd-shim-kata-like-v2")
        );
        assert_eq!(
            l.drop_in(),
            PathBuf::from("/etc/containerd/conf.d/kata-like.toml")
        );
    }
}
