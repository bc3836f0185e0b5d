//! Benchmark: create+start+wait(+delete) of a `true` container through the agent (host mode,
//! Unix socket, gRPC), against `runc run` and `crun run` of the same bundle.
//!
//! usage: kata-like-agent-bench [--iterations N] [--agent PATH]
//! Needs root, busybox-static, runc and crun.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_like_protocol::agent_client::AgentClient;
use kata_like_protocol::*;

fn build_rootfs(dir: &Path) {
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is needed");
    std::fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    for applet in ["true", "sh"] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
}

fn config(root: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true
        },
        "root": {"path": root, "readonly": false},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

struct Summary {
    name: String,
    samples: Vec<Duration>,
}

impl Summary {
    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    fn mean(&self) -> f64 {
        self.samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .sum::<f64>()
            / self.samples.len() as f64
    }
}

fn run_oci_runtime(
    binary: &str,
    global_args: &[&str],
    bundle: &Path,
    root: &Path,
    iterations: usize,
) -> Option<Summary> {
    if Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("{binary} not found: skipped");
        return None;
    }
    let mut samples = Vec::new();
    for i in 0..iterations + 3 {
        let id = format!("bench-{binary}-{i}");
        let t = Instant::now();
        let status = Command::new(binary)
            .args(global_args)
            .arg("--root")
            .arg(root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run runtime");
        let elapsed = t.elapsed();
        if !status.success() {
            eprintln!("{binary} {global_args:?} run failed: {status}");
            return None;
        }
        if i >= 3 {
            samples.push(elapsed);
        }
    }
    Some(Summary {
        name: format!("{binary} run"),
        samples,
    })
}

async fn connect(socket: &Path) -> AgentClient<tonic::transport::Channel> {
    let socket = socket.to_path_buf();
    for _ in 0..500 {
        let s = socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:0")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(s).await?,
                    ))
                }
            }))
            .await;
        if let Ok(channel) = channel {
            return AgentClient::new(channel);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("agent did not come up");
}

async fn run_agent(
    agent_bin: &Path,
    state: &Path,
    image: &Path,
    iterations: usize,
    writable: bool,
) -> Summary {
    let socket = state.join("agent.sock");
    let child = Command::new(agent_bin)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("AGENT_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("start agent");
    /// Stops the agent even if the benchmark panics.
    struct StopAgent(std::process::Child);
    impl Drop for StopAgent {
        fn drop(&mut self) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let child = StopAgent(child);
    let mut client = connect(&socket).await;
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("sandbox");
    let spec = serde_json::to_vec(&config("rootfs")).expect("json");
    let mut samples = Vec::new();
    let mut phases: [Vec<f64>; 4] = Default::default();
    for i in 0..iterations + 3 {
        let id = format!("c{i}");
        let t = Instant::now();
        let mut marks = [0f64; 4];
        client
            .create_container(CreateContainerRequest {
                container_id: id.clone(),
                oci_spec_json: spec.clone(),
                rootfs: Some(Rootfs {
                    lower_dirs: vec![image.to_string_lossy().into()],
                    writable,
                    upper_size_bytes: 0,
                }),
                stdio: None,
                ..Default::default()
            })
            .await
            .expect("create");
        marks[0] = t.elapsed().as_secs_f64() * 1e3;
        client
            .start_container(ContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("start");
        marks[1] = t.elapsed().as_secs_f64() * 1e3;
        let status = client
            .wait_process(ProcessRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            })
            .await
            .expect("wait")
            .into_inner()
            .exit_status;
        assert_eq!(status, 0);
        marks[2] = t.elapsed().as_secs_f64() * 1e3;
        client
            .remove_container(RemoveContainerRequest {
                container_id: id,
                timeout_ms: 0,
            })
            .await
            .expect("remove");
        let elapsed = t.elapsed();
        marks[3] = elapsed.as_secs_f64() * 1e3;
        if i >= 3 {
            samples.push(elapsed);
            let mut prev = 0.0;
            for (phase, mark) in phases.iter_mut().zip(marks) {
                phase.push(mark - prev);
                prev = mark;
            }
        }
    }
    drop(child);
    for (name, mut v) in ["create", "start", "wait", "remove"]
        .into_iter()
        .zip(phases)
    {
        v.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "  agent (writable={writable}) {name}: median {:.2} ms",
            v[v.len() / 2]
        );
    }
    let name = if writable {
        "agent (overlay rootfs)"
    } else {
        "agent (bind rootfs)"
    };
    Summary {
        name: name.into(),
        samples,
    }
}

/// Runs the benchmark in a mount namespace whose /sys/fs/cgroup is the host's cgroup2 hierarchy
/// (on a hybrid host: without controllers), so that all runtimes, crun included, see a pure v2
/// setup and do the same cgroup work (create, join, remove).
fn enter_cgroup2_view() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / private");
    let _ = umount2("/sys/fs/cgroup", MntFlags::MNT_DETACH);
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount cgroup2");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut iterations = 50usize;
    let mut cgroup2_view = false;
    let mut agent_bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kata-like-agent")))
        .unwrap_or_else(|| PathBuf::from("kata-like-agent"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--iterations" => {
                iterations = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--iterations N")
            }
            "--agent" => agent_bin = PathBuf::from(it.next().expect("--agent PATH")),
            "--cgroup2-view" => cgroup2_view = true,
            _ => {
                eprintln!(
                    "usage: kata-like-agent-bench [--iterations N] [--agent PATH] [--cgroup2-view]"
                );
                std::process::exit(2);
            }
        }
    }
    if cgroup2_view {
        enter_cgroup2_view();
    }
    let dir = tempfile::Builder::new()
        .prefix("kla-bench-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let bundle = dir.path().join("bundle");
    build_rootfs(&bundle.join("rootfs"));
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config("rootfs")).expect("json"),
    )
    .expect("config");
    let state = dir.path().join("agent");
    let image = state.join("images/bench");
    std::fs::create_dir_all(&image).expect("mkdir");
    build_rootfs(&image);

    let mut results = Vec::new();
    results.push(run_agent(&agent_bin, &state, &image, iterations, false).await);
    results.push(run_agent(&agent_bin, &state, &image, iterations, true).await);
    for runtime in ["runc", "crun"] {
        let root = dir.path().join(format!("{runtime}-root"));
        match run_oci_runtime(runtime, &[], &bundle, &root, iterations) {
            Some(s) => results.push(s),
            // crun 1.8 refuses hybrid cgroup hosts: measure it without cgroups (less work than
            // the others do, so its number is a lower bound).
            None if runtime == "crun" => {
                let args = ["--cgroup-manager=disabled"];
                if let Some(s) = run_oci_runtime(runtime, &args, &bundle, &root, iterations) {
                    results.push(s);
                }
            }
            None => {}
        }
    }
    println!("create+start+wait+delete of a `true` container, {iterations} iterations each (after 3 warm-up runs){}", if cgroup2_view { ", cgroup2 view" } else { "" });
    println!("{:<36} {:>10} {:>10}", "", "median ms", "mean ms");
    for r in &results {
        println!("{:<36} {:>10.2} {:>10.2}", r.name, r.median(), r.mean());
    }
    let agent = results[0].median();
    for r in &results[2..] {
        println!(
            "agent (bind) / {}: {:.2}x the time",
            r.name,
            agent / r.median()
        );
    }
}
