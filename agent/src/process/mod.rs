//! Container processes (the init process and exec'd processes) as the agent tracks them.

pub mod stdio;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::reaper::{wait_exit, Exit, ExitReceiver};
use crate::runtime::HelperStdio;
pub use stdio::ProcessStdio;

/// One process in a container. `exec_id` "" is the container's init process.
pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub pid: u32,
    pub exit: ExitReceiver,
    pub stdio: ProcessStdio,
}

impl Process {
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit, then for attached output streams to deliver everything.
    pub async fn wait(&self) -> Exit {
        let exit = wait_exit(self.exit.clone()).await;
        self.stdio.wait_output_delivered().await;
        exit
    }
}

/// What the process asked for (the protocol's `Stdio`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StdioRequest {
    pub terminal: bool,
    pub stdin: bool,
}

/// Stdio set up before the runtime helper runs; completed by [`PreparedStdio::finish`].
pub enum PreparedStdio {
    Pipes {
        helper: Option<HelperStdio>,
        agent: Option<ProcessStdio>,
    },
    Tty {
        socket_path: PathBuf,
        keep_stdin: bool,
        receiver: JoinHandle<std::io::Result<OwnedFd>>,
    },
}

static TTY_SOCKET_SEQ: AtomicU64 = AtomicU64::new(0);

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

impl PreparedStdio {
    /// Creates pipes, or a console socket (under `tty_dir`) on which the container's init sends
    /// the pty master.
    pub fn prepare(request: StdioRequest, tty_dir: &Path) -> Result<Self, Error> {
        let internal = |e: std::io::Error| Error::internal(format!("setting up stdio: {e}"));
        if request.terminal {
            // Short socket names: sun_path is limited to 108 bytes.
            let seq = TTY_SOCKET_SEQ.fetch_add(1, Ordering::Relaxed);
            let socket_path = tty_dir.join(format!("{seq}.sock"));
            let _ = std::fs::remove_file(&socket_path);
            let listener = UnixListener::bind(&socket_path).map_err(internal)?;
            let receiver = tokio::spawn(async move { receive_pty_master(listener).await });
            return Ok(Self::Tty {
                socket_path,
                keep_stdin: request.stdin,
                receiver,
            });
        }
        let (stdin_helper, stdin_agent) = if request.stdin {
            let (r, w) = pipe().map_err(internal)?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let (out_r, out_w) = pipe().map_err(internal)?;
        let (err_r, err_w) = pipe().map_err(internal)?;
        let agent = ProcessStdio::new_pipes(stdin_agent, out_r, err_r).map_err(internal)?;
        Ok(Self::Pipes {
            helper: Some(HelperStdio {
                stdin: stdin_helper,
                stdout: Some(out_w),
                stderr: Some(err_w),
            }),
            agent: Some(agent),
        })
    }

    pub fn console_socket(&self) -> Option<PathBuf> {
        match self {
            Self::Tty { socket_path, .. } => Some(socket_path.clone()),
            Self::Pipes { .. } => None,
        }
    }

    /// The stdio the helper (and so the process) inherits; pipes' write ends move into it.
    pub fn helper_stdio(&mut self) -> HelperStdio {
        match self {
            Self::Pipes { helper, .. } => helper.take().unwrap_or_else(HelperStdio::null),
            Self::Tty { .. } => HelperStdio::null(),
        }
    }

    /// After the helper succeeded: the agent's side of the process's stdio.
    pub async fn finish(self) -> Result<ProcessStdio, Error> {
        match self {
            Self::Pipes { agent, .. } => {
                agent.ok_or_else(|| Error::internal("stdio already taken"))
            }
            Self::Tty {
                socket_path,
                keep_stdin,
                receiver,
            } => {
                let _ = std::fs::remove_file(&socket_path);
                let master = tokio::time::timeout(Duration::from_secs(10), receiver)
                    .await
                    .map_err(|_| Error::internal("the container did not send its pty"))?
                    .map_err(|e| Error::internal(format!("pty receiver: {e}")))?
                    .map_err(|e| Error::internal(format!("receiving the pty master: {e}")))?;
                ProcessStdio::new_pty(master, keep_stdin)
                    .map_err(|e| Error::internal(format!("setting up the pty: {e}")))
            }
        }
    }

    /// After a failure: release everything.
    pub fn abandon(self) {
        if let Self::Tty {
            socket_path,
            receiver,
            ..
        } = self
        {
            receiver.abort();
            let _ = std::fs::remove_file(socket_path);
        }
    }
}

async fn receive_pty_master(listener: UnixListener) -> std::io::Result<OwnedFd> {
    let (stream, _) = listener.accept().await?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    tokio::task::spawn_blocking(move || {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut received = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed this fd for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if received.is_none() {
                        received = Some(owned);
                    }
                }
            }
        }
        received.ok_or_else(|| std::io::Error::other("no file descriptor on the console socket"))
    })
    .await
    .map_err(std::io::Error::other)?
}
