//! The VM's static configuration, parsed from `kata-like-vmm run ...` (see CONTRACT.md).

use std::path::PathBuf;

use crate::devices::virtio::net::device::parse_mac;
use crate::vmm_config::*;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmResources {
    pub machine: MachineConfig,
    pub boot: BootConfig,
    pub console: ConsoleConfig,
    pub drives: Vec<DriveConfig>,
    pub net: Option<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub api_sock: Option<PathBuf>,
    pub jail: JailConfig,
    pub log_level: Option<String>,
    pub seccomp_violation: Option<SeccompViolation>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Splits `k=v,k2,k3=v3` into pairs (a bare key has an empty value).
fn key_values(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, UsageError> {
    v.parse()
        .map_err(|_| usage(format!("{flag}: invalid number {v:?}")))
}

fn parse_fd(flag: &str, v: &str) -> Result<i32, UsageError> {
    let fd: i32 = parse_num(flag, v)?;
    if fd < 3 {
        return Err(usage(format!("{flag}: fd {fd} must be 3 or above")));
    }
    Ok(fd)
}

fn parse_drive(v: &str) -> Result<DriveConfig, UsageError> {
    let mut id = None;
    let mut path = None;
    let mut empty = false;
    let mut read_only = false;
    for (k, val) in key_values(v) {
        match (k, val) {
            ("id", s) if !s.is_empty() => id = Some(s.to_string()),
            ("path", s) if !s.is_empty() => path = Some(PathBuf::from(s)),
            ("empty", "") => empty = true,
            ("ro", "") => read_only = true,
            _ => return Err(usage(format!("--drive: unknown or empty option {k:?}"))),
        }
    }
    let id = id.ok_or_else(|| usage("--drive needs id=ID"))?;
    if id.len() > 20 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(usage(
            "--drive id must be 1-20 printable ASCII characters (it is the virtio-blk serial)",
        ));
    }
    match (path, empty) {
        (Some(_), true) | (None, false) => {
            Err(usage("--drive needs exactly one of path=PATH or empty"))
        }
        (path, _) => Ok(DriveConfig {
            id,
            path,
            read_only,
        }),
    }
}

fn parse_net(v: &str) -> Result<NetConfig, UsageError> {
    let mut backend = None;
    let mut mac = DEFAULT_MAC;
    for (k, val) in key_values(v) {
        match k {
            "fd" => backend = Some(NetBackend::Fd(parse_fd("--net fd", val)?)),
            "tap" if !val.is_empty() && val.len() < 16 => {
                backend = Some(NetBackend::Tap(val.to_string()))
            }
            "mac" => {
                mac = parse_mac(val).ok_or_else(|| usage(format!("--net: invalid mac {val:?}")))?
            }
            _ => return Err(usage(format!("--net: unknown option {k:?}"))),
        }
    }
    Ok(NetConfig {
        backend: backend.ok_or_else(|| usage("--net needs fd=N or tap=NAME"))?,
        mac,
    })
}

fn parse_vsock(v: &str) -> Result<VsockConfig, UsageError> {
    let mut cid = None;
    let mut uds = None;
    for (k, val) in key_values(v) {
        match k {
            "cid" => cid = Some(parse_num::<u64>("--vsock cid", val)?),
            "uds" if !val.is_empty() => uds = Some(PathBuf::from(val)),
            _ => return Err(usage(format!("--vsock: unknown option {k:?}"))),
        }
    }
    let cid = cid.ok_or_else(|| usage("--vsock needs cid=N"))?;
    if cid < 3 || cid > u64::from(u32::MAX) {
        return Err(usage("--vsock cid must be between 3 and 2^32-1"));
    }
    Ok(VsockConfig {
        cid,
        uds: uds.ok_or_else(|| usage("--vsock needs uds=PATH"))?,
    })
}

fn parse_console(v: &str) -> Result<ConsoleConfig, UsageError> {
    Ok(match v {
        "stdout" => ConsoleConfig::Stdout,
        "null" => ConsoleConfig::Null,
        s if s.starts_with("fd:") => ConsoleConfig::Fd(parse_fd("--console fd", &s[3..])?),
        "" => return Err(usage("--console needs a value")),
        s => ConsoleConfig::Path(PathBuf::from(s)),
    })
}

impl VmResources {
    /// Parses the arguments after `run`.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, UsageError> {
        let mut r = VmResources {
            jail: JailConfig {
                enabled: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut kernel = None;
        let mut no_jail = false;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .ok_or_else(|| usage(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "--kernel" => kernel = Some(PathBuf::from(value("--kernel")?)),
                "--initrd" => r.boot.initrd = Some(PathBuf::from(value("--initrd")?)),
                "--cmdline" => r.boot.cmdline = value("--cmdline")?,
                "--vcpus" => {
                    let n: u8 = parse_num("--vcpus", &value("--vcpus")?)?;
                    if n == 0 || n > crate::arch::mptable::MAX_CPUS {
                        return Err(usage("--vcpus must be between 1 and 254"));
                    }
                    r.machine.vcpus = n;
                }
                "--memory-mib" => {
                    let n: u64 = parse_num("--memory-mib", &value("--memory-mib")?)?;
                    if !(16..=1 << 20).contains(&n) {
                        return Err(usage("--memory-mib must be between 16 and 1048576"));
                    }
                    r.machine.memory_mib = n;
                }
                "--hugepages" => r.machine.hugepages = true,
                "--console" => r.console = parse_console(&value("--console")?)?,
                "--drive" => r.drives.push(parse_drive(&value("--drive")?)?),
                "--net" => {
                    if r.net.is_some() {
                        return Err(usage("only one --net is supported"));
                    }
                    r.net = Some(parse_net(&value("--net")?)?);
                }
                "--vsock" => r.vsock = Some(parse_vsock(&value("--vsock")?)?),
                "--rng" => r.rng = true,
                "--api-sock" => r.api_sock = Some(PathBuf::from(value("--api-sock")?)),
                "--jail-dir" => r.jail.jail_dir = Some(PathBuf::from(value("--jail-dir")?)),
                "--uid" => r.jail.uid = Some(parse_num("--uid", &value("--uid")?)?),
                "--gid" => r.jail.gid = Some(parse_num("--gid", &value("--gid")?)?),
                "--no-jail" => no_jail = true,
                "--log-level" => r.log_level = Some(value("--log-level")?),
                "--seccomp-test-violation" => {
                    r.seccomp_violation = Some(match value("--seccomp-test-violation")?.as_str() {
                        "vcpu" => SeccompViolation::Vcpu,
                        "api" => SeccompViolation::Api,
                        "vmm" => SeccompViolation::Vmm,
                        other => return Err(usage(format!("unknown thread {other:?}"))),
                    })
                }
                other => return Err(usage(format!("unknown option {other:?}"))),
            }
        }
        r.boot.kernel = kernel.ok_or_else(|| usage("--kernel is required"))?;
        let mut ids: Vec<&str> = r.drives.iter().map(|d| d.id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(usage("drive ids must be unique"));
        }
        let devices = r.drives.len()
            + usize::from(r.net.is_some())
            + usize::from(r.vsock.is_some())
            + usize::from(r.rng);
        let max =
            (crate::arch::layout::IOAPIC_PINS - crate::arch::layout::VIRTIO_IRQ_BASE) as usize;
        if devices > max {
            return Err(usage(format!("at most {max} virtio devices")));
        }
        if no_jail {
            r.jail.enabled = false;
        } else {
            let dir = r
                .jail
                .jail_dir
                .clone()
                .ok_or_else(|| usage("--jail-dir DIR is required unless --no-jail"))?;
            for (name, p) in [
                ("--api-sock", r.api_sock.as_ref()),
                ("--vsock uds", r.vsock.as_ref().map(|v| &v.uds)),
            ] {
                if let Some(p) = p {
                    if !p.starts_with(&dir) {
                        return Err(usage(format!(
                            "{name} must lie inside --jail-dir when jailed"
                        )));
                    }
                }
            }
        }
        if r.jail.uid.is_some() != r.jail.gid.is_some() {
            return Err(usage("--uid and --gid go together"));
        }
        Ok(r)
    }

    /// Inherited fds named on the command line (kept when closing the rest).
    pub fn inherited_fds(&self) -> Vec<i32> {
        let mut fds = Vec::new();
        if let ConsoleConfig::Fd(fd) = self.console {
            fds.push(fd);
        }
        if let Some(NetConfig {
            backend: NetBackend::Fd(fd),
            ..
        }) = &self.net
        {
            fds.push(*fd);
        }
        fds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmResources, UsageError> {
        VmResources::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn full_command_line() {
        let r = parse(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0",
            "--vcpus",
            "2",
            "--memory-mib",
            "256",
            "--console",
            "fd:5",
            "--drive",
            "id=root,path=/r.img,ro",
            "--drive",
            "id=slot1,empty",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:01",
            "--vsock",
            "cid=3,uds=/jail/v.sock",
            "--rng",
            "--api-sock",
            "/jail/api.sock",
            "--jail-dir",
            "/jail",
            "--uid",
            "1000",
            "--gid",
            "1000",
        ])
        .unwrap();
        assert_eq!(r.machine.vcpus, 2);
        assert_eq!(r.console, ConsoleConfig::Fd(5));
        assert_eq!(
            r.drives[0],
            DriveConfig {
                id: "root".into(),
                path: Some("/r.img".into()),
                read_only: true
            }
        );
        assert_eq!(r.drives[1].path, None);
        assert_eq!(
            r.net.as_ref().unwrap().backend,
            NetBackend::Tap("tap0".into())
        );
        assert_eq!(r.vsock.as_ref().unwrap().cid, 3);
        assert!(r.jail.enabled);
        assert_eq!(r.inherited_fds(), vec![5]);
    }

    #[test]
    fn usage_errors() {
        assert!(parse(&["--no-jail"]).is_err(), "kernel required");
        assert!(parse(&["--kernel", "/k", "--vcpus", "0", "--no-jail"]).is_err());
        assert!(parse(&["--kernel", "/k", "--vcpus", "x", "--no-jail"]).is_err());
        assert!(parse(&["--kernel", "/k", "--drive", "id=a", "--no-jail"]).is_err());
        assert!(parse(&[
            "--kernel",
            "/k",
            "--drive",
            "id=a,path=/x,empty",
            "--no-jail"
        ])
        .is_err());
        assert!(parse(&[
            "--kernel",
            "/k",
            "--drive",
            "id=a,empty",
            "--drive",
            "id=a,empty",
            "--no-jail"
        ])
        .is_err());
        assert!(parse(&["--kernel", "/k", "--net", "fd=1", "--no-jail"]).is_err());
        assert!(parse(&["--kernel", "/k", "--vsock", "cid=2,uds=/v", "--no-jail"]).is_err());
        assert!(parse(&["--kernel", "/k"]).is_err(), "jail dir required");
        assert!(parse(&[
            "--kernel",
            "/k",
            "--jail-dir",
            "/j",
            "--api-sock",
            "/elsewhere"
        ])
        .is_err());
        assert!(parse(&["--kernel", "/k", "--bogus", "--no-jail"]).is_err());
        assert!(parse(&["--kernel"]).is_err());
        assert!(parse(&[
            "--kernel",
            "/k",
            "--drive",
            "id=waytoolongforavirtioserial,empty",
            "--no-jail"
        ])
        .is_err());
    }
}
