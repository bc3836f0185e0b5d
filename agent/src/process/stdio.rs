//! Stdio of container processes: pipes or a pty, output streams with back-pressure, stdin.
//!
//! Output: the agent holds the read end of the process's stdout/stderr pipe (or the pty master).
//! It reads only while a `ProcessOutput` stream is attached and only when gRPC (HTTP/2 flow
//! control) asks for the next message, so a slow reader fills the pipe and the writer blocks:
//! nothing is dropped. The stream ends after EOF (every writer closed the pipe; for a pty: EIO
//! once the slave side is gone).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use kata_like_protocol::OutputChunk;
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Mutex};

use crate::error::Error;
use crate::fd::{register, set_nonblocking};

/// Largest chunk sent on an output stream (the protocol's limit).
pub const OUTPUT_CHUNK: usize = 64 * 1024;

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

/// One output of a process (stdout, stderr, or the pty master).
pub struct OutputPipe {
    /// The read end while no stream holds it.
    source: std::sync::Mutex<Option<AsyncFd<OwnedFd>>>,
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
            source: std::sync::Mutex::new(fd),
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
    pub fn attach(self: &Arc<Self>, fields: (String, String)) -> Result<OutputStream, Error> {
        let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
        match self.phase() {
            OutputPhase::Streaming => Err(Error::already_exists(
                "an output stream is already attached to this process output",
            )),
            // Everything was delivered: the new stream ends at once.
            OutputPhase::Drained => Ok(OutputStream {
                pipe: Arc::clone(self),
                fd: None,
                buf: Vec::new(),
                finished: true,
                fields,
            }),
            OutputPhase::Idle => {
                let fd = source.take();
                tracing::debug!(container_id = %fields.0, exec_id = %fields.1, has_fd = fd.is_some(), "output stream attached");
                self.phase.send_replace(OutputPhase::Streaming);
                Ok(OutputStream {
                    pipe: Arc::clone(self),
                    finished: fd.is_none(),
                    fd,
                    buf: vec![0u8; OUTPUT_CHUNK],
                    fields,
                })
            }
        }
    }
}

/// A `ProcessOutput` stream. It reads the pipe only when gRPC asks for the next message (no
/// buffer in between), so a slow consumer stalls the reads and so the writer. If the stream is
/// dropped early, the pipe goes back to the process for the next stream.
pub struct OutputStream {
    pipe: Arc<OutputPipe>,
    fd: Option<AsyncFd<OwnedFd>>,
    buf: Vec<u8>,
    finished: bool,
    fields: (String, String),
}

impl OutputStream {
    fn finish(&mut self) {
        self.finished = true;
        self.fd = None;
        self.pipe.phase.send_replace(OutputPhase::Drained);
        tracing::debug!(container_id = %self.fields.0, exec_id = %self.fields.1, "output drained");
    }
}

// Reading never fails the stream: a read error ends it like EOF (and is logged), so the items
// are plain chunks; the RPC layer wraps them for gRPC.
impl futures::Stream for OutputStream {
    type Item = OutputChunk;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        let Some(fd) = this.fd.as_ref() else {
            this.finish();
            return Poll::Ready(None);
        };
        loop {
            let mut guard = match fd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(container_id = %this.fields.0, exec_id = %this.fields.1, error = %e, "output poll failed");
                    this.finish();
                    return Poll::Ready(None);
                }
            };
            let buf = &mut this.buf;
            match guard.try_io(|inner| read_nonblocking(inner.get_ref(), buf)) {
                Ok(Ok(0)) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Ok(n)) => {
                    return Poll::Ready(Some(OutputChunk {
                        data: this.buf[..n].to_vec(),
                    }))
                }
                Ok(Err(e)) => {
                    tracing::warn!(container_id = %this.fields.0, exec_id = %this.fields.1, error = %e, "output read failed");
                    this.finish();
                    return Poll::Ready(None);
                }
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The consumer went away before EOF: hand the pipe back for the next stream.
        let mut source = self.pipe.source.lock().unwrap_or_else(|e| e.into_inner());
        *source = self.fd.take();
        self.pipe.phase.send_replace(OutputPhase::Idle);
        tracing::debug!(container_id = %self.fields.0, exec_id = %self.fields.1, "output stream detached");
    }
}

fn read_nonblocking(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    match nix::unistd::read(fd.as_raw_fd(), buf) {
        Ok(n) => Ok(n),
        // A pty master reports EIO once the last slave fd is closed: that is its EOF.
        Err(nix::errno::Errno::EIO) => Ok(0),
        Err(e) => Err(std::io::Error::from(e)),
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
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, Error> {
        let stdin = self.stdin.lock().await;
        let Some(fd) = stdin.as_ref() else {
            return Err(Error::failed_precondition(
                "the process has no open stdin (not requested or already closed)",
            ));
        };
        write_all(fd, data).await.map_err(|e| {
            if e.raw_os_error() == Some(libc::EPIPE) {
                Error::failed_precondition("the process closed its stdin")
            } else {
                Error::internal(format!("writing stdin: {e}"))
            }
        })
    }

    /// Closes stdin (the process reads EOF). For a tty the pty stays open for output.
    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), Error> {
        let Some(master) = self.pty_master.as_ref() else {
            return Err(Error::failed_precondition("the process has no terminal"));
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
            return Err(Error::internal(format!(
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
