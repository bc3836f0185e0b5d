//! Boots the project's guest kernel with the test initramfs (vmm/tests/build-test-initramfs)
//! and checks each device from inside Linux. They need a KVM that runs guest kernels at
//! native speed: run them through tests/run-e2e (the KVM test host on PVM machines).
//!
//! Inputs: KATA_LIKE_KERNEL (vmlinux) and KATA_LIKE_VMM_TEST_INITRD (default
//! target/kata-like/vmm-test-initramfs.cpio). Missing inputs fail the tests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{send_with_fd, vmm_bin};

const IGNORE: &str = "needs a Linux-capable KVM: run through tests/e2e";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";
/// The ethertype of the test frames between the guest and the TAP side.
const ETH_P_TEST: u16 = 0x88b5;

fn kernel() -> PathBuf {
    let k =
        std::env::var_os("KATA_LIKE_KERNEL").expect("KATA_LIKE_KERNEL must name the guest vmlinux");
    let k = PathBuf::from(k);
    assert!(
        k.is_file(),
        "KATA_LIKE_KERNEL={} does not exist",
        k.display()
    );
    k
}

fn initrd() -> PathBuf {
    let p = std::env::var_os("KATA_LIKE_VMM_TEST_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/kata-like/vmm-test-initramfs.cpio")
        });
    assert!(
        p.is_file(),
        "test initramfs {} missing: run vmm/tests/build-test-initramfs",
        p.display()
    );
    p
}

/// A booting VM: its process, console file and scratch directory.
struct Vm {
    child: Option<Child>,
    console: PathBuf,
    dir: tempfile::TempDir,
}

impl Vm {
    fn start(case: &str, extra: &[&str], configure: impl FnOnce(&mut Command, &Path)) -> Vm {
        Vm::start_with_cmdline(BASE_CMDLINE, case, extra, configure)
    }

    /// As `start`, with another base command line (another console).
    fn start_with_cmdline(
        cmdline: &str,
        case: &str,
        extra: &[&str],
        configure: impl FnOnce(&mut Command, &Path),
    ) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut cmd = Command::new(vmm_bin());
        cmd.args(["run", "--kernel"])
            .arg(kernel())
            .arg("--initrd")
            .arg(initrd())
            .args([
                "--cmdline",
                &format!("{cmdline} kl_test={case}"),
                "--memory-mib",
                "256",
            ])
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdout(Stdio::null());
        configure(&mut cmd, dir.path());
        let child = cmd.spawn().unwrap();
        Vm {
            child: Some(child),
            console,
            dir,
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for `marker` on the console (panics on timeout or if the VM exits first).
    fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !self.console().contains(marker) {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "VM exited ({st}) before {marker:?}; console:\n{}",
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {marker:?}; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VM to exit: its status and the whole console.
    fn wait_with_console(&mut self) -> (ExitStatus, String) {
        let st = self.wait();
        (st, self.console())
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "VM did not exit; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn no_jail(_: &mut Command, _: &Path) {}

/// Creates the jail directory `dir/jail` (for `--jail-dir`) and returns its path.
fn jail_in(dir: &Path) -> PathBuf {
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    jail
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn boots_to_init_and_powers_off() {
    let _ = IGNORE;
    let mut vm = Vm::start("poweroff", &["--no-jail"], no_jail);
    let (st, console) = vm.wait_with_console();
    assert!(console.contains("KL_INIT_REACHED"), "console:\n{console}");
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    // The boot benchmark splits boot time with these: the guest clock when it ran /init, and
    // kvm-clock's reading at its setup (time since the VM was created, so below this test's
    // whole run).
    let times = console
        .lines()
        .find(|l| l.starts_with("KL_BOOT_TIMES"))
        .unwrap_or_else(|| panic!("no KL_BOOT_TIMES line:\n{console}"));
    let field = |name: &str| -> u64 {
        times
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing or not a number in {times:?}"))
    };
    assert!(field("init_ms=") > 0, "{times}");
    assert!(field("kvmclock_ms=") < 120_000, "{times}");
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn boots_two_vcpus_in_the_jail_as_nobody() {
    let mut vm = Vm::start(
        "poweroff",
        &["--vcpus", "2", "--rng", "--uid", "65534", "--gid", "65534"],
        |cmd, dir| {
            let jail = jail_in(dir);
            cmd.arg("--jail-dir").arg(&jail);
        },
    );
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(console.contains("KL_INIT_REACHED"), "console:\n{console}");
    assert!(
        console.contains("KL_CPUS 2"),
        "both vCPUs online; console:\n{console}"
    );
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn graceful_stop_asks_the_guest_through_the_power_port() {
    let scratch = tempfile::tempdir().unwrap();
    let jail = jail_in(scratch.path());
    let vsock = format!("cid=3,uds={}", jail.join("v.sock").display());
    let api = jail.join("api.sock");
    let mut vm = Vm::start("power_port", &["--vsock", &vsock], |cmd, _| {
        cmd.arg("--jail-dir").arg(&jail).arg("--api-sock").arg(&api);
    });
    vm.wait_for("KL_POWER_PORT_READY");
    let stream = UnixStream::connect(&api).unwrap();
    (&stream)
        .write_all(b"{\"op\":\"stop\",\"force\":false,\"timeout_ms\":60000}\n")
        .unwrap();
    let mut resp = String::new();
    BufReader::new(&stream).read_line(&mut resp).unwrap();
    assert!(resp.contains("\"graceful\":true"), "{resp}");
    let (st, console) = vm.wait_with_console();
    assert!(console.contains("KL_POWER_REQUEST"), "console:\n{console}");
    assert_eq!(st.code(), Some(0), "console:\n{console}");
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn guest_panic_exits_non_zero_and_keeps_the_console() {
    let mut vm = Vm::start("panic", &["--no-jail"], no_jail);
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(3), "console:\n{console}");
    assert!(console.contains("KL_PANIC_NOW"), "console:\n{console}");
    assert!(console.contains("Kernel panic"), "console:\n{console}");
}

/// The pod VM's console is virtio-console (hvc0, one VM exit per buffer instead of per byte):
/// what /init prints and the kernel's panic report must reach the console log through it, and
/// the 8250 beside it stays silent (one sink: nothing is printed twice).
#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn hvc0_console_log_keeps_the_kernel_panic() {
    let mut vm = Vm::start_with_cmdline(
        "console=hvc0 reboot=t panic=-1 quiet",
        "panic",
        &["--no-jail", "--virtio-console"],
        no_jail,
    );
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(3), "console:\n{console}");
    assert_eq!(
        console.matches("KL_PANIC_NOW").count(),
        1,
        "console:\n{console}"
    );
    assert!(console.contains("Kernel panic"), "console:\n{console}");
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn virtio_blk_reads_and_writes_host_files_jailed() {
    let scratch = tempfile::tempdir().unwrap();
    let ro = scratch.path().join("ro.img");
    let rw = scratch.path().join("rw.img");
    let mut content = b"KL-RO-DRIVE-CONTENT".to_vec();
    content.resize(1 << 20, 0);
    std::fs::write(&ro, &content).unwrap();
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    let ro_arg = format!("id=klro,path={},ro", ro.display());
    let rw_arg = format!("id=klrw,path={}", rw.display());
    let mut vm = Vm::start(
        "blk",
        &["--drive", &ro_arg, "--drive", &rw_arg],
        |cmd, dir| {
            let jail = jail_in(dir);
            cmd.arg("--jail-dir").arg(&jail);
        },
    );
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("KL_BLK_READ KL-RO-DRIVE-CONTENT"),
        "console:\n{console}"
    );
    let written = std::fs::read(&rw).unwrap();
    assert_eq!(&written[4096..4096 + 19], b"KL-GUEST-WROTE-THIS");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        content,
        "read-only drive unchanged"
    );
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn empty_drive_slot_is_filled_through_the_api() {
    let mut vm = Vm::start(
        "blk_hotplug",
        &["--drive", "id=slot0,empty", "--rng"],
        |cmd, dir| {
            let jail = jail_in(dir);
            cmd.arg("--jail-dir")
                .arg(&jail)
                .arg("--api-sock")
                .arg(jail.join("api.sock"));
        },
    );
    vm.wait_for("KL_SLOT_EMPTY 0");
    let img = vm.dir.path().join("rootfs.img");
    let mut content = b"KL-HOTPLUGGED".to_vec();
    content.resize(8192, 0);
    std::fs::write(&img, &content).unwrap();
    let api = UnixStream::connect(vm.dir.path().join("jail/api.sock")).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    send_with_fd(
        &api,
        b"{\"op\":\"set_drive\",\"id\":\"slot0\",\"read_only\":true}\n",
        f.as_raw_fd(),
    );
    let mut resp = String::new();
    BufReader::new(&api).read_line(&mut resp).unwrap();
    assert!(resp.contains("\"ok\":true"), "{resp}");
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("KL_HOTPLUG 16 KL-HOTPLUGGED"),
        "console:\n{console}"
    );
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn vsock_carries_data_both_ways_jailed() {
    let scratch = tempfile::tempdir().unwrap();
    let jail = jail_in(scratch.path());
    let uds = jail.join("v.sock");
    // Guest-initiated connections to host port 5000 land here (inside the jail). The jailed
    // VMM connects as its unprivileged uid (65534 by default): the socket must let it in.
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::fs::set_permissions(
        format!("{}_5000", uds.display()),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vm = Vm::start("vsock", &["--vsock", &vsock], |cmd, _| {
        cmd.arg("--jail-dir").arg(&jail);
    });
    vm.wait_for("KL_VSOCK_LISTENING");

    // Host-initiated: CONNECT 1234 -> OK <port>, then an echo.
    let host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    (&host).write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(&host);
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(
        ok.starts_with("OK ") && ok.trim_end()[3..].parse::<u32>().is_ok(),
        "{ok:?}"
    );
    (&host).write_all(b"ping-from-host\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "echo:ping-from-host\n");

    // Guest-initiated to host port 5000.
    let (conn, line) = accept_line(&host_listener);
    assert_eq!(line, "hello-from-guest\n");
    (&conn).write_all(b"hello-from-host\n").unwrap();

    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("KL_VSOCK_REPLY hello-from-host"),
        "console:\n{console}"
    );
}

/// One host-initiated stream to guest port 1024 (the guest echoes it).
fn connect_echo(uds: &Path) -> UnixStream {
    let s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    (&s).write_all(b"CONNECT 1024\n").unwrap();
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!((&s).read(&mut b).unwrap(), 1, "EOF after {ok:?}");
        ok.push(b[0]);
    }
    assert!(ok.starts_with(b"OK "), "{:?}", String::from_utf8_lossy(&ok));
    s
}

/// Sends `n` bytes through the echo service and checks they come back, writing and reading
/// at once (more than the 256 KiB credit window each way: credit updates both ways).
fn echo_bulk(s: &UnixStream, n: usize, seed: u8) {
    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
    let writer = {
        let s = s.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || (&s).write_all(&data).unwrap())
    };
    let mut back = vec![0u8; n];
    (&*s).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "echoed data differs");
}

/// Accepts the guest's next connection to a host port (bounded by BOOT_TIMEOUT for reads) and
/// reads its first line: the stream and the line.
fn accept_line(listener: &UnixListener) -> (UnixStream, String) {
    // Bounded: a connection that never comes (the VMM refused by the socket's permissions, a
    // guest that never dials) fails the test instead of hanging it until run-e2e's timeout.
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(e) => panic!("no guest-initiated connection within {BOOT_TIMEOUT:?}: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    (conn, line)
}

/// One JSON request on the API socket; returns the response.
fn api_call(sock: &Path, line: &str, fd: Option<RawFd>) -> serde_json::Value {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    let msg = format!("{line}\n");
    match fd {
        None => (&s).write_all(msg.as_bytes()).unwrap(),
        Some(fd) => send_with_fd(&s, msg.as_bytes(), fd),
    }
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap()
}

/// What a pod's shim does with vsock, against a jailed VMM running as nobody: four concurrent
/// host streams with 512 KiB each way, two of them closed by the host and two kept open, a
/// guest-initiated stream, set_drive / metrics / pause / resume while streams are open, then a
/// graceful stop through the power port, on which the guest resets its vsock device with
/// three streams open (driver unbind, as at poweroff), activates it again and opens a new
/// stream. A syscall outside a VMM thread's seccomp filter would end the VMM with status 159.
#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn vsock_shim_pattern_jailed() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::tempdir().unwrap();
    let jail = jail_in(scratch.path());
    let uds = jail.join("v.sock");
    let api = jail.join("api.sock");
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::fs::set_permissions(
        format!("{}_5000", uds.display()),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut vm = Vm::start(
        "vsock_shim",
        &[
            "--vsock",
            &vsock,
            "--drive",
            "id=slot0,empty,ro",
            "--vcpus",
            "2",
        ],
        |cmd, _| {
            cmd.arg("--jail-dir")
                .arg(&jail)
                .args(["--uid", "65534", "--gid", "65534", "--api-sock"])
                .arg(&api);
        },
    );
    vm.wait_for("KL_VSOCK_LISTENING");

    let (from_guest, line) = accept_line(&host_listener);
    assert_eq!(line, "hello-from-guest\n");
    (&from_guest).write_all(b"hello-from-host\n").unwrap();

    let streams: Vec<UnixStream> = (0..4u8)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let s = connect_echo(&uds);
                echo_bulk(&s, 512 * 1024, i);
                s
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut streams = streams.into_iter();
    let kept: Vec<UnixStream> = streams.by_ref().take(2).collect();
    drop(streams);
    for s in &kept {
        echo_bulk(s, 4096, 7);
    }

    let img = scratch.path().join("rootfs.img");
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let v = api_call(
        &api,
        r#"{"op":"set_drive","id":"slot0","read_only":true}"#,
        Some(f.as_raw_fd()),
    );
    assert_eq!(v["capacity_sectors"], 16, "{v}");
    let m = api_call(&api, r#"{"op":"metrics"}"#, None);
    assert_eq!(m["metrics"]["devices"][1]["type"], "vsock", "{m}");
    assert_eq!(api_call(&api, r#"{"op":"pause"}"#, None)["ok"], true);
    assert_eq!(api_call(&api, r#"{"op":"resume"}"#, None)["ok"], true);
    vm.wait_for("KL_VSOCK_REPLY hello-from-host");

    let v = api_call(
        &api,
        r#"{"op":"stop","force":false,"timeout_ms":300000}"#,
        None,
    );
    assert_eq!(v["graceful"], true, "{v}");
    vm.wait_for("KL_POWER_REQUEST");
    // The device reset ends every stream that was open.
    for mut s in kept.into_iter().chain([from_guest]) {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    // The re-activated device carries a new guest-initiated stream.
    let (again, line) = accept_line(&host_listener);
    assert_eq!(line, "after-reset\n");
    (&again).write_all(b"again-from-host\n").unwrap();

    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("KL_VSOCK_REPLY2 again-from-host") && console.contains("KL_PASS"),
        "console:\n{console}"
    );
}

/// Opens TAP `name` (creating it) and brings it up; returns the fd and its ifindex.
fn open_tap(name: &str) -> (std::fs::File, i32) {
    let _ = Command::new("modprobe").arg("tun").status();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: ifreq ioctls with zeroed structs and a short name.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
        assert!(
            libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) >= 0,
            "TUNSETIFF"
        );
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) >= 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert!(
            libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) >= 0,
            "interface up"
        );
        assert!(libc::ioctl(s, libc::SIOCGIFINDEX, &mut req) >= 0);
        libc::close(s);
        (f, req.ifr_ifru.ifru_ifindex)
    }
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn virtio_net_frames_cross_the_tap() {
    let (tap, ifindex) = open_tap("kltap0");
    let tap_fd = tap.as_raw_fd();
    let sniffer = packet_sniffer(ifindex);
    let mut vm = Vm::start(
        "net",
        &["--no-jail", "--net", "fd=100,mac=06:00:ac:10:00:02"],
        |cmd, _| {
            // SAFETY: between fork and exec only dup2 runs; it hands the TAP to the VMM as fd 100
            // (a high number, clear of the fds std's spawn machinery uses in the child).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(tap_fd, 100) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    drop(tap);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut buf = [0u8; 2048];
    let mut saw_guest_frame = false;
    while !saw_guest_frame {
        assert!(
            Instant::now() < deadline,
            "no frame from the guest; console:\n{}",
            vm.console()
        );
        if let Ok(n) = (&sniffer).read(&mut buf) {
            saw_guest_frame = n > 14 && buf[14..n].starts_with(b"KL-NET-FRAME-FROM-GUEST");
        }
    }
    let mut frame = vec![0x06, 0x00, 0xac, 0x10, 0x00, 0x02, 0x02, 0, 0, 0, 0, 1];
    frame.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    frame.extend_from_slice(b"KL-HOST-FRAME");
    frame.resize(64, 0);
    while vm.child.as_mut().unwrap().try_wait().unwrap().is_none() {
        let _ = (&sniffer).write(&frame);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            Instant::now() < deadline,
            "guest never saw the host frame; console:\n{}",
            vm.console()
        );
    }
    let (st, console) = vm.wait_with_console();
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert!(console.contains("KL_NET_RX ok"), "console:\n{console}");
}

/// A bzImage (64-bit boot protocol): the test host's Debian kernel, or KATA_LIKE_BZIMAGE.
fn bzimage() -> PathBuf {
    if let Some(p) = std::env::var_os("KATA_LIKE_BZIMAGE") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("KATA_LIKE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kata-like")
        });
    std::fs::read_dir(cache.join("test-host"))
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("vmlinuz"))
        .find(|p| p.is_file())
        .expect("no bzImage: set KATA_LIKE_BZIMAGE (tests/kvm-host/prepare caches one)")
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn boots_a_bzimage_through_the_64_bit_protocol() {
    let kernel = bzimage();
    let mut vm = Vm::start(
        "poweroff",
        &["--no-jail", "--memory-mib", "512"],
        |cmd, _| {
            // The later --kernel wins: the bzImage replaces the vmlinux.
            cmd.arg("--kernel").arg(&kernel);
        },
    );
    let (st, console) = vm.wait_with_console();
    assert!(
        console.contains("KL_INIT_REACHED"),
        "VM exit {st}; console:\n{console}"
    );
    assert_eq!(st.code(), Some(0), "console:\n{console}");
}

impl Vm {
    /// A VM restored from the snapshot directory `snapshot` (no kernel, no boot): `extra`
    /// gives its backends, which must describe the same devices as the VM that made it.
    fn restore(snapshot: &Path, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut cmd = Command::new(vmm_bin());
        cmd.args(["run", "--restore"])
            .arg(snapshot)
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdout(Stdio::null());
        configure(&mut cmd);
        let child = cmd.spawn().unwrap();
        Vm {
            child: Some(child),
            console,
            dir,
        }
    }

    /// The highest `KL_TICK n` on the console.
    fn last_tick(&self) -> Option<u64> {
        self.console()
            .lines()
            .filter_map(|l| l.strip_prefix("KL_TICK ")?.trim().parse().ok())
            .max()
    }
}

/// A jail directory for a snapshot test's VM, with the VMM's uid (65534) able to write
/// `subdir` (a snapshot directory) in it.
fn snapshot_jail(scratch: &Path, name: &str) -> PathBuf {
    let jail = scratch.join(name);
    std::fs::create_dir(&jail).unwrap();
    jail
}

fn chown_to_vmm_user(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: chown on a NUL-terminated path we own.
    assert_eq!(
        unsafe { libc::chown(c.as_ptr(), 65534, 65534) },
        0,
        "chown {p:?}"
    );
}

/// The snapshot guest's command service (vsock port 1234): one stream.
fn snapshot_commands(uds: &Path) -> BufReader<UnixStream> {
    let s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    (&s).write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    reader
}

fn snapshot_command(stream: &mut BufReader<UnixStream>, cmd: &str) -> String {
    stream
        .get_ref()
        .write_all(format!("{cmd}\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    stream.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// The TAP fd the snapshot test VMs get their NIC on (`--net fd=`).
const SNAPSHOT_TAP_FD: i32 = 100;

/// The backends of a snapshot test VM in `jail`: drive `klrw` on `disk`, a NIC with `mac` on
/// the TAP passed as `SNAPSHOT_TAP_FD`, vsock (CID 3), rng, virtio-console and the API socket.
/// Returns the arguments, the vsock socket and the API socket.
fn snapshot_backends(jail: &Path, disk: &Path, mac: &str) -> (Vec<String>, PathBuf, PathBuf) {
    let uds = jail.join("v.sock");
    let api = jail.join("api.sock");
    let args = vec![
        "--drive".into(),
        format!("id=klrw,path={}", disk.display()),
        "--net".into(),
        format!("fd={SNAPSHOT_TAP_FD},mac={mac}"),
        "--virtio-console".into(),
        "--vsock".into(),
        format!("cid=3,uds={}", uds.display()),
        "--rng".into(),
        "--api-sock".into(),
        api.display().to_string(),
        "--jail-dir".into(),
        jail.display().to_string(),
    ];
    (args, uds, api)
}

/// A raw packet socket receiving the test ethertype (0x88b5) on interface `ifindex`, with
/// 1 s reads.
fn packet_sniffer(ifindex: i32) -> std::fs::File {
    // SAFETY: a raw packet socket set up with zeroed structs, owned by the returned File.
    unsafe {
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_TEST.to_be()),
        );
        assert!(s >= 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_TEST.to_be();
        sll.sll_ifindex = ifindex;
        assert!(
            libc::bind(
                s,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32
            ) >= 0
        );
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
        std::fs::File::from_raw_fd(s)
    }
}

/// The snapshot guest's MAC.
const SNAPSHOT_MAC: &str = "06:00:ac:10:00:0a";

/// Hands `tap` to the VMM as `SNAPSHOT_TAP_FD`.
fn pass_tap(cmd: &mut Command, tap: &std::fs::File) {
    let fd = tap.as_raw_fd();
    // SAFETY: between fork and exec only dup2 runs (async-signal-safe); SNAPSHOT_TAP_FD is clear
    // of the fds std's spawn machinery uses in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, SNAPSHOT_TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A 16 KiB tmpfs (mode 0777: a full disk for any snapshot) mounted on a directory until
/// dropped.
struct TinyTmpfs(PathBuf);

impl TinyTmpfs {
    fn mount(dir: &Path) -> TinyTmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16k,mode=0777", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a 16 KiB tmpfs on {dir:?}");
        TinyTmpfs(dir.to_path_buf())
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A guest booted, used and snapshotted (then killed): what the tests restore.
struct Snapshotted {
    scratch: tempfile::TempDir,
    /// The snapshot directory (host path; inside the first VM's jail).
    snapshot: PathBuf,
    /// The first VM's drive.
    disk: PathBuf,
    /// The guest's counter when it was paused.
    last_tick: u64,
    /// Spawn of the booting VMM to the guest's first tick.
    boot_to_first_tick: Duration,
}

/// Boots the `snapshot` guest (2 vCPUs, jailed), writes to its drive through it, checks that
/// a running VM and a full disk are refused, pauses, snapshots and kills it. A command
/// stream stays open in the guest across the snapshot.
fn boot_and_snapshot() -> Snapshotted {
    let scratch = tempfile::tempdir().unwrap();
    let jail = snapshot_jail(scratch.path(), "jail-a");
    let snapshot = jail.join("snap");
    std::fs::create_dir(&snapshot).unwrap();
    chown_to_vmm_user(&snapshot);
    let disk = scratch.path().join("disk-a.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // A full disk for the snapshot: mounted before the VMM starts, so that its jail (a
    // private copy of the mounts under the jail directory) has it too.
    let full = jail.join("full");
    std::fs::create_dir(&full).unwrap();
    let _tmpfs = TinyTmpfs::mount(&full);
    let (args, uds, api) = snapshot_backends(&jail, &disk, SNAPSHOT_MAC);
    let mut extra: Vec<&str> = vec!["--vcpus", "2"];
    extra.extend(args.iter().map(String::as_str));
    let (tap, _) = open_tap("klsnap0");
    let started = Instant::now();
    let mut vm = Vm::start("snapshot", &extra, |cmd, _| pass_tap(cmd, &tap));
    drop(tap);
    vm.wait_for("KL_TICK 0");
    let boot_to_first_tick = started.elapsed();
    vm.wait_for("KL_SNAP_READY");

    let mut commands = snapshot_commands(&uds);
    assert_eq!(
        snapshot_command(&mut commands, "blkwrite before-snapshot"),
        "written"
    );
    assert_eq!(
        snapshot_command(&mut commands, "blkread"),
        "read before-snapshot"
    );

    let running = api_call(&api, r#"{"op":"snapshot","dir":"/snap"}"#, None);
    assert_eq!(running["ok"], false, "{running}");
    assert!(
        running["error"].as_str().unwrap().contains("paused"),
        "{running}"
    );
    assert!(std::fs::read_dir(&snapshot).unwrap().next().is_none());

    let paused = api_call(&api, r#"{"op":"pause"}"#, None);
    assert_eq!(paused["ok"], true, "{paused}");
    // A full disk: the snapshot is refused with the write's error and leaves no files.
    let refused = api_call(&api, r#"{"op":"snapshot","dir":"/full"}"#, None);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{refused}"
    );
    assert!(
        std::fs::read_dir(&full).unwrap().next().is_none(),
        "a failed snapshot leaves no files"
    );

    let last_tick = vm.last_tick().expect("ticks before the pause");
    let snap = api_call(&api, r#"{"op":"snapshot","dir":"/snap"}"#, None);
    assert_eq!(snap["ok"], true, "{snap}");
    let info = &snap["snapshot"];
    println!(
        "snapshot: state {} bytes, memory {} bytes of which {} written (sparse file: {} bytes allocated), {} us",
        info["state_bytes"],
        info["memory_bytes"],
        info["memory_written_bytes"],
        std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(snapshot.join("memory")).unwrap()
        ) * 512,
        info["duration_us"]
    );
    assert_eq!(info["memory_bytes"], 256u64 << 20);
    // The VMM survived its own snapshot (a syscall outside a thread's filter kills it).
    assert!(vm.child.as_mut().unwrap().try_wait().unwrap().is_none());
    drop(vm);
    drop(commands);
    Snapshotted {
        scratch,
        snapshot,
        disk,
        last_tick,
        boot_to_first_tick,
    }
}

/// Restores `s` into a new VMM in a new jail with a copy of its drive and a new TAP: the
/// VM, the copy, the vsock socket and the TAP's interface index.
fn restore_snapshot(s: &Snapshotted) -> (Vm, PathBuf, PathBuf, i32) {
    let jail = snapshot_jail(s.scratch.path(), "jail-b");
    let disk = s.scratch.path().join("disk-b.img");
    std::fs::copy(&s.disk, &disk).unwrap();
    // Another MAC on the command line: the guest's NIC keeps the snapshot's.
    let (args, uds, _) = snapshot_backends(&jail, &disk, "06:00:ac:10:00:0b");
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let (tap, ifindex) = open_tap("klsnap1");
    let log = s.scratch.path().join("restored-vmm.log");
    let started = Instant::now();
    let mut vm = Vm::restore(&s.snapshot, &extra, |cmd| {
        cmd.args(["--log-level", "info"])
            .stderr(std::fs::File::create(&log).unwrap());
        pass_tap(cmd, &tap);
    });
    drop(tap);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while vm.last_tick().is_none() {
        if let Some(st) = vm.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("restored VMM exited ({st}); console:\n{}", vm.console());
        }
        assert!(Instant::now() < deadline, "no tick after the restore");
        std::thread::sleep(Duration::from_millis(5));
    }
    let restore_to_tick = started.elapsed();
    println!(
        "cold boot to the first tick: {:?}; restore to the next tick: {:?} (both include up to 100 ms of the guest's sleep between ticks)",
        s.boot_to_first_tick, restore_to_tick
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(line) = log.lines().find(|l| l.contains("VM restored")) {
        println!("restored VMM: {line}");
    }
    (vm, disk, uds, ifindex)
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn snapshot_restore_resumes_the_guest() {
    let s = boot_and_snapshot();
    let (mut vm, _, _, _) = restore_snapshot(&s);
    let first = vm.last_tick().unwrap();
    let console = vm.console();
    // It carried on: no second boot, and the counter continues where it was paused (a line
    // the pause cut in two may have its tail first).
    assert!(!console.contains("KL_INIT_REACHED"), "console:\n{console}");
    assert!(
        first > s.last_tick && first <= s.last_tick + 3,
        "paused at tick {}, restored guest's first tick {first}; console:\n{console}",
        s.last_tick
    );
    // Timer interrupts flow: the counter keeps advancing.
    vm.wait_for(&format!("KL_TICK {}", first + 5));
    assert!(vm.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn snapshot_restore_keeps_block_and_vsock_working() {
    let s = boot_and_snapshot();
    let (mut vm, disk_b, uds, tap_ifindex) = restore_snapshot(&s);
    // The stream open at the snapshot is gone: the guest got the transport reset.
    vm.wait_for("KL_VSOCK_CONN_CLOSED");
    let host_listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    std::fs::set_permissions(
        format!("{}_5000", uds.display()),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();

    let mut commands = snapshot_commands(&uds);
    assert_eq!(
        snapshot_command(&mut commands, "blkread"),
        "read before-snapshot"
    );
    assert_eq!(
        snapshot_command(&mut commands, "blkwrite after-restore"),
        "written"
    );
    // The guest's `blkwrite` writes at 8 KiB.
    let data_block = |disk: &Path, len: usize| {
        let mut b = vec![0u8; len];
        let f = std::fs::File::open(disk).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 8192).unwrap();
        b
    };
    assert_eq!(
        data_block(&disk_b, 13),
        b"after-restore",
        "the restored VM writes its new drive"
    );
    assert_eq!(
        data_block(&s.disk, 15),
        b"before-snapshot",
        "the first VM's drive is untouched"
    );

    let rng = snapshot_command(&mut commands, "rng");
    assert!(
        rng.starts_with("rng ") && rng.len() == 4 + 32,
        "virtio-rng answers: {rng:?}"
    );

    let dial = std::thread::spawn(move || {
        let reply = snapshot_command(&mut commands, "dial");
        (commands, reply)
    });
    let (conn, line) = accept_line(&host_listener);
    assert_eq!(line, "hello-from-guest\n");
    (&conn).write_all(b"hello-from-host\n").unwrap();
    let (mut commands, reply) = dial.join().unwrap();
    assert_eq!(reply, "dialed hello-from-host");

    // The NIC kept the MAC its guest knows, and it sends on the new TAP.
    assert_eq!(
        snapshot_command(&mut commands, "mac"),
        format!("mac {SNAPSHOT_MAC}")
    );
    let sniffer = packet_sniffer(tap_ifindex);
    assert_eq!(snapshot_command(&mut commands, "net"), "sent");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "no frame from the restored guest"
        );
        if let Ok(n) = (&sniffer).read(&mut buf) {
            if n > 14 && buf[14..n].starts_with(b"KL-NET-AFTER-RESTORE") {
                break;
            }
        }
    }

    let ticks = snapshot_command(&mut commands, "ticks");
    let n: u64 = ticks.strip_prefix("ticks ").unwrap().parse().unwrap();
    assert!(n > s.last_tick, "{ticks} after a pause at {}", s.last_tick);
    assert!(vm.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

/// Runs `kata-like-vmm run --restore <snapshot> <args>` and checks that it is refused: exit
/// status 1 with `expected` in its error. A VMM that starts the guest instead is killed after
/// a minute and fails the test.
fn assert_restore_refused(snapshot: &Path, args: &[&str], expected: &str) {
    let mut child = Command::new(vmm_bin())
        .args(["run", "--restore"])
        .arg(snapshot)
        .args(["--console", "null", "--no-jail"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("restoring a bad snapshot did not fail");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn restore_refuses_corrupt_snapshot() {
    let s = boot_and_snapshot();
    let work = s.scratch.path().join("bad");
    let disk = format!("id=klrw,path={}", s.disk.display());
    let uds = format!("cid=3,uds={}", s.scratch.path().join("bad.sock").display());
    // A NIC on a TAP the VMM opens by name (it only lives while the VMM does).
    let nic = "tap=klsnapbad0";
    let devices = [
        "--drive",
        &disk,
        "--net",
        nic,
        "--virtio-console",
        "--vsock",
        &uds,
        "--rng",
    ];
    let copy = |name: &str| -> PathBuf {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(s.snapshot.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let state_len = std::fs::metadata(s.snapshot.join("state")).unwrap().len();

    let corrupted = copy("corrupted");
    let mut state = std::fs::read(corrupted.join("state")).unwrap();
    let middle = state.len() / 2;
    state[middle] ^= 0x20;
    std::fs::write(corrupted.join("state"), &state).unwrap();
    assert_restore_refused(&corrupted, &devices, "checksum mismatch");

    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("state"))
        .unwrap()
        .set_len(state_len / 3)
        .unwrap();
    assert_restore_refused(&truncated, &devices, "truncated");

    let foreign = copy("foreign");
    std::fs::write(
        foreign.join("state"),
        b"GIF89a not a snapshot at all, padded to be long enough to have a preamble",
    )
    .unwrap();
    assert_restore_refused(&foreign, &devices, "bad magic");

    let short_memory = copy("short-memory");
    std::fs::OpenOptions::new()
        .write(true)
        .open(short_memory.join("memory"))
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    assert_restore_refused(
        &short_memory,
        &devices,
        "memory file is 134217728 bytes, the snapshot state says 268435456",
    );

    assert_restore_refused(
        &s.snapshot,
        &[
            "--drive",
            &disk,
            "--net",
            nic,
            "--virtio-console",
            "--vsock",
            &uds,
        ],
        "the snapshot has 5 virtio devices, the command line 4",
    );

    let read_only = format!("{disk},ro");
    assert_restore_refused(
        &s.snapshot,
        &[
            "--drive",
            &read_only,
            "--net",
            nic,
            "--virtio-console",
            "--vsock",
            &uds,
            "--rng",
        ],
        "read-write, this one is read-only",
    );

    assert_restore_refused(&work.join("missing"), &devices, "missing/state");
}
