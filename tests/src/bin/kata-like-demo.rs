//! The demo behind `./demo.sh`: acts as kubelet against Debian's containerd and runs one pod
//! with the RuntimeClass handler `kata-like`: its container runs in the pod's own microVM.
//! Prints the container's output and how long each phase took, then removes everything.
//!
//! Needs the `KATA_LIKE_*` artifacts in the environment (demo.sh sets them) and a KVM that boots
//! Linux (demo.sh runs this inside the KVM test host when this machine's KVM cannot).

use std::time::{Duration, Instant};

use kata_like_tests::containerd::{Containerd, KataArtifacts, BUSYBOX_IMAGE, KATA_RUNTIME_HANDLER};
use kata_like_tests::cri::{self, Cri};

const SCRIPT: &str = "echo \"Hello from a kata-like pod\"; \
    echo \"kernel in the pod: $(uname -r)\"; \
    grep -q '^flags.* hypervisor' /proc/cpuinfo && echo 'CPU flags say: running under a hypervisor'; \
    echo \"memory the pod VM sees: $(grep MemTotal /proc/meminfo)\"";

struct Phases(Vec<(&'static str, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, start: Instant, value: T) -> T {
        self.0.push((name, start.elapsed()));
        value
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().len() > 1 {
        eprintln!("usage: kata-like-demo (no arguments; run it through ./demo.sh)");
        std::process::exit(2);
    }
    let kata = KataArtifacts::from_env();
    let mut phases = Phases(Vec::new());

    let t = Instant::now();
    let containerd = phases.time(
        "containerd ready, images imported",
        t,
        Containerd::start(&kata),
    );
    // Containerd's Drop stops it and removes its mounts and network namespace; process::exit
    // would skip that, so every exit below goes through `run`'s result.
    let code = match run(&containerd, &kata, &mut phases).await {
        Ok(code) => code,
        Err(what) => {
            eprintln!(
                "demo: {what}\ncontainerd's log (last part):\n{}",
                containerd.log_tail()
            );
            1
        }
    };
    drop(containerd);
    std::process::exit(code);
}

/// The pod's life; returns the demo's exit status (the container's success).
async fn run(
    containerd: &Containerd,
    kata: &KataArtifacts,
    phases: &mut Phases,
) -> Result<i32, String> {
    let mut cri = Cri::connect(&containerd.socket).await;

    let pod = cri::pod_config("demo", &containerd.log_dir());
    let t = Instant::now();
    let pod_id = cri
        .run_pod(&pod, KATA_RUNTIME_HANDLER)
        .await
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    phases.time("RunPodSandbox (boots the pod VM)", t, ());

    let t = Instant::now();
    let container = cri
        .create_container(
            &pod_id,
            &cri::container_config("hello", BUSYBOX_IMAGE, &["sh", "-c", SCRIPT]),
            &pod,
        )
        .await
        .map_err(|e| format!("CreateContainer: {e}"))?;
    phases.time("CreateContainer", t, ());

    let t = Instant::now();
    cri.start_container(&container)
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;
    phases.time("StartContainer", t, ());

    let t = Instant::now();
    let status = cri.wait_exited(&container, Duration::from_secs(300)).await;
    phases.time("container ran to its exit", t, ());

    let t = Instant::now();
    cri.teardown_pod(&pod_id).await;
    phases.time(
        "StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox",
        t,
        (),
    );

    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!();
    println!(
        "--- output of container \"hello\" (exit code {}) ---",
        status.exit_code
    );
    for line in cri::read_log(std::path::Path::new(&status.log_path)) {
        println!("{}", line.text);
    }
    println!("--- the host runs kernel {} ---", host_kernel.trim());
    println!();
    println!("{:<70} {:>10}", "phase", "seconds");
    for (name, took) in &phases.0 {
        println!("{name:<70} {:>10.3}", took.as_secs_f64());
    }
    containerd.assert_no_leftovers(kata);
    println!("\nthe pod, its VM and its shim are gone; nothing is left behind");
    Ok(if status.exit_code == 0 { 0 } else { 1 })
}
