//! Validation and adaptation of the OCI spec the shim sends.
//!
//! The shim is trusted less than it seems: everything that names a guest path or a namespace is
//! checked here before libcontainer sees the spec. Mount destinations inside the rootfs are then
//! resolved by libcontainer itself without following symlinks out of the rootfs.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxNamespace, LinuxNamespaceType, Mount, PosixRlimitBuilder, PosixRlimitType, Process, Spec,
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
    /// Path of the sandbox's shared pid namespace, if it has one.
    pub sandbox_pid_ns: Option<PathBuf>,
    pub sandbox_hostname: Option<String>,
    /// Sandbox files bind-mounted into containers that do not mount these paths themselves:
    /// (destination, source).
    pub sandbox_files: Vec<(PathBuf, PathBuf)>,
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
    // namespaces are the guest's own, so "join the pod's" becomes "stay in the agent's"; a pid
    // namespace joins the sandbox's shared one if it has one.
    let mut namespaces = Vec::new();
    for ns in linux.namespaces().clone().unwrap_or_default() {
        let typ = ns.typ();
        match (typ, ns.path()) {
            (_, None) if typ == LinuxNamespaceType::Pid && ctx.sandbox_pid_ns.is_some() => {
                namespaces.push(pid_ns(ctx));
            }
            (_, None) => namespaces.push(ns),
            (
                LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts,
                Some(_),
            ) => {}
            (LinuxNamespaceType::Pid, Some(_)) => {
                if ctx.sandbox_pid_ns.is_some() {
                    namespaces.push(pid_ns(ctx));
                } else {
                    let mut fresh = LinuxNamespace::default();
                    fresh.set_typ(LinuxNamespaceType::Pid);
                    namespaces.push(fresh);
                }
            }
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
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn pid_ns(ctx: &SpecContext) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(LinuxNamespaceType::Pid);
    ns.set_path(ctx.sandbox_pid_ns.clone());
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
            sandbox_pid_ns: None,
            sandbox_hostname: Some("pod".into()),
            sandbox_files: vec![],
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
        assert_eq!(namespaces.len(), 1, "the host netns path is dropped");
        assert_eq!(namespaces[0].typ(), LinuxNamespaceType::Uts);
        assert_eq!(spec.hostname().as_deref(), Some("pod"));
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
}
