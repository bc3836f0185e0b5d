//! Child reaping for the agent (PID 1 in the guest, a child subreaper on the host).
//!
//! Design: the agent never waits for a specific pid. One reaper task calls `waitpid(-1, WNOHANG)`
//! on every SIGCHLD and hands each exit status to whoever registered that pid. Registration and
//! reaping share one lock ([`Reaper::spawn`] holds it across `fork`+registration), so an exit can
//! never be reaped before its owner is known. Runtime helpers (`kata-like-agent __runtime`, which
//! drive youki's libcontainer single-threaded) wait for their own grandchildren themselves: those
//! are not our children, so nothing is stolen. Container processes become our children only when
//! their helper exits (they are re-parented to the nearest subreaper); their exit may therefore be
//! reaped before the agent has read their pid from the helper. Such statuses are kept in a bounded
//! table of unclaimed exits and handed over by [`Reaper::claim`]. Exits of real orphans (daemons
//! that outlived a container with a shared pid namespace, etc.) are reaped and dropped.

use std::collections::{HashMap, VecDeque};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How many exits of not (yet) registered pids are remembered.
const UNCLAIMED_LIMIT: usize = 4096;

/// An exit status the way runc reports it: the exit code, or 128 + signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: i32,
    pub at: SystemTime,
}

impl Exit {
    fn from_wait_status(status: WaitStatus) -> Option<(Pid, Exit)> {
        let at = SystemTime::now();
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, Exit { status: code, at })),
            WaitStatus::Signaled(pid, signal, _) => Some((
                pid,
                Exit {
                    status: 128 + signal as i32,
                    at,
                },
            )),
            _ => None,
        }
    }
}

/// The receiving side of one registered pid: resolves once the pid has been reaped.
pub type ExitReceiver = watch::Receiver<Option<Exit>>;

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
    unclaimed_order: VecDeque<i32>,
}

#[derive(Default)]
pub struct Reaper {
    table: Mutex<Table>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means another thread panicked while holding it; the table itself
        // stays consistent (every operation on it is a single insert/remove).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `command` and registers its pid before the reaper can see its exit.
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<(u32, ExitReceiver)> {
        let mut table = self.lock();
        let child = command.spawn()?;
        let pid = child.id();
        // `child` is dropped without waiting: the reaper owns its exit status.
        drop(child);
        let rx = Self::register_locked(&mut table, pid as i32);
        Ok((pid, rx))
    }

    /// Takes ownership of the exit status of `pid`, a process that is (or is about to become) our
    /// child through re-parenting, e.g. a container's init once its runtime helper exited.
    pub fn claim(&self, pid: u32) -> ExitReceiver {
        let mut table = self.lock();
        Self::register_locked(&mut table, pid as i32)
    }

    fn register_locked(table: &mut Table, pid: i32) -> ExitReceiver {
        if let Some(exit) = table.unclaimed.remove(&pid) {
            table.unclaimed_order.retain(|p| *p != pid);
            let (_tx, rx) = watch::channel(Some(exit));
            return rx;
        }
        let (tx, rx) = watch::channel(None);
        table.waiting.insert(pid, tx);
        rx
    }

    /// Runs `f` while no exit can be reaped, passing whether `pid` is still registered and not
    /// reaped. Used to signal a pid without racing with its reuse after reaping.
    pub fn with_live_pid<T>(&self, pid: u32, f: impl FnOnce(bool) -> T) -> T {
        let table = self.lock();
        let live = table.waiting.contains_key(&(pid as i32));
        f(live)
    }

    /// Reaps every exited child and dispatches the statuses. Called on SIGCHLD.
    pub fn reap(&self) {
        let mut table = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let Some((pid, exit)) = Exit::from_wait_status(status) else {
                        continue;
                    };
                    let raw = pid.as_raw();
                    if let Some(tx) = table.waiting.remove(&raw) {
                        tracing::debug!(pid = raw, status = exit.status, "process exited");
                        let _ = tx.send(Some(exit));
                    } else {
                        table.unclaimed.insert(raw, exit);
                        table.unclaimed_order.push_back(raw);
                        while table.unclaimed_order.len() > UNCLAIMED_LIMIT {
                            if let Some(old) = table.unclaimed_order.pop_front() {
                                table.unclaimed.remove(&old);
                            }
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                // ECHILD: no children left.
                Err(_) => break,
            }
        }
    }

    /// Starts the reaper task: reaps on every SIGCHLD.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::clone(self);
        tokio::spawn(async move {
            // Children may have exited before the handler was installed.
            reaper.reap();
            while sigchld.recv().await.is_some() {
                reaper.reap();
            }
        });
        Ok(())
    }
}

/// Waits until the receiver carries an exit status.
pub async fn wait_exit(mut rx: ExitReceiver) -> Exit {
    loop {
        if let Some(exit) = *rx.borrow_and_update() {
            return exit;
        }
        if rx.changed().await.is_err() {
            // The sender is gone without a status: only possible if the reaper table was torn
            // down; report it as killed.
            if let Some(exit) = *rx.borrow() {
                return exit;
            }
            return Exit {
                status: 128 + libc::SIGKILL,
                at: SystemTime::now(),
            };
        }
    }
}
