//! The VM's static configuration (what `kata-like-vmm run ...` is given), and its validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// A configuration the VMM refuses: the message says which option is wrong and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Everything a VM is started with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub machine: MachineConfig,
    pub boot: BootConfig,
    /// Start from the snapshot in this directory (host path, opened before the jail)
    /// instead of booting: the machine (vCPUs, memory) and the guest come from the snapshot,
    /// the device backends from this configuration, which must list the same devices.
    pub restore: Option<PathBuf>,
    pub console: ConsoleConfig,
    pub drives: Vec<DriveConfig>,
    /// One virtio-net device per entry, in this order (the pod's interfaces).
    pub net: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// One virtio-fs device per entry (vhost-user-fs: the file system is served by a
    /// vhost-user backend such as virtiofsd on `socket`), after vsock.
    pub fs: Vec<FsConfig>,
    pub rng: bool,
    /// A virtio-console device (the guest's hvc0) writing to the same sink as the 8250.
    pub virtio_console: bool,
    pub api_sock: Option<PathBuf>,
    pub jail: JailConfig,
    pub log_level: Option<String>,
    /// Test switch (`--seccomp-test-violation`, not in the usage text): this thread makes a
    /// syscall outside its filter, so that tests can see the filter kill the VMM.
    pub seccomp_violation: Option<SeccompViolation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Back guest memory with 2 MiB hugetlbfs pages.
    pub hugepages: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            memory_mib: 128,
            hugepages: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Uncompressed ELF vmlinux (PVH entry) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Base command line; the VMM appends one `virtio_mmio.device=` per device.
    pub cmdline: String,
}

/// Where the guest console's output goes (the 8250 UART's and virtio-console's alike).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleConfig {
    Path(PathBuf),
    /// An fd inherited from the parent.
    Fd(i32),
    #[default]
    Stdout,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveConfig {
    /// The virtio-blk serial, how the guest finds the drive.
    pub id: String,
    /// None: an empty slot filled later through the API.
    pub path: Option<PathBuf>,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// A TAP fd inherited from the parent.
    Fd(i32),
    /// A TAP interface the VMM opens by name.
    Tap(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub mac: [u8; 6],
}

/// Default MAC: locally administered, stable.
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    /// Host side of the hybrid vsock: a Unix socket path.
    pub uds: PathBuf,
}

/// A vhost-user-fs device: the guest mounts `tag` (`mount -t virtiofs TAG DIR`); the VMM
/// connects to the backend's Unix socket `socket` before it jails itself, so the socket may lie
/// outside `--jail-dir`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailConfig {
    pub enabled: bool,
    pub jail_dir: Option<PathBuf>,
    /// The ids the jailed VMM runs as (neither: 65534/65534); never 0.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Which thread deliberately breaks its seccomp filter (tests of the filters only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompViolation {
    Vcpu,
    Api,
    Vmm,
}

impl SeccompViolation {
    /// The thread's name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompViolation::Vcpu => "vcpu",
            SeccompViolation::Api => "api",
            SeccompViolation::Vmm => "vmm",
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, two digits per byte).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Formats a MAC the way [`parse_mac`] reads it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A drive id is the virtio-blk serial: 1-20 printable ASCII characters. A comma would also
/// break the `--drive id=...,` syntax.
pub fn validate_drive_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id.len() > MAX_DRIVE_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_graphic() && b != b',')
    {
        return Err(invalid(format!(
            "--drive id must be 1-{MAX_DRIVE_ID_LEN} printable ASCII characters without ',' \
             (it is the virtio-blk serial), got {id:?}"
        )));
    }
    Ok(())
}

fn validate_fd(flag: &str, fd: i32) -> Result<(), ConfigError> {
    if fd < MIN_INHERITED_FD {
        return Err(invalid(format!(
            "{flag}: fd {fd} must be {MIN_INHERITED_FD} or above"
        )));
    }
    Ok(())
}

impl VmConfig {
    /// A configuration with every default and this kernel, jailed (as `run` without options).
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            boot: BootConfig {
                kernel: kernel.into(),
                ..Default::default()
            },
            jail: JailConfig {
                enabled: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Number of virtio devices, each taking one MMIO window and one IRQ.
    pub fn virtio_devices(&self) -> usize {
        self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + self.fs.len()
            + usize::from(self.rng)
            + usize::from(self.virtio_console)
    }

    /// Checks every rule of the contract; the VMM refuses a configuration that fails it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.restore {
            if dir.as_os_str().is_empty() {
                return Err(invalid("--restore needs a snapshot directory"));
            }
            if !self.boot.kernel.as_os_str().is_empty()
                || self.boot.initrd.is_some()
                || !self.boot.cmdline.is_empty()
            {
                return Err(invalid(
                    "--restore starts the snapshot's guest: --kernel, --initrd and --cmdline do not apply",
                ));
            }
            if self.machine != MachineConfig::default() {
                return Err(invalid(
                    "--restore takes the vCPUs and memory from the snapshot: --vcpus, --memory-mib and --hugepages do not apply",
                ));
            }
        } else if self.boot.kernel.as_os_str().is_empty() {
            return Err(invalid("--kernel is required (or --restore DIR)"));
        }
        let vcpus = self.machine.vcpus;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "--vcpus must be between 1 and {MAX_VCPUS}"
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.machine.memory_mib) {
            return Err(invalid(format!(
                "--memory-mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
            )));
        }
        if let ConsoleConfig::Fd(fd) = self.console {
            validate_fd("--console fd", fd)?;
        }
        if let ConsoleConfig::Path(p) = &self.console {
            if p.as_os_str().is_empty() {
                return Err(invalid("--console needs a value"));
            }
        }
        for d in &self.drives {
            validate_drive_id(&d.id)?;
        }
        let mut ids: Vec<&str> = self.drives.iter().map(|d| d.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("drive ids must be unique"));
        }
        for net in &self.net {
            match &net.backend {
                NetBackend::Fd(fd) => validate_fd("--net fd", *fd)?,
                NetBackend::Tap(name) if name.is_empty() || name.len() > MAX_TAP_NAME_LEN => {
                    return Err(invalid(format!(
                        "--net tap name must be 1-{MAX_TAP_NAME_LEN} characters"
                    )))
                }
                NetBackend::Tap(_) => {}
            }
        }
        let mut fds: Vec<i32> = self
            .net
            .iter()
            .filter_map(|n| match n.backend {
                NetBackend::Fd(fd) => Some(fd),
                NetBackend::Tap(_) => None,
            })
            .collect();
        fds.sort_unstable();
        if fds.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("each --net needs a TAP fd of its own"));
        }
        let mut macs: Vec<[u8; 6]> = self.net.iter().map(|n| n.mac).collect();
        macs.sort_unstable();
        if macs.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(
                "each --net needs a MAC of its own (the guest finds its interfaces by MAC)",
            ));
        }
        if let Some(v) = &self.vsock {
            if !(MIN_VSOCK_CID..=MAX_VSOCK_CID).contains(&v.cid) {
                return Err(invalid(format!(
                    "--vsock cid must be between {MIN_VSOCK_CID} and 2^32-1"
                )));
            }
        }
        for fs in &self.fs {
            validate_fs_tag(&fs.tag)?;
            if fs.socket.as_os_str().is_empty() {
                return Err(invalid("--fs needs socket=PATH"));
            }
        }
        let mut tags: Vec<&str> = self.fs.iter().map(|f| f.tag.as_str()).collect();
        tags.sort_unstable();
        if tags.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(
                "--fs tags must be unique (the guest mounts by tag)",
            ));
        }
        if self.virtio_devices() > MAX_VIRTIO_DEVICES {
            return Err(invalid(format!(
                "at most {MAX_VIRTIO_DEVICES} virtio devices"
            )));
        }
        if self.jail.enabled {
            let dir = self
                .jail
                .jail_dir
                .as_ref()
                .ok_or_else(|| invalid("--jail-dir DIR is required unless --no-jail"))?;
            for (name, p) in [
                ("--api-sock", self.api_sock.as_ref()),
                ("--vsock uds", self.vsock.as_ref().map(|v| &v.uds)),
            ] {
                if let Some(p) = p {
                    if !p.starts_with(dir) {
                        return Err(invalid(format!(
                            "{name} must lie inside --jail-dir when jailed"
                        )));
                    }
                }
            }
        }
        if self.jail.uid.is_some() != self.jail.gid.is_some() {
            return Err(invalid("--uid and --gid go together"));
        }
        if self.jail.enabled && (self.jail.uid == Some(0) || self.jail.gid == Some(0)) {
            return Err(invalid(
                "--uid and --gid must not be 0: the jailed VMM runs unprivileged \
                 (leave both out for 65534/65534)",
            ));
        }
        Ok(())
    }

    /// Inherited fds named in the configuration (kept when closing the rest).
    pub fn inherited_fds(&self) -> Vec<i32> {
        let mut fds = Vec::new();
        if let ConsoleConfig::Fd(fd) = self.console {
            fds.push(fd);
        }
        for net in &self.net {
            if let NetBackend::Fd(fd) = net.backend {
                fds.push(fd);
            }
        }
        fds
    }
}

/// A virtio-fs tag: 1-36 bytes (the config space field), printable ASCII without `,` and `=`
/// (the command line's separators) or spaces (the guest's mount source).
pub fn validate_fs_tag(tag: &str) -> Result<(), ConfigError> {
    if tag.is_empty()
        || tag.len() > MAX_FS_TAG_LEN
        || !tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
    {
        return Err(invalid(format!(
            "--fs tag {tag:?} must be 1-{MAX_FS_TAG_LEN} printable ASCII characters without ',' '=' or spaces"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_tags_are_checked_and_unique() {
        let mut c = VmConfig::new("/k");
        c.jail.enabled = false;
        let fs = |tag: &str| FsConfig {
            tag: tag.into(),
            socket: "/run/fs.sock".into(),
        };
        c.fs = vec![fs("kata-like-shared")];
        assert_eq!(c.validate(), Ok(()));
        c.fs = vec![fs("")];
        assert!(c.validate().is_err());
        c.fs = vec![fs(&"x".repeat(MAX_FS_TAG_LEN + 1))];
        assert!(c.validate().is_err());
        c.fs = vec![fs("a b")];
        assert!(c.validate().is_err());
        c.fs = vec![fs("a"), fs("a")];
        assert!(c.validate().unwrap_err().0.contains("unique"));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:00:aa:bb:0c"),
            Some([2, 0, 0, 0xaa, 0xbb, 0xc])
        );
        assert_eq!(parse_mac("02:00:00:aa:bb"), None);
        assert_eq!(parse_mac("02:00:00:aa:bb:0g"), None);
        assert_eq!(parse_mac("002:00:00:aa:bb:0c"), None);
    }

    #[test]
    fn macs_format_the_way_they_parse() {
        assert_eq!(format_mac(&DEFAULT_MAC), "06:00:ac:10:00:02");
        assert_eq!(parse_mac(&format_mac(&DEFAULT_MAC)), Some(DEFAULT_MAC));
    }

    #[test]
    fn memory_limits_are_the_contract_constants() {
        let mut c = VmConfig::new("/k");
        c.jail.enabled = false;
        c.machine.memory_mib = MIN_MEMORY_MIB;
        assert_eq!(c.validate(), Ok(()));
        c.machine.memory_mib = MIN_MEMORY_MIB - 1;
        assert!(c.validate().is_err());
        c.machine.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(c.validate().is_err());
    }
}
