//! Validation and adaptation of the OCI spec the shim sends.
//!
//! The shim is trusted less than it seems: everything that names a guest path or a namespace is
//! checked here before libcontainer sees the spec. Mount destinations inside the rootfs are then
//! resolved by libcontainer itself without following symlinks out of the rootfs.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxNamespace, LinuxNamespaceType, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg,
    LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall, Mount, PosixRlimitBuilder,
    PosixRlimitType, Process, Spec,
};

use crate::error::{invalid, Error};
use crate::validate::{check_container_path, check_hostname, resolve_under};

/// Limits on list sizes in a spec (far above what any real pod uses).
const MAX_MOUNTS: usize = 512;
const MAX_MOUNT_OPTIONS: usize = 64;
const MAX_ARGS: usize = 65_536;

/// Mount types that need no source path.
const SPECIAL_MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm",
];

/// What the agent knows when it adapts a container's spec.
pub struct SpecContext<'a> {
    pub container_id: &'a str,
    pub sandbox_id: &'a str,
    /// Absolute path of the container's mounted rootfs.
    pub rootfs: &'a Path,
    /// Root under which bind-mount sources must lie (storages, copied files).
    pub state_dir: &'a Path,
    pub terminal: bool,
    /// The pid namespace the container joins (the pod's shared one, or a target container's):
    /// `None` for a new one of its own.
    pub pid_ns: Option<PathBuf>,
    pub sandbox_hostname: Option<String>,
    /// Sandbox files bind-mounted into containers that do not mount these paths themselves:
    /// (destination, source).
    pub sandbox_files: Vec<(PathBuf, PathBuf)>,
    /// The guest's /dev, whose devices replace the node's in a privileged container.
    pub guest_dev: &'a Path,
}

fn check_options(what: &str, options: &[String]) -> Result<(), Error> {
    if options.len() > MAX_MOUNT_OPTIONS {
        return Err(invalid(format!("{what}: too many options")));
    }
    for option in options {
        if option.is_empty() || option.len() > 1024 || option.contains([',', '\0']) {
            return Err(invalid(format!("{what}: bad option {option:?}")));
        }
    }
    Ok(())
}

fn check_mount(mount: &Mount, ctx: &SpecContext) -> Result<Mount, Error> {
    let destination = mount.destination();
    check_container_path("mount destination", destination)?;
    let what = format!("mount at {}", destination.display());
    let options = mount.options().clone().unwrap_or_default();
    check_options(&what, &options)?;
    let is_bind = options.iter().any(|o| o == "bind" || o == "rbind")
        || mount.typ().as_deref() == Some("bind");
    let typ = mount.typ().clone().unwrap_or_default();
    let mut checked = mount.clone();
    if is_bind {
        let source = mount
            .source()
            .as_ref()
            .ok_or_else(|| invalid(format!("{what}: bind mount without source")))?;
        check_container_path(&format!("{what}: source"), source)?;
        if source.starts_with("/dev") {
            // Device nodes (e.g. /dev/fuse, /dev/null) may be bound in; nothing else of /dev.
            let resolved = resolve_under(&format!("{what}: source"), source, Path::new("/dev"))?;
            let meta = std::fs::metadata(&resolved)
                .map_err(|e| invalid(format!("{what}: source: {e}")))?;
            use std::os::unix::fs::FileTypeExt;
            let kind = meta.file_type();
            if !(kind.is_char_device() || kind.is_block_device()) {
                return Err(invalid(format!(
                    "{what}: only device nodes may be bound from /dev"
                )));
            }
            checked.set_source(Some(resolved));
        } else {
            let resolved = resolve_under(&format!("{what}: source"), source, ctx.state_dir)?;
            checked.set_source(Some(resolved));
        }
    } else if !SPECIAL_MOUNT_TYPES.contains(&typ.as_str()) {
        return Err(invalid(format!(
            "{what}: type {typ:?} is not allowed (bind mounts of guest paths under the agent's \
             state directory, or {})",
            SPECIAL_MOUNT_TYPES.join(", ")
        )));
    }
    Ok(checked)
}

fn check_process(process: &Process) -> Result<(), Error> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() && process.command_line().is_none() {
        return Err(invalid("process.args must not be empty"));
    }
    if args.len() > MAX_ARGS {
        return Err(invalid("process.args: too many arguments"));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(invalid("process.args must not contain NUL"));
    }
    if let Some(env) = process.env() {
        if env.iter().any(|e| e.contains('\0') || !e.contains('=')) {
            return Err(invalid("process.env entries must be KEY=VALUE without NUL"));
        }
    }
    if !process.cwd().is_absolute() {
        return Err(invalid("process.cwd must be absolute"));
    }
    Ok(())
}

/// libcgroups raises RLIMIT_MEMLOCK to 128 MiB in the process that loads the cgroup v2 device
/// filter, and the container's init would inherit that. Under runc a container inherits the
/// runtime's own limit; an explicit rlimit with the agent's limit (applied by the container's init
/// after the cgroup setup) keeps it so. A spec that sets RLIMIT_MEMLOCK itself is left alone.
fn keep_inherited_memlock(process: &mut Process) {
    let mut rlimits = process.rlimits().clone().unwrap_or_default();
    if rlimits
        .iter()
        .any(|r| r.typ() == PosixRlimitType::RlimitMemlock)
    {
        return;
    }
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) } != 0 {
        return;
    }
    let memlock = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitMemlock)
        .soft(current.rlim_cur)
        .hard(current.rlim_max)
        .build();
    match memlock {
        Ok(memlock) => rlimits.push(memlock),
        Err(_) => return,
    }
    process.set_rlimits(Some(rlimits));
}

/// Parses an OCI "process" object for ExecProcess.
pub fn parse_process(json: &[u8], terminal: bool) -> Result<Process, Error> {
    let mut process: Process =
        serde_json::from_slice(json).map_err(|e| invalid(format!("oci_process_json: {e}")))?;
    check_process(&process)?;
    process.set_terminal(Some(terminal));
    Ok(process)
}

/// Parses, validates and adapts a container's config.json for the guest.
pub fn adapt_spec(json: &[u8], ctx: &SpecContext) -> Result<Spec, Error> {
    let mut spec: Spec =
        serde_json::from_slice(json).map_err(|e| invalid(format!("oci_spec_json: {e}")))?;
    if !spec.version().starts_with("1.") {
        return Err(invalid(format!(
            "ociVersion {:?} is not supported (1.x)",
            spec.version()
        )));
    }

    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| invalid("the spec has no process"))?;
    check_process(&process)?;
    process.set_terminal(Some(ctx.terminal));
    keep_inherited_memlock(&mut process);
    spec.set_process(Some(process));

    // The rootfs is what the agent mounted; root.path from the host means nothing here.
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(ctx.rootfs.to_path_buf());
    spec.set_root(Some(root));

    // Mounts.
    let mounts = spec.mounts().clone().unwrap_or_default();
    if mounts.len() > MAX_MOUNTS {
        return Err(invalid("too many mounts"));
    }
    let mut checked = Vec::with_capacity(mounts.len() + ctx.sandbox_files.len());
    for mount in &mounts {
        checked.push(check_mount(mount, ctx)?);
    }
    for (destination, source) in &ctx.sandbox_files {
        if source.exists() && !checked.iter().any(|m| m.destination() == destination) {
            let mut mount = Mount::default();
            mount.set_destination(destination.clone());
            mount.set_typ(Some("bind".into()));
            mount.set_source(Some(source.clone()));
            mount.set_options(Some(vec!["rbind".into(), "rprivate".into()]));
            checked.push(mount);
        }
    }
    spec.set_mounts(Some(checked));

    // Hooks run in the guest's namespaces: their paths must at least be absolute guest paths.
    if let Some(hooks) = spec.hooks() {
        let lists = [
            hooks.prestart(),
            hooks.create_runtime(),
            hooks.create_container(),
            hooks.start_container(),
            hooks.poststart(),
            hooks.poststop(),
        ];
        for hook in lists.into_iter().flatten().flatten() {
            check_container_path("hook path", hook.path())?;
        }
    }

    let mut linux = spec.linux().clone().unwrap_or_default();
    // Device rules (linux.resources.devices) pass through untouched: libcgroups turns them into
    // the eBPF device filter of the container's cgroup (default deny, then the rules in order,
    // then runc's default allow list). libcontainer applies no resources at all to a spec without
    // linux.resources, which on cgroup v2 would leave every device of the guest (the pod's other
    // block devices included) open to a container with CAP_MKNOD: give it an empty one.
    if linux.resources().is_none() {
        linux.set_resources(Some(Default::default()));
    }
    // cgroups: the guest's hierarchy is the agent's; the host's cgroupsPath means nothing here.
    linux.set_cgroups_path(Some(
        PathBuf::from("/kata-like")
            .join(ctx.sandbox_id)
            .join(ctx.container_id),
    ));

    // Namespaces: host paths are meaningless in the guest. The pod's network, IPC and UTS
    // namespaces are the guest's own, so "join the pod's" becomes "stay in the agent's". The pid
    // namespace is the one the shim resolved (ctx.pid_ns), whatever the spec says, and always
    // present: a container never shares the agent's pid namespace, where it would see (and,
    // privileged, signal or trace) the agent and every other container's processes.
    let mut namespaces = vec![pid_ns(ctx)];
    for ns in linux.namespaces().clone().unwrap_or_default() {
        let typ = ns.typ();
        match (typ, ns.path()) {
            (LinuxNamespaceType::Pid, _) => {}
            (_, None) => namespaces.push(ns),
            (
                LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts,
                Some(_),
            ) => {}
            (other, Some(path)) => {
                return Err(invalid(format!(
                    "joining the {other:?} namespace at {} is not allowed in the guest",
                    path.display()
                )))
            }
        }
    }
    let has_uts = namespaces
        .iter()
        .any(|ns| ns.typ() == LinuxNamespaceType::Uts);
    linux.set_namespaces(Some(namespaces));
    if has_uts && spec.hostname().as_deref().unwrap_or("").is_empty() {
        spec.set_hostname(ctx.sandbox_hostname.clone());
    }
    if let Some(hostname) = spec.hostname() {
        check_hostname(hostname)?;
    }
    super::devices::adapt_devices(&mut linux, ctx.guest_dev)?;
    linux.set_seccomp(Some(wall_off_vsock(linux.seccomp().clone())?));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// The address family of vsock sockets (`AF_VSOCK`, socket(2)'s first argument).
const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

/// The error `socket(AF_VSOCK, ...)` gets in a container. EACCES is socket(2)'s documented "you
/// may not create a socket of this family" (programs report it sensibly), and it differs from
/// the EPERM of containerd's runtime/default profile, so a refusal by this wall is recognisable.
pub const VSOCK_SOCKET_ERRNO: u32 = libc::EACCES as u32;

/// The second wall between containers and the agent (issue 12): whatever the container's
/// seccomp profile, `socket(AF_VSOCK, ...)` fails with EACCES. A container without a profile
/// (privileged, unconfined) gets one that allows everything else.
///
/// libseccomp keeps, per syscall, the rule with the fewest argument comparisons (an
/// unconditional allow of `socket` would silently swallow a conditional deny), so every rule
/// that lets `socket` through also gets "argument 0 != AF_VSOCK". A rule that already compares
/// argument 0 is kept as is when it cannot admit AF_VSOCK, and refused otherwise (libcontainer
/// splits two comparisons of one argument into separate, OR-ed rules, so none can be added).
fn wall_off_vsock(seccomp: Option<LinuxSeccomp>) -> Result<LinuxSeccomp, Error> {
    let mut seccomp = seccomp.unwrap_or_else(|| {
        let mut allow_all = LinuxSeccomp::default();
        allow_all.set_default_action(LinuxSeccompAction::ScmpActAllow);
        allow_all
    });
    let mut syscalls = Vec::new();
    for rule in seccomp.syscalls().clone().unwrap_or_default() {
        if !rule.names().iter().any(|name| name == "socket") || denies(rule.action()) {
            syscalls.push(rule);
            continue;
        }
        // The condition is on socket's argument 0 only: the rule's other syscalls (whose
        // argument 0 is something else, an fd...) keep the rule as it was.
        let others: Vec<String> = rule
            .names()
            .iter()
            .filter(|name| *name != "socket")
            .cloned()
            .collect();
        if !others.is_empty() {
            let mut rest = rule.clone();
            rest.set_names(others);
            syscalls.push(rest);
        }
        let mut socket_rule = rule.clone();
        socket_rule.set_names(vec!["socket".into()]);
        let mut args = rule.args().clone().unwrap_or_default();
        let family_checks: Vec<&LinuxSeccompArg> = args.iter().filter(|a| a.index() == 0).collect();
        match family_checks.as_slice() {
            [] => {
                args.push(family_is(LinuxSeccompOperator::ScmpCmpNe)?);
                socket_rule.set_args(Some(args));
            }
            [check] if !admits(check, AF_VSOCK) => {}
            _ => {
                return Err(invalid(format!(
                    "linux.seccomp: the rule {:?} ({:?}) may let socket(AF_VSOCK) through by its \
                     argument 0 comparisons, which the agent cannot narrow: containers may not \
                     open vsock sockets; allow socket without comparing argument 0, or only \
                     families other than AF_VSOCK ({AF_VSOCK})",
                    rule.names(),
                    rule.action()
                )))
            }
        }
        syscalls.push(socket_rule);
    }
    let mut deny_vsock = LinuxSyscall::default();
    deny_vsock.set_names(vec!["socket".into()]);
    deny_vsock.set_action(LinuxSeccompAction::ScmpActErrno);
    deny_vsock.set_errno_ret(Some(VSOCK_SOCKET_ERRNO));
    deny_vsock.set_args(Some(vec![family_is(LinuxSeccompOperator::ScmpCmpEq)?]));
    syscalls.push(deny_vsock);
    seccomp.set_syscalls(Some(syscalls));
    Ok(seccomp)
}

/// The comparison "socket's argument 0 (the address family) `op` AF_VSOCK".
fn family_is(op: LinuxSeccompOperator) -> Result<LinuxSeccompArg, Error> {
    LinuxSeccompArgBuilder::default()
        .index(0usize)
        .op(op)
        .value(AF_VSOCK)
        .build()
        .map_err(|e| Error::internal(format!("building the AF_VSOCK seccomp comparison: {e}")))
}

/// Whether a seccomp action stops the syscall (then it cannot let AF_VSOCK through).
fn denies(action: LinuxSeccompAction) -> bool {
    matches!(
        action,
        LinuxSeccompAction::ScmpActErrno
            | LinuxSeccompAction::ScmpActKill
            | LinuxSeccompAction::ScmpActKillThread
            | LinuxSeccompAction::ScmpActKillProcess
            | LinuxSeccompAction::ScmpActTrap
    )
}

/// Whether an argument comparison can be true for `value`. A masked comparison counts as true:
/// runc and libcontainer disagree on which of value and valueTwo is the mask.
fn admits(check: &LinuxSeccompArg, value: u64) -> bool {
    let operand = check.value();
    match check.op() {
        LinuxSeccompOperator::ScmpCmpNe => value != operand,
        LinuxSeccompOperator::ScmpCmpLt => value < operand,
        LinuxSeccompOperator::ScmpCmpLe => value <= operand,
        LinuxSeccompOperator::ScmpCmpEq => value == operand,
        LinuxSeccompOperator::ScmpCmpGe => value >= operand,
        LinuxSeccompOperator::ScmpCmpGt => value > operand,
        LinuxSeccompOperator::ScmpCmpMaskedEq => true,
    }
}

fn pid_ns(ctx: &SpecContext) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(LinuxNamespaceType::Pid);
    ns.set_path(ctx.pid_ns.clone());
    ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn ctx<'a>(state: &'a Path, rootfs: &'a Path) -> SpecContext<'a> {
        SpecContext {
            container_id: "c1",
            sandbox_id: "sb",
            rootfs,
            state_dir: state,
            terminal: false,
            pid_ns: None,
            sandbox_hostname: Some("pod".into()),
            sandbox_files: vec![],
            guest_dev: Path::new("/dev"),
        }
    }

    fn spec_with(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["/bin/true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
               "root":{{"path":"/host/rootfs"}},"linux":{{"namespaces":[{{"type":"uts"}},{{"type":"network","path":"/proc/1/ns/net"}}],"cgroupsPath":"/host/path"}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn spec_is_adapted_to_the_guest() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let spec = adapt_spec(&spec_with(""), &ctx(state.path(), &rootfs)).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), &rootfs);
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/kata-like/sb/c1"))
        );
        let namespaces = linux.namespaces().as_ref().unwrap();
        let types: Vec<_> = namespaces.iter().map(|ns| ns.typ()).collect();
        assert_eq!(
            types,
            [LinuxNamespaceType::Pid, LinuxNamespaceType::Uts],
            "the host netns path is dropped; a pid namespace is always there"
        );
        assert_eq!(spec.hostname().as_deref(), Some("pod"));
    }

    #[test]
    fn the_pid_namespace_is_the_resolved_one_never_the_specs_host_path() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let with_pid = |pid: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["/bin/true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                   "root":{{"path":"/r"}},"linux":{{"namespaces":[{pid}]}}}}"#
            )
            .into_bytes()
        };
        let pid_entries = |spec: &Spec| -> Vec<Option<PathBuf>> {
            spec.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .filter(|ns| ns.typ() == LinuxNamespaceType::Pid)
                .map(|ns| ns.path().clone())
                .collect()
        };
        let host_path = r#"{"type":"pid","path":"/proc/4242/ns/pid"}"#;
        // Own: a fresh namespace, whatever host path containerd wrote, and also when the spec has
        // no pid namespace at all (the agent's own must never be shared).
        let own = ctx(state.path(), &rootfs);
        for entry in [host_path, r#"{"type":"pid"}"#, r#"{"type":"uts"}"#] {
            let spec = adapt_spec(&with_pid(entry), &own).unwrap();
            assert_eq!(pid_entries(&spec), [None], "{entry}");
        }
        // Pod or target: the resolved guest path replaces the host's.
        let mut joined = ctx(state.path(), &rootfs);
        joined.pid_ns = Some(PathBuf::from("/proc/7/ns/pid"));
        let spec = adapt_spec(&with_pid(host_path), &joined).unwrap();
        assert_eq!(pid_entries(&spec), [Some(PathBuf::from("/proc/7/ns/pid"))]);
    }

    #[test]
    fn the_container_keeps_the_agents_memlock_limit_unless_the_spec_sets_one() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let memlock = |spec: &Spec| {
            let rlimits = spec.process().as_ref().unwrap().rlimits().clone();
            let found: Vec<_> = rlimits
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.typ() == PosixRlimitType::RlimitMemlock)
                .map(|r| (r.soft(), r.hard()))
                .collect();
            found
        };
        let mut own = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit we pass.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut own) },
            0
        );
        let spec = adapt_spec(&spec_with(""), &ctx(state.path(), &rootfs)).unwrap();
        assert_eq!(memlock(&spec), vec![(own.rlim_cur, own.rlim_max)]);

        let json = String::from_utf8(spec_with("")).unwrap().replace(
            r#""cwd":"/""#,
            r#""cwd":"/","rlimits":[{"type":"RLIMIT_MEMLOCK","soft":4096,"hard":8192}]"#,
        );
        let spec = adapt_spec(json.as_bytes(), &ctx(state.path(), &rootfs)).unwrap();
        assert_eq!(memlock(&spec), vec![(4096, 8192)]);
    }

    #[test]
    fn device_rules_pass_through_and_resources_always_exist() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let spec = adapt_spec(&spec_with(""), &ctx(state.path(), &rootfs)).unwrap();
        let resources = spec.linux().as_ref().unwrap().resources().as_ref();
        assert!(resources.is_some(), "an empty linux.resources is added");
        assert!(resources.unwrap().devices().is_none());

        let json = String::from_utf8(spec_with("")).unwrap().replace(
            r#""cgroupsPath":"/host/path""#,
            r#""cgroupsPath":"/host/path","resources":{"devices":[{"allow":false,"access":"rwm"},
               {"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},
               {"allow":false,"type":"b","major":254,"access":"r"}]}"#,
        );
        let spec = adapt_spec(json.as_bytes(), &ctx(state.path(), &rootfs)).unwrap();
        let devices = spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        let rules: Vec<String> = devices
            .iter()
            .map(|d| format!("{}:{d}", d.allow()))
            .collect();
        assert_eq!(
            rules,
            ["false:a *:* rwm", "true:c 1:3 rwm", "false:b 254:* r"]
        );
    }

    #[test]
    fn a_spec_that_allows_every_device_gets_the_guests_devices_not_the_nodes() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let json = String::from_utf8(spec_with("")).unwrap().replace(
            r#""cgroupsPath":"/host/path""#,
            r#""cgroupsPath":"/host/path","resources":{"devices":[{"allow":true,"access":"rwm"}]},
               "devices":[{"path":"/dev/kvm-of-the-node","type":"c","major":10,"minor":232}]"#,
        );
        let spec = adapt_spec(json.as_bytes(), &ctx(state.path(), &rootfs)).unwrap();
        let devices = spec.linux().as_ref().unwrap().devices().clone().unwrap();
        assert!(devices.iter().any(|d| d.path() == Path::new("/dev/null")));
        assert!(devices
            .iter()
            .all(|d| d.path() != Path::new("/dev/kvm-of-the-node")));

        let refused = json.replace(
            r#"{"allow":true,"access":"rwm"}"#,
            r#"{"allow":false,"access":"rwm"}"#,
        );
        let err = adapt_spec(refused.as_bytes(), &ctx(state.path(), &rootfs)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("/dev/kvm-of-the-node"), "{err}");
    }

    #[test]
    fn hostile_mounts_are_rejected() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        std::os::unix::fs::symlink("/etc", state.path().join("escape")).unwrap();
        let cases = [
            r#","mounts":[{"destination":"/a/../../etc","type":"tmpfs","source":"tmpfs"}]"#.to_string(),
            r#","mounts":[{"destination":"relative","type":"tmpfs","source":"tmpfs"}]"#.to_string(),
            r#","mounts":[{"destination":"/x","type":"bind","source":"/etc","options":["rbind"]}]"#.to_string(),
            format!(
                r#","mounts":[{{"destination":"/x","source":"{}","options":["bind"]}}]"#,
                state.path().join("escape").display()
            ),
            format!(
                r#","mounts":[{{"destination":"/x","source":"{}/../..","options":["bind"]}}]"#,
                state.path().display()
            ),
            r#","mounts":[{"destination":"/x","type":"ext4","source":"/dev/vda"}]"#.to_string(),
            r#","mounts":[{"destination":"/x","type":"tmpfs","source":"tmpfs","options":["size=1m,exec"]}]"#.to_string(),
        ];
        for case in cases {
            let err = adapt_spec(&spec_with(&case), &ctx(state.path(), &rootfs)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{case}: {err}");
        }
    }

    #[test]
    fn bind_mounts_of_storages_are_accepted() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        std::fs::create_dir(state.path().join("vol")).unwrap();
        let case = format!(
            r#","mounts":[{{"destination":"/data","source":"{}","options":["rbind","ro"]}}]"#,
            state.path().join("vol").display()
        );
        let spec = adapt_spec(&spec_with(&case), &ctx(state.path(), &rootfs)).unwrap();
        assert_eq!(spec.mounts().as_ref().unwrap().len(), 1);
    }

    #[test]
    fn malformed_specs_are_rejected() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        for json in [
            &b"{not json"[..],
            br#"{"ociVersion":"2.0.0","process":{"args":["a"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
            br#"{"ociVersion":"1.0.0"}"#,
            br#"{"ociVersion":"1.0.0","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
            br#"{"ociVersion":"1.0.0","process":{"args":["a"],"cwd":"rel","user":{"uid":0,"gid":0}}}"#,
        ] {
            let err = adapt_spec(json, &ctx(state.path(), &rootfs)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        }
    }

    fn spec_with_seccomp(profile: &str) -> Vec<u8> {
        let mut spec: serde_json::Value = serde_json::from_slice(&spec_with("")).unwrap();
        spec["linux"]["seccomp"] = serde_json::from_str(profile).unwrap();
        serde_json::to_vec(&spec).unwrap()
    }

    /// A seccomp rule as (action, errno, its argument 0 comparisons).
    type SocketRule = (
        LinuxSeccompAction,
        Option<u32>,
        Vec<(LinuxSeccompOperator, u64)>,
    );

    /// The seccomp rules that name `socket`.
    fn socket_rules(spec: &Spec) -> Vec<SocketRule> {
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        seccomp
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|rule| rule.names().iter().any(|n| n == "socket"))
            .map(|rule| {
                let family = rule
                    .args()
                    .clone()
                    .unwrap_or_default()
                    .iter()
                    .filter(|a| a.index() == 0)
                    .map(|a| (a.op(), a.value()))
                    .collect();
                (rule.action(), rule.errno_ret(), family)
            })
            .collect()
    }

    fn deny_vsock() -> SocketRule {
        (
            LinuxSeccompAction::ScmpActErrno,
            Some(libc::EACCES as u32),
            vec![(LinuxSeccompOperator::ScmpCmpEq, 40)],
        )
    }

    #[test]
    fn a_container_without_seccomp_gets_an_allow_all_profile_that_refuses_vsock_sockets() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        let spec = adapt_spec(&spec_with(""), &ctx(state.path(), &rootfs)).unwrap();
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(socket_rules(&spec), vec![deny_vsock()]);
        assert_eq!(
            seccomp.syscalls().as_ref().unwrap().len(),
            1,
            "nothing else is denied"
        );
    }

    #[test]
    fn a_profile_that_allows_socket_lets_every_family_but_vsock_through() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        // Like containerd's runtime/default: socket in a long unconditional allow list.
        let profile = r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
            "architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["accept","socket","bind"],"action":"SCMP_ACT_ALLOW"},
                        {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":16,"op":"SCMP_CMP_EQ"}]},
                        {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":97}]}"#;
        let spec = adapt_spec(&spec_with_seccomp(profile), &ctx(state.path(), &rootfs)).unwrap();
        let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(seccomp.default_errno_ret(), Some(1));
        let not_vsock = vec![(LinuxSeccompOperator::ScmpCmpNe, 40)];
        assert_eq!(
            socket_rules(&spec),
            vec![
                (LinuxSeccompAction::ScmpActAllow, None, not_vsock),
                (
                    LinuxSeccompAction::ScmpActAllow,
                    None,
                    vec![(LinuxSeccompOperator::ScmpCmpEq, 16)]
                ),
                (LinuxSeccompAction::ScmpActErrno, Some(97), vec![]),
                deny_vsock(),
            ]
        );
        let others = seccomp
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|rule| rule.names().iter().any(|n| n == "accept"))
            .unwrap();
        assert_eq!(
            others.names(),
            &vec!["accept".to_string(), "bind".to_string()]
        );
        assert!(
            others.args().is_none(),
            "accept and bind keep their unconditional allow"
        );
    }

    #[test]
    fn a_profile_that_may_allow_vsock_by_family_comparison_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("rootfs");
        for family_check in [
            r#"{"index":0,"value":40,"op":"SCMP_CMP_EQ"}"#,
            r#"{"index":0,"value":30,"op":"SCMP_CMP_GT"}"#,
            r#"{"index":0,"value":1,"op":"SCMP_CMP_NE"},{"index":0,"value":2,"op":"SCMP_CMP_NE"}"#,
        ] {
            let profile = format!(
                r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{family_check}]}}]}}"#
            );
            let spec = spec_with_seccomp(&profile);
            let err = adapt_spec(&spec, &ctx(state.path(), &rootfs)).unwrap_err();
            assert!(
                err.to_string().contains("AF_VSOCK"),
                "{family_check}: {err}"
            );
        }
    }
}
