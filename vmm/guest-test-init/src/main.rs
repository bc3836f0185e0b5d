//! /init for the VMM's Linux integration tests. Reads `kl_test=<case>` from the kernel
//! command line, exercises one device, reports on the console (lines starting with `KL_`)
//! and ends through the exit port (0xf4) with 0 on success, non-zero on failure.
//!
//! Cases: marker, poweroff, boot_gaps (a diagnostic: the kernel log's slow stretches), idle,
//! panic, blk, blk_hotplug, vsock, vsock_shim, net, power_port.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

const EXIT_PORT: u16 = 0xf4;

fn say(msg: &str) {
    let mut out = io::stdout();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

/// Writes `status` to the exit port, which ends the VM.
fn write_exit_port(status: u8) {
    // SAFETY: ioperm grants this process access to one port; `out` then writes it.
    unsafe {
        if libc::ioperm(u64::from(EXIT_PORT), 1, 1) == 0 {
            std::arch::asm!("out dx, al", in("dx") EXIT_PORT, in("al") status);
        }
    }
}

/// Ends the VM with `status` through the VMM's exit port.
fn exit_vm(status: u8) -> ! {
    // The tty sends console output from an interrupt-driven buffer: wait until the UART has
    // taken all of it, or the VM could end before the last lines reach the host.
    // SAFETY: tcdrain on our stdout.
    unsafe { libc::tcdrain(1) };
    write_exit_port(status);
    say("KL_EXIT_PORT_FAILED");
    // Without the port, a reboot (reboot=t) ends the VM.
    // SAFETY: plain reboot syscall.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    std::process::exit(1)
}

/// `KL_BOOT_TIMES kvmclock_ms=A init_ms=B`: A is what kvm-clock read when the kernel set it up
/// early in boot (time since KVM's clock zero: VM creation for kata-like-vmm, VM start for
/// QEMU), B the kernel's clock (zero at that setup) when it ran /init. Both come from the
/// kernel log: `/proc/uptime` starts later and runs on jiffies early in boot. They let the boot
/// benchmark split a VMM's boot time into guest-kernel time and the VMM's own.
fn boot_times() -> String {
    let mut kvmclock_ms = None;
    let mut init_ms = None;
    if let Ok(mut kmsg) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    {
        let mut record = vec![0u8; 8192];
        // One record per read; EAGAIN at the end of the log.
        while let Ok(n) = kmsg.read(&mut record) {
            let text = String::from_utf8_lossy(&record[..n]);
            let Some((prefix, message)) = text.split_once(';') else {
                continue;
            };
            let usec = prefix.split(',').nth(2).and_then(|v| v.parse::<u64>().ok());
            if let Some(rest) = message.split("using sched offset of ").nth(1) {
                kvmclock_ms = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|ns| ns / 1_000_000);
            }
            if message.starts_with("Run /init") {
                init_ms = usec.map(|u| u / 1000);
            }
        }
    }
    let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    format!(
        "KL_BOOT_TIMES kvmclock_ms={} init_ms={}",
        show(kvmclock_ms),
        show(init_ms)
    )
}

/// The kernel log's slow stretches: every record that came at least `min_gap_ms` after the one
/// before it, with that one. For finding where boot time goes (`kl_test=boot_gaps`, best with
/// `initcall_debug`) without printing the whole log, since each console byte is a VM exit.
fn boot_gaps(min_gap_ms: u64) -> Vec<String> {
    let mut gaps = Vec::new();
    let Ok(mut kmsg) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return gaps;
    };
    let mut record = vec![0u8; 8192];
    let mut previous: Option<(u64, String)> = None;
    while let Ok(n) = kmsg.read(&mut record) {
        let text = String::from_utf8_lossy(&record[..n]);
        let Some((prefix, message)) = text.split_once(';') else {
            continue;
        };
        let Some(usec) = prefix.split(',').nth(2).and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let message: String = message
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        if let Some((before, before_message)) = &previous {
            let gap_ms = usec.saturating_sub(*before) / 1000;
            if gap_ms >= min_gap_ms {
                gaps.push(format!(
                    "KL_GAP {gap_ms} ms at {} ms: after [{before_message}] before [{message}]",
                    usec / 1000
                ));
            }
        }
        previous = Some((usec, message));
    }
    gaps
}

fn mount(fstype: &str, target: &str) {
    let _ = fs::create_dir_all(target);
    let src = std::ffi::CString::new(fstype).unwrap_or_default();
    let tgt = std::ffi::CString::new(target).unwrap_or_default();
    // SAFETY: valid C strings.
    unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
}

fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|kv| {
        kv.strip_prefix(key)
            .and_then(|v| v.strip_prefix('='))
            .map(str::to_string)
    })
}

/// The /dev node of the virtio-blk drive whose serial is `serial`.
fn drive_by_serial(serial: &str) -> Option<String> {
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Ok(s) = fs::read_to_string(entry.path().join("serial")) {
            if s.trim_end_matches(['\0', '\n']) == serial {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

fn sectors(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn printable(b: &[u8]) -> String {
    b.iter()
        .take_while(|c| **c != 0)
        .map(|c| {
            if c.is_ascii_graphic() || *c == b' ' {
                *c as char
            } else {
                '.'
            }
        })
        .collect()
}

fn test_blk() -> io::Result<()> {
    let ro =
        drive_by_serial("klro").ok_or_else(|| io::Error::other("no drive with serial klro"))?;
    let rw =
        drive_by_serial("klrw").ok_or_else(|| io::Error::other("no drive with serial klrw"))?;
    let mut buf = [0u8; 64];
    File::open(&ro)?.read_exact(&mut buf)?;
    say(&format!("KL_BLK_READ {}", printable(&buf)));
    if OpenOptions::new()
        .write(true)
        .open(&ro)
        .and_then(|f| f.write_all_at(b"x", 0))
        .is_ok()
    {
        return Err(io::Error::other("write to the read-only drive succeeded"));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_direct()
        .open(&rw)?;
    let mut block = vec![0u8; 4096];
    block[..19].copy_from_slice(b"KL-GUEST-WROTE-THIS");
    f.write_all_at(&block, 4096)?;
    f.sync_all()?;
    say("KL_BLK_DONE");
    Ok(())
}

trait DirectIo {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectIo for OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_SYNC)
    }
}

/// Serves vsock port 1025 like the agent: a connection there means "power off".
fn wait_power_request() -> io::Result<()> {
    let listener = vsock_listen(1025, 4)?;
    say("KL_POWER_PORT_READY");
    let conn = vsock_accept(listener)?;
    // The connection stays open until the power-off, as the agent keeps it.
    let _ = conn.into_raw_fd();
    say("KL_POWER_REQUEST");
    Ok(())
}

fn test_blk_hotplug() -> io::Result<()> {
    let dev =
        drive_by_serial("slot0").ok_or_else(|| io::Error::other("no drive with serial slot0"))?;
    say(&format!("KL_SLOT_EMPTY {}", sectors(&dev)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while sectors(&dev) == 0 {
        if Instant::now() > deadline {
            return Err(io::Error::other("slot never got a backing file"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = [0u8; 64];
    File::open(&dev)?.read_exact(&mut buf)?;
    say(&format!("KL_HOTPLUG {} {}", sectors(&dev), printable(&buf)));
    Ok(())
}

#[repr(C)]
struct SockaddrVm {
    family: libc::sa_family_t,
    reserved: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

fn vsock_addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: libc::AF_VSOCK as u16,
        reserved: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    }
}

fn vsock_socket() -> io::Result<RawFd> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn test_vsock() -> io::Result<()> {
    let listener = vsock_listen(1234, 4)?;
    say("KL_VSOCK_LISTENING");
    let conn = vsock_accept(listener)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    (&conn).write_all(format!("echo:{line}").as_bytes())?;
    say(&format!("KL_VSOCK_GOT {}", line.trim_end()));

    let out = vsock_connect(2, 5000)?;
    (&out).write_all(b"hello-from-guest\n")?;
    let mut reply = String::new();
    BufReader::new(&out).read_line(&mut reply)?;
    say(&format!("KL_VSOCK_REPLY {}", reply.trim_end()));
    Ok(())
}

/// A listening vsock socket on `port` (any CID, VMADDR_CID_ANY) with room for `backlog`
/// pending connections.
fn vsock_listen(port: u32, backlog: i32) -> io::Result<RawFd> {
    let listener = vsock_socket()?;
    let addr = vsock_addr(u32::MAX, port);
    // SAFETY: valid sockaddr_vm.
    unsafe {
        if libc::bind(
            listener,
            (&addr as *const SockaddrVm).cast(),
            std::mem::size_of::<SockaddrVm>() as u32,
        ) < 0
            || libc::listen(listener, backlog) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(listener)
}

fn vsock_accept(listener: RawFd) -> io::Result<File> {
    // SAFETY: accept on our listener.
    let conn = unsafe { libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) };
    if conn < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the accepted fd.
    Ok(unsafe { File::from_raw_fd(conn) })
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
    let fd = vsock_socket()?;
    // SAFETY: we own the new fd.
    let file = unsafe { File::from_raw_fd(fd) };
    let addr = vsock_addr(cid, port);
    // SAFETY: valid sockaddr_vm.
    if unsafe {
        libc::connect(
            fd,
            (&addr as *const SockaddrVm).cast(),
            std::mem::size_of::<SockaddrVm>() as u32,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Echoes a stream back until EOF or an error.
fn echo(conn: File) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&conn).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if (&conn).write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Unbinds the virtio-vsock driver from its device and binds it again: the driver resets the
/// device with its streams open, then activates it anew.
fn rebind_vsock_driver() -> io::Result<()> {
    let driver = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";
    let device = fs::read_dir(driver)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("virtio"))
        .ok_or_else(|| io::Error::other("no device bound to the vsock driver"))?;
    fs::write(format!("{driver}/unbind"), &device)?;
    fs::write(format!("{driver}/bind"), &device)?;
    Ok(())
}

/// The pattern of a pod's shim and agent (see linux_boot.rs `vsock_shim_pattern_jailed`): an
/// echo service on port 1024 for any number of concurrent streams, a guest-initiated stream
/// kept open, and on a power-port request a device reset with streams open, re-activation
/// and a new guest-initiated stream.
fn test_vsock_shim() -> io::Result<()> {
    let service = vsock_listen(1024, 16)?;
    let power = vsock_listen(1025, 16)?;
    std::thread::spawn(move || {
        while let Ok(conn) = vsock_accept(service) {
            std::thread::spawn(move || echo(conn));
        }
    });
    say("KL_VSOCK_LISTENING");
    let out = vsock_connect(2, 5000)?;
    (&out).write_all(b"hello-from-guest\n")?;
    let mut reply = String::new();
    BufReader::new(&out).read_line(&mut reply)?;
    say(&format!("KL_VSOCK_REPLY {}", reply.trim_end()));
    let _request = vsock_accept(power)?;
    say("KL_POWER_REQUEST");
    rebind_vsock_driver()?;
    say("KL_VSOCK_REBOUND");
    let again = vsock_connect(2, 5000)?;
    (&again).write_all(b"after-reset\n")?;
    let mut reply = String::new();
    BufReader::new(&again).read_line(&mut reply)?;
    say(&format!("KL_VSOCK_REPLY2 {}", reply.trim_end()));
    drop(out);
    Ok(())
}

/// The guest of the snapshot tests (linux_boot.rs `snapshot_*`): a counter on the console
/// every 100 ms (it only advances while timer interrupts reach the guest), and a command
/// service on vsock port 1234 that reads and writes the drive `klrw`, reads the virtio-rng,
/// dials the host and reports the counter, one line per command. A restored guest carries
/// on with all of it; a command stream the transport reset closed says so on the console.
fn test_snapshot() -> io::Result<()> {
    let drive =
        drive_by_serial("klrw").ok_or_else(|| io::Error::other("no drive with serial klrw"))?;
    let service = vsock_listen(1234, 16)?;
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let ticks = ticks.clone();
        std::thread::spawn(move || loop {
            let n = ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            say(&format!("KL_TICK {n}"));
            std::thread::sleep(Duration::from_millis(100));
        });
    }
    say("KL_SNAP_READY");
    while let Ok(conn) = vsock_accept(service) {
        let drive = drive.clone();
        let ticks = ticks.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&conn);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) => {
                        say(&format!("KL_VSOCK_CONN_CLOSED {e}"));
                        return;
                    }
                }
                let reply = snapshot_command(line.trim_end(), &drive, &ticks)
                    .unwrap_or_else(|e| format!("error {e}"));
                if (&conn).write_all(format!("{reply}\n").as_bytes()).is_err() {
                    say("KL_VSOCK_CONN_CLOSED on write");
                    return;
                }
            }
        });
    }
    Err(io::Error::other("vsock accept failed"))
}

fn snapshot_command(
    line: &str,
    drive: &str,
    ticks: &std::sync::atomic::AtomicU64,
) -> io::Result<String> {
    const DATA_OFFSET: u64 = 8192;
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "ticks" => Ok(format!(
            "ticks {}",
            ticks.load(std::sync::atomic::Ordering::SeqCst)
        )),
        "blkwrite" => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_direct()
                .open(drive)?;
            let mut block = vec![0u8; 512];
            let n = arg.len().min(block.len());
            block[..n].copy_from_slice(&arg.as_bytes()[..n]);
            f.write_all_at(&block, DATA_OFFSET)?;
            f.sync_all()?;
            Ok("written".into())
        }
        "blkread" => {
            // Through the page cache, as a workload reads: what the guest had before the
            // snapshot is still there after it.
            let f = File::open(drive)?;
            let mut block = [0u8; 64];
            f.read_exact_at(&mut block, DATA_OFFSET)?;
            Ok(format!("read {}", printable(&block)))
        }
        "rng" => {
            let mut bytes = [0u8; 16];
            File::open("/dev/hwrng")?.read_exact(&mut bytes)?;
            Ok(format!(
                "rng {}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ))
        }
        "mac" => Ok(format!(
            "mac {}",
            fs::read_to_string("/sys/class/net/eth0/address")?.trim()
        )),
        "net" => {
            let ifindex = if_up("eth0")?;
            let s = packet_socket(ifindex)?;
            let mut frame = vec![0xffu8; 6];
            frame.extend_from_slice(&[0x06, 0x00, 0xac, 0x10, 0x00, 0x0a]);
            frame.extend_from_slice(&ETH_P_TEST.to_be_bytes());
            frame.extend_from_slice(b"KL-NET-AFTER-RESTORE");
            frame.resize(64, 0);
            // A few, in case the host's sniffer misses one.
            for _ in 0..3 {
                (&s).write_all(&frame)?;
            }
            Ok("sent".into())
        }
        "dial" => {
            let out = vsock_connect(2, 5000)?;
            (&out).write_all(b"hello-from-guest\n")?;
            let mut reply = String::new();
            BufReader::new(&out).read_line(&mut reply)?;
            Ok(format!("dialed {}", reply.trim_end()))
        }
        other => Err(io::Error::other(format!("unknown command {other:?}"))),
    }
}

const ETH_P_TEST: u16 = 0x88b5;

/// A raw packet socket for the test ethertype, bound to interface `ifindex`.
fn packet_socket(ifindex: i32) -> io::Result<File> {
    // SAFETY: a new socket owned by the returned File, bound with a zeroed sockaddr_ll.
    unsafe {
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_TEST.to_be()),
        );
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = File::from_raw_fd(s);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_TEST.to_be();
        sll.sll_ifindex = ifindex;
        if libc::bind(
            s,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }
}

fn if_up(name: &str) -> io::Result<i32> {
    // SAFETY: ioctls on a throwaway datagram socket with a zeroed ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        if libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(s, libc::SIOCGIFINDEX, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(s);
        Ok(req.ifr_ifru.ifru_ifindex)
    }
}

fn test_net() -> io::Result<()> {
    let ifindex = if_up("eth0")?;
    let socket = packet_socket(ifindex)?;
    let s = socket.as_raw_fd();
    // SAFETY: sends and receives on our packet socket, frames built in local buffers.
    unsafe {
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
        frame.extend_from_slice(&ETH_P_TEST.to_be_bytes());
        frame.extend_from_slice(b"KL-NET-FRAME-FROM-GUEST");
        frame.resize(64, 0);
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        // Keep sending until the host answers: the host may start listening after us.
        loop {
            if libc::send(s, frame.as_ptr().cast(), frame.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 2048];
            let n = libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n > 14 && buf[14..n as usize].starts_with(b"KL-HOST-FRAME") {
                say("KL_NET_RX ok");
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("no frame from the host"));
            }
        }
    }
}

/// `vsock-probe CID:PORT...` (the program invoked under that name, e.g. as /bin/vsock-probe in
/// a test image): tries a vsock connect to each address and prints one line per attempt,
/// `CID:PORT connected`, `CID:PORT socket errno N` or `CID:PORT connect errno N`; exits 0 (the
/// caller judges the lines), 2 on a malformed address. The end-to-end test of issue 12 runs it
/// in a hostile container.
fn vsock_probe(addresses: &[String]) -> i32 {
    for address in addresses {
        let Some((cid, port)) = address
            .split_once(':')
            .and_then(|(cid, port)| Some((cid.parse::<u32>().ok()?, port.parse::<u32>().ok()?)))
        else {
            eprintln!("vsock-probe: {address:?} is not CID:PORT (two decimal u32)");
            return 2;
        };
        let outcome = match vsock_socket() {
            Err(e) => format!("socket errno {}", e.raw_os_error().unwrap_or(0)),
            Ok(fd) => {
                // SAFETY: we own the new fd.
                let _socket = unsafe { File::from_raw_fd(fd) };
                let addr = vsock_addr(cid, port);
                // SAFETY: valid sockaddr_vm of the given size.
                let rc = unsafe {
                    libc::connect(
                        fd,
                        (&addr as *const SockaddrVm).cast(),
                        std::mem::size_of::<SockaddrVm>() as u32,
                    )
                };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    format!("connect errno {}", e.raw_os_error().unwrap_or(0))
                } else {
                    "connected".to_string()
                }
            }
        };
        println!("{cid}:{port} {outcome}");
    }
    0
}

/// `memhog MIB` (the program invoked under that name, e.g. /bin/memhog in a test image):
/// allocates MIB MiB and writes every byte, prints `allocated MIB MiB`, then holds the memory
/// until killed; exits 2 on a malformed argument. Issue 15's sizing test runs it in a container
/// with a memory limit: it must either keep running or be OOM-killed by its own limit.
fn memhog(args: &[String]) -> i32 {
    let Some(mib) = args.first().and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("memhog: usage: memhog MIB");
        return 2;
    };
    let chunks: Vec<Vec<u8>> = (0..mib).map(|_| vec![1u8; 1 << 20]).collect();
    println!("allocated {mib} MiB");
    loop {
        std::hint::black_box(&chunks);
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `inotify-watch DIR`: prints one line per inotify event of DIR, `<event>\t<name>`, as
/// busybox's `inotifyd - DIR` does (Debian's busybox-static has no inotifyd): what an
/// application that reloads on changes of a configMap volume sees (issue 14's test).
fn inotify_watch(args: &[String]) -> i32 {
    let Some(dir) = args.first() else {
        eprintln!("inotify-watch: usage: inotify-watch DIR");
        return 2;
    };
    let Ok(path) = std::ffi::CString::new(dir.as_str()) else {
        eprintln!("inotify-watch: {dir:?} has a NUL byte");
        return 2;
    };
    let kinds: [(u32, &str); 6] = [
        (libc::IN_CREATE, "create"),
        (libc::IN_MOVED_TO, "moved_to"),
        (libc::IN_MOVED_FROM, "moved_from"),
        (libc::IN_DELETE, "delete"),
        (libc::IN_CLOSE_WRITE, "close_write"),
        (libc::IN_DELETE_SELF, "delete_self"),
    ];
    let mask = kinds.iter().fold(0, |m, (bit, _)| m | bit);
    // SAFETY: plain syscalls on an fd we own and a valid C string.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 || unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } < 0 {
        eprintln!("inotify-watch: {dir}: {}", io::Error::last_os_error());
        return 1;
    }
    // SAFETY: inotify_init1 returned a new fd that we own.
    let mut file = unsafe { File::from_raw_fd(fd) };
    println!("watching {dir}");
    let header = std::mem::size_of::<libc::inotify_event>();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("inotify-watch: read: {e}");
                return 1;
            }
        };
        let mut at = 0;
        while at + header <= n {
            // SAFETY: the kernel wrote a whole inotify_event at `at` (read_unaligned: the
            // buffer has no alignment guarantee).
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_bytes = &buf[at + header..(at + header + event.len as usize).min(n)];
            let name = String::from_utf8_lossy(name_bytes);
            let name = name.trim_end_matches('\0');
            for (bit, kind) in kinds {
                if event.mask & bit != 0 {
                    println!("{kind}\t{name}");
                }
            }
            at += header + event.len as usize;
        }
        let _ = io::stdout().flush();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.first().and_then(|argv0| argv0.rsplit('/').next()) {
        Some("vsock-probe") => std::process::exit(vsock_probe(&args[1..])),
        Some("memhog") => std::process::exit(memhog(&args[1..])),
        Some("inotify-watch") => std::process::exit(inotify_watch(&args[1..])),
        _ => {}
    }
    // The boot benchmark's marker: the first thing /init does. The kernel hands unknown
    // `key=value` command-line parameters to init as environment variables, so this needs no
    // /proc; and no console output, since every UART byte is a VM exit both VMMs pay for.
    if std::env::var("kl_test").as_deref() == Ok("marker") {
        write_exit_port(0);
    }
    mount("proc", "/proc");
    mount("sysfs", "/sys");
    mount("devtmpfs", "/dev");
    // The initramfs may lack /dev/console: reopen stdio on it once devtmpfs is there.
    if let Ok(c) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
    say("KL_INIT_REACHED");
    say(&boot_times());
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    say(&format!("KL_CPUS {cpus}"));
    let case = cmdline_value("kl_test").unwrap_or_default();
    let result = match case.as_str() {
        "marker" => Err(io::Error::other("writing the exit port did not end the VM")),
        "poweroff" => Ok(()),
        "boot_gaps" => {
            for line in boot_gaps(10) {
                say(&line);
            }
            Ok(())
        }
        "idle" => {
            // Stay up (benchmarks measure the VMM while the guest is idle).
            say("KL_IDLE");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "panic" => {
            say("KL_PANIC_NOW");
            // PID 1 exiting makes the kernel panic ("Attempted to kill init").
            std::process::exit(7);
        }
        "blk" => test_blk(),
        "power_port" => wait_power_request(),
        "blk_hotplug" => test_blk_hotplug(),
        "vsock" => test_vsock(),
        "vsock_shim" => test_vsock_shim(),
        "net" => test_net(),
        "snapshot" => test_snapshot(),
        other => Err(io::Error::other(format!("unknown kl_test {other:?}"))),
    };
    match result {
        Ok(()) => {
            say("KL_PASS");
            exit_vm(0)
        }
        Err(e) => {
            say(&format!("KL_FAIL {e}"));
            exit_vm(1)
        }
    }
}
