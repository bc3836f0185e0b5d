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

/// vCPU threads: nothing beyond COMMON but their KVM ioctls (added with their arguments in
/// `filter`). Register emulation only records what the guest asked for and signals eventfds
/// (`write`): device activation, reset and queue work run on the VMM thread, so no socket,
/// epoll or file I/O is reachable from a guest exit on a vCPU thread.
const VCPU: &[libc::c_long] = &[];

/// The event loop: queue processing, block I/O, TAP, vsock sockets (including the internal
/// connection the API's graceful stop asks for), device activation and reset.
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
    libc::SYS_socketpair,
    libc::SYS_shutdown,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    // Snapshot: the memory file's length (its holes), on files the API thread opened.
    libc::SYS_ftruncate,
];

/// The API thread: its own socket (requests and SCM_RIGHTS fds in with recvmsg, responses out
/// with send) and opening drive paths. Device sockets are the VMM thread's: the API asks it
/// through `VmmRequests`.
const API: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_openat,
    // A failed snapshot removes the files it had created (std's remove_file is unlink).
    libc::SYS_unlink,
    libc::SYS_unlinkat,
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

vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_REGS,
    kvm_bindings::KVMIO,
    0x81,
    kvm_bindings::kvm_regs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_SREGS,
    kvm_bindings::KVMIO,
    0x83,
    kvm_bindings::kvm_sregs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_MP_STATE,
    kvm_bindings::KVMIO,
    0x98,
    kvm_bindings::kvm_mp_state
);

// What a snapshot reads: each parked vCPU its own state on its thread, the VMM thread the
// VM's (irqchip, PIT, clock).
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSRS,
    kvm_bindings::KVMIO,
    0x88,
    kvm_bindings::kvm_msrs
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_LAPIC,
    kvm_bindings::KVMIO,
    0x8e,
    kvm_bindings::kvm_lapic_state
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_CPUID2,
    kvm_bindings::KVMIO,
    0x91,
    kvm_bindings::kvm_cpuid2
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_DEBUGREGS,
    kvm_bindings::KVMIO,
    0xa1,
    kvm_bindings::kvm_debugregs
);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XSAVE,
    kvm_bindings::KVMIO,
    0xa4,
    kvm_bindings::kvm_xsave
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_XCRS,
    kvm_bindings::KVMIO,
    0xa6,
    kvm_bindings::kvm_xcrs
);
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_IRQCHIP,
    kvm_bindings::KVMIO,
    0x62,
    kvm_bindings::kvm_irqchip
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_CLOCK,
    kvm_bindings::KVMIO,
    0x7c,
    kvm_bindings::kvm_clock_data
);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_PIT2,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_bindings::kvm_pit_state2
);

/// ioctl's request argument (the low 32 bits: the kernel takes it as an unsigned int) is
/// `request`.
fn ioctl_request_is(request: libc::c_ulong) -> Result<SeccompCondition, Error> {
    Ok(SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        request,
    )?)
}

/// Compiles the filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(kind)
        .into_iter()
        .map(|n| (n, vec![]))
        .collect();
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN, the state reads logged when a guest dies or is paused, and the rest
            // of the state a snapshot saves.
            let mut allowed = Vec::new();
            for request in [
                KVM_RUN(),
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MP_STATE(),
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_TSC_KHZ(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
            ] {
                allowed.push(SeccompRule::new(vec![ioctl_request_is(request)?])?);
            }
            rules.insert(libc::SYS_ioctl, allowed);
        }
        ThreadKind::Vmm => {
            // Sockets are made non-blocking with ioctl(FIONBIO); the VM's state is read for
            // a snapshot. No other ioctl is allowed.
            let mut allowed = Vec::new();
            for request in [
                libc::FIONBIO,
                KVM_GET_IRQCHIP(),
                KVM_GET_CLOCK(),
                KVM_GET_PIT2(),
            ] {
                allowed.push(SeccompRule::new(vec![ioctl_request_is(request)?])?);
            }
            rules.insert(libc::SYS_ioctl, allowed);
        }
        ThreadKind::Api => {}
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

/// The process outside the jail only waits for the VMM `child`, forwards a termination
/// request as SIGKILL to it, and exits with its status (writes: an error message).
pub fn jail_parent_filter(child: libc::pid_t) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_wait4,
        libc::SYS_write,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(|n| (n, vec![]))
    .collect();
    let kill_child = SeccompRule::new(vec![
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, child as u64)?,
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::SIGKILL as u64,
        )?,
    ])?;
    rules.insert(libc::SYS_kill, vec![kill_child]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(f.try_into()?)
}

/// Installs `filter` on the calling thread.
pub fn install(filter: &BpfProgram) -> Result<(), Error> {
    apply_filter(filter)?;
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
        // Socket and epoll work belongs to the VMM thread only.
        for kind in [ThreadKind::Vcpu, ThreadKind::Api] {
            for sys in [
                libc::SYS_epoll_ctl,
                libc::SYS_socket,
                libc::SYS_socketpair,
                libc::SYS_connect,
                libc::SYS_shutdown,
            ] {
                assert!(!allowed_syscalls(kind).contains(&sys), "{kind:?}: {sys}");
            }
        }
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&libc::SYS_openat));
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&libc::SYS_pread64));
    }

    #[test]
    fn kvm_ioctl_numbers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
    }
}

#[cfg(test)]
mod enforcement_tests {
    use super::*;

    /// Runs `f` in a forked child after installing the filter for `kind`; returns the
    /// child's wait status.
    fn in_filtered_child(kind: ThreadKind, f: fn()) -> i32 {
        in_filtered_child_prog(&filter(kind).unwrap(), f)
    }

    /// Runs `f` in a forked child after installing `prog`; returns the child's wait status.
    fn in_filtered_child_prog(prog: &BpfProgram, f: fn()) -> i32 {
        // SAFETY: the child only installs the filter, runs `f` and exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if apply_filter(prog).is_err() {
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

    fn exited_ok(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn fionbio() {
        let mut one: libc::c_int = 1;
        // SAFETY: FIONBIO reads an int; the fd may not be a socket, only the filter matters.
        unsafe { libc::ioctl(2, libc::FIONBIO, &mut one) };
    }

    fn kvm_run_on_a_bad_fd() {
        // SAFETY: fails with EBADF; only the filter matters.
        unsafe { libc::ioctl(-1, KVM_RUN(), 0) };
    }

    fn epoll_ctl() {
        // SAFETY: fails with EBADF; only the filter matters.
        unsafe { libc::epoll_ctl(-1, libc::EPOLL_CTL_DEL, -1, std::ptr::null_mut()) };
    }

    fn socketpair() {
        let mut fds = [0; 2];
        // SAFETY: valid out-array; the fds are left to the child's exit.
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    }

    /// The process outside the jail may SIGKILL its child and nothing else: no other signal,
    /// no other process, no other syscall.
    #[test]
    fn jail_parent_may_only_wait_and_kill_its_child() {
        // SAFETY: the children only install the filter, make one call and exit.
        unsafe {
            let run = |target_is_child: bool, sig: libc::c_int| -> i32 {
                let sleeper = libc::fork();
                assert!(sleeper >= 0);
                if sleeper == 0 {
                    libc::pause();
                    libc::_exit(0);
                }
                let prog = jail_parent_filter(sleeper).unwrap();
                let pid = libc::fork();
                assert!(pid >= 0);
                if pid == 0 {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    if install(&prog).is_err() {
                        libc::_exit(99);
                    }
                    let target = if target_is_child {
                        sleeper
                    } else {
                        sleeper + 1_000_000
                    };
                    libc::kill(target, sig);
                    libc::_exit(0);
                }
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                libc::kill(sleeper, libc::SIGKILL);
                let mut s = 0;
                libc::waitpid(sleeper, &mut s, 0);
                status
            };
            let status = run(true, libc::SIGKILL);
            assert!(exited_ok(status), "kill(child, SIGKILL): {status:#x}");
            let status = run(true, libc::SIGTERM);
            assert!(
                killed_by_sigsys(status),
                "kill(child, SIGTERM): {status:#x}"
            );
            let status = run(false, libc::SIGKILL);
            assert!(
                killed_by_sigsys(status),
                "kill(other, SIGKILL): {status:#x}"
            );
        }
        let status = in_filtered_child_prog(&jail_parent_filter(1).unwrap(), forbidden_syscall);
        assert!(killed_by_sigsys(status), "getppid: {status:#x}");
    }

    #[test]
    fn fionbio_is_allowed_other_ioctls_and_syscalls_kill() {
        let status = in_filtered_child(ThreadKind::Vmm, fionbio);
        assert!(exited_ok(status), "status {status:#x}");
        let tiocgwinsz: fn() = || {
            let mut ws = [0u16; 4];
            // SAFETY: TIOCGWINSZ writes a struct winsize into `ws`.
            unsafe { libc::ioctl(0, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
        };
        let status = in_filtered_child(ThreadKind::Api, tiocgwinsz);
        assert!(killed_by_sigsys(status), "status {status:#x}");
        let status = in_filtered_child(ThreadKind::Vcpu, forbidden_syscall);
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    /// vCPU threads may run KVM_RUN but neither touch the epoll set nor make sockets non-blocking;
    /// the API thread hands socket work to the VMM thread.
    #[test]
    fn vcpu_and_api_threads_cannot_do_socket_or_epoll_work() {
        let status = in_filtered_child(ThreadKind::Vcpu, kvm_run_on_a_bad_fd);
        assert!(exited_ok(status), "vCPU KVM_RUN: status {status:#x}");
        for (kind, f, what) in [
            (ThreadKind::Vcpu, epoll_ctl as fn(), "epoll_ctl"),
            (ThreadKind::Vcpu, fionbio, "FIONBIO"),
            (ThreadKind::Vcpu, socketpair, "socketpair"),
            (ThreadKind::Api, epoll_ctl, "epoll_ctl"),
            (ThreadKind::Api, socketpair, "socketpair"),
            (ThreadKind::Api, kvm_run_on_a_bad_fd, "KVM_RUN"),
            (ThreadKind::Vmm, kvm_run_on_a_bad_fd, "KVM_RUN"),
        ] {
            let status = in_filtered_child(kind, f);
            assert!(
                killed_by_sigsys(status),
                "{kind:?} {what}: status {status:#x}"
            );
        }
        for f in [epoll_ctl as fn(), socketpair] {
            let status = in_filtered_child(ThreadKind::Vmm, f);
            assert!(exited_ok(status), "VMM thread: status {status:#x}");
        }
    }
}
