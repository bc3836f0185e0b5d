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
        if let (Some(uid), Some(gid)) = (cfg.uid, cfg.gid) {
            check("setgroups", libc::setgroups(0, std::ptr::null()))?;
            check("setresgid", libc::setresgid(gid, gid, gid))?;
            check("setresuid", libc::setresuid(uid, uid, uid))?;
        }
        check(
            "prctl(NO_NEW_PRIVS)",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    tracing::info!(dir = %dir.display(), "entered the jail");
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
