//! The bridge to youki's libcontainer.
//!
//! libcontainer clones the calling process (intermediate and init processes) and runs a lot of
//! code in the clones; doing that from the multi-threaded agent could deadlock a clone on a lock
//! (malloc, tracing) held by another thread at clone time. So every operation that forks runs in
//! a fresh, single-threaded helper: the agent re-executes itself as
//! `kata-like-agent __runtime <request-json>`, the helper performs one libcontainer call, writes
//! one JSON [`RuntimeResponse`] to fd 3 and exits. The helper's stdin/stdout/stderr are the
//! container process's stdio, which the container process inherits. Container processes are
//! created as children of the helper and become the agent's children (subreaper/PID 1) when the
//! helper exits; see `reaper.rs` for how their exit statuses are collected.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::reaper::{wait_exit, Reaper};

/// Hidden first argument that turns the agent binary into a runtime helper.
pub const HELPER_ARG: &str = "__runtime";
/// File descriptor on which the helper writes its response.
const RESPONSE_FD: i32 = 3;
/// Longest answer a helper writes (it must fit in a pipe buffer, see `run_helper`).
const MAX_RESPONSE: usize = 32 * 1024;
/// File descriptor on which the helper logs: a copy of the agent's stderr (the console).
const LOG_FD: i32 = 4;
/// Environment variable carrying the agent's log filter to the helper.
pub const LOG_ENV: &str = "KATA_LIKE_AGENT_LOG";

/// The agent's stderr, duplicated once (close-on-exec) so helpers can log there even though
/// their own stderr is the container's.
fn agent_log_fd() -> i32 {
    static FD: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *FD.get_or_init(|| {
        nix::fcntl::fcntl(2, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)).unwrap_or(-1)
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RuntimeRequest {
    /// Create the container (init process waits for start).
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Run an additional process (the OCI process JSON at `process`) in a running container.
    Exec {
        id: String,
        root: PathBuf,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Start the created container (runs poststart hooks, which fork).
    Start { id: String, root: PathBuf },
    /// Kill what is left, remove the cgroup, run poststop hooks, drop the state.
    Delete { id: String, root: PathBuf },
    /// Create a pid namespace whose init (a pause loop) the sandbox's containers share.
    PidNamespace,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RuntimeResponse {
    pub pid: Option<u32>,
    pub error: Option<String>,
}

/// The stdio a helper (and so the container process it creates) gets.
pub struct HelperStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl HelperStdio {
    pub fn null() -> Self {
        Self {
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }
}

fn to_stdio(fd: Option<OwnedFd>) -> Stdio {
    match fd {
        Some(fd) => Stdio::from(fd),
        None => Stdio::null(),
    }
}

/// Runs one helper and returns its response. `Err` carries a message for the gRPC status.
pub async fn run_helper(
    reaper: &Reaper,
    cwd: &Path,
    request: &RuntimeRequest,
    stdio: HelperStdio,
) -> Result<RuntimeResponse, String> {
    let json = serde_json::to_string(request).map_err(|e| format!("encoding request: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("locating the agent binary: {e}"))?;
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let write_raw = write_end.as_raw_fd();
    let log_raw = agent_log_fd();
    let mut command = Command::new(exe);
    command
        .arg(HELPER_ARG)
        .arg(json)
        .current_dir(cwd)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(to_stdio(stdio.stdin))
        .stdout(to_stdio(stdio.stdout))
        .stderr(to_stdio(stdio.stderr));
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        command.pre_exec(move || {
            if write_raw == RESPONSE_FD {
                let flags = libc::fcntl(RESPONSE_FD, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(RESPONSE_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(write_raw, RESPONSE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if log_raw >= 0 && libc::dup2(log_raw, LOG_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (_pid, exit_rx) = reaper
        .spawn(&mut command)
        .map_err(|e| format!("starting the runtime helper: {e}"))?;
    drop(command);
    drop(write_end);

    // The container process the helper creates inherits fd 3 and keeps it until it execs, so
    // EOF cannot mark the end of the answer: the helper's exit does. The answer (a few hundred
    // bytes, always below the pipe's buffer) is then complete in the pipe.
    let exit = wait_exit(exit_rx).await;
    let output = read_available(&read_end);
    match serde_json::from_slice::<RuntimeResponse>(&output) {
        Ok(response) => Ok(response),
        Err(_) => Err(format!(
            "runtime helper failed without an answer (exit status {})",
            exit.status
        )),
    }
}

fn read_available(fd: &OwnedFd) -> Vec<u8> {
    let _ = crate::fd::set_nonblocking(fd);
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    while output.len() < MAX_RESPONSE {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => output.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    output
}

/// Entry point of the helper process (`kata-like-agent __runtime <json>`). Returns the exit code.
pub fn helper_main(request_json: &str) -> i32 {
    // libcontainer logs through tracing: send it to the agent's log (fd 4), marked as helper.
    // SAFETY: fd 4 was set up by `run_helper`; if it is not open, logging fails silently.
    let log = unsafe { std::fs::File::from(OwnedFd::from_raw_fd(LOG_FD)) };
    let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .compact()
        .try_init();
    // SAFETY: fd 3 was set up by `run_helper` and is owned by this process from here on.
    let mut out = unsafe { std::fs::File::from(OwnedFd::from_raw_fd(RESPONSE_FD)) };
    let response = match serde_json::from_str::<RuntimeRequest>(request_json) {
        Ok(request) => match execute(request) {
            Ok(pid) => RuntimeResponse { pid, error: None },
            Err(error) => RuntimeResponse {
                pid: None,
                error: Some(error),
            },
        },
        Err(e) => RuntimeResponse {
            pid: None,
            error: Some(format!("bad runtime request: {e}")),
        },
    };
    let mut response = response;
    if let Some(error) = response.error.as_mut() {
        if error.len() > MAX_RESPONSE / 2 {
            let mut cut = MAX_RESPONSE / 2;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
    }
    let ok = response.error.is_none();
    let bytes = serde_json::to_vec(&response).unwrap_or_default();
    let _ = out.write_all(&bytes);
    if ok {
        0
    } else {
        1
    }
}

/// A libcontainer builder for container `id` with its state under `root`, as create and exec
/// both start.
fn container_builder(
    id: String,
    root: PathBuf,
    console_socket: Option<PathBuf>,
) -> Result<libcontainer::container::builder::ContainerBuilder, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    Ok(ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(root)
        .map_err(|e| e.to_string())?
        .with_console_socket(console_socket))
}

fn execute(request: RuntimeRequest) -> Result<Option<u32>, String> {
    use libcontainer::container::Container;

    match request {
        RuntimeRequest::Create {
            id,
            root,
            bundle,
            console_socket,
        } => {
            let container = container_builder(id, root, console_socket)?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            let pid = container
                .pid()
                .ok_or_else(|| "container has no pid after create".to_string())?;
            Ok(Some(pid.as_raw() as u32))
        }
        RuntimeRequest::Exec {
            id,
            root,
            process,
            console_socket,
        } => {
            let executor = confine_exec(&root.join(&id), &process)?;
            let pid = container_builder(id, root, console_socket)?
                .with_executor(executor)
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            Ok(Some(pid.as_raw() as u32))
        }
        RuntimeRequest::Start { id, root } => {
            let mut container = Container::load(root.join(&id)).map_err(|e| error_chain(&e))?;
            container.start().map_err(|e| error_chain(&e))?;
            Ok(None)
        }
        RuntimeRequest::Delete { id, root } => {
            let dir = root.join(&id);
            if !dir.exists() {
                return Ok(None);
            }
            let mut container = Container::load(dir).map_err(|e| error_chain(&e))?;
            container.delete(true).map_err(|e| error_chain(&e))?;
            Ok(None)
        }
        RuntimeRequest::PidNamespace => pid_namespace_holder().map(Some),
    }
}

/// Confines the pod's pid namespace init (see [`pid_namespace_holder`]).
fn confine_pid_namespace_init() -> nix::Result<()> {
    use nix::unistd::{chdir, chroot, setgroups, setresgid, setresuid, Gid, Uid};
    chroot(PID_NS_INIT_ROOT)?;
    chdir("/")?;
    setgroups(&[])?;
    let gid = Gid::from_raw(PID_NS_INIT_ID);
    setresgid(gid, gid, gid)?;
    let uid = Uid::from_raw(PID_NS_INIT_ID);
    // Leaving uid 0 (without SECBIT_KEEP_CAPS) clears the permitted and effective sets.
    setresuid(uid, uid, uid)?;
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// Rewrites the exec's process file for libcontainer and returns the executor that gives the
/// process its container's confinement (see `exec_confinement`).
fn confine_exec(
    state: &Path,
    process_path: &Path,
) -> Result<crate::exec_confinement::ConfiningExecutor, String> {
    use crate::exec_confinement::{ConfiningExecutor, ExecConfinement};
    use libcontainer::container::Container;

    let container = Container::load(state.to_path_buf()).map_err(|e| error_chain(&e))?;
    let config = container.bundle().join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config)
        .map_err(|e| format!("reading the container's {}: {e}", config.display()))?;
    let process: oci_spec::runtime::Process = std::fs::read(process_path)
        .map_err(|e| e.to_string())
        .and_then(|json| serde_json::from_slice(&json).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading the exec's {}: {e}", process_path.display()))?;
    let (process, confinement) = ExecConfinement::split(&spec, process)?;
    let json = serde_json::to_vec(&process).map_err(|e| format!("encoding the process: {e}"))?;
    std::fs::write(process_path, json)
        .map_err(|e| format!("writing {}: {e}", process_path.display()))?;
    Ok(ConfiningExecutor::new(confinement))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message
}

/// The empty, read-only directory the pod's pid namespace init is confined to.
const PID_NS_INIT_ROOT: &str = "/run/kata-like/empty";
/// nobody/nogroup: the pod's pid namespace init needs no privilege to reap.
const PID_NS_INIT_ID: u32 = 65534;

/// Creates a new pid namespace whose init reaps orphans and otherwise sleeps. Returns its pid
/// (in the agent's namespace); it becomes the agent's child when this helper exits.
///
/// The pod's containers see this init as their PID 1, so it holds nothing worth reaching: it
/// runs as nobody with no capabilities and no_new_privs, chrooted into an empty directory with
/// no open fds. Left as root in the agent's mount namespace, a container allowed to trace it
/// (CAP_SYS_PTRACE) could walk `/proc/1/root` into the guest's root, the agent's and every
/// container's files.
fn pid_namespace_holder() -> Result<u32, String> {
    use nix::sched::{unshare, CloneFlags};
    use nix::unistd::{fork, ForkResult};
    std::fs::create_dir_all(PID_NS_INIT_ROOT)
        .and_then(|()| {
            std::fs::set_permissions(
                PID_NS_INIT_ROOT,
                std::os::unix::fs::PermissionsExt::from_mode(0o555),
            )
        })
        .map_err(|e| format!("creating {PID_NS_INIT_ROOT}: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: this helper is single-threaded.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => Ok(child.as_raw() as u32),
        ForkResult::Child => {
            // Init of the sandbox's pid namespace: close everything, reap forever.
            for fd in 0..1024 {
                // SAFETY: closing fds this process does not use.
                unsafe { libc::close(fd) };
            }
            let _ = nix::sys::prctl::set_name(c"pidns-init");
            if let Err(e) = confine_pid_namespace_init() {
                // Nothing to report to (stdio is closed): an unconfined init must not run.
                let _ = e;
                std::process::exit(1);
            }
            let mut mask = nix::sys::signal::SigSet::empty();
            mask.add(nix::sys::signal::Signal::SIGCHLD);
            let _ = mask.thread_block();
            loop {
                while let Ok(status) = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(-1),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
                let _ = mask.wait();
            }
        }
    }
}
