//! PID 1 duties in the guest: the early mounts, kernel command-line options, console messages
//! and powering the VM off (exit port 0xf4 of the kata-like VMM).

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Exit port of the VMM: one byte written there is the VMM's exit status.
pub const EXIT_PORT: u16 = 0xf4;

/// Options read from the kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelOptions {
    /// `agent.debug` (or `agent.debug=1`): debug logs on the console.
    pub debug: bool,
    /// `agent.log=<filter>`: a tracing filter such as `info` or `kata_like_agent=trace`.
    pub log: Option<String>,
}

pub fn parse_cmdline(cmdline: &str) -> KernelOptions {
    let mut options = KernelOptions::default();
    for word in cmdline.split_whitespace() {
        match word.split_once('=') {
            None if word == "agent.debug" => options.debug = true,
            Some(("agent.debug", value)) => options.debug = !matches!(value, "0" | "false" | "no"),
            Some(("agent.log", value)) if !value.is_empty() => options.log = Some(value.into()),
            _ => {}
        }
    }
    options
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
    }
}

/// The initramfs root (rootfs) cannot be pivot_root'ed away from, which the container runtime
/// needs. Re-root onto a bind mount of the same tree (as switch_root does, without copying), so
/// "/" becomes an ordinary mount with a parent.
fn leave_rootfs() -> Result<(), String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    if !root_is_initial_rootfs(&mountinfo) {
        return Ok(());
    }
    let new_root = "/.kata-like-root";
    std::fs::create_dir_all(new_root).map_err(|e| format!("mkdir {new_root}: {e}"))?;
    mount(
        Some("/"),
        new_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind / on {new_root}: {e}"))?;
    std::env::set_current_dir(new_root).map_err(|e| format!("chdir {new_root}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move {new_root} to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Whether "/" is the kernel's initial rootfs (the initramfs): the mount at "/" whose file system
/// type is `rootfs` and which is its own parent (the root of the mount tree). After
/// `leave_rootfs`, "/" is a bind mount whose parent is that rootfs, so this is false.
fn root_is_initial_rootfs(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        // "<id> <parent> <major:minor> <root> <mount point> <options> ... - <fstype> <source> ..."
        let mut fields = line.split_whitespace();
        let (Some(id), Some(parent), Some(_), Some(_), Some(mount_point)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return false;
        };
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split_whitespace().next());
        mount_point == "/" && id == parent && fstype == Some("rootfs")
    })
}

/// Mounts what a container host needs. Idempotent for what the kernel already mounted.
pub fn setup_guest() -> Result<(), String> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    // /proc first: leave_rootfs reads mountinfo.
    mount_fs("proc", "/proc", "proc", nosuid_noexec_nodev, None)?;
    leave_rootfs()?;
    mount_fs("proc", "/proc", "proc", nosuid_noexec_nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        nosuid_noexec_nodev,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_noexec_nodev,
        Some("nsdelegate"),
    )?;
    // Controllers must be enabled at the root for container cgroups to use them.
    if let Ok(available) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: String = available
            .split_whitespace()
            .map(|c| format!("+{c} "))
            .collect();
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.trim_end()) {
            return Err(format!("enabling cgroup controllers: {e}"));
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    Ok(())
}

/// Sets the I/O port permission and writes the exit status to the VMM's exit port.
fn write_exit_port(status: u8) {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(EXIT_PORT), 1, 1) } != 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: port 0xf4 is the VMM's exit port; writing it stops the VM.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") EXIT_PORT, in("al") status, options(nomem, nostack));
    }
}

/// Powers the VM off with `status` (0 = clean). Never returns.
pub fn poweroff(status: u8) -> ! {
    nix::unistd::sync();
    write_exit_port(status);
    // Not under the kata-like VMM (or the write did not stop us): ask the kernel.
    // SAFETY: reboot(2) with the power-off command has no memory arguments.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

/// Prints a fatal error on the console and powers off with status 1 (PID 1 must not exit: the
/// kernel would panic and hide the message).
pub fn fatal(message: &str) -> ! {
    eprintln!("kata-like-agent: fatal: {message}");
    poweroff(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_initial_rootfs_even_with_proc_mounted() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=61380k\n\
                         12 1 0:13 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n";
        assert!(root_is_initial_rootfs(initramfs));
        // After leave_rootfs, seen from the new root: "/" is a bind mount of rootfs whose parent
        // (the original rootfs mount, outside the new root) is no longer listed.
        let rerooted = "13 1 0:2 / / rw - rootfs rootfs rw\n\
                        14 13 0:13 / /proc rw - proc proc rw\n";
        assert!(!root_is_initial_rootfs(rerooted));
        let disk_root = "21 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw\n";
        assert!(!root_is_initial_rootfs(disk_root));
        assert!(!root_is_initial_rootfs(""));
        assert!(!root_is_initial_rootfs("garbage\n1 1\n"));
    }

    #[test]
    fn kernel_options_are_read() {
        assert_eq!(
            parse_cmdline("console=ttyS0 quiet"),
            KernelOptions::default()
        );
        assert!(parse_cmdline("agent.debug panic=-1").debug);
        assert!(parse_cmdline("agent.debug=1").debug);
        assert!(!parse_cmdline("agent.debug=0").debug);
        assert_eq!(
            parse_cmdline("agent.log=kata_like_agent=trace")
                .log
                .as_deref(),
            Some("kata_like_agent=trace")
        );
    }
}
