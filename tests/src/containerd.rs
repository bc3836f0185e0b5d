//! A private Debian containerd for the end-to-end tests, configured as a cluster node would be:
//! CRI with the `runc` and `kata-like` runtime handlers, a CNI bridge network, the test images
//! imported. Everything lives under one directory of its own (root on its own tmpfs: the
//! overlayfs snapshotter cannot use an overlayfs upper), and containerd runs in a network
//! namespace of its own, so the CNI bridge and pod networks never touch the machine's network.
//!
//! Needs: root, `containerd`, `ctr`, `runc`, `nsenter`, `ip`, `mkfs.erofs`, CNI plugins in
//! /usr/lib/cni, busybox-static; for kata-like pods the `KATA_LIKE_*` artifacts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Local test images (busybox, pause) as OCI layout tarballs.
#[path = "../images/oci.rs"]
pub mod images;

pub const BUSYBOX_IMAGE: &str = "registry.test/kata-like/busybox:1";
/// busybox plus `/bin/vsock-probe CID:PORT...` (see `images::vsock_probe_image`).
pub const VSOCK_PROBE_IMAGE: &str = "registry.test/kata-like/vsock-probe:1";
pub const PAUSE_IMAGE: &str = "registry.test/kata-like/pause:1";
/// busybox plus the node's iptables-nft (see `images::iptables_image`).
pub const IPTABLES_IMAGE: &str = "registry.test/kata-like/iptables:1";
pub const KATA_RUNTIME_HANDLER: &str = "kata-like";
pub const KATA_RUNTIME_TYPE: &str = "io.containerd.kata-like.v2";
pub const SHIM_BINARY_NAME: &str = "containerd-shim-kata-like-v2";
/// Where the CRI plugin puts container logs (pod log dirs are chosen by the test).
pub const CNI_SUBNET: &str = "10.234.0.0/24";

/// A running containerd. Stopped (and its directory removed) when dropped or at process exit.
pub struct Containerd {
    pub base: PathBuf,
    pub socket: PathBuf,
    /// State dir given to the kata-like shim (its per-pod state lives here).
    pub kata_state_dir: PathBuf,
    pub kata_config: PathBuf,
    /// Named network namespace containerd (and so every shim and VMM) runs in.
    netns: String,
    child: Option<Child>,
    /// Shim sockets present before this containerd ran (someone else's).
    baseline_shim_sockets: Vec<PathBuf>,
}

/// The artifacts of kata-like pods, from the runner's environment.
#[derive(Debug, Clone)]
pub struct KataArtifacts {
    pub shim: PathBuf,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The static VMM test init (`vmm/guest-test-init`), `/bin/vsock-probe` in
    /// [`VSOCK_PROBE_IMAGE`].
    pub test_init_static: PathBuf,
    /// The Rust virtiofsd (`KATA_LIKE_VIRTIOFSD`).
    pub virtiofsd: PathBuf,
}

impl KataArtifacts {
    /// Reads `KATA_LIKE_SHIM`, `KATA_LIKE_VMM`, `KATA_LIKE_KERNEL`, `KATA_LIKE_INITRD`,
    /// `KATA_LIKE_TEST_INIT_STATIC`; panics
    /// (the test fails) when one is missing.
    pub fn from_env() -> KataArtifacts {
        KataArtifacts {
            shim: crate::artifact("KATA_LIKE_SHIM"),
            vmm: crate::artifact("KATA_LIKE_VMM"),
            kernel: crate::artifact("KATA_LIKE_KERNEL"),
            initrd: crate::artifact("KATA_LIKE_INITRD"),
            test_init_static: crate::artifact("KATA_LIKE_TEST_INIT_STATIC"),
            virtiofsd: crate::artifact("KATA_LIKE_VIRTIOFSD"),
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_tool(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the test dependencies (tests/install-deps)"
    );
}

impl Containerd {
    /// Starts containerd with the kata-like runtime registered and the test images imported.
    pub fn start(kata: &KataArtifacts) -> Containerd {
        Containerd::start_with(kata, true)
    }

    /// Starts containerd as a node has it before kata-like is installed: the same test
    /// configuration without the kata-like runtime (`kata-like install` adds it).
    pub fn start_unregistered(kata: &KataArtifacts) -> Containerd {
        Containerd::start_with(kata, false)
    }

    fn start_with(kata: &KataArtifacts, register_kata: bool) -> Containerd {
        for tool in [
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/nsenter",
            "/usr/lib/cni/bridge",
            "/usr/lib/cni/host-local",
            "/usr/lib/cni/loopback",
            "/usr/lib/cni/portmap",
            "/usr/sbin/iptables",
            "/bin/busybox",
        ] {
            require_tool(tool);
        }
        assert!(
            nix_is_root(),
            "the containerd end-to-end tests must run as root"
        );
        // What containerd, the overlayfs snapshotter and the CNI bridge need from the kernel
        // (modules on a stock kernel such as the test host's; built in elsewhere).
        let _ = Command::new("modprobe")
            .args(["-a", "overlay", "bridge", "veth", "tun"])
            .stderr(Stdio::null())
            .status();
        // The shim's port-forward rule (nat OUTPUT DNAT, shim/src/pod/port_forward.rs) through
        // iptables-nft or legacy iptables; each name alone, as some are built in elsewhere.
        for module in [
            "nf_tables",
            "nft_compat",
            "nft_chain_nat",
            "nf_nat",
            "xt_nat",
            "xt_tcpudp",
            "iptable_nat",
        ] {
            let _ = Command::new("modprobe")
                .arg(module)
                .stderr(Stdio::null())
                .status();
        }
        let base = PathBuf::from(format!("/tmp/kata-like-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for d in [
            "root",
            "state",
            "cni",
            "bin",
            "certs.d",
            "logs",
            "kata-like-state",
        ] {
            std::fs::create_dir_all(base.join(d)).expect("create containerd dirs");
        }
        // containerd's root on a tmpfs of its own: overlayfs refuses an overlayfs upper.
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0711", "tmpfs"])
            .arg(base.join("root")));

        // The shim is found on containerd's PATH by its runtime type.
        std::os::unix::fs::symlink(&kata.shim, base.join("bin").join(SHIM_BINARY_NAME))
            .expect("link the shim binary");

        let kata_state_dir = base.join("kata-like-state");
        let kata_config = base.join("kata-like.toml");
        // KATA_LIKE_E2E_JAIL=0 runs the VMM unjailed: only to tell jail problems from others.
        let jail = std::env::var("KATA_LIKE_E2E_JAIL")
            .map(|v| v != "0")
            .unwrap_or(true);
        // KATA_LIKE_E2E_DEBUG=1: verbose guest kernel and agent on the console, whose tail the
        // shim logs when a container fails.
        let debug = std::env::var("KATA_LIKE_E2E_DEBUG").is_ok_and(|v| v == "1");
        std::fs::write(
            &kata_config,
            format!(
                "state_dir = {state:?}\nrootfs_cache_dir = {cache:?}\nlog_level = \"debug\"\n\
                 virtiofsd = {virtiofsd:?}\n\
                 [jail]\nenabled = {jail}\n\
                 [vmm]\ndebug_console = {debug}\npath = {vmm:?}\nkernel = {kernel:?}\ninitrd = {initrd:?}\n",
                state = kata_state_dir.display().to_string(),
                cache = base.join("rootfs-cache").display().to_string(),
                vmm = kata.vmm.display().to_string(),
                kernel = kata.kernel.display().to_string(),
                initrd = kata.initrd.display().to_string(),
                virtiofsd = kata.virtiofsd.display().to_string(),
            ),
        )
        .expect("write the kata-like config");

        std::fs::write(
            base.join("cni/10-kata-like-test.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "kata-like-test", "plugins": [
  {{"type": "bridge", "bridge": "kltest0", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{CNI_SUBNET}"}}]],
              "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#
            ),
        )
        .expect("write the CNI config");

        let socket = base.join("containerd.sock");
        let config = base.join("config.toml");
        let mut text = containerd_config(&base, &socket, &kata_config);
        if !register_kata {
            text = without_kata_runtime(&text);
        }
        std::fs::write(&config, text).expect("write the containerd config");

        let baseline_shim_sockets = shim_sockets();
        // A network namespace of its own, kept across containerd restarts: the CNI bridge and
        // every pod network stay in it.
        let netns = format!("kata-like-e2e-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &netns]));
        run(Command::new("ip").args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"]));
        let child = spawn_containerd(&base, &netns, &kata_config);
        let mut containerd = Containerd {
            base,
            socket,
            kata_state_dir,
            kata_config,
            netns,
            child: Some(child),
            baseline_shim_sockets,
        };
        containerd.wait_ready();
        containerd.import_images(kata);
        containerd
    }

    /// SIGKILLs containerd (its shims keep running, as on a node whose containerd crashed) and
    /// starts it again on the same state; it reconnects to the running shims.
    pub fn kill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = Some(spawn_containerd(&self.base, &self.netns, &self.kata_config));
        self.wait_ready();
    }

    /// containerd's pid (for a restart command that stops it, as a service manager would).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "containerd exited during start ({status}); its log:\n{}",
                        self.log_tail()
                    );
                }
            }
            let ok = Command::new("/usr/bin/ctr")
                .arg("--address")
                .arg(&self.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "containerd did not come up; its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr` with this containerd's socket and the CRI namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io"]);
        cmd
    }

    fn import_images(&self, kata: &KataArtifacts) {
        let dir = self.base.join("images");
        std::fs::create_dir_all(&dir).expect("images dir");
        for (name, tar) in [
            (BUSYBOX_IMAGE, images::busybox_image(BUSYBOX_IMAGE)),
            (PAUSE_IMAGE, images::pause_image(PAUSE_IMAGE)),
            (IPTABLES_IMAGE, images::iptables_image(IPTABLES_IMAGE)),
            (
                VSOCK_PROBE_IMAGE,
                images::vsock_probe_image(VSOCK_PROBE_IMAGE, &kata.test_init_static),
            ),
        ] {
            let file = dir.join(format!("{}.tar", name.replace(['/', ':'], "_")));
            std::fs::write(&file, tar).expect("write image tar");
            run(self.ctr().args(["images", "import"]).arg(&file));
        }
    }

    /// The last part of containerd's log (shim logs included), for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.base.join("containerd.log")).unwrap_or_default();
        let start = text.len().saturating_sub(16 * 1024);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// What the node shows about its pods while one seems stuck: each pod VM's console, VMM and
    /// virtiofsd log tails, each sandbox cgroup's CPU and memory figures and pressure, the
    /// node's load and pressure, then containerd's log tail. For a failure message.
    pub fn pod_diagnostics(&self) -> String {
        let tail = |path: &Path, bytes: usize| -> String {
            let data = std::fs::read(path).unwrap_or_default();
            String::from_utf8_lossy(&data[data.len().saturating_sub(bytes)..]).into_owned()
        };
        let mut out = String::new();
        for file in [
            "/proc/loadavg",
            "/proc/pressure/cpu",
            "/proc/pressure/memory",
            "/proc/pressure/io",
        ] {
            out.push_str(&format!("--- {file}\n{}", tail(Path::new(file), 1024)));
        }
        for cgroup in sandbox_cgroups() {
            for file in [
                "cgroup.procs",
                "cpu.weight",
                "cpu.max",
                "cpu.stat",
                "cpu.pressure",
                "memory.max",
                "memory.current",
                "memory.events",
                "memory.pressure",
                "io.pressure",
            ] {
                out.push_str(&format!(
                    "--- {}\n{}",
                    cgroup.join(file).display(),
                    tail(&cgroup.join(file), 2048)
                ));
            }
        }
        for dir in std::fs::read_dir(&self.kata_state_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push_str(&format!(
                "--- VMM metrics of {}\n{}\n",
                dir.path().display(),
                vmm_metrics(&dir.path().join("jail/api.sock"))
            ));
            for (file, bytes) in [
                ("console.log", 12 * 1024),
                ("vmm.log", 8 * 1024),
                ("virtiofsd.log", 4 * 1024),
            ] {
                let path = dir.path().join(file);
                if path.exists() {
                    out.push_str(&format!("--- {}\n{}\n", path.display(), tail(&path, bytes)));
                }
            }
        }
        out.push_str(&format!("--- containerd log\n{}", self.log_tail()));
        out
    }

    /// Adds `toml` (whole tables, e.g. `[annotations]` or `[limits]`, which the base config
    /// does not have) to the kata-like config until the returned guard is dropped. Each pod's
    /// shim reads the config when the pod starts, so pods started meanwhile get it and no
    /// containerd restart is needed.
    pub fn extend_kata_config(&self, toml: &str) -> KataConfigOverride {
        let original =
            std::fs::read_to_string(&self.kata_config).expect("read the kata-like config");
        std::fs::write(&self.kata_config, format!("{original}{toml}\n"))
            .expect("write the kata-like config");
        KataConfigOverride {
            path: self.kata_config.clone(),
            original,
        }
    }

    /// `program` run in containerd's network namespace: the node's "host" network, where the
    /// CNI bridge and hostPorts are.
    pub fn host_net_command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// The node's address on the CNI bridge (the bridge plugin's gateway, `.1` of the subnet).
    pub fn bridge_ip(&self) -> String {
        CNI_SUBNET.replace(".0/24", ".1")
    }

    /// Directory for pod log dirs.
    /// The network namespace containerd (its streaming server, every shim) runs in.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.base.join("logs")
    }

    /// Asserts that nothing of kata-like is left: no shim or VMM process, no per-pod state, no
    /// mount under the state dir, no tap device, no new shim socket. Waits (bounded) for shims
    /// that are exiting after their last container went away.
    pub fn assert_no_leftovers(&self, kata: &KataArtifacts) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let leftovers = self.leftovers(kata);
            if leftovers.is_empty() {
                remove_empty_pod_cgroups();
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "left behind after the test: {leftovers:#?}\ncontainerd log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn leftovers(&self, kata: &KataArtifacts) -> Vec<String> {
        let mut found = Vec::new();
        for (pid, exe) in processes() {
            if same_file(&exe, &kata.shim)
                || same_file(&exe, &kata.vmm)
                || same_file(&exe, &kata.virtiofsd)
            {
                found.push(format!("process {pid} {}", exe.display()));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.kata_state_dir) {
            for e in entries.flatten() {
                // The VMM id leases' directory stays (with its lock file); a lease in it is a
                // leftover.
                if e.file_name() == "vmm-ids" {
                    for lease in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        if lease.file_name() != ".lock" {
                            found.push(format!("VMM id lease {}", lease.path().display()));
                        }
                    }
                    continue;
                }
                found.push(format!("state {}", e.path().display()));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts.lines() {
            if line.contains(self.kata_state_dir.to_str().unwrap_or("\0"))
                || line.contains("/run/kata-like")
            {
                found.push(format!("mount {line}"));
            }
        }
        let netns_pid = self.child.as_ref().map(|c| c.id());
        for net in net_devices(netns_pid) {
            if net.starts_with("tap") || net.starts_with("kl") && net != "kltest0" {
                found.push(format!("net device {net}"));
            }
        }
        // TAPs the shim connected to a pod's interfaces (tap<N>_kl) in any pod network
        // namespace still there.
        for netns in pod_network_namespaces() {
            for net in net_devices_in(&netns) {
                if net.ends_with("_kl") {
                    found.push(format!("net device {net} in {}", netns.display()));
                }
            }
        }
        for cgroup in sandbox_cgroups() {
            found.push(format!("cgroup {}", cgroup.display()));
        }
        for s in shim_sockets() {
            if !self.baseline_shim_sockets.contains(&s) {
                found.push(format!("shim socket {}", s.display()));
            }
        }
        found
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM to the containerd process (nsenter exec'd it, same pid).
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // containerd's snapshot mounts die with the tmpfs; lazily, in case a shim holds one.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let base = self.base.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
        let _ = std::fs::remove_dir_all(&self.base);
        if !self.netns.is_empty() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status();
        }
    }
}

/// The kata-like config as an operator changed it for one test; the original comes back when
/// this is dropped (also when the test panics), so later tests see the base config.
#[must_use = "the change is undone when this is dropped"]
pub struct KataConfigOverride {
    path: PathBuf,
    original: String,
}

impl Drop for KataConfigOverride {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.original) {
            eprintln!("cannot restore {}: {e}", self.path.display());
        }
    }
}

/// Starts containerd with the test config inside the named network namespace (nsenter joins
/// only the network namespace: containerd's mounts stay visible to the test and its shims).
fn spawn_containerd(base: &Path, netns: &str, kata_config: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.join("containerd.log"))
        .expect("containerd log");
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        base.join("bin").display()
    );
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .arg("--")
        .arg("/usr/bin/containerd")
        .arg("--config")
        .arg(base.join("config.toml"))
        .env("PATH", path)
        .env("KATA_LIKE_CONFIG", kata_config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start containerd")
}

/// The configuration's text without the kata-like runtime's tables (and their comments).
fn without_kata_runtime(text: &str) -> String {
    let runtime_table = format!("runtimes.{KATA_RUNTIME_HANDLER}");
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            skipping = trimmed.contains(&runtime_table);
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn containerd_config(base: &Path, socket: &Path, kata_config: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{socket}"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KATA_RUNTIME_HANDLER}]
      runtime_type = "{KATA_RUNTIME_TYPE}"
      pod_annotations = ["io.kata-like.*"]
      # An operator's default (false): containerd gives a privileged container the node's
      # devices and the agent replaces them with the pod VM's own (agent/src/container/devices.rs).
      privileged_without_host_devices = false
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{KATA_RUNTIME_HANDLER}.options]
        ConfigPath = "{kata_config}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        root = base.join("root").display(),
        state = base.join("state").display(),
        socket = socket.display(),
        kata_config = kata_config.display(),
        cni = base.join("cni").display(),
        certs = base.join("certs.d").display(),
    )
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// (pid, executable) of every process.
pub fn processes() -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
                out.push((pid, exe));
            }
        }
    }
    out
}

/// Pids of the processes running `binary`.
pub fn pids_of(binary: &Path) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, exe)| same_file(exe, binary))
        .map(|(pid, _)| pid)
        .collect()
}

/// One pid per running VMM instance. A jailed VMM is two processes (the jail's parent, which
/// waits, and the VM process in its own pid namespace); this returns the outer one, whose parent
/// is not a VMM. Use [`pids_of`] to see (or account the memory of) every VMM process.
pub fn vmm_instances(vmm: &Path) -> Vec<u32> {
    let pids = pids_of(vmm);
    pids.iter()
        .copied()
        .filter(|pid| parent_of(*pid).is_none_or(|parent| !pids.contains(&parent)))
        .collect()
}

/// The parent pid of `pid` from /proc/<pid>/stat ("pid (comm) state ppid ...").
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn same_file(exe: &Path, binary: &Path) -> bool {
    let exe = exe.to_string_lossy();
    let exe = exe.trim_end_matches(" (deleted)");
    match std::fs::canonicalize(binary) {
        Ok(b) => Path::new(exe) == b,
        Err(_) => false,
    }
}

/// The VMM's `metrics` answer on its API socket (or why there is none).
fn vmm_metrics(api_sock: &Path) -> String {
    use std::io::{BufRead, BufReader};
    let ask = || -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(api_sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"{\"op\":\"metrics\"}\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    };
    ask().unwrap_or_else(|e| format!("no answer: {e}"))
}

/// Where kubelet's pod cgroups are (cgroupfs driver): `<root>/<qos>/pod<uid>/`.
pub const KUBEPODS_CGROUP: &str = "/sys/fs/cgroup/kubepods";

/// kubelet's pod cgroups (`kubepods/<qos>/pod<uid>`) of the node.
fn pod_cgroups() -> Vec<PathBuf> {
    let subdirs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    subdirs(Path::new(KUBEPODS_CGROUP))
        .iter()
        .flat_map(|qos| subdirs(qos))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pod"))
        })
        .collect()
}

/// The sandbox cgroups (runc's or kata-like's, each a child of a pod cgroup) still there: the
/// runtime removes its own when the pod goes.
fn sandbox_cgroups() -> Vec<PathBuf> {
    pod_cgroups()
        .iter()
        .flat_map(|pod| {
            std::fs::read_dir(pod)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Removes the emptied pod cgroups, kubelet's part once a pod is gone (the test stands in for
/// kubelet, which also creates them with the pod's limits; here the runtime creates them).
fn remove_empty_pod_cgroups() {
    for pod in pod_cgroups() {
        let _ = std::fs::remove_dir(&pod);
    }
}

fn shim_sockets() -> Vec<PathBuf> {
    std::fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Network devices of the network namespace of process `pid` (containerd's, where shims and
/// their VMMs run), or of ours.
fn net_devices(pid: Option<u32>) -> Vec<String> {
    let mut cmd = Command::new("nsenter");
    if let Some(pid) = pid {
        cmd.args(["-t", &pid.to_string(), "-n"]);
    }
    let out = match cmd.args(["ip", "-o", "link", "show"]).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => return Vec::new(),
    };
    link_names(&out)
}

/// The named network namespaces CNI made for pods (`/var/run/netns/cni-*`).
pub fn pod_network_namespaces() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/var/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The links of the network namespace bound at `netns` (none if it cannot be entered).
pub fn net_devices_in(netns: &Path) -> Vec<String> {
    let out = match Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link", "show"])
        .output()
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(_) => return Vec::new(),
    };
    link_names(&out)
}

fn link_names(ip_o_link: &str) -> Vec<String> {
    // "2: name@peer: <...>" -> name
    ip_o_link
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// The containerd shared by the tests of one test binary (started on first use; stopped at
/// process exit). Tests hold the returned guard, so they run one at a time.
pub fn shared() -> std::sync::MutexGuard<'static, Containerd> {
    static SHARED: OnceLock<Mutex<Containerd>> = OnceLock::new();
    let m = SHARED.get_or_init(|| {
        let c = Containerd::start(&KataArtifacts::from_env());
        extern "C" fn stop_at_exit() {
            if let Some(m) = SHARED_FOR_EXIT.get() {
                if let Ok(mut c) = m.lock() {
                    let dummy = Containerd {
                        base: PathBuf::new(),
                        socket: PathBuf::new(),
                        kata_state_dir: PathBuf::new(),
                        kata_config: PathBuf::new(),
                        netns: String::new(),
                        child: None,
                        baseline_shim_sockets: Vec::new(),
                    };
                    drop(std::mem::replace(&mut *c, dummy));
                }
            }
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        Mutex::new(c)
    });
    let _ = SHARED_FOR_EXIT.set(m);
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static SHARED_FOR_EXIT: OnceLock<&'static Mutex<Containerd>> = OnceLock::new();

/// Writes text to a file, creating parents.
pub fn write_file(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}

/// sha256 hex of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
