//! Pod fixtures of the CRI tests: a node to test on, a kata-like pod with its containers built
//! from the knobs the tests vary, and the CRI calls that run them. The tests and the benchmark
//! call these instead of repeating the RunPodSandbox, CreateContainer, StartContainer sequence.

use std::sync::MutexGuard;
use std::time::Duration;

use crate::containerd::{self, Containerd, KataArtifacts, BUSYBOX_IMAGE, KATA_RUNTIME_HANDLER};
use crate::cri::{self, Cri};

/// The shared containerd (locked for the test's whole run), the kata-like artifacts and a CRI
/// client on a node from which every pod an earlier test may have left is removed.
// The lock is held across awaits on purpose: tests must not overlap (they count VMMs and check
// for leftovers), and every test has its own single-threaded runtime, so this blocks nothing
// else.
#[allow(clippy::await_holding_lock)]
pub async fn clean_node() -> (MutexGuard<'static, Containerd>, KataArtifacts, Cri) {
    let containerd = containerd::shared();
    let kata = KataArtifacts::from_env();
    let mut cri = Cri::connect(&containerd.socket).await;
    cri.remove_all_pods().await;
    (containerd, kata, cri)
}

/// A privileged pod config (a privileged container needs one): RunPodSandbox it with
/// `cri.run_pod(&config, KATA_RUNTIME_HANDLER)`.
pub fn privileged_pod_config(name: &str, containerd: &Containerd) -> cri::v1::PodSandboxConfig {
    let mut config = cri::pod_config(name, &containerd.log_dir());
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
    {
        context.privileged = true;
    }
    config
}

/// A privileged container of `image` running `cmd` as root (uid 0), every capability, no
/// seccomp profile from containerd.
pub fn privileged_root_container(
    name: &str,
    image: &str,
    cmd: &[&str],
) -> cri::v1::ContainerConfig {
    let mut config = cri::container_config(name, image, cmd);
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
    {
        context.privileged = true;
        context.run_as_user = Some(cri::v1::Int64Value { value: 0 });
    }
    config
}

/// A busybox container running `cmd`, with a memory limit (bytes) in its resources.
pub fn container_with_memory_limit(
    name: &str,
    cmd: &[&str],
    memory_limit_in_bytes: i64,
) -> cri::v1::ContainerConfig {
    let mut config = cri::container_config(name, BUSYBOX_IMAGE, cmd);
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(cri::v1::LinuxContainerResources {
            memory_limit_in_bytes,
            ..Default::default()
        });
    }
    config
}

/// RunPodSandbox of the pod `name` with the kata-like handler: the pod's id and the config it
/// was created from (CreateContainer sends it again). A refusal fails the test with
/// containerd's log, where the shim's reason is.
pub async fn run_kata_pod(
    cri: &mut Cri,
    containerd: &Containerd,
    name: &str,
) -> (String, cri::v1::PodSandboxConfig) {
    run_annotated_kata_pod(cri, containerd, name, &[]).await
}

/// CreateContainer then StartContainer of `config` in the pod; returns the container id.
pub async fn start_container(
    cri: &mut Cri,
    pod_id: &str,
    pod_config: &cri::v1::PodSandboxConfig,
    config: &cri::v1::ContainerConfig,
) -> String {
    let c = cri
        .create_container(pod_id, config, pod_config)
        .await
        .expect("CreateContainer");
    cri.start_container(&c).await.expect("StartContainer");
    c
}

/// A busybox container `name` that sleeps for an hour, started in the pod; returns its id.
pub async fn start_sleeper(
    cri: &mut Cri,
    pod_id: &str,
    pod_config: &cri::v1::PodSandboxConfig,
    name: &str,
) -> String {
    start_container(
        cri,
        pod_id,
        pod_config,
        &cri::container_config(name, BUSYBOX_IMAGE, &["sleep", "3600"]),
    )
    .await
}

/// A kata-like pod with one started busybox container that sleeps: (pod id, container id).
pub async fn sleeping_kata_pod(
    cri: &mut Cri,
    containerd: &Containerd,
    pod_name: &str,
    container_name: &str,
) -> (String, String) {
    let (pod_id, pod) = run_kata_pod(cri, containerd, pod_name).await;
    let c = start_sleeper(cri, &pod_id, &pod, container_name).await;
    (pod_id, c)
}

/// RunPodSandbox of a kata-like pod `name` with one extra annotation, which must be refused:
/// returns the refusal's message after removing the failed sandbox record containerd keeps
/// (NotReady) until it is removed.
pub async fn kata_pod_refused(
    cri: &mut Cri,
    containerd: &Containerd,
    name: &str,
    annotation: (&str, &str),
) -> String {
    let mut config = cri::pod_config(name, &containerd.log_dir());
    config
        .annotations
        .insert(annotation.0.into(), annotation.1.into());
    pod_refused(cri, &config).await
}

/// RunPodSandbox of a kata-like pod from `config`, which must be refused: returns the
/// refusal's message after removing the failed sandbox record containerd keeps (NotReady)
/// until it is removed.
pub async fn pod_refused(cri: &mut Cri, config: &cri::v1::PodSandboxConfig) -> String {
    let err = match cri.run_pod(config, KATA_RUNTIME_HANDLER).await {
        Ok(id) => panic!("RunPodSandbox started pod {id} from {config:?}; it must be refused"),
        Err(e) => e,
    };
    for p in cri.list_pods().await {
        let _ = cri.stop_pod(&p.id).await;
        let _ = cri.remove_pod(&p.id).await;
    }
    err.message().to_string()
}

/// Sets the pid namespace mode (`cri::v1::NamespaceMode`) of a container's config.
pub fn with_pid_mode(
    mut config: cri::v1::ContainerConfig,
    mode: cri::v1::NamespaceMode,
) -> cri::v1::ContainerConfig {
    if let Some(options) = config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
        .and_then(|context| context.namespace_options.as_mut())
    {
        options.pid = mode as i32;
    }
    config
}

/// The namespace options of a pod's config, to change its modes.
pub fn namespace_options(config: &mut cri::v1::PodSandboxConfig) -> &mut cri::v1::NamespaceOption {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// RunPodSandbox of the kata-like pod `name` with extra annotations, which must be accepted.
pub async fn run_annotated_kata_pod(
    cri: &mut Cri,
    containerd: &Containerd,
    name: &str,
    annotations: &[(&str, &str)],
) -> (String, cri::v1::PodSandboxConfig) {
    let mut config = cri::pod_config(name, &containerd.log_dir());
    for (k, v) in annotations {
        config.annotations.insert(k.to_string(), v.to_string());
    }
    let id = cri
        .run_pod(&config, KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    (id, config)
}

/// The port of [`web_server`].
pub const WEB_PORT: u16 = 8080;
/// How many times a fetch is tried while the server in the pod starts (each try bounded by
/// `timeout 5`; a server that never answers fails the test after all of them).
const FETCH_ATTEMPTS: usize = 60;

/// A busybox httpd on [`WEB_PORT`] serving `marker` at `/` (and whatever `setup`, a shell
/// command run first, puts in /www).
pub fn web_server(name: &str, marker: &str, setup: &str) -> cri::v1::ContainerConfig {
    let script = format!(
        "mkdir -p /www && echo {marker} > /www/index.html && {setup} exec httpd -f -p {WEB_PORT} -h /www"
    );
    cri::container_config(name, BUSYBOX_IMAGE, &["sh", "-c", &script])
}

/// The pod's IP as containerd (its CNI result) reports it.
pub async fn pod_ip(cri: &mut Cri, pod_id: &str) -> String {
    let ip = cri
        .pod_status(pod_id)
        .await
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with("10.234.0."), "pod IP {ip:?}");
    ip
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fetches `url` with busybox wget from the node's network namespace, trying again while the
/// server is not up yet; the body, or the last error. (Debian's busybox wget crashes with its
/// own `-T`, so `timeout` bounds each try.)
pub fn fetch_from_host(containerd: &Containerd, url: &str) -> Result<String, String> {
    let mut last = String::new();
    for _ in 0..FETCH_ATTEMPTS {
        let out = containerd
            .host_net_command("timeout")
            .args(["5", "busybox", "wget", "-q", "-O", "-", url])
            .output()
            .map_err(|e| format!("busybox wget: {e}"))?;
        if out.status.success() {
            return Ok(text(&out.stdout));
        }
        last = format!("{}: {}", out.status, text(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "{url} did not answer in {FETCH_ATTEMPTS} tries: {last}"
    ))
}

/// Fetches `url` from inside a container, trying again while the server starts.
pub async fn fetch_from_container(
    cri: &mut Cri,
    container: &str,
    url: &str,
) -> Result<String, String> {
    let mut last = String::new();
    for _ in 0..FETCH_ATTEMPTS {
        match cri
            .exec_sync(
                container,
                &["timeout", "5", "wget", "-q", "-O", "-", url],
                30,
            )
            .await
        {
            Ok(r) if r.exit_code == 0 => return Ok(text(&r.stdout)),
            Ok(r) => last = format!("exit {}: {}", r.exit_code, text(&r.stderr)),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "{url} did not answer {container} in {FETCH_ATTEMPTS} tries: {last}"
    ))
}

/// The sandbox's cgroup directory on the node, as containerd names it from the pod's cgroup
/// parent (cgroupfs form: `<cgroup_parent>/<sandbox id>`).
pub fn sandbox_cgroup_dir(config: &cri::v1::PodSandboxConfig, pod_id: &str) -> std::path::PathBuf {
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    std::path::Path::new("/sys/fs/cgroup")
        .join(parent.trim_start_matches('/'))
        .join(pod_id)
}

/// Sets the pod-level memory limit (what kubelet sums from the containers' limits), which
/// sizes a kata-like pod's VM.
pub fn with_pod_memory_limit(
    mut config: cri::v1::PodSandboxConfig,
    bytes: i64,
) -> cri::v1::PodSandboxConfig {
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        });
    }
    config
}

/// Waits (bounded by `limit`) until the running container `id` printed `line` on stdout.
pub async fn wait_for_stdout_line(cri: &mut Cri, id: &str, line: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let status = cri.container_status(id).await;
        let log = cri::read_log(std::path::Path::new(&status.log_path));
        let stdout = cri::stream_lines(&log, "stdout");
        if stdout.iter().any(|l| l == line) {
            return;
        }
        assert_eq!(
            status.state,
            cri::CONTAINER_RUNNING,
            "container {id} ended before printing {line:?}: {status:?} {stdout:?} {:?}",
            cri::stream_lines(&log, "stderr")
        );
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} did not print {line:?} within {limit:?}: {stdout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A container of the vsock-probe image running `/bin/memhog MIB` (it prints
/// `allocated MIB MiB` and holds the memory) under a memory limit of `limit_mib`.
pub fn memhog_container(name: &str, mib: u32, limit_mib: i64) -> cri::v1::ContainerConfig {
    let mut config = cri::container_config(
        name,
        containerd::VSOCK_PROBE_IMAGE,
        &["/bin/memhog", &mib.to_string()],
    );
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: limit_mib << 20,
            ..Default::default()
        });
    }
    config
}
