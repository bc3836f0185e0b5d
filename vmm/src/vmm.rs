//! The running VM: vCPU threads, the API thread and the event loop on the main thread.

use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{Epoll, EpollEvent};

use crate::api::ApiContext;
use crate::devices::bus::{lock, Bus};
use crate::devices::console_sink::ConsoleCounters;
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{decode_token, DEVICE_TOKEN_BASE, WORK_TOKEN};
use crate::devices::DeviceInfo;
use crate::persist::{self, HostInfo, MicrovmState, SnapshotHeader};
use crate::seccomp::{self, ThreadKind};
use crate::vmm_requests::{VmmRequest, VmmRequests};
use crate::vstate::memory::{write_snapshot_memory, GuestMemoryMmap};
use crate::vstate::vcpu::{
    kick_signal, kick_signal_handler, ExitReason, ExitSignal, Vcpu, VcpuContext, VcpuControl,
};
use crate::vstate::vm::Vm;
use kata_like_vmm_contract::{SeccompViolation, SnapshotInfo};

/// Stack of the vCPU, API and setup threads. Rust's default, 2 MiB, lets a stack that
/// happens to be 2 MiB-aligned (it often sits right below the aligned guest RAM) become one
/// transparent huge page on first touch: measured, the idle VMM's RSS outside guest RAM then
/// jumped from 2.7 to 4.8 MiB. These threads need far less (KVM_RUN, device registers,
/// seccomp setup, JSON on the API socket).
pub const THREAD_STACK_BYTES: usize = 512 << 10;

/// A builder for every thread the VMM starts: named, with `THREAD_STACK_BYTES` of stack.
pub fn thread_builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK_BYTES)
}

/// Epoll token of the exit eventfd; device tokens have a non-zero high half.
pub const EXIT_TOKEN: u64 = 0;
/// Epoll token of `VmmRequests::evt` (see vmm_requests.rs).
pub const REQUEST_TOKEN: u64 = 1;

pub struct Vmm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    /// What a snapshot's header says about this host.
    pub host: HostInfo,
    pub epoll: Arc<Epoll>,
    pub exit: Arc<ExitSignal>,
    pub requests: Arc<VmmRequests>,
    pub control: Arc<VcpuControl>,
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub console: Arc<ConsoleCounters>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub devices: Vec<DeviceInfo>,
    pub vcpus: Vec<Vcpu>,
    /// How many vCPUs the VM has (`vcpus` is emptied when their threads start).
    pub vcpu_count: usize,
}

/// Per-thread seccomp: whether to install filters, and which thread breaks its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeccompSettings {
    pub enabled: bool,
    pub violation: Option<SeccompViolation>,
}

fn enter_thread(kind: ThreadKind, settings: SeccompSettings) -> Result<(), seccomp::Error> {
    if settings.enabled {
        seccomp::apply(kind)?;
    }
    let violator = match kind {
        ThreadKind::Vcpu => SeccompViolation::Vcpu,
        ThreadKind::Api => SeccompViolation::Api,
        ThreadKind::Vmm => SeccompViolation::Vmm,
    };
    if settings.violation == Some(violator) {
        tracing::warn!(thread = ?kind, "making a syscall outside the seccomp filter on request");
        seccomp::forbidden_syscall();
    }
    Ok(())
}

impl Vmm {
    /// Runs the VM to its end; returns the process exit status.
    pub fn run(
        mut self,
        api_listener: Option<UnixListener>,
        seccomp_settings: SeccompSettings,
    ) -> i32 {
        if let Err(e) =
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_signal_handler)
        {
            tracing::error!(error = %e, "cannot install the vCPU kick handler");
            return 1;
        }
        let ctx = VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            control: self.control.clone(),
        };
        let vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>> = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let ctx = ctx.clone();
            let name = format!("vcpu{}", vcpu.index);
            let spawned = thread_builder(name).spawn(move || {
                if let Err(e) = enter_thread(ThreadKind::Vcpu, seccomp_settings) {
                    tracing::error!(error = %e, "vCPU seccomp filter");
                    ctx.exit.request(ExitReason::VmmError);
                    return;
                }
                vcpu.run(ctx);
            });
            match spawned {
                Ok(h) => {
                    lock(&vcpu_threads).push(h.as_pthread_t());
                    handles.push(h);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a vCPU thread");
                    self.exit.request(ExitReason::VmmError);
                }
            }
        }

        if let Some(listener) = api_listener {
            let api = Arc::new(ApiContext {
                exit: self.exit.clone(),
                requests: self.requests.clone(),
                control: self.control.clone(),
                transports: self.transports.clone(),
                devices: self.devices.clone(),
                vcpu_threads: vcpu_threads.clone(),
                console: self.console.clone(),
            });
            let spawned = thread_builder("api").spawn(move || {
                if let Err(e) = enter_thread(ThreadKind::Api, seccomp_settings) {
                    tracing::error!(error = %e, "API seccomp filter");
                    api.exit.request(ExitReason::VmmError);
                    return;
                }
                crate::api::serve(listener, api);
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the API thread");
                self.exit.request(ExitReason::VmmError);
            }
        }

        if let Err(e) = enter_thread(ThreadKind::Vmm, seccomp_settings) {
            tracing::error!(error = %e, "VMM seccomp filter");
            self.exit.request(ExitReason::VmmError);
        }
        self.event_loop();

        let reason = self.exit.reason().unwrap_or(ExitReason::VmmError);
        self.control.request_stop();
        for t in lock(&vcpu_threads).iter() {
            // SAFETY: the threads are alive (joined below), the signal has a handler.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
        lock(&self.serial).sync();
        let first_exit_monotonic_ns = self
            .exit
            .first_exit_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            ?reason,
            status = reason.status(),
            first_exit_monotonic_ns,
            "VM stopped"
        );
        reason.status()
    }

    fn event_loop(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        while self.exit.reason().is_none() {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed");
                    self.exit.request(ExitReason::VmmError);
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == EXIT_TOKEN {
                    continue;
                }
                if token == REQUEST_TOKEN {
                    self.handle_requests();
                    continue;
                }
                let Some((dev, sub)) = decode_token(token) else {
                    continue;
                };
                let Some(transport) = self.transports.get(dev) else {
                    continue;
                };
                let mut t = lock(transport);
                if sub == WORK_TOKEN {
                    t.process_work();
                } else if sub < DEVICE_TOKEN_BASE {
                    t.process_queue(sub as usize);
                } else {
                    t.process_event(sub, ev.events());
                }
            }
        }
    }

    fn handle_requests(&self) {
        for request in self.requests.take() {
            match request {
                VmmRequest::VsockConnect { port, reply } => {
                    let result = self.vsock_connect(port);
                    if let Err(e) = &result {
                        tracing::info!(port, error = %e, "internal vsock connection not opened");
                    }
                    // The requester may have stopped waiting: then the stream just closes.
                    let _ = reply.send(result);
                }
                VmmRequest::Snapshot {
                    mut state_file,
                    memory_file,
                    reply,
                } => {
                    let result = self.snapshot(&mut state_file, &memory_file);
                    match &result {
                        Ok(info) => tracing::info!(
                            state_bytes = info.state_bytes,
                            memory_written_bytes = info.memory_written_bytes,
                            duration_us = info.duration_us,
                            "snapshot written"
                        ),
                        Err(e) => tracing::warn!(error = %e, "snapshot failed"),
                    }
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Writes the memory file, then the state file, of the paused VM. Runs on the VMM
    /// thread, so no device touches guest memory or its queues meanwhile; the vCPUs save
    /// their own state on their threads.
    fn snapshot(
        &self,
        state_file: &mut std::fs::File,
        memory_file: &std::fs::File,
    ) -> Result<SnapshotInfo, String> {
        let started = std::time::Instant::now();
        let vcpus = self.control.save_vcpus(self.vcpu_count)?;
        let vm = self.vm.save_state().map_err(|e| e.to_string())?;
        let devices = self.transports.iter().map(|t| lock(t).snapshot()).collect();
        let serial = lock(&self.serial).snapshot();
        let dump = write_snapshot_memory(&self.mem, memory_file).map_err(|e| e.to_string())?;
        let state = MicrovmState {
            memory_bytes: dump.size,
            vm,
            vcpus,
            serial,
            devices,
        };
        let bytes = persist::encode(&SnapshotHeader::new(self.host.clone()), &state)
            .map_err(|e| e.to_string())?;
        persist::write_state(state_file, &bytes).map_err(|e| e.to_string())?;
        Ok(SnapshotInfo {
            state_bytes: bytes.len() as u64,
            memory_bytes: dump.size,
            memory_written_bytes: dump.written,
            duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    fn vsock_connect(&self, port: u32) -> std::io::Result<UnixStream> {
        let transport = self
            .devices
            .iter()
            .position(|d| d.kind == "vsock")
            .and_then(|i| self.transports.get(i))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no vsock device"))?;
        let mut t = lock(transport);
        t.apply_pending();
        let vsock = t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Vsock>()
            .ok_or_else(|| std::io::Error::other("vsock slot holds another device"))?;
        vsock.connect_internal(port)
    }
}
