//! Per-thread seccomp filters. Each thread gets an allow-list of the syscalls its code
//! makes after start-up; anything else kills the whole process (SECCOMP_RET_KILL_PROCESS).

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Api,
    Vmm,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// What every thread needs: memory management, futexes, signals, time, exit, logging.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
];

/// vCPU threads: KVM_RUN and friends, device register emulation (activating a device adds
/// its fds to the event loop's epoll set).
const VCPU: &[libc::c_long] = &[libc::SYS_ioctl, libc::SYS_epoll_ctl];

/// The event loop: queue processing, block I/O, TAP, vsock sockets.
const VMM: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

/// The API thread: its socket, opening drive paths, vsock power-port connections.
const API: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_openat,
    libc::SYS_socketpair,
    libc::SYS_epoll_ctl,
    libc::SYS_shutdown,
];

/// The allowed syscall numbers for `kind`.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<libc::c_long> {
    let extra = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Api => API,
        ThreadKind::Vmm => VMM,
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// Compiles the filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(kind)
        .into_iter()
        .map(|n| (n, vec![]))
        .collect();
    if kind != ThreadKind::Vcpu {
        // Sockets are made non-blocking with ioctl(FIONBIO); no other ioctl is allowed.
        let fionbio =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)?;
        rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![fionbio])?]);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(f.try_into()?)
}

/// Installs the filter for `kind` on the calling thread.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let prog = filter(kind)?;
    apply_filter(&prog)?;
    Ok(())
}

/// A syscall no thread's filter allows: used by `--seccomp-test-violation`.
pub fn forbidden_syscall() {
    // SAFETY: getppid has no arguments and no side effects.
    unsafe { libc::syscall(libc::SYS_getppid) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_exclude_the_test_violation() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Vmm] {
            assert!(!filter(kind).unwrap().is_empty());
            assert!(!allowed_syscalls(kind).contains(&libc::SYS_getppid));
            assert!(!allowed_syscalls(kind).contains(&libc::SYS_execve));
        }
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&libc::SYS_openat));
        assert!(allowed_syscalls(ThreadKind::Vcpu).contains(&libc::SYS_ioctl));
    }
}

#[cfg(test)]
mod enforcement_tests {
    use super::*;

    /// Runs `f` in a forked child after installing the filter for `kind`; returns the
    /// child's wait status.
    fn in_filtered_child(kind: ThreadKind, f: fn()) -> i32 {
        let prog = filter(kind).unwrap();
        // SAFETY: the child only installs the filter, runs `f` and exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if apply_filter(&prog).is_err() {
                    libc::_exit(99);
                }
                f();
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        }
    }

    #[test]
    fn fionbio_is_allowed_other_ioctls_and_syscalls_kill() {
        let nonblocking: fn() = || {
            let mut one: libc::c_int = 1;
            // SAFETY: FIONBIO reads an int; the fd may not be a socket, only the filter matters.
            unsafe { libc::ioctl(2, libc::FIONBIO, &mut one) };
        };
        let status = in_filtered_child(ThreadKind::Vmm, nonblocking);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
        let tiocgwinsz: fn() = || {
            let mut ws = [0u16; 4];
            // SAFETY: TIOCGWINSZ writes a struct winsize into `ws`.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
        };
        let status = in_filtered_child(ThreadKind::Api, tiocgwinsz);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
        let status = in_filtered_child(ThreadKind::Vcpu, forbidden_syscall);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}"
        );
    }
}
