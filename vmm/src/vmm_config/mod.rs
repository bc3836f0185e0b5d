//! Plain configuration structs, filled from the command line and consumed by the builder.

use std::os::unix::io::RawFd;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleConfig {
    Path(PathBuf),
    Fd(RawFd),
    #[default]
    Stdout,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    /// None: an empty slot filled later through the API.
    pub path: Option<PathBuf>,
    pub read_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    Fd(RawFd),
    Tap(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub mac: [u8; 6],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailConfig {
    pub enabled: bool,
    pub jail_dir: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Which thread deliberately breaks its seccomp filter (tests of the filters only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompViolation {
    Vcpu,
    Api,
    Vmm,
}

/// Default MAC: locally administered, stable.
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
