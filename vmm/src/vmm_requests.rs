//! The channel from the other threads (today the API thread) to the VMM thread, which owns the
//! devices' sockets and the epoll set (the other threads' seccomp filters allow neither).
//!
//! It lives apart from both ends so that neither imports the other's module: `vmm` (the event
//! loop) receives here and starts the API thread; `api` sends here.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// Work another thread hands to the VMM thread.
pub enum VmmRequest {
    /// Open a vsock connection to this guest port; the reply is the host end of the stream.
    VsockConnect {
        port: u32,
        reply: SyncSender<std::io::Result<UnixStream>>,
    },
    /// Write a snapshot of the paused VM into these files (opened by the requester: the VMM
    /// thread may not open files); the reply says what was written or why not.
    Snapshot {
        state_file: std::fs::File,
        memory_file: std::fs::File,
        reply: SyncSender<Result<kata_like_vmm_contract::SnapshotInfo, String>>,
    },
}

/// The VMM thread's request queue and the eventfd that wakes it.
pub struct VmmRequests {
    queue: Mutex<VecDeque<VmmRequest>>,
    /// Readable when requests wait; the VMM thread polls it in its epoll set.
    pub evt: EventFd,
}

impl VmmRequests {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmmRequests {
            queue: Mutex::new(VecDeque::new()),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn send(&self, request: VmmRequest) {
        lock(&self.queue).push_back(request);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "cannot wake the VMM thread");
        }
    }

    /// Everything queued so far (the VMM thread's side).
    pub fn take(&self) -> VecDeque<VmmRequest> {
        let _ = self.evt.read();
        std::mem::take(&mut *lock(&self.queue))
    }
}
