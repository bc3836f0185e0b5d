//! Dropping host access before guest code runs: namespaces, pivot_root into the jail
//! directory, unprivileged ids, rlimits, no inherited fds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use kata_like_vmm_contract::JailConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Syscall(&'static str, std::io::Error),
    #[error("--jail-dir is required")]
    NoDir,
    #[error("jail directory path is not valid")]
    BadPath,
    #[error("--uid and --gid must not be 0: the jailed VMM runs unprivileged")]
    RootIds,
    #[error("the seccomp filter of the process outside the jail: {0}")]
    Seccomp(#[from] crate::seccomp::Error),
}

/// The uid and gid the jailed VMM runs as when none are given: nobody/nogroup.
pub const DEFAULT_ID: u32 = 65534;

/// The unprivileged ids both jail processes switch to.
#[derive(Clone, Copy, Debug)]
struct Ids {
    uid: u32,
    gid: u32,
}

fn check(name: &'static str, ret: libc::c_int) -> Result<(), Error> {
    if ret < 0 {
        Err(Error::Syscall(name, std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Closes every fd from 3 up except `keep`.
pub fn close_inherited_fds(keep: &[RawFd]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing fds we inherited and do not use; the directory fd itself is gone.
        unsafe { libc::close(fd) };
    }
}

static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_kill(_: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe. The jailed VMM is PID 1 of its namespace and
        // ignores unhandled signals, so termination requests become SIGKILL.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Enters the jail. Returns in the jailed child only; the parent waits for the child and
/// exits with its status (128 + signal if it was killed).
pub fn enter(cfg: &JailConfig) -> Result<(), Error> {
    let dir = cfg.jail_dir.as_deref().ok_or(Error::NoDir)?;
    let ids = Ids {
        uid: cfg.uid.unwrap_or(DEFAULT_ID),
        gid: cfg.gid.unwrap_or(DEFAULT_ID),
    };
    if ids.uid == 0 || ids.gid == 0 {
        return Err(Error::RootIds);
    }
    // SAFETY: plain syscalls; the process is single-threaded here (no threads started yet).
    unsafe {
        check(
            "unshare",
            libc::unshare(
                libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWNET,
            ),
        )?;
        let pid = libc::fork();
        if pid < 0 {
            return Err(Error::Syscall("fork", std::io::Error::last_os_error()));
        }
        if pid > 0 {
            CHILD_PID.store(pid, Ordering::SeqCst);
            close_inherited_fds(&[]);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::signal(sig, forward_kill as *const () as libc::sighandler_t);
            }
            // This process stays outside the chroot and in the host's pid namespace: it keeps
            // nothing but waiting for the VMM, killing it and exiting.
            if let Err(e) = confine_parent(pid, ids) {
                eprintln!("kata-like-vmm: jail: confining the process outside the jail: {e}");
                libc::kill(pid, libc::SIGKILL);
                libc::_exit(1);
            }
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    libc::_exit(1);
                }
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                1
            };
            libc::_exit(code);
        }
        check(
            "prctl(PDEATHSIG)",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
        )?;
    }
    pivot_into(dir)?;
    // SAFETY: plain syscalls on our own process.
    unsafe {
        let name = b"kata-like-vmm";
        check(
            "sethostname",
            libc::sethostname(name.as_ptr().cast(), name.len()),
        )?;
        set_rlimit(libc::RLIMIT_CORE, 0)?;
        set_rlimit(libc::RLIMIT_NOFILE, 4096)?;
    }
    drop_privileges(ids)?;
    // SAFETY: prctl on our own process.
    unsafe {
        // Changing the uid cleared the parent-death signal set after fork: set it again.
        check(
            "prctl(PDEATHSIG)",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
        )?;
    }
    tracing::info!(dir = %dir.display(), uid = ids.uid, gid = ids.gid, "entered the jail");
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), Error> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: valid rlimit pointer.
    check("setrlimit", unsafe { libc::setrlimit(resource, &lim) })
}

/// Makes `dir` the root of a private mount namespace.
fn pivot_into(dir: &Path) -> Result<(), Error> {
    let c_dir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::BadPath)?;
    let dot = c".";
    let root = c"/";
    // SAFETY: valid NUL-terminated strings; mount/pivot_root act on our own namespace.
    unsafe {
        check(
            "mount(/, private)",
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        check(
            "mount(jail, bind)",
            libc::mount(
                c_dir.as_ptr(),
                c_dir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
        )?;
        check("chdir(jail)", libc::chdir(c_dir.as_ptr()))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
        )?;
        check(
            "umount(old root)",
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir(/)", libc::chdir(root.as_ptr()))?;
    }
    Ok(())
}

/// `struct __user_cap_header_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` of capset(2); version 3 takes two (64 capability bits).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Leaves the calling (single-threaded) process with no capability in any set, `ids` as
/// every uid and gid, no supplementary groups and no_new_privs. The bounding set goes first:
/// dropping it needs CAP_SETPCAP, which the uid change takes away.
fn drop_privileges(ids: Ids) -> Result<(), Error> {
    // SAFETY: plain syscalls on our own process with valid pointers.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                let err = std::io::Error::last_os_error();
                // EINVAL: past the last capability this kernel knows.
                if err.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(Error::Syscall("prctl(CAPBSET_DROP)", err));
            }
        }
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(ids.gid, ids.gid, ids.gid))?;
        check("setresuid", libc::setresuid(ids.uid, ids.uid, ids.uid))?;
        // The uid change emptied the permitted, effective and ambient sets; the inheritable
        // set stays until cleared here.
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            "capset",
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int,
        )?;
        check(
            "prctl(CAP_AMBIENT_CLEAR_ALL)",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
        )?;
        check(
            "prctl(NO_NEW_PRIVS)",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    Ok(())
}

/// Confines the process that waits outside the jail for the VMM `child`: the same ids and no
/// capabilities, then a filter that allows only waiting, killing `child` and exiting.
fn confine_parent(child: libc::pid_t, ids: Ids) -> Result<(), Error> {
    let filter = crate::seccomp::jail_parent_filter(child)?;
    drop_privileges(ids)?;
    crate::seccomp::install(&filter)?;
    Ok(())
}
