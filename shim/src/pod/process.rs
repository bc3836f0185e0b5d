//! One process as the task API sees it (a container's init or an exec): its state, stdio, the
//! copy tasks bridging that stdio, and its exit.

use std::sync::Mutex;
use std::time::Duration;

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long an exit waits for the rest of the process's output to be copied. The agent ends the
/// output stream at EOF of the process's pipe; only a background child that keeps the pipe open
/// holds it longer, and then the exit is reported anyway (the copy goes on).
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    /// Start was asked for and is in progress: an exit seen now is held until the start event.
    Starting,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn to_proto(self) -> containerd_shim_protos::api::Status {
        use containerd_shim_protos::api::Status as S;
        match self {
            Status::Created => S::CREATED,
            Status::Starting | Status::Running => S::RUNNING,
            Status::Paused => S::PAUSED,
            Status::Stopped => S::STOPPED,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: Timestamp,
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp_from_unix_nanos(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
    )
}

pub fn timestamp_from_unix_nanos(nanos: i64) -> Timestamp {
    Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug)]
struct ProcState {
    status: Status,
    pid: u32,
}

pub struct Process {
    pub container_id: String,
    /// "" for the init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The exec's OCI process JSON, kept between Exec and Start.
    pub exec_spec: Option<Vec<u8>>,
    state: Mutex<ProcState>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    output: Mutex<Vec<JoinHandle<()>>>,
    stdin_close: Mutex<Option<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("container_id", &self.container_id)
            .field("exec_id", &self.exec_id)
            .field("status", &self.status())
            .finish()
    }
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        exec_spec: Option<Vec<u8>>,
    ) -> Process {
        Process {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
            }),
            exit_tx: watch::channel(None).0,
            output: Mutex::new(Vec::new()),
            stdin_close: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    pub fn pid(&self) -> u32 {
        self.state().pid
    }

    pub fn set_pid(&self, pid: u32) {
        self.state().pid = pid;
    }

    /// Moves to `to` unless the process has exited already; returns whether it moved.
    pub fn set_status(&self, to: Status) -> bool {
        let mut s = self.state();
        if s.status == Status::Stopped {
            return false;
        }
        s.status = to;
        true
    }

    /// Compare-and-set of the status.
    pub fn transition(&self, from: Status, to: Status) -> bool {
        let mut s = self.state();
        if s.status != from {
            return false;
        }
        s.status = to;
        true
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        self.exit_tx.borrow().clone()
    }

    /// Records the exit once. Returns the status the process had before (None when it had
    /// exited already, so the caller publishes nothing).
    pub fn record_exit(&self, info: ExitInfo) -> Option<Status> {
        let before = {
            let mut s = self.state();
            if s.status == Status::Stopped {
                return None;
            }
            let before = s.status;
            s.status = Status::Stopped;
            before
        };
        self.exit_tx.send_replace(Some(info));
        Some(before)
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self, so this cannot happen while we are borrowed.
                continue;
            }
        }
    }

    pub fn add_output_task(&self, task: JoinHandle<()>) {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Waits (bounded) for the output copies to finish: every byte the process wrote is in the
    /// FIFOs before its exit is published.
    pub async fn drain_output(&self) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.output.lock().unwrap_or_else(|p| p.into_inner()));
        for mut task in tasks {
            if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    container_id = %self.container_id,
                    exec_id = %self.exec_id,
                    "output still open after the process exited (a child keeps it open); reporting the exit"
                );
            }
        }
    }

    pub fn set_stdin_closer(&self, tx: oneshot::Sender<()>) {
        *self.stdin_close.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Asks the stdin pump to close the process's stdin (CloseIO). Returns false without a pump.
    pub fn close_stdin(&self) -> bool {
        match self
            .stdin_close
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(tx) => {
                let _ = tx.send(());
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let p = std::sync::Arc::new(Process::new("c", "", StdioPaths::default(), None));
        assert!(p.transition(Status::Created, Status::Starting));
        assert!(!p.transition(Status::Created, Status::Running));
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        let info = ExitInfo {
            status: 3,
            at: Timestamp::default(),
        };
        assert_eq!(p.record_exit(info.clone()), Some(Status::Starting));
        assert_eq!(p.record_exit(info.clone()), None);
        assert_eq!(waiter.await.expect("join"), info);
        assert_eq!(p.status(), Status::Stopped);
        assert!(!p.set_status(Status::Running));
    }

    #[test]
    fn timestamps_split_nanos() {
        let t = timestamp_from_unix_nanos(1_700_000_000_123_456_789);
        assert_eq!(t.seconds, 1_700_000_000);
        assert_eq!(t.nanos, 123_456_789);
    }
}
