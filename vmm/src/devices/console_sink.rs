//! The host side of the guest console, shared by the 8250 (ttyS0) and virtio-console (hvc0):
//! one sink and one set of counters, whichever device the guest prints on.
//!
//! Writing never waits. A file sink is non-blocking (the shim hands over the write end of a
//! pipe that it drains into the capped, rotated `console.log`); what the sink cannot take at
//! once is dropped and counted, because the writer is a vCPU thread (8250) or the event loop
//! (virtio-console) and a guest flooding its console must not stall either on a slow reader.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where console output goes.
pub enum ConsoleSink {
    File(File),
    Stdout,
    Null,
}

/// The console's counters, reported by the API's `metrics` op.
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    /// Bytes the guest wrote to its consoles.
    pub bytes: AtomicU64,
    /// Bytes the sink did not take (a full pipe, a write error): lost, never queued.
    pub dropped_bytes: AtomicU64,
}

/// A handle on the console sink; clones share the sink and the counters.
#[derive(Clone)]
pub struct ConsoleOutput {
    sink: Arc<Mutex<ConsoleSink>>,
    pub counters: Arc<ConsoleCounters>,
}

impl ConsoleOutput {
    /// Takes over `sink`; a file sink is made non-blocking first (a no-op for regular files,
    /// essential for a pipe or FIFO whose reader may fall behind).
    pub fn new(sink: ConsoleSink) -> io::Result<Self> {
        if let ConsoleSink::File(f) = &sink {
            set_nonblocking(f)?;
        }
        Ok(ConsoleOutput {
            sink: Arc::new(Mutex::new(sink)),
            counters: Arc::new(ConsoleCounters::default()),
        })
    }

    /// Counts `data` as console output and writes what the sink takes now; the rest is
    /// dropped and counted. Returns the bytes the sink took.
    pub fn write(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        self.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let taken = match &mut *sink {
            ConsoleSink::File(f) => write_now(f, data),
            // Stdout is for running the VMM by hand and in tests, whose reader keeps up.
            ConsoleSink::Stdout => write_now(&mut io::stdout().lock(), data),
            ConsoleSink::Null => data.len(),
        };
        let dropped = data.len() - taken;
        if dropped > 0 {
            self.counters
                .dropped_bytes
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        taken
    }
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes as much of `data` as `w` takes without waiting; returns how much that was.
fn write_now(w: &mut impl Write, data: &[u8]) -> usize {
    let mut written = 0;
    while written < data.len() {
        match w.write(&data[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: the reader is behind. Any other error (EPIPE once the reader is
            // gone, ENOSPC): console loss is not fatal to the VM.
            Err(_) => break,
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_full_pipe_drops_and_counts_instead_of_blocking() {
        let (mut reader, writer) = pipe();
        let out = ConsoleOutput::new(ConsoleSink::File(writer)).expect("sink");
        // Far more than a pipe holds (64 KiB by default): a blocking write would hang here.
        let chunk = vec![b'x'; 256 * 1024];
        let taken = out.write(&chunk);
        assert!(taken > 0 && taken < chunk.len(), "took {taken}");
        let c = &out.counters;
        assert_eq!(c.bytes.load(Ordering::Relaxed), chunk.len() as u64);
        assert_eq!(
            c.dropped_bytes.load(Ordering::Relaxed),
            (chunk.len() - taken) as u64
        );
        // Once the reader catches up the sink takes bytes again.
        let mut buf = vec![0u8; taken];
        reader.read_exact(&mut buf).expect("read");
        assert_eq!(out.write(b"after\n"), 6);
    }

    #[test]
    fn a_vanished_reader_is_counted_as_loss() {
        let (reader, writer) = pipe();
        drop(reader);
        // SAFETY: ignoring SIGPIPE for the test process, as the VMM's write must not die of it
        // either (libtest already ignores it; this only makes the test independent of that).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let out = ConsoleOutput::new(ConsoleSink::File(writer)).expect("sink");
        assert_eq!(out.write(b"lost"), 0);
        assert_eq!(out.counters.dropped_bytes.load(Ordering::Relaxed), 4);
    }
}
