//! End-to-end tests of the VMM binary with hand-made guests. They run on any KVM, including
//! this project's PVM machines where Linux cannot boot: the guests are a few instructions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
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
    assert_exit_status(&out, 42);
}

#[test]
fn exit_port_status_is_the_exit_status_long_mode() {
    let dir = tempfile::tempdir().unwrap();
    // Entered in 64-bit mode: `mov al, 7; out 0xf4, al` encodes the same.
    let k = write_kernel(dir.path(), "k", &Asm::new().exit(7).code, false);
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail", "--vcpus", "2"]);
    assert_exit_status(&out, 7);
}

/// Runs the PVH guest `code` without the jail, its console written to `dir/console.log`: the
/// VMM's output and the console file's path.
fn run_with_console_file(
    dir: &std::path::Path,
    code: &[u8],
) -> (std::process::Output, std::path::PathBuf) {
    let k = write_kernel(dir, "k", code, true);
    let console = dir.join("console.log");
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--console",
        console.to_str().unwrap(),
    ]);
    (out, console)
}

#[test]
fn serial_output_reaches_the_console_file() {
    let dir = tempfile::tempdir().unwrap();
    let (out, console) = run_with_console_file(
        dir.path(),
        &Asm::new()
            .serial_print(b"hello from the guest\n")
            .exit(0)
            .code,
    );
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
    let (out, console) = run_with_console_file(dir.path(), &code);
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
    virtio_submit_first(&mut a, VIRTIO0, RING);
    a.load_eax(RING + 0x108) // used[0].len
        .exit_with_al();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let out = run_vmm(&["--kernel", k.to_str().unwrap(), "--no-jail", "--rng"]);
    assert_exit_status(&out, 16);
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
    virtio_submit_first(&mut a, VIRTIO0, RING);
    a.load_eax(data).exit_with_al();
    let k = write_kernel(dir.path(), "k", &a.code, true);
    let drive = format!("id=disk0,path={},ro", disk.display());
    let out = run_vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--no-jail",
        "--drive",
        &drive,
    ]);
    assert_exit_status(&out, 0x5c);
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
    assert_exit_status(&out, 0x4f);
}

/// Kills the VMM if a test fails before it exits.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Waits for the VMM to exit (blocking on its pidfd; HANG_GUARD only turns a hang into a
    /// failure).
    fn wait_guarded(&mut self) -> std::process::ExitStatus {
        // SAFETY: pidfd_open on our own child, which is not reaped before `wait` below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.0.id(), 0) } as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; then closing the pidfd we opened.
        let n = unsafe {
            let n = libc::poll(&mut pfd, 1, HANG_GUARD.as_millis() as i32);
            libc::close(pidfd);
            n
        };
        assert!(n > 0, "the VMM did not exit within {HANG_GUARD:?}");
        self.0.wait().unwrap()
    }

    /// Panics if the VMM has exited (with its status) instead of waiting for something it
    /// would never do.
    fn assert_alive(&mut self, waiting_for: &str) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!("the VMM exited ({status:?}) while waiting for {waiting_for}");
        }
    }
}

/// Longest wait for one event the test expects (console output, the API socket): only turns
/// a hung VMM into a failure, it never decides a result.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The read end of a pipe the VMM writes its console to (`--console fd:60`): tests wait for
/// guest output on it instead of polling a file.
struct ConsolePipe {
    reader: std::io::PipeReader,
    seen: Vec<u8>,
}

/// The fd number the console pipe gets in the VMM.
const CONSOLE_FD: i32 = 60;

impl ConsolePipe {
    /// Spawns `cmd` (which must pass `--console fd:60`) with a pipe's write end as fd 60.
    fn spawn(cmd: &mut Command) -> (ChildGuard, ConsolePipe) {
        use std::os::unix::io::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (reader, writer) = std::io::pipe().unwrap();
        let wfd = writer.as_raw_fd();
        // SAFETY: only dup2 between fork and exec; `writer` (CLOEXEC) outlives the spawn. The
        // copy is inherited (no CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(wfd, CONSOLE_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ChildGuard(cmd.spawn().unwrap());
        // Only the VMM holds a write end now: EOF means it is gone.
        drop(writer);
        (
            child,
            ConsolePipe {
                reader,
                seen: Vec::new(),
            },
        )
    }

    /// Reads one chunk; false at EOF (every writer, i.e. the VMM, is gone).
    fn read_some(&mut self) -> bool {
        use std::io::Read;
        use std::os::unix::io::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, HANG_GUARD.as_millis() as i32) };
        assert!(
            n > 0,
            "no console output for {HANG_GUARD:?}; so far: {:?}",
            String::from_utf8_lossy(&self.seen)
        );
        let mut buf = [0u8; 4096];
        let n = self.reader.read(&mut buf).unwrap();
        self.seen.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Blocks until the console output contains `needle`.
    fn wait_for(&mut self, needle: &str) {
        while !String::from_utf8_lossy(&self.seen).contains(needle) {
            assert!(
                self.read_some(),
                "console closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&self.seen)
            );
        }
    }

    /// Everything the console got, once the VMM has exited (reads to EOF).
    fn all(mut self) -> String {
        while self.read_some() {}
        String::from_utf8(self.seen).unwrap()
    }
}

struct Api {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl Api {
    /// Connects once the VMM has bound its API socket (it does so before the guest runs).
    fn connect(path: &std::path::Path, vmm: &mut ChildGuard) -> Api {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                return Api {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    stream: s,
                };
            }
            vmm.assert_alive("its API socket");
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn call(&mut self, line: &str) -> serde_json::Value {
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        self.stream.write_all(&msg).unwrap();
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap()
    }

    /// Sends a line the VMM refuses for its length. The VMM answers and closes the connection
    /// as soon as it has read more than the limit, possibly before the whole line is written:
    /// the write may then fail with EPIPE. Returns the response and what the next read gives.
    fn call_oversized(&mut self, line: &str) -> (serde_json::Value, std::io::Result<usize>) {
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        match self.stream.write_all(&msg) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing the oversized line: {e}"),
        }
        let mut resp = String::new();
        self.reader.read_line(&mut resp).unwrap();
        let mut rest = String::new();
        let after = self.reader.read_line(&mut rest);
        (serde_json::from_str(&resp).unwrap(), after)
    }

    /// Polls `metrics` until `ready` holds for them (an event on the VMM thread the test
    /// cannot see otherwise).
    fn wait_metrics(
        &mut self,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let m = self.call(r#"{"op":"metrics"}"#);
            if ready(&m["metrics"]) {
                return m["metrics"].clone();
            }
            assert!(Instant::now() < deadline, "never saw {what}: {m}");
            std::thread::sleep(Duration::from_millis(5));
        }
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

/// A VMM without the jail running `kernel`, with its API socket at `sock` and the arguments
/// `configure` adds: the VMM and a connection to its API.
fn unjailed_vm_with_api(
    kernel: &std::path::Path,
    sock: &std::path::Path,
    configure: impl FnOnce(&mut Command),
) -> (ChildGuard, Api) {
    let mut cmd = vmm_run_command(kernel);
    cmd.args(["--no-jail", "--api-sock", sock.to_str().unwrap()]);
    configure(&mut cmd);
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let api = Api::connect(sock, &mut child);
    (child, api)
}

#[test]
fn api_controls_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let sock = dir.path().join("api.sock");
    let (mut child, mut api) = unjailed_vm_with_api(&k, &sock, |cmd| {
        cmd.args(["--drive", "id=slot0,empty", "--rng", "--vcpus", "2"])
            .stdout(Stdio::null());
    });
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
    let mut other = Api::connect(&sock, &mut child);
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(70 * 1024));
    let (v, after) = other.call_oversized(&big);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
    // Then EOF, or ECONNRESET when the VMM closed with part of the line still unread.
    match after {
        Ok(n) => assert_eq!(n, 0, "connection closed after the error"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    // The VMM itself carries on.
    assert_eq!(api.call(r#"{"op":"ping"}"#)["ok"], true);

    // No vsock: a graceful stop cannot ask the guest, so it forces after the timeout.
    let v = api.call(r#"{"op":"stop","force":false,"timeout_ms":100}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["graceful"], false);
    let status = child.wait_guarded();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn api_force_stop_ends_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let sock = dir.path().join("api.sock");
    let (mut child, mut api) = unjailed_vm_with_api(&k, &sock, |_| {});
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.wait_guarded().code(), Some(0));
}

#[test]
fn a_paused_vcpu_logs_where_the_guest_is() {
    // The shim pauses a pod VM whose agent never answered and keeps the VMM log: this line is
    // all it has to tell a stuck guest from a slow one.
    let dir = tempfile::tempdir().unwrap();
    // Jailed: the register reads must pass the vCPU thread's seccomp filter.
    let k = write_kernel(dir.path(), "k", &Asm::new().spin().code, true);
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let sock = jail.join("api.sock");
    let log = dir.path().join("vmm.log");
    let child = Command::new(vmm_bin())
        .args(["run", "--kernel", k.to_str().unwrap(), "--jail-dir"])
        .arg(&jail)
        .args(["--log-level", "info", "--api-sock"])
        .arg(&sock)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let mut api = Api::connect(&sock, &mut child);
    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.wait_guarded().code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    let paused: Vec<&str> = log.lines().filter(|l| l.contains("vCPU paused")).collect();
    assert_eq!(paused.len(), 1, "{log}");
    // The guest's only instruction, `jmp $`, sits at the image's load address, in the 32-bit
    // protected mode of the PVH entry, and it runs: not halted (mp_state 0, RUNNABLE).
    let rip = format!("rip={:#x} ", kata_like_vmm::test_guest::TINY_ELF_LOAD_ADDR);
    assert!(paused[0].contains(&rip), "{}", paused[0]);
    assert!(paused[0].contains("mp_state=0"), "{}", paused[0]);
}

fn jailed_run(violation: Option<&str>) -> std::process::ExitStatus {
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    // Without a violation the guest ends the VM itself. With one it spins: the violating
    // thread may make its syscall after the guest ran (the API thread starts last), and only
    // the SIGSYS kill may end the VMM.
    let mut guest = Asm::new();
    guest.serial_print(b"jailed\n");
    match violation {
        None => guest.exit(9),
        Some(_) => guest.spin(),
    };
    let k = write_kernel(dir.path(), "k", &guest.code, true);
    let mut cmd = Command::new(vmm_bin());
    cmd.args([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--jail-dir",
        jail.to_str().unwrap(),
    ])
    .args(["--console", "fd:60", "--rng", "--api-sock"])
    .arg(jail.join("api.sock"));
    if let Some(v) = violation {
        cmd.args(["--seccomp-test-violation", v]);
    }
    let (mut child, console) = ConsolePipe::spawn(&mut cmd);
    let status = child.wait_guarded();
    let output = console.all();
    if violation.is_none() {
        assert_eq!(output, "jailed\n");
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

/// The VMM running `kernel` in `jail` as nobody, its console on a pipe, with the devices of
/// `devices` (arguments), then vsock at `jail/v.sock` and the API socket at `jail/api.sock`.
fn jailed_vsock_vm(
    kernel: &std::path::Path,
    jail: &std::path::Path,
    devices: &[&str],
) -> (ChildGuard, ConsolePipe) {
    let mut cmd = vmm_run_command(kernel);
    cmd.args(["--jail-dir", jail.to_str().unwrap()])
        .args(["--uid", "65534", "--gid", "65534", "--console", "fd:60"])
        .args(devices)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", jail.join("v.sock").display()))
        .arg("--api-sock")
        .arg(jail.join("api.sock"));
    ConsolePipe::spawn(&mut cmd)
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
    let sock = jail.join("api.sock");
    let (mut child, mut console) = jailed_vsock_vm(&k, &jail, &[]);
    console.wait_for("activated\n");
    let mut host = UnixStream::connect(jail.join("v.sock")).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let mut api = Api::connect(&sock, &mut child);
    // The VMM thread accepted the client and read its CONNECT line: the connection exists
    // (its REQUEST waits for a receive buffer the guest never posts).
    let m = api.wait_metrics("the host connection", |m| {
        m["devices"][0]["connections_opened"] == 1
    });
    assert_eq!(m["devices"][0]["type"], "vsock");
    assert_eq!(m["devices"][0]["status"], 0xf);
    child.assert_alive("the stop");
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.wait_guarded().code(), Some(0));
    assert_eq!(console.all(), "activated\n");
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
    let secret = std::fs::File::open("/dev/null").unwrap();
    let secret_fd = secret.as_raw_fd();
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
    // SAFETY: only dup2 between fork and exec; the copy is inherited (no CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(secret_fd, 61) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, mut console) = ConsolePipe::spawn(&mut cmd);
    // The guest runs (and so the jail-less start-up, fd closing included, is over).
    console.wait_for("up\n");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.0.id()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(fds.contains(&"60".to_string()), "console fd kept: {fds:?}");
    assert!(
        !fds.contains(&"61".to_string()),
        "unnamed fd closed: {fds:?}"
    );
    let mut api = Api::connect(&sock, &mut child);
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.wait_guarded().code(), Some(0));
    assert_eq!(console.all(), "up\n");
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
    let (mut child, mut api) = unjailed_vm_with_api(&k, &sock, |cmd| {
        cmd.args(["--net", "tap=kltest0,mac=02:00:00:00:00:07"]);
    });
    let m = api.call(r#"{"op":"metrics"}"#);
    assert_eq!(m["metrics"]["devices"][0]["type"], "net");
    assert!(
        std::path::Path::new("/sys/class/net/kltest0").exists(),
        "TAP created"
    );
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(child.wait_guarded().code(), Some(0));
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

/// A hand-made virtio-vsock driver in guest code (guest CID 3): rings of 8 entries, receive
/// buffers of 4 KiB at RX_BUFS, small transmit packets at TX_PKTS.
struct VsockGuest {
    a: Asm,
    base: u32,
    rx: u32,
    tx: u32,
    /// Transmit descriptors used since the last activation.
    sent: u32,
}

const VSOCK_HDR: u32 = 44;
const RX_BUFS: u32 = 0x4_0000;
const TX_PKTS: u32 = 0x5_0000;
const OP_REQUEST: u32 = 1;
const OP_RESPONSE: u32 = 2;
const OP_RST: u32 = 3;
const OP_SHUTDOWN: u32 = 4;
const OP_RW: u32 = 5;
const OP_CREDIT_UPDATE: u32 = 6;

impl VsockGuest {
    fn new(base: u32) -> Self {
        VsockGuest {
            a: Asm::new(),
            base,
            rx: 0,
            tx: 0,
            sent: 0,
        }
    }

    /// Driver init with fresh rings at `rx` and `tx` (zeroed memory), then all eight receive
    /// buffers posted.
    fn activate(&mut self, rx: u32, tx: u32) {
        let (a, base) = (&mut self.a, self.base);
        a.store32(base + 0x70, 3)
            .store32(base + 0x24, 1)
            .store32(base + 0x20, 1)
            .store32(base + 0x70, 0xb);
        virtio_queue(a, base, 0, rx, 8);
        virtio_queue(a, base, 1, tx, 8);
        a.store32(base + 0x70, 0xf);
        for i in 0..8 {
            virtio_desc(a, rx, i, RX_BUFS + i * 0x1000, 0x1000, 2, 0);
            a.store32(rx + 0x84 + 2 * i, i);
        }
        a.store32(rx + 0x80, 8 << 16).store32(base + 0x50, 0);
        self.rx = rx;
        self.tx = tx;
        self.sent = 0;
    }

    fn rx_buf(i: u32) -> u32 {
        RX_BUFS + i * 0x1000
    }

    /// Waits for the `n`-th received packet (1-based) and exits with `status` unless its op
    /// is `op`.
    fn expect(&mut self, n: u16, op: u32, status: u8) {
        let buf = Self::rx_buf(u32::from(n) - 1);
        self.a
            .wait_idx_at_least(self.rx + 0x100, n)
            .load_eax(buf + 28)
            .exit_unless_eax(1 | (op << 16), status);
    }

    /// Sends a packet: header (ports from `ports`), then `data` in the same descriptor, or a
    /// zero-filled payload of `zeros` bytes at `big` instead.
    fn send(&mut self, ports: Ports, op: u32, data: &[u8], big: Option<(u32, u32)>) {
        let j = self.sent;
        let pkt = big.map_or(TX_PKTS + j * 0x1000, |(addr, _)| addr);
        let len = big.map_or(data.len() as u32, |(_, n)| n);
        let a = &mut self.a;
        a.store32(pkt, 3)
            .store32(pkt + 4, 0)
            .store32(pkt + 8, 2)
            .store32(pkt + 12, 0);
        match ports {
            Ports::Fixed(src, dst) => {
                a.store32(pkt + 16, src).store32(pkt + 20, dst);
            }
            Ports::ReplyTo(i) => {
                let buf = Self::rx_buf(i);
                a.copy32(pkt + 16, buf + 20).copy32(pkt + 20, buf + 16);
            }
        }
        a.store32(pkt + 24, len)
            .store32(pkt + 28, 1 | (op << 16))
            .store32(pkt + 32, 0)
            .store32(pkt + 36, 256 * 1024)
            .store32(pkt + 40, 0);
        for (k, chunk) in data.chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            a.store32(pkt + VSOCK_HDR + 4 * k as u32, u32::from_le_bytes(word));
        }
        virtio_desc(a, self.tx, j, pkt, VSOCK_HDR + len, 0, 0);
        a.store32(self.tx + 0x84 + 2 * j, j)
            .store32(self.tx + 0x80, (j + 1) << 16)
            .store32(self.base + 0x50, 1);
        self.sent += 1;
    }
}

#[derive(Clone, Copy)]
enum Ports {
    /// (guest port, host port)
    Fixed(u32, u32),
    /// Back to the sender of the packet in receive buffer i.
    ReplyTo(u32),
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// What a pod's shim and guest do with vsock, on a jailed VMM, with a guest driver written in
/// guest code: two host-initiated streams open at once, data both ways, a 64 KiB guest write
/// (credit update), a guest-initiated stream, a stream closed by the host, API calls while
/// streams are open, the guest resetting the device with streams open (Linux does so at
/// poweroff) and activating it again, then a graceful API stop through the power port. Device
/// activation and reset are written by the vCPU thread; every socket and epoll operation must
/// happen on the VMM thread, or the VMM dies of SIGSYS (exit status 159).
#[test]
fn jailed_vsock_traffic_resets_and_api_calls_stay_within_the_filters() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::AsRawFd;
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    // Guest-initiated connections to host port 5000 go to <uds>_5000 (inside the jail); the
    // jailed VMM runs as nobody.
    let host_listener = std::os::unix::net::UnixListener::bind(jail.join("v.sock_5000")).unwrap();
    std::fs::set_permissions(
        jail.join("v.sock_5000"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();

    // The drive slot is device 0, vsock device 1.
    let mut g = VsockGuest::new(VIRTIO0 + 0x1000);
    g.activate(0x1_0000, 0x1_1000);
    g.a.serial_print(b"A\n");
    // Host-initiated connections, one after the other: REQUEST -> RESPONSE.
    g.expect(1, OP_REQUEST, 0x91);
    g.send(Ports::ReplyTo(0), OP_RESPONSE, b"", None);
    g.expect(2, OP_REQUEST, 0x92);
    g.send(Ports::ReplyTo(1), OP_RESPONSE, b"", None);
    g.a.serial_print(b"B\n");
    // Data from the first stream, answered.
    g.expect(3, OP_RW, 0x93);
    g.send(Ports::ReplyTo(2), OP_RW, b"pong", None);
    // 64 KiB on the second stream: the VMM reports the freed credit once the host read it.
    g.send(Ports::ReplyTo(1), OP_RW, b"", Some((0x80_0000, 64 * 1024)));
    g.expect(4, OP_CREDIT_UPDATE, 0x94);
    // A guest-initiated connection to host port 5000, and data on it.
    g.send(Ports::Fixed(777, 5000), OP_REQUEST, b"", None);
    g.expect(5, OP_RESPONSE, 0x95);
    g.send(Ports::Fixed(777, 5000), OP_RW, b"hi", None);
    g.a.serial_print(b"E\n");
    // The host closes the first stream: SHUTDOWN, answered with RST.
    g.expect(6, OP_SHUTDOWN, 0x96);
    g.send(Ports::ReplyTo(5), OP_RST, b"", None);
    g.a.serial_print(b"F\n");
    // On the host's word, reset the device with two streams open, then activate it again.
    g.expect(7, OP_RW, 0x97);
    g.a.store32(g.base + 0x70, 0);
    g.a.serial_print(b"G\n");
    g.activate(0x1_2000, 0x1_3000);
    g.a.serial_print(b"H\n");
    // The API's graceful stop connects to the power port: exit 0x42 once asked.
    g.expect(1, OP_REQUEST, 0x98);
    g.a.load_eax(VsockGuest::rx_buf(0) + 20)
        .exit_unless_eax(1025, 0x99)
        .exit(0x42);
    let k = write_kernel(dir.path(), "k", &g.a.code, true);

    let sock = jail.join("api.sock");
    let (mut child, mut console) = jailed_vsock_vm(&k, &jail, &["--drive", "id=slot0,empty,ro"]);
    console.wait_for("A\n");

    let mut c1 = UnixStream::connect(jail.join("v.sock")).unwrap();
    c1.write_all(b"CONNECT 1234\n").unwrap();
    assert!(read_line(&mut c1).starts_with("OK "));
    let mut c2 = UnixStream::connect(jail.join("v.sock")).unwrap();
    c2.write_all(b"CONNECT 1235\n").unwrap();
    assert!(read_line(&mut c2).starts_with("OK "));
    console.wait_for("B\n");

    c1.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    c1.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    let mut bulk = vec![0xffu8; 64 * 1024];
    c2.read_exact(&mut bulk).unwrap();
    assert!(bulk.iter().all(|b| *b == 0));

    let (mut from_guest, _) = host_listener.accept().unwrap();
    let mut hi = [0u8; 2];
    from_guest.read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi");
    console.wait_for("E\n");

    drop(c1);
    console.wait_for("F\n");
    let mut api = Api::connect(&sock, &mut child);
    // The RST for the first stream reached the VMM thread: two streams left.
    api.wait_metrics("two open streams", |m| {
        m["devices"][1]["open_connections"] == 2
    });
    let img = dir.path().join("rootfs.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let v = api.call_with_fd(
        r#"{"op":"set_drive","id":"slot0","read_only":true}"#,
        f.as_raw_fd(),
    );
    assert_eq!(v["capacity_sectors"], 8, "{v}");
    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"resume"}"#)["ok"], true);

    // The guest resets the device: both remaining streams end (closed by the VMM thread).
    c2.write_all(b"reset").unwrap();
    let mut rest = Vec::new();
    c2.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    from_guest.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    console.wait_for("H\n");
    let m = api.wait_metrics("the device active again", |m| {
        m["devices"][1]["status"] == 0xf && m["devices"][1]["open_connections"] == 0
    });
    assert_eq!(m["devices"][1]["connections_closed"], 3, "{m}");
    child.assert_alive("the graceful stop");

    let v = api.call(r#"{"op":"stop","force":false,"timeout_ms":120000}"#);
    assert_eq!(v["graceful"], true, "{v}");
    assert_eq!(child.wait_guarded().code(), Some(0x42));
    assert_eq!(console.all(), "A\nB\nE\nF\nG\nH\n");
}

/// The `Name:\tvalue` lines of /proc/`pid`/task/`tid`/status.
fn thread_status(pid: u32, tid: &str) -> std::collections::HashMap<String, String> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// What is wrong with the privileges of every thread of `pid` (empty: nothing): each must
/// have non-zero uids and gids, no capability in any set, no_new_privs and a seccomp filter.
fn privilege_problems(pid: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![format!("{pid}: no /proc entry")];
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let status = thread_status(pid, &tid);
        let field = |k: &str| status.get(k).cloned().unwrap_or_default();
        for ids in ["Uid", "Gid"] {
            let v = field(ids);
            if v.is_empty() || v.split_whitespace().any(|id| id == "0") {
                problems.push(format!("{pid}/{tid} ({}): {ids} {v}", field("Name")));
            }
        }
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            if field(caps) != "0000000000000000" {
                problems.push(format!(
                    "{pid}/{tid} ({}): {caps} {}",
                    field("Name"),
                    field(caps)
                ));
            }
        }
        for (k, want) in [("NoNewPrivs", "1"), ("Seccomp", "2")] {
            if field(k) != want {
                problems.push(format!("{pid}/{tid} ({}): {k} {}", field("Name"), field(k)));
            }
        }
    }
    problems
}

/// The jailed VMM (by default, without --uid/--gid) and the process that waits for it outside
/// the jail both run as a non-root user with no capabilities, no_new_privs and a seccomp
/// filter on every thread; SIGTERM to the outside process still ends the VMM (128 + SIGKILL).
#[test]
fn jailed_vmm_and_its_outside_process_run_unprivileged() {
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    let dir = tempfile::tempdir().unwrap();
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let mut guest = Asm::new();
    guest.serial_print(b"up\n").spin();
    let k = write_kernel(dir.path(), "k", &guest.code, true);
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--kernel", k.to_str().unwrap(), "--jail-dir"])
        .arg(&jail)
        .args(["--vcpus", "2", "--console", "fd:60", "--rng", "--api-sock"])
        .arg(jail.join("api.sock"));
    let (mut child, mut console) = ConsolePipe::spawn(&mut cmd);
    console.wait_for("up\n");
    // The API answering means its thread is past its filter; the sockets made before the
    // drop stay usable.
    let mut api = Api::connect(&jail.join("api.sock"), &mut child);
    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"resume"}"#)["ok"], true);
    let outside = child.0.id();
    let children =
        std::fs::read_to_string(format!("/proc/{outside}/task/{outside}/children")).unwrap();
    let vmm: u32 = children.trim().parse().unwrap();
    // Threads install their filters as they start: give the last one (the VMM thread, after
    // starting the others) a moment; a missing filter never appears however long we wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut problems;
    loop {
        problems = privilege_problems(outside);
        problems.extend(privilege_problems(vmm));
        if problems.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let threads = std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .count();
    assert!(
        threads >= 4,
        "vcpu0, vcpu1, api and the VMM thread: {threads}"
    );
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(outside as i32, libc::SIGTERM) };
    assert_eq!(child.wait_guarded().code(), Some(128 + libc::SIGKILL));
}

/// The 32-bit guest of the snapshot tests: `inc dword [SNAPSHOT_COUNTER]` in a loop.
const SNAPSHOT_COUNTER: u32 = 0x30_0000;

fn counting_guest() -> Vec<u8> {
    let mut code = vec![0xff, 0x05];
    code.extend_from_slice(&SNAPSHOT_COUNTER.to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf8]); // jmp back to the inc
    code
}

/// The guest's counter in a snapshot's memory file.
fn counter_in(snapshot: &std::path::Path) -> u32 {
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(snapshot.join("memory")).unwrap(),
        &mut b,
        u64::from(SNAPSHOT_COUNTER),
    )
    .unwrap();
    u32::from_le_bytes(b)
}

/// A jailed VMM (API socket `jail/api.sock`, an rng) started with `args`, its API and the
/// snapshot directory `jail/snap`, writable by the jail's uid.
fn jailed_snapshot_vm(
    jail: &std::path::Path,
    args: &[&str],
) -> (ChildGuard, Api, std::path::PathBuf) {
    std::fs::create_dir_all(jail).unwrap();
    let snap = jail.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let c = std::ffi::CString::new(snap.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: chown on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let sock = jail.join("api.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .args(args)
        .arg("--jail-dir")
        .arg(jail)
        .args(["--rng", "--console", "null", "--api-sock"])
        .arg(&sock);
    let mut child = ChildGuard(cmd.spawn().unwrap());
    let api = Api::connect(&sock, &mut child);
    (child, api, snap)
}

#[test]
fn a_jailed_snapshot_restores_into_a_new_vmm_whose_guest_carries_on() {
    if !is_root() {
        panic!("the jail needs root (mount and pid namespaces)");
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "k", &counting_guest(), true);
    // A full disk inside the first jail, mounted before the VMM copies the jail's mounts.
    let full = dir.path().join("jail-a/full");
    std::fs::create_dir_all(&full).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k,mode=0777", "tmpfs"])
        .arg(&full)
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&full);
    let (mut first, mut api, snap) = jailed_snapshot_vm(
        &dir.path().join("jail-a"),
        &["--kernel", k.to_str().unwrap(), "--vcpus", "2"],
    );
    let running = api.call(r#"{"op":"snapshot","dir":"/snap"}"#);
    assert_eq!(running["ok"], false, "{running}");
    assert!(
        running["error"].as_str().unwrap().contains("paused"),
        "{running}"
    );
    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    // Refusals leave no files and the VMM running (their clean-up is within the filters).
    let nowhere = api.call(r#"{"op":"snapshot","dir":"/nowhere"}"#);
    assert!(
        nowhere["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot create /nowhere/state"),
        "{nowhere}"
    );
    let full_disk = api.call(r#"{"op":"snapshot","dir":"/full"}"#);
    assert!(
        full_disk["error"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device"),
        "{full_disk}"
    );
    assert!(std::fs::read_dir(&full).unwrap().next().is_none());
    assert_eq!(api.call(r#"{"op":"ping"}"#)["ok"], true);
    let v = api.call(r#"{"op":"snapshot","dir":"/snap"}"#);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["snapshot"]["memory_bytes"], 128u64 << 20);
    // Only the pages the guest and the boot setup wrote: a few of them.
    let written = v["snapshot"]["memory_written_bytes"].as_u64().unwrap();
    assert!(written > 0 && written < 1 << 20, "{v}");
    let at_snapshot = counter_in(&snap);
    assert!(at_snapshot > 0, "the guest ran before the snapshot");
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(first.wait_guarded().code(), Some(0));

    // A new VMM in a new jail: it runs the guest on from the snapshot (the counter grows
    // from where it was), and its own snapshot shows that.
    let (mut second, mut api, snap2) = jailed_snapshot_vm(
        &dir.path().join("jail-b"),
        &["--restore", snap.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(api.call(r#"{"op":"pause"}"#)["ok"], true);
    let v = api.call(r#"{"op":"snapshot","dir":"/snap"}"#);
    assert_eq!(v["ok"], true, "{v}");
    let after = counter_in(&snap2);
    assert!(
        after > at_snapshot,
        "counter {after} after the restore, {at_snapshot} at the snapshot"
    );
    // MAP_PRIVATE: the restored guest's writes never reached the first snapshot's file.
    assert_eq!(counter_in(&snap), at_snapshot);
    assert_eq!(api.call(r#"{"op":"resume"}"#)["ok"], true);
    assert_eq!(api.call(r#"{"op":"stop","force":true}"#)["ok"], true);
    assert_eq!(second.wait_guarded().code(), Some(0));
}
