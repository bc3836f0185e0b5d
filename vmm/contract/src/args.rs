//! The codec between [`VmConfig`] and the arguments of `kata-like-vmm run` (vmm/CONTRACT.md).
//! `from_args(to_args(c)) == c` for every valid `c`.

use std::path::PathBuf;

use crate::config::*;

/// Splits `k=v,k2,k3=v3` into pairs (a bare key has an empty value).
fn key_values(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|_| invalid(format!("{flag}: invalid number {v:?}")))
}

fn parse_drive(v: &str) -> Result<DriveConfig, ConfigError> {
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
            _ => return Err(invalid(format!("--drive: unknown or empty option {k:?}"))),
        }
    }
    let id = id.ok_or_else(|| invalid("--drive needs id=ID"))?;
    match (path, empty) {
        (Some(_), true) | (None, false) => {
            Err(invalid("--drive needs exactly one of path=PATH or empty"))
        }
        (path, _) => Ok(DriveConfig {
            id,
            path,
            read_only,
        }),
    }
}

fn parse_net(v: &str) -> Result<NetConfig, ConfigError> {
    let mut backend = None;
    let mut mac = DEFAULT_MAC;
    for (k, val) in key_values(v) {
        match k {
            "fd" => backend = Some(NetBackend::Fd(parse_num("--net fd", val)?)),
            "tap" => backend = Some(NetBackend::Tap(val.to_string())),
            "mac" => {
                mac =
                    parse_mac(val).ok_or_else(|| invalid(format!("--net: invalid mac {val:?}")))?
            }
            _ => return Err(invalid(format!("--net: unknown option {k:?}"))),
        }
    }
    Ok(NetConfig {
        backend: backend.ok_or_else(|| invalid("--net needs fd=N or tap=NAME"))?,
        mac,
    })
}

fn parse_vsock(v: &str) -> Result<VsockConfig, ConfigError> {
    let mut cid = None;
    let mut uds = None;
    for (k, val) in key_values(v) {
        match k {
            "cid" => cid = Some(parse_num::<u64>("--vsock cid", val)?),
            "uds" if !val.is_empty() => uds = Some(PathBuf::from(val)),
            _ => return Err(invalid(format!("--vsock: unknown option {k:?}"))),
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or_else(|| invalid("--vsock needs cid=N"))?,
        uds: uds.ok_or_else(|| invalid("--vsock needs uds=PATH"))?,
    })
}

fn parse_fs(v: &str) -> Result<FsConfig, ConfigError> {
    let mut tag = None;
    let mut socket = None;
    for (k, val) in key_values(v) {
        match k {
            "tag" if !val.is_empty() => tag = Some(val.to_string()),
            "socket" if !val.is_empty() => socket = Some(PathBuf::from(val)),
            _ => return Err(invalid(format!("--fs: unknown or empty option {k:?}"))),
        }
    }
    Ok(FsConfig {
        tag: tag.ok_or_else(|| invalid("--fs needs tag=TAG"))?,
        socket: socket.ok_or_else(|| invalid("--fs needs socket=PATH"))?,
    })
}

fn parse_console(v: &str) -> Result<ConsoleConfig, ConfigError> {
    Ok(match v {
        "stdout" => ConsoleConfig::Stdout,
        "null" => ConsoleConfig::Null,
        s if s.starts_with("fd:") => ConsoleConfig::Fd(parse_num("--console fd", &s[3..])?),
        "" => return Err(invalid("--console needs a value")),
        s => ConsoleConfig::Path(PathBuf::from(s)),
    })
}

fn path_arg(p: &std::path::Path) -> String {
    p.display().to_string()
}

impl VmConfig {
    /// Parses the arguments after `run` and validates the result.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let mut c = VmConfig::new(PathBuf::new());
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .ok_or_else(|| invalid(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "--kernel" => c.boot.kernel = PathBuf::from(value("--kernel")?),
                "--restore" => c.restore = Some(PathBuf::from(value("--restore")?)),
                "--initrd" => c.boot.initrd = Some(PathBuf::from(value("--initrd")?)),
                "--cmdline" => c.boot.cmdline = value("--cmdline")?,
                "--vcpus" => c.machine.vcpus = parse_num("--vcpus", &value("--vcpus")?)?,
                "--memory-mib" => {
                    c.machine.memory_mib = parse_num("--memory-mib", &value("--memory-mib")?)?
                }
                "--hugepages" => c.machine.hugepages = true,
                "--console" => c.console = parse_console(&value("--console")?)?,
                "--drive" => c.drives.push(parse_drive(&value("--drive")?)?),
                "--net" => c.net.push(parse_net(&value("--net")?)?),
                "--vsock" => c.vsock = Some(parse_vsock(&value("--vsock")?)?),
                "--fs" => c.fs.push(parse_fs(&value("--fs")?)?),
                "--rng" => c.rng = true,
                "--virtio-console" => c.virtio_console = true,
                "--api-sock" => c.api_sock = Some(PathBuf::from(value("--api-sock")?)),
                "--jail-dir" => c.jail.jail_dir = Some(PathBuf::from(value("--jail-dir")?)),
                "--uid" => c.jail.uid = Some(parse_num("--uid", &value("--uid")?)?),
                "--gid" => c.jail.gid = Some(parse_num("--gid", &value("--gid")?)?),
                "--no-jail" => c.jail.enabled = false,
                "--log-level" => c.log_level = Some(value("--log-level")?),
                "--seccomp-test-violation" => {
                    c.seccomp_violation = Some(match value("--seccomp-test-violation")?.as_str() {
                        "vcpu" => SeccompViolation::Vcpu,
                        "api" => SeccompViolation::Api,
                        "vmm" => SeccompViolation::Vmm,
                        other => return Err(invalid(format!("unknown thread {other:?}"))),
                    })
                }
                other => return Err(invalid(format!("unknown option {other:?}"))),
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The arguments after `run` that [`VmConfig::from_args`] reads back as this configuration,
    /// in the order vmm/CONTRACT.md lists the options.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(dir) = &self.restore {
            // The snapshot brings the guest and the machine.
            args.extend(["--restore".into(), path_arg(dir)]);
        } else {
            args.extend(["--kernel".into(), path_arg(&self.boot.kernel)]);
            if let Some(initrd) = &self.boot.initrd {
                args.extend(["--initrd".into(), path_arg(initrd)]);
            }
            args.extend([
                "--cmdline".into(),
                self.boot.cmdline.clone(),
                "--vcpus".into(),
                self.machine.vcpus.to_string(),
                "--memory-mib".into(),
                self.machine.memory_mib.to_string(),
            ]);
        }
        args.extend([
            "--console".into(),
            match &self.console {
                ConsoleConfig::Path(p) => path_arg(p),
                ConsoleConfig::Fd(fd) => format!("fd:{fd}"),
                ConsoleConfig::Stdout => "stdout".into(),
                ConsoleConfig::Null => "null".into(),
            },
        ]);
        if self.machine.hugepages {
            args.push("--hugepages".into());
        }
        for d in &self.drives {
            let mut spec = format!("id={}", d.id);
            match &d.path {
                Some(p) => spec.push_str(&format!(",path={}", p.display())),
                None => spec.push_str(",empty"),
            }
            if d.read_only {
                spec.push_str(",ro");
            }
            args.extend(["--drive".into(), spec]);
        }
        for net in &self.net {
            let backend = match &net.backend {
                NetBackend::Fd(fd) => format!("fd={fd}"),
                NetBackend::Tap(name) => format!("tap={name}"),
            };
            args.extend([
                "--net".into(),
                format!("{backend},mac={}", format_mac(&net.mac)),
            ]);
        }
        if let Some(v) = &self.vsock {
            args.extend([
                "--vsock".into(),
                format!("cid={},uds={}", v.cid, v.uds.display()),
            ]);
        }
        for fs in &self.fs {
            args.extend([
                "--fs".into(),
                format!("tag={},socket={}", fs.tag, fs.socket.display()),
            ]);
        }
        if self.rng {
            args.push("--rng".into());
        }
        if self.virtio_console {
            args.push("--virtio-console".into());
        }
        if let Some(p) = &self.api_sock {
            args.extend(["--api-sock".into(), path_arg(p)]);
        }
        if let Some(dir) = &self.jail.jail_dir {
            args.extend(["--jail-dir".into(), path_arg(dir)]);
        }
        if let (Some(uid), Some(gid)) = (self.jail.uid, self.jail.gid) {
            args.extend([
                "--uid".into(),
                uid.to_string(),
                "--gid".into(),
                gid.to_string(),
            ]);
        }
        if !self.jail.enabled {
            args.push("--no-jail".into());
        }
        if let Some(level) = &self.log_level {
            args.extend(["--log-level".into(), level.clone()]);
        }
        if let Some(thread) = self.seccomp_violation {
            args.extend(["--seccomp-test-violation".into(), thread.as_str().into()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        VmConfig::from_args(args.iter().map(|s| s.to_string()))
    }

    const FULL: &[&str] = &[
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
        "--fs",
        "tag=shared,socket=/run/vfs.sock",
        "--rng",
        "--virtio-console",
        "--api-sock",
        "/jail/api.sock",
        "--jail-dir",
        "/jail",
        "--uid",
        "1000",
        "--gid",
        "1000",
    ];

    #[test]
    fn full_command_line() {
        let r = parse(FULL).unwrap();
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
        assert_eq!(r.net.len(), 1);
        assert_eq!(r.net[0].backend, NetBackend::Tap("tap0".into()));
        assert_eq!(r.vsock.as_ref().unwrap().cid, 3);
        assert!(r.virtio_console);
        assert!(r.jail.enabled);
        assert_eq!(r.inherited_fds(), vec![5]);
    }

    #[test]
    fn to_args_reads_back_as_the_same_config() {
        let full = parse(FULL).unwrap();
        assert_eq!(VmConfig::from_args(full.to_args()), Ok(full.clone()));
        let mut other = full;
        other.console = ConsoleConfig::Null;
        other.net = vec![
            NetConfig {
                backend: NetBackend::Fd(7),
                mac: DEFAULT_MAC,
            },
            NetConfig {
                backend: NetBackend::Fd(8),
                mac: [2, 0, 0, 0, 0, 9],
            },
        ];
        assert_eq!(other.inherited_fds(), vec![7, 8]);
        other.machine.hugepages = true;
        other.jail = JailConfig {
            enabled: false,
            ..Default::default()
        };
        other.log_level = Some("debug".into());
        other.seccomp_violation = Some(SeccompViolation::Api);
        assert_eq!(VmConfig::from_args(other.to_args()), Ok(other.clone()));
        let mut minimal = VmConfig::new("/k");
        minimal.jail.enabled = false;
        assert_eq!(VmConfig::from_args(minimal.to_args()), Ok(minimal.clone()));
        let mut restored = minimal;
        restored.boot = Default::default();
        restored.restore = Some("/snapshots/a".into());
        restored.vsock = Some(VsockConfig {
            cid: 9,
            uds: "/v".into(),
        });
        assert_eq!(VmConfig::from_args(restored.to_args()), Ok(restored));
    }

    #[test]
    fn restore_takes_the_guest_and_machine_from_the_snapshot() {
        let r = parse(&["--restore", "/s", "--rng", "--no-jail"]).unwrap();
        assert_eq!(r.restore, Some(PathBuf::from("/s")));
        for extra in [
            &["--kernel", "/k"][..],
            &["--initrd", "/i"],
            &["--cmdline", "quiet"],
            &["--vcpus", "2"],
            &["--memory-mib", "256"],
            &["--hugepages"],
        ] {
            let mut args = vec!["--restore", "/s", "--no-jail"];
            args.extend_from_slice(extra);
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains("do not apply"), "{extra:?}: {err}");
        }
        assert!(parse(&["--restore", "", "--no-jail"]).is_err());
        assert_eq!(
            parse(&["--no-jail"]).unwrap_err().to_string(),
            "--kernel is required (or --restore DIR)"
        );
    }

    #[test]
    fn a_jailed_vmm_refuses_root_ids() {
        let jailed = ["--kernel", "/k", "--jail-dir", "/j"];
        for ids in [["--uid", "0", "--gid", "1"], ["--uid", "1", "--gid", "0"]] {
            let args: Vec<&str> = jailed.iter().chain(ids.iter()).copied().collect();
            assert!(parse(&args).is_err(), "{ids:?}");
        }
        let args: Vec<&str> = jailed
            .iter()
            .chain(&["--uid", "1", "--gid", "1"])
            .copied()
            .collect();
        assert!(parse(&args).is_ok());
        assert!(parse(&jailed).is_ok());
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
        let two_nets = |a: &'static str, b: &'static str| {
            parse(&["--kernel", "/k", "--net", a, "--net", b, "--no-jail"])
        };
        assert!(two_nets("fd=7,mac=02:00:00:00:00:01", "fd=8,mac=02:00:00:00:00:02").is_ok());
        assert!(
            two_nets("fd=7,mac=02:00:00:00:00:01", "fd=7,mac=02:00:00:00:00:02").is_err(),
            "one fd for two devices"
        );
        assert!(
            two_nets("fd=7,mac=02:00:00:00:00:01", "fd=8,mac=02:00:00:00:00:01").is_err(),
            "one MAC for two devices"
        );
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
