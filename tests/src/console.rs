//! Watching a guest's serial console: wait for a line, with a hang guard, keeping everything
//! read so that a failing test can show the whole console log.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines a child process writes, read on a background thread.
pub struct ConsoleLines {
    lines: mpsc::Receiver<String>,
    /// Everything received so far, for failure messages.
    pub log: Vec<String>,
}

impl ConsoleLines {
    /// Starts reading `source` (e.g. a child's stdout) line by line.
    pub fn new(source: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ConsoleLines {
            lines: rx,
            log: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`. `guard` only stops a hung guest from hanging the
    /// test; it is not a performance assertion. Returns the line, or `None` when the guard
    /// expired or the source ended first.
    pub fn wait_for(&mut self, needle: &str, guard: Duration) -> Option<String> {
        let deadline = Instant::now() + guard;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The console log so far, for assertion messages.
    pub fn dump(&self) -> String {
        self.log.join("\n")
    }
}
