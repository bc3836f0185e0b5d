//! Bridges containerd's stdio FIFOs to the agent's streams.
//!
//! Output: the agent's `ProcessOutput` stream is written to the stdout/stderr FIFO chunk by
//! chunk; a slow reader (containerd writing the CRI log) blocks the write, which stops us from
//! pulling the next chunk, which back-pressures the guest process. Nothing is dropped. The copy
//! ends when the agent ends the stream (after the process's pipe reached EOF and every byte was
//! sent) — the exit event waits for that.
//!
//! Input: the stdin FIFO is read in chunks and each chunk is written with `WriteStdin`, which
//! returns once the bytes are in the process's pipe. EOF on the FIFO (containerd closed it, or
//! `CloseIO`) closes the process's stdin.

use std::future::Future;
use std::os::fd::AsFd;
use std::path::Path;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// Size of one stdin chunk sent to the agent (its limit is 1 MiB).
pub const STDIN_CHUNK: usize = 64 * 1024;

/// Opens an output FIFO for writing without waiting for a reader (containerd opened the read
/// side before Create; holding it read-write also keeps writes from failing with EPIPE when
/// containerd re-opens it after a restart).
pub fn open_output_fifo(path: &Path) -> Result<tokio::net::unix::pipe::Sender> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(Error::io(format!("open stdio FIFO {}", path.display())))
}

/// Opens the stdin FIFO for reading. Reads see EOF only after a writer has come and gone.
pub fn open_input_fifo(path: &Path) -> Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(path)
        .map_err(Error::io(format!("open stdin FIFO {}", path.display())))
}

/// Copies an output stream into `out` (None: the process has no such stdio; the stream is
/// still drained so the process never blocks on a full pipe). Returns the bytes copied.
pub async fn copy_output<S, W>(mut stream: S, mut out: Option<W>) -> Result<u64>
where
    S: Stream<Item = Result<Vec<u8>>> + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut copied = 0u64;
    while let Some(chunk) = stream.next().await {
        let data = chunk?;
        if let Some(w) = out.as_mut() {
            if let Err(e) = w.write_all(&data).await {
                // The reader went away for good: keep draining so the guest process is not
                // stuck, but stop writing.
                tracing::warn!(error = %e, "stdio FIFO write failed; discarding further output");
                out = None;
            }
        }
        copied += data.len() as u64;
    }
    if let Some(w) = out.as_mut() {
        let _ = w.flush().await;
    }
    Ok(copied)
}

/// Where stdin bytes go: the agent's WriteStdin/CloseStdin for one process.
pub trait StdinSink {
    /// Writes `data`, returning how many bytes the process's pipe took.
    fn write(&mut self, data: Vec<u8>) -> impl Future<Output = Result<usize>> + Send;
    fn close(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// Pumps `input` into `sink` until EOF on the FIFO or until `close` fires (CloseIO), then
/// closes the process's stdin. Returns the bytes forwarded.
///
/// containerd writes everything it has into the FIFO before it sends CloseIO, but keeps its
/// write end open, so EOF may never come: on `close`, whatever the FIFO still holds is read with
/// plain non-blocking reads (not through the reactor, whose readiness may lag) and forwarded
/// before stdin is closed. Nothing written before CloseIO is lost.
pub async fn pump_stdin<R, K>(
    mut input: R,
    sink: &mut K,
    mut close: tokio::sync::oneshot::Receiver<()>,
) -> Result<u64>
where
    R: AsyncRead + AsFd + Unpin,
    K: StdinSink,
{
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            // Data first: CloseIO is only looked at when nothing is ready to read.
            biased;
            read = input.read(&mut buf) => read.map_err(Error::io("read stdin FIFO"))?,
            _ = &mut close => {
                loop {
                    let n = match nix::unistd::read(input.as_fd(), &mut buf) {
                        Ok(n) => n,
                        Err(nix::errno::Errno::EAGAIN) => 0,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => return Err(Error::io("read stdin FIFO")(e.into())),
                    };
                    if n == 0 {
                        break;
                    }
                    forward(sink, &buf[..n]).await?;
                    total += n as u64;
                }
                0
            }
        };
        if n == 0 {
            break;
        }
        forward(sink, &buf[..n]).await?;
        total += n as u64;
    }
    sink.close().await?;
    Ok(total)
}

async fn forward<K: StdinSink>(sink: &mut K, data: &[u8]) -> Result<()> {
    let mut chunk = data.to_vec();
    while !chunk.is_empty() {
        let written = sink.write(chunk.clone()).await?;
        if written == 0 {
            return Err(Error::Agent("WriteStdin accepted no bytes".into()));
        }
        chunk.drain(..written.min(chunk.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn output_chunks_arrive_complete_and_in_order() {
        let chunks: Vec<Result<Vec<u8>>> =
            (0..100u8).map(|i| Ok(vec![i; 1000 + i as usize])).collect();
        let expected: Vec<u8> = (0..100u8)
            .flat_map(|i| vec![i; 1000 + i as usize])
            .collect();
        // A small duplex buffer forces the writer to wait for the reader (back-pressure).
        let (writer, mut reader) = tokio::io::duplex(512);
        let copy = tokio::spawn(copy_output(futures::stream::iter(chunks), Some(writer)));
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.expect("read");
        assert_eq!(
            copy.await.expect("join").expect("copy"),
            expected.len() as u64
        );
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn output_is_drained_without_a_fifo_and_errors_surface() {
        let chunks: Vec<Result<Vec<u8>>> = vec![Ok(b"abc".to_vec()), Ok(b"de".to_vec())];
        let n = copy_output(
            futures::stream::iter(chunks),
            None::<tokio::io::DuplexStream>,
        )
        .await
        .expect("drained");
        assert_eq!(n, 5);
        let chunks: Vec<Result<Vec<u8>>> = vec![
            Ok(b"abc".to_vec()),
            Err(Error::Agent("ProcessOutput: guest died (Internal)".into())),
        ];
        let err = copy_output(
            futures::stream::iter(chunks),
            None::<tokio::io::DuplexStream>,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("guest died"), "{err}");
    }

    /// A sink that takes at most `limit` bytes per write, like a pipe that is nearly full.
    #[derive(Clone, Default)]
    struct RecordingSink {
        data: Arc<Mutex<Vec<u8>>>,
        closed: Arc<Mutex<bool>>,
        limit: usize,
    }

    impl StdinSink for RecordingSink {
        async fn write(&mut self, data: Vec<u8>) -> Result<usize> {
            let n = data.len().min(self.limit);
            self.data
                .lock()
                .expect("lock")
                .extend_from_slice(&data[..n]);
            Ok(n)
        }
        async fn close(&mut self) -> Result<()> {
            *self.closed.lock().expect("lock") = true;
            Ok(())
        }
    }

    fn fifo(dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        path
    }

    #[tokio::test]
    async fn stdin_is_forwarded_completely_then_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(dir.path(), "stdin");
        let receiver = open_input_fifo(&path).expect("open");
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let to_write = input.clone();
        let writer = tokio::spawn(async move {
            let mut w = tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(&path)
                .expect("writer");
            w.write_all(&to_write).await.expect("write");
        });
        let mut sink = RecordingSink {
            limit: 10_000,
            ..Default::default()
        };
        let (_close_tx, close_rx) = tokio::sync::oneshot::channel();
        let n = pump_stdin(receiver, &mut sink, close_rx)
            .await
            .expect("pump");
        writer.await.expect("writer");
        assert_eq!(n, input.len() as u64);
        assert_eq!(*sink.data.lock().expect("lock"), input);
        assert!(*sink.closed.lock().expect("lock"));
    }

    #[tokio::test]
    async fn close_io_forwards_what_the_fifo_still_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fifo(dir.path(), "stdin");
        let receiver = open_input_fifo(&path).expect("open");
        // containerd's side: writes, keeps the FIFO open, then asks for CloseIO.
        let mut writer = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(&path)
            .expect("writer");
        writer
            .write_all(b"written before CloseIO")
            .await
            .expect("write");
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        close_tx.send(()).expect("close");
        let mut sink = RecordingSink {
            limit: usize::MAX,
            ..Default::default()
        };
        let n = pump_stdin(receiver, &mut sink, close_rx)
            .await
            .expect("pump");
        assert_eq!(n, 22);
        assert_eq!(&*sink.data.lock().expect("lock"), b"written before CloseIO");
        assert!(*sink.closed.lock().expect("lock"));
        drop(writer);
    }

    #[tokio::test]
    async fn fifos_bridge_real_pipes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // The shim opens its end first, as in a real Create; the writer (containerd) comes later.
        let receiver = open_input_fifo(&fifo).expect("open");
        let mut sink = RecordingSink {
            limit: usize::MAX,
            ..Default::default()
        };
        let writer_path = fifo.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut w = tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(&writer_path)
                .expect("writer");
            w.write_all(b"hello from containerd").await.expect("write");
        });
        let (_close_tx, close_rx) = tokio::sync::oneshot::channel();
        let n = pump_stdin(receiver, &mut sink, close_rx)
            .await
            .expect("pump");
        writer.await.expect("writer");
        assert_eq!(n, 21);
        assert_eq!(&*sink.data.lock().expect("lock"), b"hello from containerd");

        let out = dir.path().join("stdout");
        nix::unistd::mkfifo(&out, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let mut reader = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&out)
            .expect("reader");
        let sender = open_output_fifo(&out).expect("sender");
        let chunks: Vec<Result<Vec<u8>>> = vec![Ok(b"out".to_vec())];
        copy_output(futures::stream::iter(chunks), Some(sender))
            .await
            .expect("copy");
        let mut got = [0u8; 3];
        reader.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"out");
    }
}
