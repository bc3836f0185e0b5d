//! The VMM process (`kata-like-vmm run ...`, see vmm/CONTRACT.md) and its run-time API client
//! (JSON lines on a Unix socket, drive fds passed with SCM_RIGHTS). The arguments, requests,
//! responses and metrics are the contract crate's types (`kata_like_vmm_contract`).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_like_vmm_contract::limits::MAX_LINE;
use kata_like_vmm_contract::{
    parse_response, ConsoleConfig, DriveConfig, FsConfig, JailConfig, MachineConfig, NetBackend,
    NetConfig, Request, Response, VmConfig, VmMetrics, VsockConfig,
};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::{Config, VmShape};
use crate::error::{Error, Result};
use crate::vm::console_log;
use crate::vm::network::Nic;
use crate::vm::shared_fs::{SharedFsPaths, SHARED_FS_TAG};

/// Guest context id of the pod VM (any value >= 3; each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;

// The VMM's contract names the agent's vsock ports without depending on the agent's protocol
// crate; the shim sees both, so it checks here that they agree (a mismatch breaks the build).
const _: () = assert!(
    kata_like_protocol::AGENT_VSOCK_PORT == kata_like_vmm_contract::limits::AGENT_PORT
        && kata_like_protocol::POWER_VSOCK_PORT == kata_like_vmm_contract::limits::POWER_PORT
);
/// A response line longer than this is a broken VMM, not a reply.
const MAX_RESPONSE_BYTES: usize = MAX_LINE;
/// Deadline of one API request (the VMM answers at once; `stop` waits at most its timeout).
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Paths of one sandbox's VMM inside its state dir.
#[derive(Debug, Clone)]
pub struct VmmPaths {
    /// Jail root of the VMM; its sockets live inside it.
    pub jail_dir: PathBuf,
    pub api_sock: PathBuf,
    pub vsock_sock: PathBuf,
    pub console_log: PathBuf,
    pub vmm_log: PathBuf,
    pub pid_file: PathBuf,
    /// virtiofsd's socket: outside the jail (the VMM connects before jailing itself).
    pub shared_fs_sock: PathBuf,
}

impl VmmPaths {
    pub fn new(state_dir: &Path) -> VmmPaths {
        let jail_dir = state_dir.join("jail");
        VmmPaths {
            api_sock: jail_dir.join("api.sock"),
            vsock_sock: jail_dir.join("vsock.sock"),
            jail_dir,
            console_log: state_dir.join("console.log"),
            vmm_log: state_dir.join("vmm.log"),
            pid_file: state_dir.join("vmm.pid"),
            shared_fs_sock: SharedFsPaths::new(state_dir).socket,
        }
    }
}

/// Name of the i-th empty drive slot (also the virtio-blk serial the agent looks for).
pub fn slot_id(index: u32) -> String {
    format!("slot{index}")
}

/// The VMM configuration of one pod VM: `console_fd` is the write end of the console pipe the
/// VMM inherits (see `console_log`), and one NIC per TAP (inherited by its fd number).
/// `jail_id`: the pod's own uid and gid in the jail (`vmm_ids`), when jailed.
pub fn vm_config(
    config: &Config,
    shape: &VmShape,
    paths: &VmmPaths,
    console_fd: RawFd,
    nics: &[Nic],
    jail_id: Option<u32>,
) -> VmConfig {
    let mut cmdline = config.vmm.kernel_params.clone();
    if shape.debug_console {
        // Verbose kernel output to the console log; "quiet" from the base line is overridden.
        cmdline.push_str(" loglevel=7 agent.log=debug,h2=info,hyper=info,tower=info,tonic=info");
    }
    let mut vm = VmConfig::new(&config.vmm.kernel);
    vm.boot.initrd = config.vmm.initrd.clone();
    vm.boot.cmdline = cmdline;
    vm.machine = MachineConfig {
        // Out-of-range values stay out of range (saturated) so that validation refuses them.
        vcpus: u8::try_from(shape.vcpus).unwrap_or(u8::MAX),
        memory_mib: u64::from(shape.memory_mib),
        hugepages: config.vmm.hugepages,
    };
    // The guest's console is hvc0 (`console=hvc0` in the default kernel_params): one VM exit
    // per buffer, where the 8250 (also there, same sink) costs one per byte.
    vm.console = ConsoleConfig::Fd(console_fd);
    vm.virtio_console = true;
    vm.drives = (0..config.vmm.drive_slots)
        .map(|i| DriveConfig {
            id: slot_id(i),
            path: None,
            read_only: true,
        })
        .collect();
    vm.net = nics
        .iter()
        .map(|nic| NetConfig {
            backend: NetBackend::Fd(nic.tap.as_raw_fd()),
            mac: nic.mac,
        })
        .collect();
    vm.vsock = Some(VsockConfig {
        cid: u64::from(GUEST_CID),
        uds: paths.vsock_sock.clone(),
    });
    vm.fs = vec![FsConfig {
        tag: SHARED_FS_TAG.into(),
        socket: paths.shared_fs_sock.clone(),
    }];
    vm.rng = true;
    vm.api_sock = Some(paths.api_sock.clone());
    vm.jail = if config.jail.enabled {
        JailConfig {
            enabled: true,
            jail_dir: Some(paths.jail_dir.clone()),
            uid: jail_id,
            gid: jail_id,
        }
    } else {
        JailConfig::default()
    };
    vm.log_level = Some(if shape.debug_console { "debug" } else { "info" }.into());
    vm
}

/// The `kata-like-vmm run` argument list for one pod VM.
pub fn command_args(
    config: &Config,
    shape: &VmShape,
    paths: &VmmPaths,
    console_fd: RawFd,
    nics: &[Nic],
    jail_id: Option<u32>,
) -> Vec<String> {
    run_args(&vm_config(config, shape, paths, console_fd, nics, jail_id))
}

fn run_args(vm: &VmConfig) -> Vec<String> {
    let mut args = vec!["run".to_string()];
    args.extend(vm.to_args());
    args
}

/// Starts the VMM. Its stdout/stderr go to `vmm.log`; it is killed if the shim dies (the
/// parent-death signal), and `delete` finds it through `vmm.pid` otherwise. Returns the VMM and
/// the read end of its console pipe, which the caller drains (`console_log::drain`). The TAP fds
/// of `nics` are inherited by the VMM under the same numbers (the caller closes its copies).
/// `jail_id`: the pod's own uid and gid in the jail.
pub fn spawn(
    config: &Config,
    shape: &VmShape,
    paths: &VmmPaths,
    nics: &[Nic],
    jail_id: Option<u32>,
) -> Result<(tokio::process::Child, OwnedFd)> {
    let (console_read, console_write) =
        console_log::console_pipe().map_err(Error::io("create the guest console pipe"))?;
    let console_fd = console_write.as_raw_fd();
    let vm = vm_config(config, shape, paths, console_fd, nics, jail_id);
    let tap_fds: Vec<i32> = nics.iter().map(|nic| nic.tap.as_raw_fd()).collect();
    // The VMM would refuse it too, but only after starting, with the reason in its log.
    vm.validate()
        .map_err(|e| Error::InvalidConfig(format!("pod VM: {e}")))?;
    std::fs::create_dir_all(&paths.jail_dir).map_err(Error::io(format!(
        "create jail dir {}",
        paths.jail_dir.display()
    )))?;
    let log = std::fs::File::create(&paths.vmm_log)
        .map_err(Error::io(format!("create {}", paths.vmm_log.display())))?;
    let log2 = log
        .try_clone()
        .map_err(Error::io("duplicate the VMM log fd"))?;
    let mut command = tokio::process::Command::new(&config.vmm.path);
    command
        .args(run_args(&vm))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // SAFETY: prctl(PR_SET_PDEATHSIG) and fcntl(F_SETFD) are async-signal-safe and touch
    // no shared state; the fcntl makes the console pipe's write end and the TAPs `nics` keeps
    // open until the spawn returns (all close-on-exec in the shim) inheritable in this child only.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The console pipe and the TAPs are close-on-exec in the shim (no other child may
            // get them); only the VMM inherits them, at the numbers its arguments name.
            for &fd in std::iter::once(&console_fd).chain(&tap_fds) {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(Error::io(format!(
        "start the VMM {}",
        config.vmm.path.display()
    )))?;
    // Only the VMM holds the write end now: the drain sees end-of-file once the VMM is gone.
    drop(console_write);
    if let Some(pid) = child.id() {
        std::fs::write(&paths.pid_file, pid.to_string())
            .map_err(Error::io(format!("write {}", paths.pid_file.display())))?;
    }
    Ok((child, console_read))
}

/// Kills a VMM recorded in a state dir by an earlier shim (after a crash), making sure the pid
/// still belongs to that VMM: its command line must name this sandbox's API socket.
pub fn kill_recorded(paths: &VmmPaths) -> Result<Option<u32>> {
    super::pid_file::kill_recorded_pid(&paths.pid_file, &paths.api_sock.display().to_string())
}

/// Client of the VMM's run-time API. One connection per request keeps a failed request from
/// poisoning later ones.
#[derive(Debug, Clone)]
pub struct VmmApi {
    socket: PathBuf,
}

impl VmmApi {
    pub fn new(socket: impl Into<PathBuf>) -> VmmApi {
        VmmApi {
            socket: socket.into(),
        }
    }

    /// Sends one request (with an optional fd) and returns the response when `ok`.
    pub async fn request(&self, request: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Response> {
        let op = request.op();
        tokio::time::timeout(API_TIMEOUT, self.request_inner(request, fd))
            .await
            .map_err(|_| Error::Vmm(format!("API {op}: no answer within {API_TIMEOUT:?}")))?
            .map_err(|e| match e {
                Error::Vmm(m) => Error::Vmm(format!("API {op}: {m}")),
                other => other,
            })
    }

    async fn request_inner(
        &self,
        request: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Response> {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| Error::Vmm(format!("connect {}: {e}", self.socket.display())))?;
        let line = request
            .to_line()
            .map_err(|e| Error::Other(format!("encode VMM request: {e}")))?;
        match fd {
            Some(fd) => {
                // The fd travels with the first bytes of the request line.
                let raw = [fd.as_raw_fd()];
                let mut sent = 0;
                while sent == 0 {
                    stream
                        .writable()
                        .await
                        .map_err(|e| Error::Vmm(format!("send: {e}")))?;
                    match stream.try_io(tokio::io::Interest::WRITABLE, || {
                        let cmsg = [ControlMessage::ScmRights(&raw)];
                        sendmsg::<()>(
                            stream.as_raw_fd(),
                            &[IoSlice::new(&line)],
                            &cmsg,
                            MsgFlags::MSG_NOSIGNAL,
                            None,
                        )
                        .map_err(std::io::Error::from)
                    }) {
                        Ok(n) => sent = n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(Error::Vmm(format!("send: {e}"))),
                    }
                }
                if sent < line.len() {
                    stream
                        .write_all(&line[sent..])
                        .await
                        .map_err(|e| Error::Vmm(format!("send: {e}")))?;
                }
                read_response(&mut stream).await
            }
            None => {
                stream
                    .write_all(&line)
                    .await
                    .map_err(|e| Error::Vmm(format!("send: {e}")))?;
                read_response(&mut stream).await
            }
        }
    }

    pub async fn ping(&self) -> Result<String> {
        let resp = self.request(&Request::Ping {}, None).await?;
        Ok(resp.version.unwrap_or_default())
    }

    /// Fills an empty drive slot with an open file (the VMM never needs to see our paths).
    pub async fn set_drive(&self, id: &str, file: BorrowedFd<'_>, read_only: bool) -> Result<()> {
        let request = Request::SetDrive {
            id: id.to_string(),
            path: None,
            read_only,
        };
        self.request(&request, Some(file)).await.map(|_| ())
    }

    pub async fn clear_drive(&self, id: &str) -> Result<()> {
        let request = Request::ClearDrive { id: id.to_string() };
        self.request(&request, None).await.map(|_| ())
    }

    pub async fn pause(&self) -> Result<()> {
        self.request(&Request::Pause {}, None).await.map(|_| ())
    }

    pub async fn resume(&self) -> Result<()> {
        self.request(&Request::Resume {}, None).await.map(|_| ())
    }

    pub async fn stop(&self, force: bool, timeout_ms: u64) -> Result<()> {
        let request = Request::Stop { force, timeout_ms };
        self.request(&request, None).await.map(|_| ())
    }

    pub async fn metrics(&self) -> Result<VmMetrics> {
        let resp = self.request(&Request::Metrics {}, None).await?;
        Ok(resp.metrics.unwrap_or_default())
    }
}

async fn read_response(stream: &mut UnixStream) -> Result<Response> {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    // Bounded read of one line: a VMM that streams garbage cannot make us allocate without end.
    loop {
        let available = reader
            .fill_buf()
            .await
            .map_err(|e| Error::Vmm(format!("read: {e}")))?;
        if available.is_empty() {
            return Err(Error::Vmm("connection closed before a response".into()));
        }
        if let Some(pos) = available.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&available[..pos]);
            break;
        }
        let n = available.len();
        buf.extend_from_slice(available);
        reader.consume(n);
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(Error::Vmm(format!(
                "response longer than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
    }
    // A refusal reads as the VMM's own message; anything else says what was wrong with the line.
    parse_response(&buf).map_err(|e| Error::Vmm(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::{BufRead, Read, Write};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixListener;

    #[test]
    fn command_line_follows_the_contract() {
        let mut config = Config::default();
        config.vmm.drive_slots = 2;
        let shape = VmShape {
            vcpus: 2,
            memory_mib: 256,
            debug_console: false,
        };
        let paths = VmmPaths::new(Path::new("/run/kata-like/default/pod1"));
        let args = command_args(&config, &shape, &paths, 7, &[], Some(100_000)).join(" ");
        assert!(args.contains("--console fd:7"), "{args}");
        assert!(args.contains("--rng --virtio-console"), "{args}");
        assert!(args.contains("console=hvc0"), "{args}");
        assert!(args.starts_with("run --kernel /usr/share/kata-like/vmlinux --initrd "));
        assert!(args.contains("--vcpus 2 --memory-mib 256"));
        assert!(args.contains("--drive id=slot0,empty,ro --drive id=slot1,empty,ro --vsock"));
        assert!(args.contains("--vsock cid=3,uds=/run/kata-like/default/pod1/jail/vsock.sock"));
        assert!(args.contains("--api-sock /run/kata-like/default/pod1/jail/api.sock"));
        assert!(
            args.contains("--jail-dir /run/kata-like/default/pod1/jail --uid 100000 --gid 100000")
        );
        assert!(!args.contains("--no-jail"));
        config.jail.enabled = false;
        let args = command_args(&config, &shape, &paths, 7, &[], Some(100_000)).join(" ");
        assert!(args.contains("--no-jail") && !args.contains("--jail-dir"));
    }

    #[test]
    fn each_nic_is_a_net_device_on_its_inherited_tap_fd_with_its_mac() {
        let config = Config::default();
        let shape = VmShape {
            vcpus: 1,
            memory_mib: 128,
            debug_console: false,
        };
        let paths = VmmPaths::new(Path::new("/run/kata-like/default/pod1"));
        let nics: Vec<Nic> = [[0x6a, 0, 0, 0, 0, 1], [0x6a, 0, 0, 0, 0, 2]]
            .into_iter()
            .map(|mac| Nic {
                tap: std::fs::File::open("/dev/null").expect("open"),
                mac,
            })
            .collect();
        let vm = vm_config(&config, &shape, &paths, 7, &nics, None);
        assert_eq!(vm.validate(), Ok(()));
        let fds: Vec<i32> = std::iter::once(7)
            .chain(nics.iter().map(|n| n.tap.as_raw_fd()))
            .collect();
        assert_eq!(vm.inherited_fds(), fds, "the console pipe, then the TAPs");
        let args = command_args(&config, &shape, &paths, 7, &nics, None).join(" ");
        assert!(
            args.contains(&format!(
                "--net fd={},mac=6a:00:00:00:00:01 --net fd={},mac=6a:00:00:00:00:02",
                fds[1], fds[2]
            )),
            "{args}"
        );
    }

    /// A stand-in for the VMM's API server that answers each request line with a canned line
    /// and reports what it received (including an fd's contents).
    fn serve_once(listener: UnixListener, answer: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut buf = [0u8; 4096];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = nix::sys::socket::recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .expect("recvmsg");
            let mut fd_content = String::new();
            for c in msg.cmsgs().expect("cmsgs") {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                    let mut f = unsafe { std::fs::File::from(OwnedFd::from_raw_fd(fds[0])) };
                    f.read_to_string(&mut fd_content).expect("read fd");
                }
            }
            let n = msg.bytes;
            let mut line = String::from_utf8_lossy(&buf[..n]).to_string();
            if !line.ends_with('\n') {
                let mut rest = String::new();
                std::io::BufReader::new(&conn)
                    .read_line(&mut rest)
                    .expect("rest");
                line.push_str(&rest);
            }
            (&conn).write_all(answer.as_bytes()).expect("answer");
            format!("{}|{}", line.trim_end(), fd_content)
        })
    }

    #[tokio::test]
    async fn set_drive_passes_the_fd_with_the_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let server = serve_once(listener, "{\"ok\":true}\n");
        let image = dir.path().join("layer.img");
        std::fs::write(&image, "erofs image bytes").expect("write");
        let file = std::fs::File::open(&image).expect("open");
        VmmApi::new(&sock)
            .set_drive("slot3", file.as_fd(), true)
            .await
            .expect("set_drive");
        let seen = server.join().expect("server");
        let (line, content) = seen.split_once('|').expect("separator");
        let req: Value = serde_json::from_str(line).expect("json");
        assert_eq!(
            req,
            json!({"op": "set_drive", "id": "slot3", "read_only": true})
        );
        assert_eq!(content, "erofs image bytes");
    }

    #[tokio::test]
    async fn vmm_errors_and_garbage_become_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (answer, expect) in [
            (
                "{\"ok\":false,\"error\":\"no such drive\"}\n",
                "no such drive",
            ),
            ("not json\n", "malformed response"),
            ("{\"version\":1}\n", "without \"ok\""),
            ("", "closed before a response"),
        ] {
            let sock = dir.path().join("api.sock");
            let _ = std::fs::remove_file(&sock);
            let listener = UnixListener::bind(&sock).expect("bind");
            let server = serve_once(listener, answer);
            let err = VmmApi::new(&sock)
                .clear_drive("slot0")
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expect) && err.contains("clear_drive"),
                "{answer:?}: {err}"
            );
            server.join().expect("server");
        }
    }

    #[tokio::test]
    async fn missing_socket_is_a_clear_error() {
        let err = VmmApi::new("/nonexistent/api.sock")
            .ping()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/api.sock"), "{err}");
    }
}
