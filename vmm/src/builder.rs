//! Assembles a VM from its `VmConfig`: opens everything first (so the jail can drop access
//! to the host), then builds memory, vCPUs and devices.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, Kvm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::arch::{boot, mptable};
use crate::devices::bus::Bus;
use crate::devices::console_sink::{ConsoleCounters, ConsoleOutput, ConsoleSink};
use crate::devices::legacy::serial::{ConsoleWriter, SerialDevice};
use crate::devices::virtio::block::device::Backing;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{EventRegistrar, VirtioDevice, WORK_TOKEN};
use crate::devices::DeviceInfo;
use crate::persist::{HostInfo, MicrovmState};
use crate::vmm::{thread_builder, Vmm, EXIT_TOKEN, REQUEST_TOKEN};
use crate::vmm_requests::VmmRequests;
use crate::vstate::memory::{
    create_guest_memory_with, map_snapshot_memory, GuestMemoryMmap, MemoryBacking,
};
use crate::vstate::vcpu::{ExitSignal, Vcpu, VcpuControl};
use crate::vstate::vm::{open_kvm, Vm};
use kata_like_vmm_contract::{ConsoleConfig, DriveConfig, NetBackend, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("KVM: {0}")]
    Vm(#[from] crate::vstate::vm::Error),
    #[error("vCPU: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] crate::vstate::memory::Error),
    #[error("boot: {0}")]
    Boot(#[from] boot::Error),
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::Error),
    #[error("TAP: {0}")]
    Tap(std::io::Error),
    #[error("device setup: {0}")]
    Device(std::io::Error),
    #[error("registering {0} with KVM: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::Error),
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::persist::Error),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
    #[error("virtio-fs: {0}")]
    Fs(#[from] crate::devices::virtio::fs::FsBackendError),
}

/// Host resources opened before jailing.
pub struct OpenedResources {
    pub kvm: Kvm,
    /// None when restoring a snapshot.
    pub kernel: Option<File>,
    /// `--restore`: the state file's bytes and the memory file.
    pub snapshot: Option<(Vec<u8>, File)>,
    pub initrd: Option<File>,
    pub drives: Vec<(DriveConfig, Option<File>)>,
    /// One TAP per `--net`, in order.
    pub taps: Vec<Tap>,
    pub vsock_listener: Option<UnixListener>,
    /// One per `--fs`, in order, each already connected to its vhost-user backend.
    pub fs: Vec<Fs>,
    pub api_listener: Option<UnixListener>,
    pub console: ConsoleSink,
}

fn open_file(path: &Path, write: bool) -> Result<File, BuildError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| BuildError::Open(path.to_path_buf(), e))
}

/// Binds a Unix listener at `path`, replacing a stale socket file (never a regular file).
pub fn bind_unix(path: &Path) -> Result<UnixListener, BuildError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|e| BuildError::Open(path.to_path_buf(), e))
}

/// Opens every host resource the VM will use.
pub fn open_resources(r: &VmConfig) -> Result<OpenedResources, BuildError> {
    let kvm = open_kvm()?;
    let (kernel, snapshot) = match &r.restore {
        Some(dir) => (None, Some(open_snapshot(dir)?)),
        None => (Some(open_file(&r.boot.kernel, false)?), None),
    };
    let initrd = r
        .boot
        .initrd
        .as_deref()
        .map(|p| open_file(p, false))
        .transpose()?;
    let mut drives = Vec::new();
    for d in &r.drives {
        let file = d
            .path
            .as_deref()
            .map(|p| open_file(p, !d.read_only))
            .transpose()?;
        drives.push((d.clone(), file));
    }
    let taps = r
        .net
        .iter()
        .map(|n| match &n.backend {
            NetBackend::Fd(fd) => Tap::from_fd(*fd),
            NetBackend::Tap(name) => Tap::open_named(name),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(BuildError::Tap)?;
    let vsock_listener = r.vsock.as_ref().map(|v| bind_unix(&v.uds)).transpose()?;
    let fs =
        r.fs.iter()
            .map(|f| Fs::connect(&f.tag, &f.socket))
            .collect::<Result<Vec<_>, _>>()?;
    let api_listener = r.api_sock.as_deref().map(bind_unix).transpose()?;
    let console = match &r.console {
        ConsoleConfig::Stdout => ConsoleSink::Stdout,
        ConsoleConfig::Null => ConsoleSink::Null,
        // SAFETY: the fd was named on the command line and is kept open for us.
        ConsoleConfig::Fd(fd) => ConsoleSink::File(unsafe { File::from_raw_fd(*fd) }),
        ConsoleConfig::Path(p) => ConsoleSink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| BuildError::Open(p.clone(), e))?,
        ),
    };
    Ok(OpenedResources {
        kvm,
        kernel,
        snapshot,
        initrd,
        drives,
        taps,
        vsock_listener,
        fs,
        api_listener,
        console,
    })
}

/// Reads a snapshot directory's state file and opens its memory file (read-only: it is
/// mapped MAP_PRIVATE, the guest's writes never reach it).
fn open_snapshot(dir: &Path) -> Result<(Vec<u8>, File), BuildError> {
    use std::io::Read;
    let state_path = dir.join(crate::persist::STATE_FILE);
    let mut state = Vec::new();
    // Read at most one byte more than a state file may have: a larger file is refused by
    // `persist::decode` without the VMM holding all of it.
    open_file(&state_path, false)?
        .take(crate::persist::MAX_STATE_FILE_LEN + 1)
        .read_to_end(&mut state)
        .map_err(|e| BuildError::Open(state_path, e))?;
    let memory = open_file(&dir.join(crate::persist::MEMORY_FILE), false)?;
    Ok((state, memory))
}

/// The path of `p` as seen from inside the jail rooted at `jail_dir`.
pub fn path_in_jail(p: &Path, jail_dir: Option<&Path>) -> PathBuf {
    match jail_dir.and_then(|d| p.strip_prefix(d).ok()) {
        Some(rel) => Path::new("/").join(rel),
        None => p.to_path_buf(),
    }
}

/// How the guest starts.
enum Start<'a> {
    /// From the kernel: load it, write boot parameters, set up the vCPUs for its entry.
    Boot,
    /// From a snapshot whose vCPUs and VM state are already restored: devices take its state.
    Restore {
        state: &'a MicrovmState,
        vcpus: Vec<Vcpu>,
    },
}

/// Builds the VM: memory, kernel, devices, vCPUs (or all of them from a snapshot). Nothing
/// runs yet.
pub fn build_vmm(r: &VmConfig, mut o: OpenedResources) -> Result<Vmm, BuildError> {
    if let Some((state, memory)) = o.snapshot.take() {
        return build_restored(r, o, &state, &memory);
    }
    // A vhost-user backend maps guest RAM itself: it must be a shared memfd then.
    let backing = if r.fs.is_empty() {
        MemoryBacking::Anonymous
    } else {
        MemoryBacking::SharedMemfd
    };
    let mem = create_guest_memory_with(r.machine.memory_mib << 20, r.machine.hugepages, backing)?;
    tracing::debug!(mib = r.machine.memory_mib, "guest memory mapped");
    let vm = Vm::new_without_pit(&o.kvm)?;
    let host = HostInfo::probe(&o.kvm, vm.supported_cpuid());
    // Registering the memory slot and creating the PIT are slow ioctls (milliseconds on some
    // hosts) that nothing else waits for until the vCPUs run: do them while the kernel loads
    // and the devices are set up.
    let parts = std::thread::scope(|s| {
        // Two threads: the two ioctls take different KVM locks and run in parallel.
        let pit = thread_builder("vm-pit").spawn_scoped(s, || vm.create_pit());
        let memory = thread_builder("vm-memory").spawn_scoped(s, || vm.register_memory(&mem));
        let parts = assemble(r, o, &vm, &mem, Start::Boot);
        for handle in [pit, memory] {
            let joined = handle
                .map_err(BuildError::Device)?
                .join()
                .map_err(|_| std::io::Error::other("VM setup thread panicked"));
            joined.map_err(BuildError::Device)??;
        }
        parts
    })?;
    tracing::debug!(vcpus = parts.vcpus.len(), "VM built");
    Ok(Vmm::from_parts(vm, mem, host, parts))
}

/// Rebuilds a VM from a snapshot: the state file is checked whole first (format, checksum,
/// VMM version, host), then guest RAM maps the memory file, the vCPUs and the VM (irqchip,
/// PIT, clock) get their state, and the devices are built on this configuration's backends
/// and take the state of the same slots. No kernel is loaded and no boot-time setup runs.
fn build_restored(
    r: &VmConfig,
    o: OpenedResources,
    state_bytes: &[u8],
    memory: &File,
) -> Result<Vmm, BuildError> {
    let started = std::time::Instant::now();
    if !r.fs.is_empty() {
        // A vhost-user backend maps guest RAM through a shared fd; a restored VM's RAM is a
        // private copy-on-write mapping of the snapshot file, which the backend cannot share.
        return Err(BuildError::Restore(
            "a VM with a virtio-fs device (--fs) cannot be restored: boot it instead".into(),
        ));
    }
    let vm = Vm::new_without_pit(&o.kvm)?;
    let host = HostInfo::probe(&o.kvm, vm.supported_cpuid());
    let (_, state) = crate::persist::decode(state_bytes, &host)?;
    let vcpu_count = state.vcpus.len();
    if vcpu_count == 0 || vcpu_count > usize::from(kata_like_vmm_contract::limits::MAX_VCPUS) {
        return Err(BuildError::Restore(format!(
            "the snapshot has {vcpu_count} vCPUs"
        )));
    }
    if state.devices.len() != r.virtio_devices() {
        return Err(BuildError::Restore(format!(
            "the snapshot has {} virtio devices, the command line {}: give the same devices in the same order as the VM that made it",
            state.devices.len(),
            r.virtio_devices()
        )));
    }
    let mem = map_snapshot_memory(memory, state.memory_bytes)?;
    vm.create_pit()?;
    vm.register_memory(&mem)?;
    let mut vcpus = Vec::with_capacity(vcpu_count);
    for (index, saved) in state.vcpus.iter().enumerate() {
        if usize::from(saved.index) != index {
            return Err(BuildError::Restore(format!(
                "vCPU {index} of the snapshot says it is vCPU {}",
                saved.index
            )));
        }
        let vcpu = Vcpu::new(&vm, saved.index)?;
        vcpu.restore_state(saved)
            .map_err(|e| BuildError::Restore(e.to_string()))?;
        vcpus.push(vcpu);
    }
    // After the vCPUs (their LAPICs), before the devices (which may raise interrupts).
    vm.restore_state(&state.vm)?;
    let parts = assemble(
        r,
        o,
        &vm,
        &mem,
        Start::Restore {
            state: &state,
            vcpus,
        },
    )?;
    tracing::info!(
        vcpus = vcpu_count,
        memory_bytes = state.memory_bytes,
        devices = state.devices.len(),
        restore_us = started.elapsed().as_micros(),
        "VM restored from the snapshot"
    );
    Ok(Vmm::from_parts(vm, mem, host, parts))
}

impl Vmm {
    fn from_parts(vm: Vm, mem: GuestMemoryMmap, host: HostInfo, parts: Parts) -> Vmm {
        Vmm {
            vm,
            mem,
            host,
            control: Arc::new(VcpuControl::default()),
            epoll: parts.epoll,
            exit: parts.exit,
            requests: parts.requests,
            pio: parts.pio,
            mmio: parts.mmio,
            serial: parts.serial,
            console: parts.console,
            transports: parts.transports,
            devices: parts.devices,
            vcpu_count: parts.vcpus.len(),
            vcpus: parts.vcpus,
        }
    }
}

/// Everything of a `Vmm` but the VM and its memory.
struct Parts {
    epoll: Arc<Epoll>,
    exit: Arc<ExitSignal>,
    requests: Arc<VmmRequests>,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    console: Arc<ConsoleCounters>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<DeviceInfo>,
    vcpus: Vec<Vcpu>,
}

/// Loads the kernel (when booting) and builds devices and vCPUs.
fn assemble(
    r: &VmConfig,
    mut o: OpenedResources,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    start: Start,
) -> Result<Parts, BuildError> {
    let mem = mem.clone();
    let boot = match (&start, o.kernel.as_mut()) {
        (Start::Boot, Some(kernel_file)) => {
            let kernel = boot::load_kernel(&mem, kernel_file)?;
            tracing::debug!(kernel_end = kernel.kernel_end, "kernel loaded");
            let initrd = match o.initrd.as_mut() {
                Some(f) => Some(boot::load_initrd(&mem, f, kernel.kernel_end)?),
                None => None,
            };
            tracing::debug!(bytes = initrd.map(|i| i.size), "initramfs loaded");
            Some((kernel, initrd))
        }
        (Start::Boot, None) => {
            return Err(BuildError::Restore("booting needs a kernel".into()));
        }
        (Start::Restore { .. }, _) => None,
    };

    let epoll = Arc::new(Epoll::new().map_err(BuildError::Device)?);
    let exit = Arc::new(ExitSignal::new().map_err(BuildError::Device)?);
    epoll
        .ctl(
            ControlOperation::Add,
            exit_fd(&exit.evt),
            EpollEvent::new(EventSet::IN, EXIT_TOKEN),
        )
        .map_err(BuildError::Device)?;
    let requests = Arc::new(VmmRequests::new().map_err(BuildError::Device)?);
    epoll
        .ctl(
            ControlOperation::Add,
            exit_fd(&requests.evt),
            EpollEvent::new(EventSet::IN, REQUEST_TOKEN),
        )
        .map_err(BuildError::Device)?;

    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::Device)?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| BuildError::Kvm("serial irqfd", e))?;
    // One sink for both consoles: the guest prints on either (ttyS0 early or in tests, hvc0
    // in pod VMs).
    let console = ConsoleOutput::new(o.console).map_err(BuildError::Device)?;
    let serial_out = ConsoleWriter::new(console.clone());
    let serial = match &start {
        Start::Boot => SerialDevice::new(serial_irq, serial_out),
        Start::Restore { state, .. } => {
            SerialDevice::from_snapshot(serial_irq, serial_out, &state.serial)
                .map_err(BuildError::Restore)?
        }
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(u64::from(COM1_BASE), 8, serial.clone())?;

    let mut devices: Vec<(Box<dyn VirtioDevice>, DeviceInfo)> = Vec::new();
    for (cfg, file) in o.drives {
        let backing = file
            .map(|f| Backing::new(f, cfg.read_only))
            .transpose()
            .map_err(BuildError::Device)?;
        let info = DeviceInfo {
            kind: "block",
            id: Some(cfg.id.clone()),
        };
        let block = Block::new(
            BlockConfig {
                id: cfg.id,
                read_only: cfg.read_only,
            },
            backing,
        );
        devices.push((Box::new(block), info));
    }
    for (tap, net) in o.taps.into_iter().zip(&r.net) {
        devices.push((
            Box::new(Net::new(tap, net.mac)),
            DeviceInfo {
                kind: "net",
                id: None,
            },
        ));
    }
    if let (Some(listener), Some(v)) = (o.vsock_listener, r.vsock.as_ref()) {
        let jail_dir = r
            .jail
            .enabled
            .then_some(r.jail.jail_dir.as_deref())
            .flatten();
        let uds = path_in_jail(&v.uds, jail_dir);
        let vsock = Vsock::new(v.cid, listener, uds).map_err(BuildError::Device)?;
        devices.push((
            Box::new(vsock),
            DeviceInfo {
                kind: "vsock",
                id: None,
            },
        ));
    }
    for (fs, cfg) in o.fs.into_iter().zip(&r.fs) {
        devices.push((
            Box::new(fs),
            DeviceInfo {
                kind: "fs",
                id: Some(cfg.tag.clone()),
            },
        ));
    }
    if r.rng {
        devices.push((
            Box::new(Rng::new()),
            DeviceInfo {
                kind: "rng",
                id: None,
            },
        ));
    }

    if r.virtio_console {
        devices.push((
            Box::new(Console::new(console.clone())),
            DeviceInfo {
                kind: "console",
                id: None,
            },
        ));
    }

    let mut mmio = Bus::new();
    let mut transports = Vec::new();
    let mut infos = Vec::new();
    let mut cmdline_devices = Vec::new();
    for (i, (device, info)) in devices.into_iter().enumerate() {
        let addr = MMIO_DEVICES_START + i as u64 * MMIO_DEVICE_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let mut transport = MmioTransport::new(device, mem.clone()).map_err(BuildError::Device)?;
        vm.fd()
            .register_irqfd(&transport.irq().evt, irq)
            .map_err(|e| BuildError::Kvm("virtio irqfd", e))?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(|e| BuildError::Kvm("ioeventfd", e))?;
            let token = EventRegistrar::token(i as u32, q as u32);
            epoll
                .ctl(
                    ControlOperation::Add,
                    exit_fd(evt),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(BuildError::Device)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                exit_fd(transport.work_evt()),
                EpollEvent::new(EventSet::IN, EventRegistrar::token(i as u32, WORK_TOKEN)),
            )
            .map_err(BuildError::Device)?;
        transport.set_registrar(EventRegistrar::new(epoll.clone(), i as u32));
        if let Start::Restore { state, .. } = &start {
            // The count was checked against the configuration before anything was built.
            if let Some(saved) = state.devices.get(i) {
                transport
                    .restore(saved)
                    .map_err(|e| BuildError::Restore(format!("device {i} ({}): {e}", info.kind)))?;
            }
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(addr, MMIO_DEVICE_SIZE, transport.clone())?;
        transports.push(transport);
        infos.push(info);
        cmdline_devices.push((addr, irq));
    }

    let vcpus = match (start, boot) {
        (Start::Boot, Some((kernel, initrd))) => {
            let cmdline = boot::build_cmdline(&r.boot.cmdline, &cmdline_devices)?;
            boot::configure_boot(&mem, &kernel, &cmdline, initrd)?;
            mptable::setup_mptable(&mem, r.machine.vcpus)?;
            let mut vcpus = Vec::new();
            for index in 0..r.machine.vcpus {
                let vcpu = Vcpu::new(vm, index)?;
                vcpu.configure_cpu(vm.supported_cpuid(), r.machine.vcpus)?;
                if index == 0 {
                    vcpu.configure_boot(&mem, kernel.entry)?;
                }
                vcpus.push(vcpu);
            }
            vcpus
        }
        (Start::Restore { vcpus, .. }, _) => vcpus,
        (Start::Boot, None) => Vec::new(),
    };

    Ok(Parts {
        epoll,
        exit,
        requests,
        pio,
        mmio,
        serial,
        console: console.counters.clone(),
        transports,
        devices: infos,
        vcpus,
    })
}

fn exit_fd(evt: &EventFd) -> i32 {
    use std::os::unix::io::AsRawFd;
    evt.as_raw_fd()
}
