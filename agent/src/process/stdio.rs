//! Stdio of container processes: pipes or a pty, output streams with back-pressure, stdin.
//!
//! Output: the agent holds the read end of the process's stdout/stderr pipe (or the pty master).
//! It reads only while a `ProcessOutput` stream is attached and only as fast as the stream is
//! consumed (a bounded channel sits between the pipe and gRPC/HTTP2 flow control), so a slow
//! reader fills the pipe and the writer blocks: nothing is dropped. A chunk read but not yet
//! delivered when a stream goes away is kept and sent first on the next stream. The stream ends
//! after EOF (every writer closed the pipe; for a pty: EIO once the slave side is gone).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use kata_like_protocol::OutputChunk;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch, Mutex};
use tonic::Status;

/// Largest chunk sent on an output stream (the protocol's limit).
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// Chunks buffered between the pipe reader and the gRPC stream.
const STREAM_BUFFER: usize = 4;

/// Registers an owned, non-blocking fd with the tokio reactor.
pub fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the fd, so it is deregistered before it is closed.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

pub fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Where an output pipe is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPhase {
    /// Nobody reads; the writer blocks once the pipe is full.
    Idle,
    /// A stream is attached and being fed.
    Streaming,
    /// EOF was read and every byte was handed to a stream.
    Drained,
}

struct OutputSource {
    fd: Option<AsyncFd<OwnedFd>>,
    /// Bytes read from the pipe but not delivered (their stream went away).
    pending: Vec<u8>,
}

/// One output of a process (stdout, stderr, or the pty master).
pub struct OutputPipe {
    source: Mutex<OutputSource>,
    phase: watch::Sender<OutputPhase>,
}

impl OutputPipe {
    /// `fd` is the agent's read end (the pipe read end or a dup of the pty master); `None` is an
    /// output that never produces anything (stderr of a tty process).
    pub fn new(fd: Option<OwnedFd>) -> std::io::Result<Arc<Self>> {
        let (phase, _) = watch::channel(if fd.is_some() {
            OutputPhase::Idle
        } else {
            OutputPhase::Drained
        });
        let fd = match fd {
            Some(fd) => {
                set_nonblocking(&fd)?;
                Some(register(fd)?)
            }
            None => None,
        };
        Ok(Arc::new(Self {
            source: Mutex::new(OutputSource {
                fd,
                pending: Vec::new(),
            }),
            phase,
        }))
    }

    pub fn phase(&self) -> OutputPhase {
        *self.phase.borrow()
    }

    /// Waits while a stream is attached and has not reached EOF yet.
    pub async fn wait_not_streaming(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p != OutputPhase::Streaming).await;
    }

    /// Attaches a stream. At most one at a time (ALREADY_EXISTS otherwise).
    pub async fn attach(
        self: &Arc<Self>,
        fields: (String, String),
    ) -> Result<mpsc::Receiver<Result<OutputChunk, Status>>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut source = self.source.lock().await;
        match self.phase() {
            OutputPhase::Streaming => {
                return Err(Status::already_exists(
                    "an output stream is already attached to this process output",
                ))
            }
            // Everything was delivered: the new stream ends at once.
            OutputPhase::Drained => return Ok(rx),
            OutputPhase::Idle => {}
        }
        let fd = source.fd.take();
        let pending = std::mem::take(&mut source.pending);
        self.phase.send_replace(OutputPhase::Streaming);
        drop(source);
        let pipe = Arc::clone(self);
        tokio::spawn(async move {
            pipe.pump(fd, pending, tx, fields).await;
        });
        Ok(rx)
    }

    async fn pump(
        self: Arc<Self>,
        fd: Option<AsyncFd<OwnedFd>>,
        mut pending: Vec<u8>,
        tx: mpsc::Sender<Result<OutputChunk, Status>>,
        (container_id, exec_id): (String, String),
    ) {
        let Some(fd) = fd else {
            self.phase.send_replace(OutputPhase::Drained);
            return;
        };
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        loop {
            if !pending.is_empty() {
                let chunk = OutputChunk {
                    data: std::mem::take(&mut pending),
                };
                if let Err(mpsc::error::SendError(Ok(chunk))) = tx.send(Ok(chunk)).await {
                    // The stream went away: keep the chunk and the pipe for the next stream.
                    let mut source = self.source.lock().await;
                    source.pending = chunk.data;
                    source.fd = Some(fd);
                    self.phase.send_replace(OutputPhase::Idle);
                    tracing::debug!(container_id, exec_id, "output stream detached");
                    return;
                }
                continue;
            }
            match read_some(&fd, &mut buf).await {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) => {
                    tracing::warn!(container_id, exec_id, error = %e, "output read failed");
                    break;
                }
            }
        }
        // EOF: every byte has been handed to the stream.
        self.phase.send_replace(OutputPhase::Drained);
        tracing::debug!(container_id, exec_id, "output drained");
    }
}

async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| {
            match nix::unistd::read(inner.get_ref().as_raw_fd(), buf) {
                Ok(n) => Ok(n),
                // A pty master reports EIO once the last slave fd is closed: that is its EOF.
                Err(nix::errno::Errno::EIO) => Ok(0),
                Err(e) => Err(std::io::Error::from(e)),
            }
        }) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<usize> {
    let total = data.len();
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(total)
}

/// The stdio of one process, as the agent sees it.
pub struct ProcessStdio {
    pub terminal: bool,
    /// Write side of stdin (pipe write end, or a dup of the pty master); `None` once closed or
    /// if the process has no stdin.
    stdin: Mutex<Option<AsyncFd<OwnedFd>>>,
    pub stdout: Arc<OutputPipe>,
    pub stderr: Arc<OutputPipe>,
    /// The pty master, for window size changes.
    pty_master: Option<OwnedFd>,
}

impl ProcessStdio {
    pub fn new_pipes(
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> std::io::Result<Self> {
        let stdin = match stdin {
            Some(fd) => {
                set_nonblocking(&fd)?;
                Some(register(fd)?)
            }
            None => None,
        };
        Ok(Self {
            terminal: false,
            stdin: Mutex::new(stdin),
            stdout: OutputPipe::new(Some(stdout))?,
            stderr: OutputPipe::new(Some(stderr))?,
            pty_master: None,
        })
    }

    pub fn new_pty(master: OwnedFd, keep_stdin: bool) -> std::io::Result<Self> {
        set_nonblocking(&master)?;
        let reader = master.try_clone()?;
        let stdin = if keep_stdin {
            Some(register(master.try_clone()?)?)
        } else {
            None
        };
        Ok(Self {
            terminal: true,
            stdin: Mutex::new(stdin),
            stdout: OutputPipe::new(Some(reader))?,
            stderr: OutputPipe::new(None)?,
            pty_master: Some(master),
        })
    }

    /// Writes all of `data` to stdin; returns once it is in the pipe/pty (back-pressure).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, Status> {
        let stdin = self.stdin.lock().await;
        let Some(fd) = stdin.as_ref() else {
            return Err(Status::failed_precondition(
                "the process has no open stdin (not requested or already closed)",
            ));
        };
        write_all(fd, data).await.map_err(|e| {
            if e.raw_os_error() == Some(libc::EPIPE) {
                Status::failed_precondition("the process closed its stdin")
            } else {
                Status::internal(format!("writing stdin: {e}"))
            }
        })
    }

    /// Closes stdin (the process reads EOF). For a tty the pty stays open for output.
    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), Status> {
        let Some(master) = self.pty_master.as_ref() else {
            return Err(Status::failed_precondition("the process has no terminal"));
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(Status::internal(format!(
                "TIOCSWINSZ: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Waits until no attached output stream is still draining.
    pub async fn wait_output_delivered(&self) {
        self.stdout.wait_not_streaming().await;
        self.stderr.wait_not_streaming().await;
    }
}
