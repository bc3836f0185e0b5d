//! End-to-end tests of the VMM binary with hand-made guests. They run on any KVM, including
//! this project's PVM machines where Linux cannot boot: the guests are a few instructions.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VIRTIO0: u32 = 0xd000_0000;
const RING: u32 = 0x1_0000;
const BUF: u32 = 0x2_0000;

#[test]
fn exit_port_status_is_the_exit_status_pvh() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().exit(42).code, true);
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--console",
        "null",
    ]);
    assert_eq!(
        out.status.code(),
        Some(42),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exit_port_status_is_the_exit_status_long_mode() {
    let dir = tempfile::tempdir().unwrap();
    // Entered in 64-bit mode: `mov al, 7; out 0xf4, al` encodes the same.
    let k = write_kernel(dir.path(), "k", &Asm::new().exit(7).code, false);
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail", "--vcpus", "2"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serial_output_reaches_the_console_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(
        dir.path(),
        "k",
        &Asm::new()
            .serial_print(b"hello from the guest\n")
            .exit(0)
            .code,
        true,
    );
    let console = dir.path().join("console.log");
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from the guest\n"
    );
}

#[test]
fn serial_output_to_stdout_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(
        dir.path(),
        "k",
        &Asm::new().serial_print(b"on stdout\n").exit(0).code,
        true,
    );
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "on stdout\n");
}

#[test]
fn guest_reset_through_i8042_exits_3_and_keeps_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let code = Asm::new()
        .serial_print(b"Kernel panic\n")
        .mov_al(0xfe)
        .out_al(0x64)
        .spin()
        .code
        .clone();
    let k = write_kernel(dir.path(), "k", &code, true);
    let console = dir.path().join("console.log");
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--console",
        console.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "Kernel panic\n");
}

#[test]
fn usage_and_configuration_errors() {
    assert_eq!(run_vmm(&["--bogus"]).status.code(), Some(2));
    assert_eq!(
        run_vmm(&["--kernel", "/nonexistent/vmlinux", "--no-jail"])
            .status
            .code(),
        Some(1)
    );
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x90u8; 4096]).unwrap();
    let out = run_vmm(&["--kernel", junk.to_str().unwrap(), "--no-jail"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel"));
    let out = Command::new(vmm_bin()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn probe_prints_one_json_line() {
    let out = Command::new(vmm_bin()).arg("probe").output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["cpl0_loop_ns"].as_f64().unwrap() > 0.0);
    assert!(v["linux_capable"].is_boolean());
}

/// Guest virtio-rng driver: one 16-byte buffer; exits with the used length.
#[test]
fn guest_driver_reads_virtio_rng() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Asm::new();
    virtio_init(&mut a, VIRTIO0, RING, 8);
    virtio_desc(&mut a, RING, 0, BUF, 16, 2, 0);
    a.store32(RING + 0x84, 0) // avail ring[0] = 0
        .store32(RING + 0x80, 1 << 16) // avail idx = 1
        .store32(VIRTIO0 + 0x50, 0) // notify queue 0
        .wait_nonzero(RING + 0x100, 0xffff_0000) // used idx
        .load_eax(RING + 0x108) // used[0].len
        .exit_with_al();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail", "--rng"]);
    assert_eq!(
        out.status.code(),
        Some(16),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Guest virtio-blk driver: reads sector 1 of the drive and exits with its first byte,
/// after printing the status byte on the console.
#[test]
fn guest_driver_reads_a_virtio_blk_sector() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut contents = vec![0u8; 4096];
    contents[512] = 0x5c;
    std::fs::write(&disk, &contents).unwrap();
    let hdr = BUF;
    let data = BUF + 0x1000;
    let status = BUF + 0x2000;
    let mut a = Asm::new();
    virtio_init(&mut a, VIRTIO0, RING, 8);
    a.store32(hdr, 0)
        .store32(hdr + 4, 0)
        .store32(hdr + 8, 1)
        .store32(hdr + 12, 0); // IN, sector 1
    a.store32(status, 0xff);
    virtio_desc(&mut a, RING, 0, hdr, 16, 1, 1);
    virtio_desc(&mut a, RING, 1, data, 512, 3, 2);
    virtio_desc(&mut a, RING, 2, status, 1, 2, 0);
    a.store32(RING + 0x84, 0)
        .store32(RING + 0x80, 1 << 16)
        .store32(VIRTIO0 + 0x50, 0)
        .wait_nonzero(RING + 0x100, 0xffff_0000)
        .load_eax(data)
        .exit_with_al();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let drive = format!("id=disk0,path={},ro", disk.display());
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--drive",
        &drive,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0x5c),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A driver that sets DRIVER_OK with a queue size that is not a power of two gets
/// DEVICE_NEEDS_RESET (0x40) in the status register, and the VMM carries on.
#[test]
fn invalid_queue_size_marks_the_device_needs_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Asm::new();
    virtio_init(&mut a, VIRTIO0, RING, 6);
    a.load_eax(VIRTIO0 + 0x70).exit_with_al();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail", "--rng"]);
    assert_eq!(
        out.status.code(),
        Some(0x4f),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the VMM if a test fails before it exits.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Api {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl Api {
    fn connect(path: &std::path::Path) -> Api {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                return Api {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    stream: s,
                };
            }
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn call(&mut self, line: &str) -> serde_json::Value {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    }

    fn call_with_fd(&mut self, line: &str, fd: std::os::unix::io::RawFd) -> serde_json::Value {
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        send_with_fd(&self.stream, &msg, fd);
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    }
}

fn send_with_fd(stream: &UnixStream, data: &[u8], fd: std::os::unix::io::RawFd) {
    use std::os::unix::io::AsRawFd;
    let mut cmsg_buf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: building a valid msghdr over live buffers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
        assert_eq!(
            libc::sendmsg(stream.as_raw_fd(), &msg, 0),
            data.len() as isize
        );
    }
}

#[test]
fn api_controls_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let sock = dir.path().join("api.sock");
    let child = Command::new(vmm_bin())
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--no-jail",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .args(["--drive", "id=slot0,empty", "--rng", "--vcpus", "2"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let mut api = Api::connect(&sock);
    let v = api.call(r#"{"op":"ping"}"#);
    assert_eq!(v["ok"], true);
    assert!(v["version"].is_string());
    assert_eq!(api.call(r#"{"op":"nope"}"#)["ok"], false);
    assert_eq!(api.call(r#"{"op":"ping","x":1}"#)["ok"], false);
    assert_eq!(api.call("{broken")["ok"], false);
    assert_eq!(
        api.call(r#"{"op":"set_drive","id":"slot0"}"#)["ok"],
        false,
        "no fd, no path"
    );
    assert_eq!(
        api.call(r#"{"op":"clear_drive","id":"missing"}"#)["ok"],
        false
    );

    let img = dir.path().join("rootfs.img");
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    use std::os::unix::io::AsRawFd;
    let v = api.call_with_fd(
        r#"{"op":"set_drive","id":"slot0","read_only":true}"#,
        f.as_raw_fd(),
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["capacity_sectors"], 16);
    let m = api.call(r#"{"op":"metrics"}"#);
    assert_eq!(m["metrics"]["devices"][0]["id"], "slot0");
    assert_eq!(m["metrics"]["devices"][0]["capacity_sectors"], 16);
    assert_eq!(m["metrics"]["devices"][1]["type"], "rng");
    let v = api.call(&format!(
        r#"{{"op":"set_drive","id":"slot0","path":"{}","read_only":false}}"#,
        img.display()
    ));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        api.call(r#"{"op":"clear_drive","id":"slot0"}"#)["capacity_sectors"],
        0
    );

    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"metrics"}"#)["metrics"]["paused"], true);
    assert_eq!(api.call(r#"{"op":"resume"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"metrics"}"#)["metrics"]["paused"], false);

    // Oversized line: error, and the connection is dropped.
    let mut other = Api::connect(&sock);
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(70 * 1024));
    assert_eq!(other.call(&big)["ok"], false);

    // No vsock: a graceful stop cannot ask the guest, so it forces after the timeout.
    let v = api.call(r#"{"op":"stop","force":false,"timeout_ms":100}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["graceful"], false);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn api_force_stop_ends_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let sock = dir.path().join("api.sock");
    let child = Command::new(vmm_bin())
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--no-jail",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let mut api = Api::connect(&sock);
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

fn jailed_run(violation: Option<&str>) -> std::process::ExitStatus {
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let k = write_kernel(
        dir.path(),
        "k",
        &Asm::new().serial_print(b"jailed\n").exit(9).code,
        true,
    );
    let console = dir.path().join("console.log");
    let mut cmd = Command::new(vmm_bin());
    cmd.args([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--jail-dir",
        jail.to_str().unwrap(),
    ])
    .args([
        "--console",
        console.to_str().unwrap(),
        "--rng",
        "--api-sock",
    ])
    .arg(jail.join("api.sock"));
    if let Some(v) = violation {
        cmd.args(["--seccomp-test-violation", v]);
    }
    let status = cmd.status().unwrap();
    if violation.is_none() {
        assert_eq!(std::fs::read_to_string(&console).unwrap(), "jailed\n");
    }
    status
}

fn is_root() -> bool {
    // SAFETY: trivial getter.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn jailed_vm_runs_to_its_exit_status() {
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    assert_eq!(jailed_run(None).code(), Some(9));
}

#[test]
fn seccomp_kills_the_vmm_on_a_forbidden_syscall_in_each_thread() {
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    for thread in ["vcpu", "api", "vmm"] {
        let status = jailed_run(Some(thread));
        // The jailed VMM dies of SIGSYS; its parent reports 128 + 31.
        assert_eq!(
            status.code(),
            Some(128 + libc::SIGSYS),
            "thread {thread}: {status:?}"
        );
        assert_eq!(status.signal(), None);
    }
}

/// The jailed VMM with vsock: the guest activates the device (epoll registration on the vCPU
/// thread), a host client connects (accept and non-blocking setup on the VMM thread), the API
/// stops the VM. Any syscall outside a thread's filter would kill the VMM with SIGSYS.
#[test]
fn jailed_vsock_activation_and_host_connection_stay_within_the_filters() {
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let mut a = Asm::new();
    virtio_init(&mut a, VIRTIO0, RING, 8);
    a.serial_print(b"activated\n").spin();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let console = dir.path().join("console.log");
    let sock = jail.join("api.sock");
    let child = Command::new(vmm_bin())
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--jail-dir",
            jail.to_str().unwrap(),
        ])
        .args([
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--console",
            console.to_str().unwrap(),
        ])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", jail.join("v.sock").display()))
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("activated")
    {
        assert!(
            Instant::now() < deadline,
            "guest never activated the device"
        );
        assert!(child.0.try_wait().unwrap().is_none(), "VMM died");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut host = UnixStream::connect(jail.join("v.sock")).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let mut api = Api::connect(&sock);
    let m = api.call(r#"{"op":"metrics"}"#);
    assert_eq!(m["metrics"]["devices"][0]["type"], "vsock");
    assert_eq!(m["metrics"]["devices"][0]["status"], 0xf);
    assert!(child.0.try_wait().unwrap().is_none(), "VMM died");
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// Inherited descriptors the VMM was not told about are closed before the guest runs; the
/// ones named on the command line (`--console fd:N`) stay.
#[test]
fn unnamed_inherited_fds_are_closed() {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(
        dir.path(),
        "k",
        &Asm::new().serial_print(b"up\n").spin().code,
        true,
    );
    let sock = dir.path().join("api.sock");
    let console = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let secret = std::fs::File::open("/dev/null").unwrap();
    let (console_fd, secret_fd) = (console.as_raw_fd(), secret.as_raw_fd());
    let mut cmd = Command::new(vmm_bin());
    cmd.args([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--console",
        "fd:60",
    ])
    .arg("--api-sock")
    .arg(&sock);
    // SAFETY: only dup2 between fork and exec; the copies are inherited (no CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(console_fd, 60) < 0 || libc::dup2(secret_fd, 61) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let mut api = Api::connect(&sock);
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.0.id()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(fds.contains(&"60".to_string()), "console fd kept: {fds:?}");
    assert!(
        !fds.contains(&"61".to_string()),
        "unnamed fd closed: {fds:?}"
    );
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("console.log")).unwrap(),
        "up\n"
    );
}

/// `--net tap=NAME` opens (creating) the TAP; the device shows up in the metrics.
#[test]
fn named_tap_backs_virtio_net() {
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        panic!("needs root and /dev/net/tun");
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let sock = dir.path().join("api.sock");
    let child = Command::new(vmm_bin())
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--no-jail",
            "--api-sock",
            sock.to_str().unwrap(),
        ])
        .args(["--net", "tap=kltest0,mac=02:00:00:00:00:07"])
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let mut api = Api::connect(&sock);
    let m = api.call(r#"{"op":"metrics"}"#);
    assert_eq!(m["metrics"]["devices"][0]["type"], "net");
    assert!(
        std::path::Path::new("/sys/class/net/kltest0").exists(),
        "TAP created"
    );
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    // A name that cannot be a TAP is a configuration error.
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--net",
        "tap=bad/name",
    ]);
    assert_eq!(out.status.code(), Some(1));
}
