//! `kata-like check`: can this node run kata-like pods? Each check says what it found in plain
//! words and, when it fails, how to fix it.

use std::path::{Path, PathBuf};
use std::process::Command;

use kata_like_shim::config::Config;

use crate::containerd_config::{self, RUNTIME_TYPE};
use crate::install::{load_receipt, sha256_hex};
use crate::layout::{self, Layout};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. "KVM".
    pub what: &'static str,
    pub ok: bool,
    pub detail: String,
    /// How to fix it (failures only).
    pub fix: Option<String>,
}

fn ok(what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        what,
        ok: true,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(what: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        what,
        ok: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

pub struct Inputs<'a> {
    pub layout: &'a Layout,
    /// The shim configuration as the shim will read it, or why it cannot be read.
    pub config: Result<(PathBuf, Config), String>,
    pub containerd_bin: &'a Path,
}

pub fn run(i: &Inputs) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match &i.config {
        Ok((path, c)) => {
            let detail = if path.exists() {
                format!("{} is valid", path.display())
            } else {
                format!(
                    "no file at {}: the shim's built-in defaults",
                    path.display()
                )
            };
            out.push(ok("configuration", detail));
            Some(c)
        }
        Err(e) => {
            out.push(fail(
                "configuration",
                e.clone(),
                "fix the named setting (shim/README.md lists them) or reinstall",
            ));
            None
        }
    };
    if let Some(c) = config {
        out.push(kvm(&c.vmm.path));
        out.extend(artifacts(i.layout, c));
        out.push(tool(
            "mkfs.erofs",
            &c.mkfs_erofs,
            "apt install erofs-utils (the shim turns image layers into erofs images)",
        ));
        out.push(virtiofsd(&c.virtiofsd));
    }
    out.push(containerd(i));
    out.push(cgroup_v2());
    out.push(module(
        "tun",
        &["tun"],
        "pod VM NICs are taps opened through /dev/net/tun",
    ));
    out.push(module(
        "tc redirect",
        &["act_mirred", "sch_ingress"],
        "the pod VM's NIC is joined to the pod's veth with tc (ingress qdisc, mirred action)",
    ));
    out.push(tool(
        "iptables",
        Path::new("/usr/sbin/iptables"),
        "apt install iptables (kubectl port-forward into a pod uses a nat rule in its namespace)",
    ));
    out.push(ok(
        "vsock",
        "nothing needed on the host: kata-like-vmm provides the guest's virtio-vsock over a Unix socket",
    ));
    out
}

fn kvm(vmm: &Path) -> Finding {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return fail(
            "KVM",
            "/dev/kvm does not exist",
            "enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd \
             (modprobe kvm_intel); in a cloud VM, pick an instance type with nested virtualization",
        );
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return fail(
            "KVM",
            format!("/dev/kvm cannot be opened for reading and writing: {e}"),
            "run as root (containerd and the shim do), or fix /dev/kvm's permissions",
        );
    }
    let out = match Command::new(vmm).arg("probe").output() {
        Ok(out) => out,
        Err(e) => {
            return fail(
                "KVM",
                format!("cannot run {} probe: {e}", vmm.display()),
                "install kata-like (kata-like install) or fix [vmm] path",
            )
        }
    };
    if !out.status.success() {
        return fail(
            "KVM",
            format!(
                "/dev/kvm opens but cannot run a guest: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "check dmesg for KVM errors; another hypervisor may hold the virtualization extensions",
        );
    }
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ns = probe["cpl0_loop_ns"].as_f64().unwrap_or(f64::NAN);
    if probe["linux_capable"].as_bool() == Some(true) {
        ok(
            "KVM",
            format!(
                "/dev/kvm runs guest code at hardware speed ({ns:.1} ns per probe loop iteration)"
            ),
        )
    } else {
        fail(
            "KVM",
            format!(
                "/dev/kvm is too slow for a Linux guest ({ns:.0} ns per probe loop iteration): it is \
                 emulated in software, e.g. a nested hypervisor without hardware support"
            ),
            "run on hardware with VT-x/AMD-V, or enable hardware-assisted nested virtualization \
             for this VM (kvm_intel nested=1 / kvm_amd nested=1 on its host)",
        )
    }
}

fn artifacts(layout: &Layout, c: &Config) -> Vec<Finding> {
    let receipt = load_receipt(layout).ok().flatten();
    let installed_sha = |path: &Path| -> Option<String> {
        let r = receipt.as_ref()?;
        r.files
            .iter()
            .find(|(rel, _)| layout.installed(rel) == path)
            .map(|(_, sha)| sha.clone())
    };
    let mut out = Vec::new();
    let mut files: Vec<(&'static str, PathBuf, &'static [u8])> = vec![
        ("VMM", c.vmm.path.clone(), b"\x7fELF"),
        ("guest kernel", c.vmm.kernel.clone(), b"\x7fELF"),
    ];
    if let Some(initrd) = &c.vmm.initrd {
        files.push(("guest initramfs", initrd.clone(), b"070701"));
    }
    for (what, path, magic) in files {
        let host = layout.host(&path);
        let data = match std::fs::read(&host) {
            Ok(d) => d,
            Err(e) => {
                out.push(fail(
                    what,
                    format!("{} cannot be read: {e}", path.display()),
                    format!(
                        "install kata-like (kata-like install), or point the shim configuration's \
                         [vmm] {} at the file",
                        match what {
                            "VMM" => "path",
                            "guest kernel" => "kernel",
                            _ => "initrd",
                        }
                    ),
                ));
                continue;
            }
        };
        if !data.starts_with(magic) {
            out.push(fail(
                what,
                format!("{} is not a {what} (unexpected file format)", path.display()),
                "reinstall kata-like (kata-like install) from a payload built by deploy/build-payload",
            ));
            continue;
        }
        match installed_sha(&path) {
            Some(sha) if sha != sha256_hex(&data) => out.push(fail(
                what,
                format!(
                    "{} is not the file kata-like installed (sha256 differs): kernel, initramfs, \
                     agent and VMM must come from one build",
                    path.display()
                ),
                "run kata-like install again with the payload of one build",
            )),
            Some(_) => out.push(ok(what, format!("{} is the installed one", path.display()))),
            None => out.push(ok(what, format!("{} is present", path.display()))),
        }
    }
    out
}

fn containerd(i: &Inputs) -> Finding {
    let main = i.layout.host(&i.layout.containerd_config);
    let out = Command::new(i.containerd_bin)
        .arg("--config")
        .arg(&main)
        .args(["config", "dump"])
        .output();
    let dump = match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => {
            return fail(
                "containerd",
                format!(
                    "containerd cannot read {}: {}",
                    i.layout.containerd_config.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                "fix containerd's configuration file",
            )
        }
        Err(e) => {
            return fail(
                "containerd",
                format!("cannot run {}: {e}", i.containerd_bin.display()),
                "install containerd 1.6 (apt install containerd) or pass --containerd-bin",
            )
        }
    };
    let Some((ty, path, config_path)) = containerd_config::registered_runtime(&dump) else {
        return fail(
            "containerd",
            format!(
                "the runtime handler `kata-like` is not registered in {}",
                i.layout.containerd_config.display()
            ),
            "run `kata-like install` (it registers the runtime and restarts containerd)",
        );
    };
    if ty != RUNTIME_TYPE {
        return fail(
            "containerd",
            format!("the runtime `kata-like` has runtime_type {ty:?}, not {RUNTIME_TYPE:?}"),
            "run `kata-like install` again",
        );
    }
    let shim = if path.is_empty() {
        None
    } else {
        Some(PathBuf::from(&path))
    };
    if let Some(shim) = &shim {
        if !i.layout.host(shim).is_file() {
            return fail(
                "containerd",
                format!("the registered shim {} does not exist", shim.display()),
                "run `kata-like install` again",
            );
        }
    }
    if !config_path.is_empty() && !i.layout.host(Path::new(&config_path)).is_file() {
        return fail(
            "containerd",
            format!("the registered shim configuration {config_path} does not exist"),
            "run `kata-like install` again",
        );
    }
    ok(
        "containerd",
        format!(
            "runtime handler `kata-like` registered (shim {}, configuration {})",
            shim.map(|s| s.display().to_string())
                .unwrap_or_else(|| "on containerd's PATH".into()),
            if config_path.is_empty() {
                "default"
            } else {
                &config_path
            }
        ),
    )
}

fn cgroup_v2() -> Finding {
    match std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        Ok(controllers) => {
            let missing: Vec<&str> = ["cpu", "memory", "pids"]
                .into_iter()
                .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
                .collect();
            if missing.is_empty() {
                ok("cgroup v2", "unified hierarchy with cpu, memory and pids")
            } else {
                fail(
                    "cgroup v2",
                    format!("the cgroup v2 root lacks the {missing:?} controller(s)"),
                    "enable them in the kernel (CONFIG_MEMCG, CONFIG_CGROUP_PIDS, CONFIG_CGROUP_SCHED)",
                )
            }
        }
        Err(_) => fail(
            "cgroup v2",
            "/sys/fs/cgroup is not a cgroup v2 (unified) hierarchy",
            "boot with systemd.unified_cgroup_hierarchy=1 (the default of Debian 11 and later)",
        ),
    }
}

/// Kernel modules: loaded, built in, or loadable.
fn module(what: &'static str, names: &[&str], why: &str) -> Finding {
    let builtin =
        std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", kernel_release()))
            .unwrap_or_default();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|m| {
            let loaded = Path::new("/sys/module").join(m).exists();
            let built_in = builtin.lines().any(|l| l.ends_with(&format!("/{m}.ko")));
            let loadable = Command::new("modprobe")
                .args(["-n", "-q", m])
                .status()
                .is_ok_and(|s| s.success());
            !(loaded || built_in || loadable)
        })
        .collect();
    if missing.is_empty() {
        ok(what, format!("{} available ({why})", names.join(", ")))
    } else {
        fail(
            what,
            format!("kernel module(s) {missing:?} are neither loaded nor loadable: {why}"),
            format!(
                "install this kernel's modules package, then modprobe {}",
                missing.join(" ")
            ),
        )
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// virtiofsd must run here (it links libseccomp and libcap-ng), not just exist.
fn virtiofsd(path: &Path) -> Finding {
    match Command::new(path).arg("--version").output() {
        Ok(out) if out.status.success() => ok(
            "virtiofsd",
            format!(
                "{} runs ({})",
                path.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        ),
        Ok(out) => fail(
            "virtiofsd",
            format!(
                "{} does not run: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "apt install libseccomp2 libcap-ng0 (its libraries), or reinstall kata-like",
        ),
        Err(e) => fail(
            "virtiofsd",
            format!("cannot run {}: {e}", path.display()),
            "install kata-like (kata-like install), or point the shim configuration's \
             `virtiofsd` at the Rust virtiofsd (every pod's volumes are served by it)",
        ),
    }
}

fn tool(what: &'static str, path: &Path, fix: &str) -> Finding {
    if path.is_file() {
        ok(what, format!("{} is present", path.display()))
    } else {
        fail(what, format!("{} is missing", path.display()), fix)
    }
}

/// The report as printed.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let mark = if f.ok { "ok  " } else { "FAIL" };
        // A detail of several lines (a TOML parse error) keeps them, indented under its own.
        let detail = f.detail.trim_end().replace('\n', "\n     ");
        s.push_str(&format!("{mark} {}: {detail}\n", f.what));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("     fix: {fix}\n"));
        }
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if failed == 0 {
        s.push_str("this node can run kata-like pods\n");
    } else {
        s.push_str(&format!(
            "this node cannot run kata-like pods: {failed} problem(s) above\n"
        ));
    }
    s
}

/// Where the shim's configuration is, as the shim will look for it when started by the
/// installed runtime: the installed one, else the shim's own default resolution.
pub fn shim_config_path(layout: &Layout) -> Option<PathBuf> {
    let installed = layout.installed(layout::SHIM_CONFIG);
    layout
        .host(&installed)
        .is_file()
        .then(|| layout.host(&installed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gives_a_fix_for_every_failure() {
        let text = render(&[
            ok("KVM", "fine"),
            fail("containerd", "not registered", "run `kata-like install`"),
        ]);
        assert!(text.contains("ok   KVM: fine"));
        assert!(text.contains("FAIL containerd: not registered\n     fix: run `kata-like install`"));
        assert!(text.contains("cannot run kata-like pods: 1 problem"));
    }

    #[test]
    fn missing_and_foreign_artifacts_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout {
            root: "/".into(),
            prefix: dir.path().join("prefix"),
            containerd_config: dir.path().join("config.toml"),
        };
        let mut c = Config::default();
        c.vmm.kernel = dir.path().join("vmlinux");
        c.vmm.initrd = Some(dir.path().join("initramfs.cpio"));
        std::fs::write(dir.path().join("initramfs.cpio"), b"not a cpio").expect("w");
        let found = artifacts(&layout, &c);
        let kernel = found
            .iter()
            .find(|f| f.what == "guest kernel")
            .expect("kernel");
        assert!(
            !kernel.ok && kernel.detail.contains("vmlinux"),
            "{kernel:?}"
        );
        assert!(kernel
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("[vmm] kernel")));
        let initrd = found
            .iter()
            .find(|f| f.what == "guest initramfs")
            .expect("initrd");
        assert!(
            !initrd.ok && initrd.detail.contains("unexpected file format"),
            "{initrd:?}"
        );
    }
}
