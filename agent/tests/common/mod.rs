//! Test harness: a busybox rootfs, an agent on a Unix socket with its own state dir, a client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use kata_like_protocol::agent_client::AgentClient;
use kata_like_protocol::*;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

pub type Client = AgentClient<Channel>;

/// Host binaries (dynamically linked) copied into the rootfs with their libraries, so tests can
/// exec real programs (busybox-static runs its applets inside the shell without exec).
const REAL_BINARIES: &[(&str, &str)] = &[
    ("/bin/true", "/usr/bin/gnu-true"),
    ("/bin/cat", "/usr/bin/gnu-cat"),
];

fn copy_with_libs(rootfs: &Path, src: &str, dst: &str) {
    let target = rootfs.join(dst.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(src, &target).unwrap_or_else(|e| panic!("copy {src}: {e}"));
    let out = Command::new("ldd").arg(src).output().expect("ldd");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        if let Some(lib) = path {
            let real = std::fs::canonicalize(&lib).unwrap();
            let dest = rootfs.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            if !dest.exists() {
                std::fs::copy(&real, &dest).unwrap();
            }
        }
    }
}

/// A busybox rootfs (Debian's busybox-static plus a few real binaries), built once per target
/// dir and reused.
pub fn busybox_rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let done = base.join("busybox-rootfs");
            if done.join(".complete").exists() {
                return done;
            }
            let busybox = ["/bin/busybox", "/usr/bin/busybox"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .expect("busybox-static must be installed (apt-get install busybox-static)");
            let tmp = base.join(format!("busybox-rootfs.tmp.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            for dir in [
                "bin",
                "sbin",
                "usr/bin",
                "etc",
                "proc",
                "sys",
                "dev",
                "tmp",
                "root",
                "home/user",
                "var",
            ] {
                std::fs::create_dir_all(tmp.join(dir)).unwrap();
            }
            std::fs::copy(busybox, tmp.join("bin/busybox")).unwrap();
            let list = Command::new(busybox).arg("--list").output().unwrap();
            for applet in String::from_utf8_lossy(&list.stdout).lines() {
                if applet != "busybox" {
                    let _ = std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet));
                }
            }
            for (src, dst) in REAL_BINARIES {
                copy_with_libs(&tmp, src, dst);
            }
            std::fs::write(
                tmp.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
            )
            .unwrap();
            std::fs::write(
                tmp.join("etc/group"),
                "root:x:0:\nuser:x:1000:\nextra:x:2000:\n",
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.join("tmp"), std::fs::Permissions::from_mode(0o1777))
                .unwrap();
            std::fs::write(tmp.join(".complete"), "").unwrap();
            match std::fs::rename(&tmp, &done) {
                Ok(()) => {}
                Err(_) => {
                    // Another test binary won the race.
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            done
        })
        .clone()
}

pub struct TestAgent {
    pub state: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    pub client: Client,
    /// The pid namespace mode [`create`] asks for (a `PidNamespaceMode`).
    pub pid_namespace: i32,
}

pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(64 * 1024 * 1024))
}

impl TestAgent {
    /// Starts an agent in host mode with a fresh state dir containing the busybox image at
    /// `<state>/images/busybox`.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Command)) -> Self {
        let rootfs = busybox_rootfs();
        let state = tempfile::Builder::new()
            .prefix("kla-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        std::fs::create_dir_all(state.join("images")).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(&rootfs)
            .arg(state.join("images/busybox"))
            .status()
            .unwrap();
        assert!(status.success());
        let socket = state.join("agent.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kata-like-agent"));
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null());
        if std::env::var_os("AGENT_TEST_LOG").is_none() {
            command.stderr(std::process::Stdio::null());
        }
        configure(&mut command);
        let child = command.spawn().expect("spawn agent");
        // Wait for the socket (readiness, not a timing assertion).
        let mut client = None;
        for _ in 0..1000 {
            if socket.exists() {
                if let Ok(c) = connect(&socket).await {
                    client = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let client = client.expect("agent did not come up");
        Self {
            state,
            socket,
            child: Some(child),
            client,
            pid_namespace: PidNamespaceMode::Own as i32,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn image(&self) -> String {
        self.state
            .join("images/busybox")
            .to_string_lossy()
            .into_owned()
    }

    pub async fn sandbox(&mut self, id: &str) {
        self.client
            .create_sandbox(CreateSandboxRequest {
                sandbox_id: id.into(),
                hostname: "pod-host".into(),
                ..Default::default()
            })
            .await
            .expect("create sandbox");
    }

    pub fn rootfs(&self, writable: bool) -> Rootfs {
        Rootfs {
            lower_dirs: vec![self.image()],
            writable,
            upper_size_bytes: 64 << 20,
        }
    }

    /// Mount points under the state dir that are still mounted.
    pub fn mounts_under_state(&self) -> Vec<String> {
        mounts_under(&self.state)
    }

    /// Stops the agent (SIGTERM: it tears everything down) and waits for it.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        for _ in 0..2000 {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
        for m in mounts_under(&self.state).into_iter().rev() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if mounts_under(&self.state).is_empty() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}

/// A config.json like `runc spec` makes, running `args`.
pub fn spec(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn stdio(terminal: bool, stdin: bool) -> Option<Stdio> {
    Some(Stdio { terminal, stdin })
}

pub async fn create(
    agent: &mut TestAgent,
    id: &str,
    spec: &Value,
    stdio_: Option<Stdio>,
    writable: bool,
) -> Result<u32, tonic::Status> {
    let rootfs = agent.rootfs(writable);
    agent
        .client
        .create_container(CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs: Some(rootfs),
            stdio: stdio_,
            pid_namespace: agent.pid_namespace,
            pid_namespace_target: String::new(),
        })
        .await
        .map(|r| r.into_inner().pid)
}

/// Collects one output stream to its end.
pub fn collect_output(
    client: &Client,
    container: &str,
    exec: &str,
    fd: OutputFd,
) -> tokio::task::JoinHandle<Vec<u8>> {
    let mut client = client.clone();
    let req = ProcessOutputRequest {
        container_id: container.into(),
        exec_id: exec.into(),
        fd: fd as i32,
    };
    tokio::spawn(async move {
        let mut stream = client
            .process_output(req)
            .await
            .expect("output stream")
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("chunk").data);
        }
        out
    })
}

pub async fn wait(client: &mut Client, container: &str, exec: &str) -> i32 {
    client
        .wait_process(ProcessRequest {
            container_id: container.into(),
            exec_id: exec.into(),
        })
        .await
        .expect("wait")
        .into_inner()
        .exit_status
}

pub struct RunResult {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl RunResult {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Create, start, collect output, wait, remove.
pub async fn run(agent: &mut TestAgent, id: &str, spec: &Value) -> RunResult {
    create(agent, id, spec, stdio(false, false), true)
        .await
        .expect("create");
    let out = collect_output(&agent.client, id, "", OutputFd::Stdout);
    let err = collect_output(&agent.client, id, "", OutputFd::Stderr);
    start(agent, id).await;
    let status = wait(&mut agent.client, id, "").await;
    let stdout = out.await.unwrap();
    let stderr = err.await.unwrap();
    remove(agent, id).await;
    RunResult {
        status,
        stdout,
        stderr,
    }
}

/// The request that names container `id` alone.
fn container(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
    }
}

/// StartContainer of `id`; the tests that expect a refusal look at the status.
pub async fn start_container(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client.start_container(container(id)).await.map(|_| ())
}

/// RemoveContainer of `id`, killing what still runs after `timeout_ms`.
pub async fn remove_container(
    client: &mut Client,
    id: &str,
    timeout_ms: u32,
) -> Result<(), tonic::Status> {
    client
        .remove_container(RemoveContainerRequest {
            container_id: id.into(),
            timeout_ms,
        })
        .await
        .map(|_| ())
}

/// Starts a created container; a refusal fails the test.
pub async fn start(agent: &mut TestAgent, id: &str) {
    start_container(&mut agent.client, id).await.expect("start");
}

/// Removes a container at once; a refusal fails the test.
pub async fn remove(agent: &mut TestAgent, id: &str) {
    remove_container(&mut agent.client, id, 0)
        .await
        .expect("remove");
}

/// Creates a container without a terminal or stdin on a writable rootfs, then starts it.
pub async fn create_and_start(agent: &mut TestAgent, id: &str, spec: &Value) {
    create(agent, id, spec, stdio(false, false), true)
        .await
        .expect("create");
    start(agent, id).await;
}

/// ExecProcess of `args` (the process of [`spec`]) as `exec_id` in container `id`; its pid.
pub async fn exec(
    agent: &mut TestAgent,
    id: &str,
    exec_id: &str,
    args: &[&str],
    stdio_: Option<Stdio>,
) -> Result<u32, tonic::Status> {
    exec_process(agent, id, exec_id, &spec(args)["process"], stdio_).await
}

/// ExecProcess of the OCI `process` as `exec_id` in container `id`; its pid.
pub async fn exec_process(
    agent: &mut TestAgent,
    id: &str,
    exec_id: &str,
    process: &Value,
    stdio_: Option<Stdio>,
) -> Result<u32, tonic::Status> {
    agent
        .client
        .exec_process(ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(process).unwrap(),
            stdio: stdio_,
        })
        .await
        .map(|r| r.into_inner().pid)
}

/// SignalProcess of one process (`all: false`).
pub async fn signal(
    agent: &mut TestAgent,
    id: &str,
    exec_id: &str,
    sig: i32,
) -> Result<(), tonic::Status> {
    agent
        .client
        .signal_process(SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig as u32,
            all: false,
        })
        .await
        .map(|_| ())
}

/// PauseContainer of `id` (freezes its cgroup).
pub async fn pause_container(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client.pause_container(container(id)).await.map(|_| ())
}

/// ResumeContainer of `id` (thaws its cgroup).
pub async fn resume_container(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client.resume_container(container(id)).await.map(|_| ())
}

/// UpdateContainer of `id` with OCI `linux.resources` as JSON.
pub async fn update_container(
    client: &mut Client,
    id: &str,
    oci_linux_resources_json: &[u8],
) -> Result<(), tonic::Status> {
    client
        .update_container(UpdateContainerRequest {
            container_id: id.into(),
            oci_linux_resources_json: oci_linux_resources_json.to_vec(),
        })
        .await
        .map(|_| ())
}

/// ListProcesses of `id`: the processes of its cgroup.
pub async fn list_processes(
    client: &mut Client,
    id: &str,
) -> Result<Vec<ProcessInfo>, tonic::Status> {
    client
        .list_processes(container(id))
        .await
        .map(|r| r.into_inner().processes)
}
