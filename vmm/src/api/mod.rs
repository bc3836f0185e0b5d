//! Run-time control API: JSON lines on a Unix stream socket (see CONTRACT.md). Requests are
//! untrusted: bounded line length, strict parsing, fds accepted only where an op wants one.
//! The requests, responses and metrics are the contract crate's types.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::bus::lock;
use crate::devices::console_sink::ConsoleCounters;
use crate::devices::virtio::block::device::Backing;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::DeviceInfo;
use crate::persist::{MEMORY_FILE, STATE_FILE};
use crate::vmm_requests::{VmmRequest, VmmRequests};
use crate::vstate::vcpu::{kick_signal, ExitReason, ExitSignal, VcpuControl};
use kata_like_vmm_contract::limits::{MAX_LINE, POWER_PORT};
use kata_like_vmm_contract::{parse_request, DeviceMetrics, Request, Response, VmMetrics};
const MAX_CLIENTS: usize = 16;
/// How long a graceful stop waits for the VMM thread to open the power-port connection.
const POWER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_FDS_PER_MESSAGE: usize = 4;

pub struct ApiContext {
    pub exit: Arc<ExitSignal>,
    pub requests: Arc<VmmRequests>,
    pub control: Arc<VcpuControl>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub devices: Vec<DeviceInfo>,
    pub vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    pub console: Arc<ConsoleCounters>,
}

impl ApiContext {
    fn drive(&self, id: &str) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.devices
            .iter()
            .position(|d| d.kind == "block" && d.id.as_deref() == Some(id))
            .and_then(|i| self.transports.get(i))
    }

    fn kick_vcpus(&self) {
        for t in lock(&self.vcpu_threads).iter() {
            // SAFETY: vCPU threads live as long as the process; the signal has a handler.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    fn set_backing(&self, id: &str, backing: Option<Backing>) -> Response {
        let Some(transport) = self.drive(id) else {
            return Response::error(format!("no drive with id {id:?}"));
        };
        let mut t = lock(transport);
        let Some(block) = t.device_mut().as_any_mut().downcast_mut::<Block>() else {
            return Response::error("device is not a drive");
        };
        block.set_backing(backing);
        let sectors = block.capacity();
        t.notify_config_change();
        tracing::info!(drive = id, sectors, "drive backing changed");
        Response {
            capacity_sectors: Some(sectors),
            ..Response::ok()
        }
    }

    /// Executes one request. `fds` holds descriptors that came with it.
    pub fn handle(
        &self,
        req: Request,
        fds: &mut VecDeque<OwnedFd>,
    ) -> (Response, Option<Box<dyn FnOnce() + Send>>) {
        match req {
            Request::Ping {} => (
                Response {
                    version: Some(env!("CARGO_PKG_VERSION").into()),
                    ..Response::ok()
                },
                None,
            ),
            Request::SetDrive {
                id,
                path,
                read_only,
            } => {
                let file = match path {
                    Some(p) => std::fs::OpenOptions::new()
                        .read(true)
                        .write(!read_only)
                        .open(&p),
                    None => match fds.pop_front() {
                        Some(fd) => Ok(File::from(fd)),
                        None => {
                            return (
                                Response::error(
                                    "set_drive needs a path or an fd passed with SCM_RIGHTS",
                                ),
                                None,
                            )
                        }
                    },
                };
                let backing = match file.and_then(|f| Backing::new(f, read_only)) {
                    Ok(b) => b,
                    Err(e) => return (Response::error(format!("backing file: {e}")), None),
                };
                (self.set_backing(&id, Some(backing)), None)
            }
            Request::ClearDrive { id } => (self.set_backing(&id, None), None),
            Request::Pause {} => {
                self.control.request_pause(true);
                self.kick_vcpus();
                self.control.wait_paused(lock(&self.vcpu_threads).len());
                (Response::ok(), None)
            }
            Request::Resume {} => {
                self.control.request_pause(false);
                (Response::ok(), None)
            }
            Request::Snapshot { dir } => (self.snapshot(&dir), None),
            Request::Metrics {} => (
                Response {
                    metrics: Some(self.metrics()),
                    ..Response::ok()
                },
                None,
            ),
            Request::Stop { force, timeout_ms } => {
                let exit = self.exit.clone();
                if force {
                    return (
                        Response {
                            graceful: Some(false),
                            ..Response::ok()
                        },
                        Some(Box::new(move || exit.request(ExitReason::Stopped))),
                    );
                }
                // Resume a paused guest so that it can shut down.
                self.control.request_pause(false);
                let stream = self.power_port_connect();
                let graceful = stream.is_some();
                let after: Box<dyn FnOnce() + Send> = Box::new(move || {
                    exit.wait_timeout(Duration::from_millis(timeout_ms));
                    drop(stream);
                    exit.request(ExitReason::Stopped);
                });
                (
                    Response {
                        graceful: Some(graceful),
                        ..Response::ok()
                    },
                    Some(after),
                )
            }
        }
    }

    /// Creates the snapshot's files in `dir` (inside the jail) and has the VMM thread write
    /// them. A failed snapshot leaves no files behind.
    fn snapshot(&self, dir: &str) -> Response {
        if !self.control.is_paused() {
            return Response::error("snapshot needs a paused VM: send pause first");
        }
        let dir = Path::new(dir);
        let paths = [dir.join(STATE_FILE), dir.join(MEMORY_FILE)];
        let create = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))
        };
        let remove = || {
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
        };
        // The state file first: truncated, it no longer describes the old memory file.
        let files = create(&paths[0]).and_then(|s| Ok((s, create(&paths[1])?)));
        let (state_file, memory_file) = match files {
            Ok(f) => f,
            Err(e) => {
                remove();
                return Response::error(format!("snapshot: {e}"));
            }
        };
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.requests.send(VmmRequest::Snapshot {
            state_file,
            memory_file,
            reply,
        });
        let result = loop {
            match answer.recv_timeout(Duration::from_secs(1)) {
                Ok(result) => break result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if self.exit.reason().is_none() => {
                }
                Err(_) => break Err("the VM ended before the snapshot was written".into()),
            }
        };
        match result {
            Ok(info) => Response {
                snapshot: Some(info),
                ..Response::ok()
            },
            Err(e) => {
                remove();
                Response::error(format!("snapshot: {e}"))
            }
        }
    }

    /// Asks the VMM thread (the owner of the vsock sockets) to connect to the power port.
    fn power_port_connect(&self) -> Option<UnixStream> {
        if !self.devices.iter().any(|d| d.kind == "vsock") {
            return None;
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.requests.send(VmmRequest::VsockConnect {
            port: POWER_PORT,
            reply,
        });
        // The VMM thread answers at once unless the VM is ending.
        answer.recv_timeout(POWER_CONNECT_TIMEOUT).ok()?.ok()
    }

    pub fn metrics(&self) -> VmMetrics {
        let devices = self
            .transports
            .iter()
            .map(|t| {
                let t = lock(t);
                DeviceMetrics {
                    status: t.status(),
                    counters: t.device().metrics(),
                }
            })
            .collect();
        VmMetrics {
            vcpus: lock(&self.vcpu_threads).len(),
            paused: self.control.is_paused(),
            console_bytes: self.console.bytes.load(Ordering::Relaxed),
            console_dropped_bytes: self.console.dropped_bytes.load(Ordering::Relaxed),
            devices,
        }
    }
}

/// recvmsg with room for a few SCM_RIGHTS fds; extra fds are closed by the kernel's
/// truncation (MSG_CTRUNC) or dropped here.
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> std::io::Result<usize> {
    let mut cmsg_buf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; we set the pointers to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into cmsg_buf.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if fds.len() < MAX_FDS_PER_MESSAGE {
                        fds.push_back(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Client {
    fn respond(&mut self, response: &Response) -> bool {
        (&self.stream)
            .write_all(response.to_line().as_bytes())
            .is_ok()
    }

    /// Reads what is available and answers complete lines. Returns false to drop the client.
    fn service(&mut self, ctx: &ApiContext) -> bool {
        let mut chunk = [0u8; 4096];
        let n = match recv_with_fds(self.stream.as_raw_fd(), &mut chunk, &mut self.fds) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let (resp, after) = match parse_request(&line[..line.len() - 1]) {
                Ok(req) => ctx.handle(req, &mut self.fds),
                Err(e) => (Response::error(e), None),
            };
            // Descriptors not consumed by this request are not carried over to the next.
            self.fds.clear();
            let alive = self.respond(&resp);
            if let Some(f) = after {
                f();
            }
            if !alive {
                return false;
            }
        }
        if self.buf.len() > MAX_LINE {
            self.respond(&Response::error(format!(
                "request line longer than {MAX_LINE} bytes"
            )));
            return false;
        }
        true
    }
}

/// Serves the API until the process exits.
pub fn serve(listener: UnixListener, ctx: Arc<ApiContext>) {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let mut pfds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        pfds.extend(clients.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: pfds is a valid array of pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue;
        }
        let mut keep = vec![true; clients.len()];
        for (i, c) in clients.iter_mut().enumerate() {
            if pfds[i + 1].revents != 0 {
                keep[i] = c.service(&ctx);
            }
        }
        let mut k = keep.iter();
        clients.retain(|_| *k.next().unwrap_or(&false));
        if pfds[0].revents & libc::POLLIN != 0 {
            if let Ok((stream, _)) = listener.accept() {
                if clients.len() < MAX_CLIENTS {
                    clients.push(Client {
                        stream,
                        buf: Vec::new(),
                        fds: VecDeque::new(),
                    });
                }
            }
        }
    }
}
