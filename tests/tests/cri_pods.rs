//! End-to-end CRI tests: this test acts as kubelet against Debian's containerd, which runs pods
//! with the `kata-like` runtime handler (our shim, VMM, guest kernel and agent) and, as a
//! baseline in the same containerd, with runc. After every test nothing of kata-like is left.

// Each test holds the shared containerd's lock for its whole run (tests must not overlap: they
// count VMMs and check for leftovers); every test has its own single-threaded runtime, so
// holding a std lock across its awaits blocks nothing else.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use kata_like_tests::containerd::{self, BUSYBOX_IMAGE};
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod;

const ANNOTATION_MEMORY: &str = "io.kata-like.memory-mib";
const ANNOTATION_DEBUG_CONSOLE: &str = "io.kata-like.debug-console";

/// Generous bound for one container to finish under TCG (the test host is several times slower).
const EXIT_LIMIT: Duration = Duration::from_secs(180);

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("host osrelease")
        .trim()
        .to_string()
}

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("host boot_id")
        .trim()
        .to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn runc_baseline_pod_runs_in_the_same_containerd() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let pod = cri::pod_config("runc-baseline", &containerd.log_dir());
    let pod_id = cri
        .run_pod(&pod, "runc")
        .await
        .expect("RunPodSandbox (runc)");
    let c = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &cri::container_config("main", BUSYBOX_IMAGE, &["sh", "-c", "echo runc-ok; exit 4"]),
    )
    .await;
    let status = cri.wait_exited(&c, EXIT_LIMIT).await;
    assert_eq!(status.exit_code, 4);
    let log = cri::read_log(std::path::Path::new(&status.log_path));
    assert_eq!(cri::stream_lines(&log, "stdout"), vec!["runc-ok"]);
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_pod_runs_a_container_with_logs_and_exit_code() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-logs").await;
    let state = cri.pod_status(&pod_id).await;
    assert_eq!(state.state, cri::v1::PodSandboxState::SandboxReady as i32);
    // The pod went through the CNI setup as for runc: it has an address from our subnet.
    let ip = state.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with("10.234.0."), "pod IP {ip:?}");
    assert_eq!(
        containerd::vmm_instances(&kata.vmm).len(),
        1,
        "one VMM for the pod"
    );

    let script = "echo hello from the pod; echo to stderr >&2; i=0; \
                  while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; exit 3";
    let c = cri
        .create_container(
            &pod_id,
            &cri::container_config("main", BUSYBOX_IMAGE, &["sh", "-c", script]),
            &pod,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log_tail()));
    cri.start_container(&c)
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", containerd.log_tail()));
    let status = cri.wait_exited(&c, EXIT_LIMIT).await;
    assert_eq!(status.exit_code, 3, "{status:?}");

    let log = cri::read_log(std::path::Path::new(&status.log_path));
    let stdout = cri::stream_lines(&log, "stdout");
    let mut expected = vec!["hello from the pod".to_string()];
    expected.extend((0..2000).map(|i| format!("line-{i}")));
    assert_eq!(stdout, expected, "every stdout line, in order");
    assert_eq!(cri::stream_lines(&log, "stderr"), vec!["to stderr"]);

    cri.remove_container(&c).await.expect("RemoveContainer");
    cri.stop_pod(&pod_id).await.expect("StopPodSandbox");
    cri.remove_pod(&pod_id).await.expect("RemovePodSandbox");
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_container_runs_under_its_own_kernel() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) = pod::sleeping_kata_pod(&mut cri, &containerd, "kata-kernel", "sleeper").await;

    let uname = cri
        .exec_sync(&c, &["uname", "-r"], 60)
        .await
        .expect("ExecSync uname");
    assert_eq!(uname.exit_code, 0, "{uname:?}");
    let guest_release = text(&uname.stdout).trim().to_string();
    assert!(!guest_release.is_empty());
    assert_ne!(
        guest_release,
        host_kernel_release(),
        "the container sees another kernel"
    );

    let boot_id = cri
        .exec_sync(&c, &["cat", "/proc/sys/kernel/random/boot_id"], 60)
        .await
        .expect("ExecSync boot_id");
    assert_ne!(
        text(&boot_id.stdout).trim(),
        host_boot_id(),
        "another booted kernel instance"
    );

    let cpuinfo = cri
        .exec_sync(&c, &["grep", "-c", "-w", "hypervisor", "/proc/cpuinfo"], 60)
        .await
        .expect("ExecSync cpuinfo");
    assert_eq!(
        cpuinfo.exit_code, 0,
        "the guest CPU has the hypervisor flag: {cpuinfo:?}"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_exec_sync_returns_output_and_exit_code() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) = pod::sleeping_kata_pod(&mut cri, &containerd, "kata-exec", "sleeper").await;
    let r = cri
        .exec_sync(&c, &["sh", "-c", "echo out; echo err >&2; exit 7"], 60)
        .await
        .expect("ExecSync");
    assert_eq!(text(&r.stdout), "out\n");
    assert_eq!(text(&r.stderr), "err\n");
    assert_eq!(r.exit_code, 7);
    // Files written by one exec are seen by the next: same container, same rootfs.
    let w = cri
        .exec_sync(
            &c,
            &["sh", "-c", "echo persisted > /tmp/f && cat /tmp/f"],
            60,
        )
        .await
        .expect("ExecSync write");
    assert_eq!(text(&w.stdout), "persisted\n");
    let r = cri
        .exec_sync(&c, &["cat", "/tmp/f"], 60)
        .await
        .expect("ExecSync read");
    assert_eq!(text(&r.stdout), "persisted\n");
    // Resources are updated in the guest: the container's cgroup gets the new memory limit.
    cri.runtime
        .update_container_resources(cri::v1::UpdateContainerResourcesRequest {
            container_id: c.clone(),
            linux: Some(cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: 96 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    let limit = cri
        .exec_sync(
            &c,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
            60,
        )
        .await
        .expect("ExecSync memory.max");
    assert_eq!(
        text(&limit.stdout).trim(),
        (96 * 1024 * 1024).to_string(),
        "{limit:?}"
    );
    // Stats come back decoded by containerd's CRI.
    let stats = cri.container_stats(&c).await.expect("ContainerStats");
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .map(|v| v.value)
            .unwrap_or(0)
            > 0
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_container_cannot_open_the_pod_vms_block_devices() {
    // The pod's containers share one VM whose virtio disks hold every container's rootfs. A
    // container has CAP_MKNOD by default, so only the device cgroup (an eBPF filter on cgroup v2)
    // keeps it from reading the disks, as runc's device rules do on a node.
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) = pod::sleeping_kata_pod(&mut cri, &containerd, "kata-devices", "prober").await;
    // The disk exists and its node can be made (mknod itself is allowed, as under runc); opening
    // it is what the filter refuses.
    let probe = "for b in /sys/class/block/vd*; do d=$(cat $b/dev); break; done; \
                 echo dev=$d; mknod /tmp/disk b ${d%:*} ${d#*:} && echo made && \
                 head -c 512 /tmp/disk | wc -c";
    let r = cri
        .exec_sync(&c, &["sh", "-c", probe], 60)
        .await
        .expect("ExecSync probe");
    let (out, err) = (text(&r.stdout), text(&r.stderr));
    assert!(
        out.starts_with("dev=254:") || out.starts_with("dev=253:"),
        "{out} {err}"
    );
    assert!(out.contains("made\n"), "mknod: {out} {err}");
    assert!(
        err.contains("/tmp/disk: Operation not permitted"),
        "{out} {err}"
    );
    assert!(!out.contains("512"), "the disk was read: {out}");
    // Devices of the default list still work.
    let ok = cri
        .exec_sync(
            &c,
            &[
                "sh",
                "-c",
                "head -c 4 /dev/zero | wc -c; echo x > /dev/null",
            ],
            60,
        )
        .await
        .expect("ExecSync /dev/zero");
    assert_eq!(text(&ok.stdout).trim(), "4", "{ok:?}");
    assert_eq!(ok.exit_code, 0, "{ok:?}");

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_stop_container_honours_the_grace_period() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-stop").await;
    // Handles SIGTERM: exits 42 within the grace period.
    let polite = cri
        .create_container(
            &pod_id,
            &cri::container_config(
                "polite",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 1; done",
                ],
            ),
            &pod,
        )
        .await
        .expect("CreateContainer polite");
    // Ignores SIGTERM: killed when the grace period ends.
    let stubborn = cri
        .create_container(
            &pod_id,
            &cri::container_config(
                "stubborn",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    "trap '' TERM; echo ready; while true; do sleep 1; done",
                ],
            ),
            &pod,
        )
        .await
        .expect("CreateContainer stubborn");
    for c in [&polite, &stubborn] {
        cri.start_container(c).await.expect("StartContainer");
    }
    // Wait until both shells run their trap (they print "ready" after installing it).
    for c in [&polite, &stubborn] {
        let status = cri.container_status(c).await;
        let deadline = std::time::Instant::now() + EXIT_LIMIT;
        loop {
            let log = cri::read_log(std::path::Path::new(&status.log_path));
            if cri::stream_lines(&log, "stdout").contains(&"ready".to_string()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "container never got ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    cri.stop_container(&polite, 30)
        .await
        .expect("StopContainer polite");
    let status = cri.container_status(&polite).await;
    assert_eq!(status.state, cri::CONTAINER_EXITED);
    assert_eq!(status.exit_code, 42);
    let log = cri::read_log(std::path::Path::new(&status.log_path));
    assert!(cri::stream_lines(&log, "stdout").contains(&"got TERM".to_string()));

    cri.stop_container(&stubborn, 2)
        .await
        .expect("StopContainer stubborn");
    let status = cri.container_status(&stubborn).await;
    assert_eq!(status.state, cri::CONTAINER_EXITED);
    assert_eq!(status.exit_code, 137, "SIGKILL after the grace period");

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_two_containers_share_one_pod_vm() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-two").await;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        ids.push(pod::start_sleeper(&mut cri, &pod_id, &pod, name).await);
    }
    assert_eq!(
        containerd::vmm_instances(&kata.vmm).len(),
        1,
        "both containers in one VM"
    );
    assert_eq!(
        containerd::pids_of(&kata.shim).len(),
        1,
        "one shim for the pod"
    );
    let mut boot_ids = Vec::new();
    for c in &ids {
        let r = cri
            .exec_sync(c, &["cat", "/proc/sys/kernel/random/boot_id"], 60)
            .await
            .expect("ExecSync");
        boot_ids.push(text(&r.stdout).trim().to_string());
    }
    assert_eq!(boot_ids[0], boot_ids[1], "same guest kernel");
    assert_ne!(boot_ids[0], host_boot_id());
    // Each container has its own rootfs.
    cri.exec_sync(&ids[0], &["sh", "-c", "echo mine > /tmp/only-first"], 60)
        .await
        .expect("ExecSync");
    let r = cri
        .exec_sync(&ids[1], &["ls", "/tmp/only-first"], 60)
        .await
        .expect("ExecSync");
    assert_ne!(
        r.exit_code, 0,
        "the second container does not see the first one's files"
    );

    // Removing one container leaves the other running in the same VM.
    cri.stop_container(&ids[0], 5).await.expect("StopContainer");
    cri.remove_container(&ids[0])
        .await
        .expect("RemoveContainer");
    let r = cri
        .exec_sync(&ids[1], &["echo", "still here"], 60)
        .await
        .expect("ExecSync");
    assert_eq!(text(&r.stdout), "still here\n");

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_two_pods_run_at_once() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let mut pods = Vec::new();
    for name in ["kata-pod-a", "kata-pod-b"] {
        pods.push(pod::sleeping_kata_pod(&mut cri, &containerd, name, "main").await);
    }
    assert_eq!(
        containerd::vmm_instances(&kata.vmm).len(),
        2,
        "a VM per pod"
    );
    assert_eq!(containerd::pids_of(&kata.shim).len(), 2, "a shim per pod");
    let mut boot_ids = Vec::new();
    for (_, c) in &pods {
        let r = cri
            .exec_sync(c, &["cat", "/proc/sys/kernel/random/boot_id"], 60)
            .await
            .expect("ExecSync");
        boot_ids.push(text(&r.stdout).trim().to_string());
    }
    assert_ne!(boot_ids[0], boot_ids[1], "each pod has its own kernel");
    for (pod_id, _) in &pods {
        cri.teardown_pod(pod_id).await;
    }
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_pod_refuses_hostile_annotations_and_leaves_nothing() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    // The operator allows the memory annotation, so what is refused here is the value.
    let _allowed = containerd.extend_kata_config(&format!(
        "[annotations]\nallowed = [{ANNOTATION_MEMORY:?}]\n"
    ));
    let err = pod::kata_pod_refused(
        &mut cri,
        &containerd,
        "kata-hostile",
        (ANNOTATION_MEMORY, "99999999"),
    )
    .await;
    assert!(
        err.contains(ANNOTATION_MEMORY) && err.contains("outside"),
        "the error names the annotation and the reason: {err}"
    );
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn vm_annotations_need_operator_consent() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    // The base test config allows no annotation, like a fresh install.
    for (name, annotation) in [
        (
            "kata-no-consent-console",
            (ANNOTATION_DEBUG_CONSOLE, "true"),
        ),
        ("kata-no-consent-memory", (ANNOTATION_MEMORY, "384")),
    ] {
        let err = pod::kata_pod_refused(&mut cri, &containerd, name, annotation).await;
        assert!(
            err.contains(annotation.0)
                && err.contains("not allowed")
                && err.contains("[annotations] allowed"),
            "the error names the annotation and how the operator allows it: {err}"
        );
        containerd.assert_no_leftovers(&kata);
    }

    // The operator allows the memory annotation up to 512 MiB.
    let _allowed = containerd.extend_kata_config(&format!(
        "[annotations]\nallowed = [{ANNOTATION_MEMORY:?}]\n[limits]\nmax_memory_mib = 512\n"
    ));
    let err = pod::kata_pod_refused(
        &mut cri,
        &containerd,
        "kata-over-max",
        (ANNOTATION_MEMORY, "513"),
    )
    .await;
    assert!(
        err.contains(ANNOTATION_MEMORY) && err.contains("outside 64..=512"),
        "an allowed size above the maximum is refused: {err}"
    );
    containerd.assert_no_leftovers(&kata);

    // Within the maximum the VM gets that size (the default is 128 MiB): the guest kernel's
    // MemTotal is the VM's memory minus what the kernel keeps for itself.
    let (pod_id, pod) = pod::run_annotated_kata_pod(
        &mut cri,
        &containerd,
        "kata-consented-memory",
        &[(ANNOTATION_MEMORY, "384")],
    )
    .await;
    let c = pod::start_sleeper(&mut cri, &pod_id, &pod, "main").await;
    let r = cri
        .exec_sync(&c, &["cat", "/proc/meminfo"], 60)
        .await
        .expect("ExecSync");
    let meminfo = text(&r.stdout);
    let mem_total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in the guest's /proc/meminfo: {meminfo}"));
    assert!(
        (256 * 1024..=384 * 1024).contains(&mem_total_kib),
        "a 384 MiB VM has MemTotal {mem_total_kib} kB"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_killed_shim_leaves_nothing_behind() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-killed-shim", "sleeper").await;
    let shims = containerd::pids_of(&kata.shim);
    assert_eq!(shims.len(), 1, "one shim for the pod");
    // SIGKILL: the shim gets no chance to clean up; its VMM dies with it (parent-death signal)
    // and containerd runs `containerd-shim-kata-like-v2 delete`, which removes the pod's state.
    // SAFETY: kill(2) on a pid we just looked up.
    unsafe {
        libc::kill(shims[0] as i32, libc::SIGKILL);
    }
    let status = cri.wait_exited(&c, EXIT_LIMIT).await;
    assert_ne!(status.exit_code, 0, "the container died with its VM");
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_pod_survives_a_containerd_kill_and_is_cleaned_after() {
    let (mut containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-containerd-kill", "sleeper").await;
    let vmm_before = containerd::vmm_instances(&kata.vmm);
    drop(cri);

    // containerd dies hard; the pod's shim and VM keep running, as with runc.
    containerd.kill_and_restart();
    assert_eq!(
        containerd::vmm_instances(&kata.vmm),
        vmm_before,
        "the pod VM survived"
    );
    let mut cri = Cri::connect(&containerd.socket).await;
    let r = cri
        .exec_sync(&c, &["echo", "still running"], 60)
        .await
        .unwrap_or_else(|e| panic!("ExecSync after the restart: {e}\n{}", containerd.log_tail()));
    assert_eq!(text(&r.stdout), "still running\n");

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_oom_kill_is_reported_to_kubelet() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-oom").await;
    // 32 MiB limit; the shell then builds a 64 MiB string.
    let config = pod::container_with_memory_limit(
        "hog",
        &[
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived",
        ],
        32 * 1024 * 1024,
    );
    let c = pod::start_container(&mut cri, &pod_id, &pod, &config).await;
    let status = cri.wait_exited(&c, EXIT_LIMIT).await;
    assert_ne!(status.exit_code, 0, "{status:?}");
    // The OOM event (guest cgroup -> agent -> shim -> containerd) marks the container.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut reason = status.reason.clone();
    while reason != "OOMKilled" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reason = cri.container_status(&c).await.reason;
    }
    assert_eq!(reason, "OOMKilled", "{status:?}");
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn kata_vm_death_ends_the_pods_containers() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, c) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-vm-death", "sleeper").await;
    let vmms = containerd::vmm_instances(&kata.vmm);
    assert_eq!(vmms.len(), 1);
    // The VM dies under a live shim: its container exits (status 255) and the sandbox is no
    // longer ready; the shim stays to answer kubelet.
    // SAFETY: kill(2) on a pid we just looked up.
    unsafe {
        libc::kill(vmms[0] as i32, libc::SIGKILL);
    }
    let status = cri.wait_exited(&c, EXIT_LIMIT).await;
    assert_eq!(status.exit_code, 255, "{status:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cri.pod_status(&pod_id).await.state != cri::v1::PodSandboxState::SandboxNotready as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox stayed ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        containerd.log_tail().contains("the pod VM died"),
        "the shim logged the VM's death with its console"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// What is wrong with the privileges of every thread of `pid` (empty: nothing): non-zero uids
/// and gids, no capability in any set, no_new_privs and a seccomp filter on each.
fn privilege_problems(pid: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![format!("{pid}: no /proc entry")];
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let field = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name");
        for ids in ["Uid", "Gid"] {
            let v = field(ids);
            if v.is_empty() || v.split_whitespace().any(|id| id == "0") {
                problems.push(format!("{pid}/{tid} ({name}): {ids} {v}"));
            }
        }
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            if field(caps) != "0000000000000000" {
                problems.push(format!("{pid}/{tid} ({name}): {caps} {}", field(caps)));
            }
        }
        for (key, want) in [("NoNewPrivs", "1"), ("Seccomp", "2")] {
            if field(key) != want {
                problems.push(format!("{pid}/{tid} ({name}): {key} {}", field(key)));
            }
        }
    }
    problems
}

/// The uid of process `pid` (real uid, /proc/PID/status).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status: {status:?}"))
}

/// Issue 12, item 6: every VMM process and thread runs with no capabilities, seccomp on and a
/// non-zero uid of its pod's own: two pods' VMMs never share an identity (one taken over could
/// otherwise signal, ptrace or read /proc of the other).
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn vmm_runs_unprivileged() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_a, _) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-unpriv-a", "sleeper").await;
    let (pod_b, _) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-unpriv-b", "sleeper").await;
    let instances = containerd::vmm_instances(&kata.vmm);
    assert_eq!(instances.len(), 2, "two pods' VMMs: {instances:?}");
    // Each instance is the jail's parent outside and the VM process inside its pid namespace:
    // all four are checked.
    let pids = containerd::pids_of(&kata.vmm);
    assert_eq!(pids.len(), 4, "the jails' parents and the VMMs: {pids:?}");
    // The containers run, so every VMM thread (vCPUs, API, event loop) is past its filter.
    let problems: Vec<String> = pids.iter().flat_map(|p| privilege_problems(*p)).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let threads: usize = pids
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/task")).ok())
        .map(|d| d.count())
        .sum();
    assert!(
        threads >= 8,
        "parent, vCPU, API and VMM threads of each: {threads}"
    );
    // One uid per pod: the jail's parent and its VMM share it; the two pods do not.
    let uid_of_instance = |outer: u32| {
        let inner: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| *p != outer && containerd::parent_of(*p) == Some(outer))
            .collect();
        assert_eq!(
            inner.len(),
            1,
            "the VMM inside {outer}'s jail: {inner:?} of {pids:?}"
        );
        assert_eq!(
            uid_of(outer),
            uid_of(inner[0]),
            "jail parent {outer} and its VMM"
        );
        uid_of(outer)
    };
    let (uid_a, uid_b) = (uid_of_instance(instances[0]), uid_of_instance(instances[1]));
    println!("VMM uids: {uid_a} and {uid_b}");
    assert!(uid_a != 0 && uid_b != 0);
    assert_ne!(uid_a, uid_b, "two pods' VMMs share uid {uid_a}");
    cri.teardown_pod(&pod_a).await;
    cri.teardown_pod(&pod_b).await;
    containerd.assert_no_leftovers(&kata);
}

/// Issue 12, item 1: only the host talks to the agent. A privileged container running as root
/// (every capability, no seccomp profile from containerd) tries vsock connects to the loopback
/// CID, the host, the guest's own CID and "any", on the agent's ports and a range around them.
/// Every attempt must fail at `socket()` with EACCES: the seccomp rule the agent adds to every
/// container (the second wall; the first is the guest kernel without vsock loopback, checked by
/// kernel-config/check-config). The pod stays healthy afterwards.
///
/// The agent's own wall (it drops and logs a peer that is not the host) cannot be reached from a
/// container at all with these two walls up, so it is covered by its unit test
/// (agent/src/server.rs `only_the_host_cid_may_connect_to_the_agent`), not here.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn hostile_container_cannot_reach_agent() {
    use kata_like_protocol::{AGENT_VSOCK_PORT, POWER_VSOCK_PORT};
    // The shim's GUEST_CID (shim/src/vm/vmm_client.rs): the pod VM's own CID.
    const GUEST_CID: u32 = 3;
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let pod = pod::privileged_pod_config("kata-hostile-vsock", &containerd);
    let pod_id = cri
        .run_pod(&pod, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));

    let mut addresses = Vec::new();
    for cid in [1, 2, 3, GUEST_CID, u32::MAX - 1, u32::MAX] {
        for port in 1020..=1030 {
            addresses.push(format!("{cid}:{port}"));
        }
    }
    assert!(addresses.contains(&format!("{GUEST_CID}:{AGENT_VSOCK_PORT}")));
    assert!(addresses.contains(&format!("1:{POWER_VSOCK_PORT}")));
    let mut cmd = vec!["/bin/vsock-probe"];
    cmd.extend(addresses.iter().map(String::as_str));
    let probe = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &pod::privileged_root_container("probe", containerd::VSOCK_PROBE_IMAGE, &cmd),
    )
    .await;
    let status = cri.wait_exited(&probe, EXIT_LIMIT).await;
    let log = cri::read_log(std::path::Path::new(&status.log_path));
    let lines = cri::stream_lines(&log, "stdout");
    assert_eq!(
        status.exit_code,
        0,
        "the probe ran every attempt: {lines:?} {:?}",
        cri::stream_lines(&log, "stderr")
    );
    let eacces = libc::EACCES;
    for address in &addresses {
        let line = lines
            .iter()
            .find(|l| l.split(' ').next() == Some(address.as_str()))
            .unwrap_or_else(|| panic!("no attempt reported for {address}: {lines:?}"));
        assert_eq!(
            line,
            &format!("{address} socket errno {eacces}"),
            "a container must not open a vsock socket (the agent's seccomp wall): {lines:?}"
        );
    }

    // The pod is healthy: the agent still creates and starts a container and runs an exec.
    let sleeper = pod::start_sleeper(&mut cri, &pod_id, &pod, "after-probe").await;
    let r = cri
        .exec_sync(&sleeper, &["echo", "still-here"], 60)
        .await
        .expect("ExecSync after the probe");
    assert_eq!(r.exit_code, 0);
    assert_eq!(text(&r.stdout).trim(), "still-here");
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// The stdout lines of a container that ran to its end.
async fn output_of(cri: &mut Cri, container: &str) -> Vec<String> {
    let status = cri.wait_exited(container, EXIT_LIMIT).await;
    let log = cri::read_log(std::path::Path::new(&status.log_path));
    assert_eq!(
        status.exit_code,
        0,
        "{container} failed: {:?} {:?}",
        cri::stream_lines(&log, "stdout"),
        cri::stream_lines(&log, "stderr")
    );
    cri::stream_lines(&log, "stdout")
}

/// Issue 13: with NamespaceMode POD every container of the pod joins one pid namespace whose
/// PID 1 is the sandbox init; CONTAINER gives one of its own; TARGET joins the named
/// container's. A container whose process is not PID 1 dies of StopContainer's SIGTERM at once
/// (143), as in a runc pod, instead of being SIGKILLed (137) after the grace period.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn containers_share_pod_pid_namespace() {
    use cri::v1::NamespaceMode;
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-pidns").await;
    let ps = ["sh", "-c", "ps -o args; echo pid1=$(cat /proc/1/comm)"];

    let sleeper = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &cri::container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "4242"]),
    )
    .await;
    let viewer = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &cri::container_config("viewer", BUSYBOX_IMAGE, &ps),
    )
    .await;
    let lines = output_of(&mut cri, &viewer).await;
    assert!(
        lines.iter().any(|l| l == "sleep 4242"),
        "POD mode: the second container sees the first: {lines:?}"
    );
    assert!(
        lines.contains(&"pid1=pidns-init".to_string()),
        "POD mode: PID 1 is the sandbox init: {lines:?}"
    );

    let isolated = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &pod::with_pid_mode(
            cri::container_config("isolated", BUSYBOX_IMAGE, &["sleep", "4343"]),
            NamespaceMode::Container,
        ),
    )
    .await;
    let alone = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &pod::with_pid_mode(
            cri::container_config("alone", BUSYBOX_IMAGE, &ps),
            NamespaceMode::Container,
        ),
    )
    .await;
    let lines = output_of(&mut cri, &alone).await;
    assert!(
        !lines.iter().any(|l| l.starts_with("sleep")),
        "CONTAINER mode sees no other container: {lines:?}"
    );
    assert!(lines.contains(&"pid1=sh".to_string()), "{lines:?}");

    let mut debug = pod::with_pid_mode(
        cri::container_config("debug", BUSYBOX_IMAGE, &ps),
        NamespaceMode::Target,
    );
    if let Some(options) = debug
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|c| c.namespace_options.as_mut())
    {
        options.target_id = isolated.clone();
    }
    let debug = pod::start_container(&mut cri, &pod_id, &pod, &debug).await;
    let lines = output_of(&mut cri, &debug).await;
    assert!(
        lines.iter().any(|l| l == "sleep 4343") && !lines.iter().any(|l| l == "sleep 4242"),
        "TARGET mode sees the target's processes only: {lines:?}"
    );

    // StopContainer right after StartContainer: SIGTERM ends a process that is not PID 1.
    let quick = pod::start_sleeper(&mut cri, &pod_id, &pod, "quick").await;
    cri.stop_container(&quick, 60).await.expect("StopContainer");
    let status = cri.container_status(&quick).await;
    assert_eq!(status.state, cri::CONTAINER_EXITED);
    assert_eq!(status.exit_code, 143, "killed by SIGTERM, not SIGKILL");

    let _ = sleeper;
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// Issue 13: the pod's sysctls (containerd writes them into the sandbox's spec only) are
/// applied in the guest before any container starts; a sysctl that is not the pod's to set is
/// refused with its name.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn pod_sysctls_applied() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let mut config = cri::pod_config("kata-sysctls", &containerd.log_dir());
    let sysctls = [("net.core.somaxconn", "1234"), ("kernel.shmmni", "1000")];
    if let Some(linux) = config.linux.as_mut() {
        linux.sysctls = sysctls
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    let pod_id = cri
        .run_pod(&config, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let reader = pod::start_container(
        &mut cri,
        &pod_id,
        &config,
        &cri::container_config(
            "reader",
            BUSYBOX_IMAGE,
            &[
                "cat",
                "/proc/sys/net/core/somaxconn",
                "/proc/sys/kernel/shmmni",
            ],
        ),
    )
    .await;
    assert_eq!(output_of(&mut cri, &reader).await, ["1234", "1000"]);
    cri.teardown_pod(&pod_id).await;

    let mut unsafe_config = cri::pod_config("kata-bad-sysctl", &containerd.log_dir());
    if let Some(linux) = unsafe_config.linux.as_mut() {
        linux.sysctls = [("vm.overcommit_memory".to_string(), "1".to_string())].into();
    }
    let refusal = pod::pod_refused(&mut cri, &unsafe_config).await;
    assert!(
        refusal.contains("vm.overcommit_memory"),
        "the refusal names the sysctl: {refusal}"
    );
    containerd.assert_no_leftovers(&kata);
}

/// Issue 13: a pod that asks for the node's network or pid namespace is refused with a clear
/// error (a VM cannot give it the node's), leaving nothing; host IPC gets the pod-wide stand-in
/// (the guest's IPC namespace, a guest /dev/shm) and runs.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn host_network_refused_clearly() {
    use cri::v1::NamespaceMode;
    let (containerd, kata, mut cri) = pod::clean_node().await;
    for (name, what) in [("kata-hostnet", "hostNetwork"), ("kata-hostpid", "hostPID")] {
        let mut config = cri::pod_config(name, &containerd.log_dir());
        let options = pod::namespace_options(&mut config);
        if what == "hostNetwork" {
            options.network = NamespaceMode::Node as i32;
        } else {
            options.pid = NamespaceMode::Node as i32;
        }
        let refusal = pod::pod_refused(&mut cri, &config).await;
        assert!(
            refusal.contains(what) && refusal.contains("kata-like"),
            "{what}: {refusal}"
        );
        containerd.assert_no_leftovers(&kata);
    }

    let mut config = cri::pod_config("kata-hostipc", &containerd.log_dir());
    pod::namespace_options(&mut config).ipc = NamespaceMode::Node as i32;
    let pod_id = cri
        .run_pod(&config, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("hostIPC RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let mut container = cri::container_config(
        "shm",
        BUSYBOX_IMAGE,
        &["sh", "-c", "echo x > /dev/shm/probe && cat /dev/shm/probe"],
    );
    if let Some(options) = container
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|c| c.namespace_options.as_mut())
    {
        options.ipc = NamespaceMode::Node as i32;
    }
    let c = pod::start_container(&mut cri, &pod_id, &config, &container).await;
    assert_eq!(output_of(&mut cri, &c).await, ["x"]);
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// Issue 13: what a service mesh's init container does works in a kata-like pod: with
/// NET_ADMIN, iptables (nft backend) installs a nat REDIRECT with an owner match and a mangle
/// TPROXY rule in the pod's network, and the redirect takes effect.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn iptables_redirect_in_pod() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-iptables").await;
    // (busybox's own `wget -T` crashes: `timeout` bounds each fetch.)
    let script = "set -e
mkdir -p /tmp/www && echo redirected > /tmp/www/index.html
httpd -p 127.0.0.1:8080 -h /tmp/www
if timeout 10 wget -q -O- http://127.0.0.1:80/; then echo 'port 80 answered before the rule'; exit 3; fi
iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport 80 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 8080
iptables -t mangle -A PREROUTING -p tcp --dport 9999 -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1
timeout 20 wget -q -O- http://127.0.0.1:80/
iptables -t nat -S OUTPUT";
    let mut config = cri::container_config(
        "mesh-init",
        containerd::IPTABLES_IMAGE,
        &["sh", "-c", script],
    );
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        context.capabilities = Some(cri::v1::Capability {
            add_capabilities: vec!["NET_ADMIN".into(), "NET_RAW".into()],
            ..Default::default()
        });
    }
    let c = pod::start_container(&mut cri, &pod_id, &pod, &config).await;
    let lines = output_of(&mut cri, &c).await;
    assert!(
        lines.contains(&"redirected".to_string()),
        "port 80 reaches the server on 8080 through the REDIRECT: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("REDIRECT") && l.contains("--to-ports 8080")),
        "{lines:?}"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// Issue 15: the pod's limits (containerd's `io.kubernetes.cri.sandbox-*` annotations) size its
/// VM: a container with a 1 GiB limit in a pod with a 1 GiB limit allocates 800 MiB and keeps
/// running (the default VM has 128 MiB), while a container that exceeds its own limit is
/// OOM-killed by the guest's cgroup, as under runc.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn vm_sized_from_pod_limits() {
    const GIB: i64 = 1 << 30;
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let mut config = cri::pod_config("kata-sized", &containerd.log_dir());
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: GIB + (64 << 20),
            ..Default::default()
        });
    }
    let pod_id = cri
        .run_pod(&config, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));

    // The guest's memory and the container's limit go to the log first: they explain a failure.
    let mut big = cri::container_config(
        "big",
        containerd::VSOCK_PROBE_IMAGE,
        &[
            "sh",
            "-c",
            "grep -E 'MemTotal|MemFree' /proc/meminfo; cat /sys/fs/cgroup/memory.max; exec /bin/memhog 800",
        ],
    );
    let mut small = cri::container_config(
        "small",
        containerd::VSOCK_PROBE_IMAGE,
        &["/bin/memhog", "200"],
    );
    for (c, limit) in [(&mut big, GIB), (&mut small, 64 << 20)] {
        if let Some(linux) = c.linux.as_mut() {
            linux.resources = Some(cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: limit,
                ..Default::default()
            });
        }
    }
    let big = pod::start_container(&mut cri, &pod_id, &config, &big).await;
    let status = cri.container_status(&big).await;
    let deadline = std::time::Instant::now() + EXIT_LIMIT;
    loop {
        let status = cri.container_status(&big).await;
        let log = cri::read_log(std::path::Path::new(&status.log_path));
        if cri::stream_lines(&log, "stdout").contains(&"allocated 800 MiB".to_string()) {
            break;
        }
        assert_eq!(
            status.state,
            cri::CONTAINER_RUNNING,
            "the 800 MiB container ended before it allocated: {status:?} {:?} {:?}",
            cri::stream_lines(&log, "stdout"),
            cri::stream_lines(&log, "stderr")
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no allocation reported"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = cri.container_status(&big).await;
    assert_eq!(
        after.state,
        cri::CONTAINER_RUNNING,
        "keeps running with its 800 MiB: {after:?} (log {})",
        status.log_path
    );

    let small = pod::start_container(&mut cri, &pod_id, &config, &small).await;
    let status = cri.wait_exited(&small, EXIT_LIMIT).await;
    assert_eq!(status.exit_code, 137, "{status:?}");
    // The OOM event (guest cgroup -> agent -> shim -> containerd) marks the container.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut reason = status.reason.clone();
    while reason != "OOMKilled" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reason = cri.container_status(&small).await.reason;
    }
    assert_eq!(reason, "OOMKilled", "{status:?}");
    assert_eq!(
        cri.container_status(&big).await.state,
        cri::CONTAINER_RUNNING,
        "the neighbour's OOM kill leaves the big container alone"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// Issue 12: a guest that floods its console must not grow the host-side console log without
/// bound under /run. A container writes 2 MiB to the guest console (hvc0, through a
/// /dev/console node it makes); the pod's console log (`console.log` and its rotated files in the
/// pod's state dir) then holds at most the configured size, and what it holds is the newest
/// output: the marker written after the flood, not the agent's ready line from the boot.
///
/// The test also prints what the guest console costs: the flood's throughput through hvc0 as dd
/// reports it, and the pod VM's boot time to a healthy agent from the shim's log. Measurements
/// only, never asserted.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn console_log_is_capped() {
    const MAX_BYTES: u64 = 64 * 1024;
    const FILES: u32 = 2;
    const MARKER: &str = "CONSOLE-FLOOD-END-MARKER";
    /// A hang guard for the flood through the guest console under TCG, not a performance bound.
    const FLOOD_LIMIT: Duration = Duration::from_secs(900);
    let (containerd, kata, mut cri) = pod::clean_node().await;
    // 2 MiB, not the issue's 100 MiB (ten times the kept size is enough to rotate through every
    // file): longer floods faulted the nested KVM test host in this run's three tries, see the
    // VMM README, "Known defects".
    let _cap = containerd.extend_kata_config(&format!(
        "[console_log]\nmax_bytes = {MAX_BYTES}\nfiles = {FILES}"
    ));
    let pod = pod::privileged_pod_config("kata-console-flood", &containerd);
    let pod_id = cri
        .run_pod(&pod, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    // The pod's state dir is the only one under the shim's state dir.
    let state_dirs: Vec<std::path::PathBuf> = std::fs::read_dir(&containerd.kata_state_dir)
        .expect("the shim's state dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("console.log").exists())
        .collect();
    assert_eq!(state_dirs.len(), 1, "{state_dirs:?}");
    let console_log = state_dirs[0].join("console.log");
    let ready_line = "kata-like-agent: ready";
    assert!(
        std::fs::read_to_string(&console_log)
            .unwrap_or_default()
            .contains(ready_line),
        "the agent's ready line reaches the console log at boot"
    );

    // /dev/console (char 5:1) is the guest's console, hvc0, and the one console device the
    // container's device cgroup lets it open (libcgroups' default allow list, which every
    // container gets: containerd adds no allow-all for privileged containers here, see
    // `privileged_without_host_devices`). The marker is repeated after the flood: the VMM drops
    // console output while the shim's pipe is full, so one write of it may be lost.
    let script = format!(
        "set -e; mknod /tmp/console c 5 1; \
         dd if=/dev/zero of=/tmp/console bs=65536 count=32 2>&1; echo flood-done; \
         i=0; while [ $i -lt 1200 ]; do echo {MARKER} > /tmp/console; sleep 1; i=$((i+1)); done"
    );
    let flooder = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &cri::container_config("flooder", BUSYBOX_IMAGE, &["sh", "-c", &script]),
    )
    .await;
    let started = std::time::Instant::now();
    let kept_files = |dir: &std::path::Path| -> Vec<(String, u64)> {
        console_log_files(dir).unwrap_or_else(|e| {
            panic!(
                "the pod's state dir {}: {e} (the pod VM ended?); containerd's log: {}",
                dir.display(),
                containerd.log_tail()
            )
        })
    };
    let mut largest_total = 0;
    loop {
        let total: u64 = kept_files(&state_dirs[0]).iter().map(|(_, len)| len).sum();
        largest_total = largest_total.max(total);
        if std::fs::read_to_string(&console_log)
            .unwrap_or_default()
            .contains(MARKER)
        {
            break;
        }
        let status = cri.container_status(&flooder).await;
        let log = cri::read_log(std::path::Path::new(&status.log_path));
        assert_ne!(
            status.state,
            cri::CONTAINER_EXITED,
            "the flooder ended before its marker reached the console log: {:?}",
            cri::stream_lines(&log, "stdout")
        );
        assert!(
            started.elapsed() < FLOOD_LIMIT,
            "no marker in the console log within {FLOOD_LIMIT:?}: flooder output {:?}, files {:?}",
            cri::stream_lines(&log, "stdout"),
            kept_files(&state_dirs[0])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = cri.container_status(&flooder).await;
    let output = cri::stream_lines(
        &cri::read_log(std::path::Path::new(&status.log_path)),
        "stdout",
    );
    eprintln!(
        "console_log_is_capped: flood to the marker in {:?}; flooder output: {output:?}",
        started.elapsed()
    );
    if let Some(boot) = std::fs::read_to_string(containerd.base.join("containerd.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("pod VM is up"))
    {
        eprintln!("console_log_is_capped: {boot}");
    }
    assert!(
        output.iter().any(|l| l == "32+0 records out"),
        "the guest wrote all 2 MiB to its console: {output:?}"
    );

    let files = kept_files(&state_dirs[0]);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["console.log", "console.log.1", "console.log.2"],
        "the log and {FILES} rotated files, no more: {files:?}"
    );
    for (name, len) in &files {
        assert!(*len <= MAX_BYTES, "{name} holds {len} bytes: {files:?}");
    }
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    let cap = MAX_BYTES * (1 + u64::from(FILES));
    assert!(
        total <= cap && largest_total <= cap,
        "{total} bytes kept ({largest_total} at most while flooding), cap {cap}: {files:?}"
    );
    let kept: Vec<u8> = files
        .iter()
        .flat_map(|(name, _)| std::fs::read(state_dirs[0].join(name)).expect("read"))
        .collect();
    assert!(
        !String::from_utf8_lossy(&kept).contains(ready_line),
        "the oldest output (the boot's ready line) was rotated away"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// `console.log*` files in `dir` with their sizes, sorted by name.
fn console_log_files(dir: &std::path::Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("console.log") {
            files.push((name, entry.metadata()?.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Issue 15 item 6: the guest console (where the agent logs) is kept with the pod's logs, in
/// `<pod log dir>/kata-like-vm/console.log`, capped and rotated with `[console_log]`'s limits,
/// and outlives StopPodSandbox and RemovePodSandbox: the pod log directory is kubelet's, which
/// removes it with the pod (here the test does, as kubelet would). A container floods the guest
/// console with 16 times the cap; the kept files never hold more than the cap, and after the pod
/// is stopped and removed they still hold the agent's lines about the flooder's stop.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn logs_kept_and_capped() {
    const MAX_BYTES: u64 = 16 * 1024;
    const FILES: u32 = 2;
    const MARKER: &str = "KEPT-CONSOLE-FLOOD-END";
    /// A hang guard for the flood through the guest console under TCG, not a performance bound.
    const FLOOD_LIMIT: Duration = Duration::from_secs(600);
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let _cap = containerd.extend_kata_config(&format!(
        "[console_log]\nmax_bytes = {MAX_BYTES}\nfiles = {FILES}"
    ));
    let pod = pod::privileged_pod_config("kata-kept-log", &containerd);
    // kubelet makes the pod's log directory before RunPodSandbox.
    let pod_log_dir = std::path::PathBuf::from(&pod.log_directory);
    std::fs::create_dir_all(&pod_log_dir).expect("the pod's log directory");
    let kept_dir = pod_log_dir.join("kata-like-vm");
    let pod_id = cri
        .run_pod(&pod, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let kept_log = kept_dir.join("console.log");
    assert!(
        std::fs::read_to_string(&kept_log)
            .unwrap_or_default()
            .contains("kata-like-agent: ready"),
        "the agent's ready line is kept in {}: {:?}; containerd's log: {}",
        kept_log.display(),
        console_log_files(&kept_dir),
        containerd.log_tail()
    );

    // The flood through /dev/console (hvc0), as in console_log_is_capped; the marker repeats
    // because the VMM drops console output while the shim's pipe is full.
    let script = format!(
        "set -e; mknod /tmp/console c 5 1; \
         dd if=/dev/zero of=/tmp/console bs=65536 count=4 2>&1; echo flood-done; \
         i=0; while [ $i -lt 600 ]; do echo {MARKER} > /tmp/console; sleep 1; i=$((i+1)); done"
    );
    let flooder = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &cri::container_config("flooder", BUSYBOX_IMAGE, &["sh", "-c", &script]),
    )
    .await;
    let cap = MAX_BYTES * (1 + u64::from(FILES));
    let started = std::time::Instant::now();
    let mut largest_total = 0;
    loop {
        let files = console_log_files(&kept_dir).expect("the kept console log's folder");
        largest_total = largest_total.max(files.iter().map(|(_, len)| len).sum());
        if std::fs::read_to_string(&kept_log)
            .unwrap_or_default()
            .contains(MARKER)
        {
            break;
        }
        assert!(
            started.elapsed() < FLOOD_LIMIT,
            "no marker in the kept console log within {FLOOD_LIMIT:?}: files {files:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let files = console_log_files(&kept_dir).expect("the kept console log's folder");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["console.log", "console.log.1", "console.log.2"],
        "the kept log rotated through {FILES} files, no more: {files:?}"
    );
    for (name, len) in &files {
        assert!(*len <= MAX_BYTES, "{name} holds {len} bytes: {files:?}");
    }
    assert!(
        largest_total <= cap,
        "{largest_total} bytes kept at most while flooding, cap {cap}: {files:?}"
    );

    // What kubelet does on pod deletion, then the kept log is read as an operator would.
    cri.stop_container(&flooder, 5)
        .await
        .expect("StopContainer");
    cri.remove_container(&flooder)
        .await
        .expect("RemoveContainer");
    cri.stop_pod(&pod_id).await.expect("StopPodSandbox");
    let after_stop = console_log_files(&kept_dir).expect("the kept log after StopPodSandbox");
    cri.remove_pod(&pod_id).await.expect("RemovePodSandbox");
    let files = console_log_files(&kept_dir).expect("the kept log after RemovePodSandbox");
    assert!(
        !after_stop.is_empty() && !files.is_empty(),
        "{after_stop:?}"
    );
    let kept: String = files
        .iter()
        .map(|(name, _)| std::fs::read_to_string(kept_dir.join(name)).unwrap_or_default())
        .collect();
    assert!(
        kept.lines()
            .any(|l| l.contains("signalled") && l.contains(&flooder)),
        "the agent's lines on stopping the flooder are kept: {:?}",
        &kept[kept.len().saturating_sub(2048)..]
    );
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert!(total <= cap, "{total} bytes kept, cap {cap}: {files:?}");
    // kubelet removes the pod's log directory with the pod.
    std::fs::remove_dir_all(&pod_log_dir).expect("remove the pod's log directory");
    containerd.assert_no_leftovers(&kata);
}

/// The /proc/<pid>/status lines that make up a process's confinement.
const CONFINEMENT_LINES: &str =
    "^(Uid|Gid|Groups|Seccomp|Seccomp_filters|NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):";

/// Issue 12 item 2: a process started by exec gets exactly the container's confinement. The
/// container runs with a localhost seccomp profile (containerd reads it on the node) that lets
/// everything through but chmod, which fails with EOPNOTSUPP; containerd gives it no
/// no_new_privs, so the agent must install the filter before it drops the capabilities.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn exec_keeps_container_seccomp() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let profile = containerd.base.join("no-chmod-seccomp.json");
    let eopnotsupp = libc::EOPNOTSUPP;
    std::fs::write(
        &profile,
        format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{{"names":["chmod","fchmod","fchmodat","fchmodat2"],
                              "action":"SCMP_ACT_ERRNO","errnoRet":{eopnotsupp}}}]}}"#
        ),
    )
    .expect("writing the seccomp profile");
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-exec-seccomp").await;
    let mut config = cri::container_config(
        "confined",
        containerd::VSOCK_PROBE_IMAGE,
        &["sh", "-c", "echo $$ > /tmp/init-pid; exec sleep 3600"],
    );
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
    {
        context.seccomp = Some(cri::v1::SecurityProfile {
            profile_type: cri::v1::security_profile::ProfileType::Localhost as i32,
            localhost_ref: profile.display().to_string(),
        });
    }
    let c = pod::start_container(&mut cri, &pod_id, &pod, &config).await;

    let script = format!(
        "while [ ! -s /tmp/init-pid ]; do sleep 0.1; done; \
         grep -E '{CONFINEMENT_LINES}' /proc/$(cat /tmp/init-pid)/status; echo --; \
         grep -E '{CONFINEMENT_LINES}' /proc/self/status"
    );
    let r = cri
        .exec_sync(&c, &["sh", "-c", &script], 60)
        .await
        .expect("ExecSync of the status probe");
    let out = text(&r.stdout);
    assert_eq!(r.exit_code, 0, "{out} {}", text(&r.stderr));
    let (init, exec) = out.split_once("--\n").expect("two status excerpts");
    assert!(init.contains("Seccomp:\t2"), "the init is filtered: {init}");
    assert!(init.contains("Seccomp_filters:\t1"), "{init}");
    assert!(init.contains("NoNewPrivs:\t0"), "{init}");
    assert_eq!(exec, init, "the exec's confinement is the init's");

    // The profile's denial holds in the exec.
    let r = cri
        .exec_sync(&c, &["chmod", "600", "/tmp/init-pid"], 60)
        .await
        .expect("ExecSync of chmod");
    let stderr = text(&r.stderr);
    assert_ne!(r.exit_code, 0, "chmod is denied in the exec: {stderr}");
    assert!(
        stderr.to_lowercase().contains("not supported"),
        "chmod fails with the profile's EOPNOTSUPP: {stderr}"
    );

    // And so does the agent's AF_VSOCK wall, which lives in the container's filter.
    let r = cri
        .exec_sync(&c, &["/bin/vsock-probe", "2:1024", "3:1024"], 60)
        .await
        .expect("ExecSync of the vsock probe");
    let lines = text(&r.stdout);
    let eacces = libc::EACCES;
    for address in ["2:1024", "3:1024"] {
        assert!(
            lines.contains(&format!("{address} socket errno {eacces}")),
            "an exec'd process must not open a vsock socket: {lines} {}",
            text(&r.stderr)
        );
    }
    cri.teardown_pod(&pod_id).await;
    let _ = std::fs::remove_file(&profile);
    containerd.assert_no_leftovers(&kata);
}

/// Issue 12 item 3: `readOnlyRootFilesystem: true` works as with runc: the container starts
/// (its mount points, such as its volume's, are made before / becomes read-only), writes to /
/// fail with EROFS and its emptyDir volume stays writable.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn read_only_root_filesystem() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    // What kubelet bind-mounts for an emptyDir: a fresh directory of the node.
    let empty_dir = containerd
        .base
        .join(format!("emptydir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&empty_dir);
    std::fs::create_dir_all(&empty_dir).expect("creating the emptyDir");
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-ro-root").await;
    let mut config = cri::container_config("ro", BUSYBOX_IMAGE, &["sleep", "3600"]);
    config.mounts = vec![cri::v1::Mount {
        container_path: "/scratch/data".into(),
        host_path: empty_dir.display().to_string(),
        ..Default::default()
    }];
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|linux| linux.security_context.as_mut())
    {
        context.readonly_rootfs = true;
    }
    let c = cri
        .create_container(&pod_id, &config, &pod)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log_tail()));
    cri.start_container(&c)
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", containerd.log_tail()));

    let r = cri
        .exec_sync(&c, &["touch", "/x"], 60)
        .await
        .expect("ExecSync of touch /x");
    assert_ne!(r.exit_code, 0, "/ is read-only");
    assert!(
        text(&r.stderr).contains("Read-only file system"),
        "touch /x fails with EROFS: {}",
        text(&r.stderr)
    );
    let r = cri
        .exec_sync(
            &c,
            &[
                "sh",
                "-c",
                "echo written > /scratch/data/f && cat /scratch/data/f",
            ],
            60,
        )
        .await
        .expect("ExecSync of the volume write");
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    assert_eq!(
        text(&r.stdout).trim(),
        "written",
        "the emptyDir is writable"
    );
    cri.teardown_pod(&pod_id).await;
    let _ = std::fs::remove_dir_all(&empty_dir);
    containerd.assert_no_leftovers(&kata);
}

/// Issue 12 item 4: the test containerd gives a privileged container the node's devices (an
/// operator's default, `privileged_without_host_devices = false`); in the pod VM it sees the
/// guest's own devices instead: every device node in its /dev is one the guest kernel has
/// (listed in the guest's /sys/dev), none of the node's (such as its /dev/kvm), and its device
/// cgroup lets it use them (it reads a guest drive).
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn privileged_container_sees_guest_devices_only() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "the node has /dev/kvm, a device the pod VM does not have"
    );
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let pod = pod::privileged_pod_config("kata-privileged-devices", &containerd);
    let pod_id = cri
        .run_pod(&pod, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let config = pod::privileged_root_container("privileged", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let c = cri
        .create_container(&pod_id, &config, &pod)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log_tail()));
    cri.start_container(&c)
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", containerd.log_tail()));

    let script = r#"
        for f in /dev/* /dev/*/* /dev/*/*/*; do
            case "$f" in /dev/pts/*) continue;; esac
            [ -L "$f" ] && continue
            if [ -b "$f" ]; then kind=block; elif [ -c "$f" ]; then kind=char; else continue; fi
            set -- $(stat -c '%t %T' "$f")
            number=$((0x$1)):$((0x$2))
            if [ -e "/sys/dev/$kind/$number" ]; then
                echo "guest $kind $f"
            else
                echo "foreign $kind $f $number"
            fi
        done
        for f in /dev/vd*; do
            [ -b "$f" ] && echo "read $f $(head -c 512 "$f" | wc -c)" && break
        done
        [ -e /dev/kvm ] && echo "node /dev/kvm"
        true
    "#;
    let r = cri
        .exec_sync(&c, &["sh", "-c", script], 60)
        .await
        .expect("ExecSync of the device listing");
    let out = text(&r.stdout);
    assert_eq!(r.exit_code, 0, "{out} {}", text(&r.stderr));
    let foreign: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("foreign") || l.starts_with("node"))
        .collect();
    assert!(
        foreign.is_empty(),
        "devices of the node in a pod VM's container: {foreign:?}\n{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("guest block /dev/vd")),
        "the guest's drives are the privileged container's devices: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("read /dev/vd") && l.ends_with(" 512")),
        "its device cgroup lets it read a guest drive: {out}"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

const MIB: u64 = 1 << 20;

/// The cgroup v2 path of every thread of `pid` (the `0::` line of /proc/PID/task/TID/cgroup).
fn thread_cgroups(pid: u32) -> Vec<(u32, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid: u32 = t.file_name().to_string_lossy().parse().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
            let path = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .to_string();
            Some((tid, path))
        })
        .collect()
}

/// A number from a cgroup file: the whole file, or the value of `key` in a flat-keyed one.
fn cgroup_value(dir: &std::path::Path, file: &str, key: Option<&str>) -> u64 {
    let text = std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("read {}/{file}: {e}", dir.display()));
    let value = match key {
        None => Some(text.trim()),
        Some(key) => text.lines().find_map(|l| {
            l.split_once(' ')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.trim())
        }),
    };
    value
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}/{file} {key:?}: {text:?}", dir.display()))
}

fn cpu_nanos(usage: Option<&cri::v1::CpuUsage>) -> u64 {
    usage
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value)
}

fn working_set(usage: Option<&cri::v1::MemoryUsage>) -> u64 {
    usage
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value)
}

/// Issue 15, item 2: the shim, the VMM and every VMM thread (vCPUs included) run in the pod's
/// host cgroup (the sandbox's cgroupsPath under kubelet's pod cgroup), so guest RAM and vCPU
/// time are charged to the pod: the cgroup's memory.current grows by what a container in the
/// guest touches, its cpu.stat by what the guest burns. The cgroup is gone with the pod.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn vmm_in_pod_cgroup() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let config = pod::with_pod_memory_limit(
        cri::pod_config("kata-cgroup", &containerd.log_dir()),
        512 << 20,
    );
    let pod_id = cri
        .run_pod(&config, containerd::KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let dir = pod::sandbox_cgroup_dir(&config, &pod_id);
    let expected = format!(
        "/{}",
        dir.strip_prefix("/sys/fs/cgroup")
            .expect("under root")
            .display()
    );
    let shims = containerd::pids_of(&kata.shim);
    let vmms = containerd::pids_of(&kata.vmm);
    assert_eq!(vmms.len(), 2, "the jail's parent and the VMM: {vmms:?}");
    assert!(!shims.is_empty(), "no shim process");
    let mut checked = 0;
    let mut outside = Vec::new();
    for pid in shims.iter().chain(&vmms) {
        for (tid, path) in thread_cgroups(*pid) {
            checked += 1;
            if path != expected {
                outside.push(format!("{pid}/{tid} in {path}"));
            }
        }
    }
    assert!(
        outside.is_empty(),
        "threads outside the pod cgroup {expected}: {outside:#?}"
    );
    assert!(checked >= shims.len() + 4, "threads checked: {checked}");
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
    println!("pod cgroup {}: processes {procs:?}", dir.display());

    // Guest memory: a container touches 200 MiB.
    let memory_before = cgroup_value(&dir, "memory.current", None);
    let hog = pod::memhog_container("hog", 200, 300);
    let hog = pod::start_container(&mut cri, &pod_id, &config, &hog).await;
    pod::wait_for_stdout_line(&mut cri, &hog, "allocated 200 MiB", EXIT_LIMIT).await;
    let memory_after = cgroup_value(&dir, "memory.current", None);
    println!(
        "pod cgroup memory.current: {} MiB before, {} MiB after the guest touched 200 MiB",
        memory_before / MIB,
        memory_after / MIB
    );
    assert!(
        memory_after >= memory_before + 150 * MIB,
        "guest RAM is not charged to the pod: {memory_before} -> {memory_after}"
    );

    // Guest CPU: a busy loop in the container, measured by the guest (the container's own
    // cgroup through ContainerStats) and by the host (the pod cgroup's cpu.stat).
    let guest_before = cpu_nanos(cri.container_stats(&hog).await.expect("stats").cpu.as_ref());
    let host_before = cgroup_value(&dir, "cpu.stat", Some("usage_usec"));
    let busy = cri
        .exec_sync(
            &hog,
            &["timeout", "3", "sh", "-c", "while :; do :; done"],
            120,
        )
        .await
        .expect("busy loop");
    println!("busy loop exit {}", busy.exit_code);
    let guest_after = cpu_nanos(cri.container_stats(&hog).await.expect("stats").cpu.as_ref());
    let host_after = cgroup_value(&dir, "cpu.stat", Some("usage_usec"));
    let (guest_usec, host_usec) = (
        (guest_after - guest_before) / 1000,
        host_after - host_before,
    );
    println!("CPU of the busy loop: guest {guest_usec} us, pod cgroup on the host {host_usec} us");
    assert!(
        guest_usec > 500_000,
        "the guest did not burn CPU: {guest_usec} us"
    );
    assert!(
        host_usec >= guest_usec / 2,
        "the guest's CPU time is not charged to the pod: guest {guest_usec} us, host {host_usec} us"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
    assert!(!dir.exists(), "{} outlived the pod", dir.display());
}

/// One pod's stats through CRI, for the side-by-side table.
#[derive(Debug, Default)]
struct PodFigures {
    container_cpu_ns: u64,
    container_working_set: u64,
    container_writable_layer: Option<u64>,
    listed_cpu_ns: u64,
    listed_working_set: u64,
    pod_cpu_ns: u64,
    pod_working_set: u64,
    pod_rx: u64,
    pod_tx: u64,
    pod_containers: usize,
}

async fn pod_figures(cri: &mut Cri, pod_id: &str, container: &str) -> PodFigures {
    let stats = cri
        .container_stats(container)
        .await
        .expect("ContainerStats");
    let listed = cri
        .list_container_stats(pod_id)
        .await
        .expect("ListContainerStats");
    let listed = listed
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == container))
        .unwrap_or_else(|| panic!("ListContainerStats lacks {container}: {listed:?}"));
    let pod = cri.pod_sandbox_stats(pod_id).await.unwrap_or_else(|e| {
        panic!("PodSandboxStats of {pod_id}: {e}");
    });
    let linux = pod.linux.unwrap_or_default();
    let interface = linux
        .network
        .as_ref()
        .and_then(|n| n.default_interface.clone())
        .unwrap_or_default();
    PodFigures {
        container_cpu_ns: cpu_nanos(stats.cpu.as_ref()),
        container_working_set: working_set(stats.memory.as_ref()),
        container_writable_layer: stats
            .writable_layer
            .as_ref()
            .and_then(|w| w.used_bytes.as_ref())
            .map(|v| v.value),
        listed_cpu_ns: cpu_nanos(listed.cpu.as_ref()),
        listed_working_set: working_set(listed.memory.as_ref()),
        pod_cpu_ns: cpu_nanos(linux.cpu.as_ref()),
        pod_working_set: working_set(linux.memory.as_ref()),
        pod_rx: interface.rx_bytes.map_or(0, |v| v.value),
        pod_tx: interface.tx_bytes.map_or(0, |v| v.value),
        pod_containers: linux.containers.len(),
    }
}

/// Issue 15, item 3: a kata-like pod's CRI stats are filled like a runc pod's, from the right
/// processes: ContainerStats and ListContainerStats (the container's guest cgroup), and
/// PodSandboxStats (containerd reads the pod cgroup, now holding the VMM with guest RAM and
/// vCPUs, and the pod's eth0 in its network namespace, which our TAP redirect feeds). Each pod
/// runs a container holding 100 MiB, then burns CPU and is pinged; both pods' figures are
/// printed side by side and every field runc fills must be filled and sane for kata-like.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn pod_stats_like_runc() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let mut rows = Vec::new();
    let mut pods = Vec::new();
    for handler in ["runc", containerd::KATA_RUNTIME_HANDLER] {
        let config = pod::with_pod_memory_limit(
            cri::pod_config(&format!("stats-{handler}"), &containerd.log_dir()),
            512 << 20,
        );
        let pod_id = cri
            .run_pod(&config, handler)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {handler}: {e}\n{}", containerd.log_tail()));
        let hog = pod::memhog_container("hog", 100, 256);
        let hog = pod::start_container(&mut cri, &pod_id, &config, &hog).await;
        pod::wait_for_stdout_line(&mut cri, &hog, "allocated 100 MiB", EXIT_LIMIT).await;
        let ip = pod::pod_ip(&mut cri, &pod_id).await;
        let before = pod_figures(&mut cri, &pod_id, &hog).await;
        cri.exec_sync(
            &hog,
            &["timeout", "2", "sh", "-c", "while :; do :; done"],
            120,
        )
        .await
        .expect("busy loop");
        let ping = containerd
            .host_net_command("busybox")
            .args(["ping", "-c", "10", "-s", "1000", &ip])
            .output()
            .expect("busybox ping");
        assert!(ping.status.success(), "ping {ip}: {}", text(&ping.stdout));
        let after = pod_figures(&mut cri, &pod_id, &hog).await;
        rows.push((handler, before, after));
        pods.push(pod_id);
    }
    println!(
        "{:<28} {:>16} {:>16}",
        "after load and ping", "runc", "kata-like"
    );
    let (runc, kata_like) = (&rows[0].2, &rows[1].2);
    for (name, r, k) in [
        (
            "container cpu ns",
            runc.container_cpu_ns,
            kata_like.container_cpu_ns,
        ),
        (
            "container working set",
            runc.container_working_set,
            kata_like.container_working_set,
        ),
        ("listed cpu ns", runc.listed_cpu_ns, kata_like.listed_cpu_ns),
        (
            "listed working set",
            runc.listed_working_set,
            kata_like.listed_working_set,
        ),
        ("pod cpu ns", runc.pod_cpu_ns, kata_like.pod_cpu_ns),
        (
            "pod working set",
            runc.pod_working_set,
            kata_like.pod_working_set,
        ),
        ("pod rx bytes", runc.pod_rx, kata_like.pod_rx),
        ("pod tx bytes", runc.pod_tx, kata_like.pod_tx),
        (
            "pod containers",
            runc.pod_containers as u64,
            kata_like.pod_containers as u64,
        ),
    ] {
        println!("{name:<28} {r:>16} {k:>16}");
    }
    println!(
        "{:<28} {:>16?} {:>16?}",
        "container writable layer",
        runc.container_writable_layer,
        kata_like.container_writable_layer
    );
    for (handler, before, after) in &rows {
        let what = |field: &str| format!("{handler}: {field} (before {before:?}, after {after:?})");
        assert!(
            after.container_cpu_ns > before.container_cpu_ns,
            "{}",
            what("container CPU grows")
        );
        assert!(
            after.listed_cpu_ns > before.listed_cpu_ns,
            "{}",
            what("listed CPU grows")
        );
        assert!(
            after.pod_cpu_ns > before.pod_cpu_ns,
            "{}",
            what("pod CPU grows")
        );
        assert!(
            (90 * MIB..=256 * MIB).contains(&after.container_working_set),
            "{}",
            what("container working set near 100 MiB, within its 256 MiB limit")
        );
        assert!(
            (90 * MIB..=256 * MIB).contains(&after.listed_working_set),
            "{}",
            what("listed working set")
        );
        assert!(
            after.pod_working_set >= after.container_working_set,
            "{}",
            what("the pod's working set holds its container's")
        );
        assert!(
            after.pod_rx >= before.pod_rx + 5000,
            "{}",
            what("pod rx grows by the pings")
        );
        assert!(
            after.pod_tx >= before.pod_tx + 5000,
            "{}",
            what("pod tx grows by the replies")
        );
        assert_eq!(
            after.pod_containers,
            1,
            "{}",
            what("the pod's container is listed")
        );
        assert!(
            after.container_writable_layer.is_some(),
            "{}",
            what("writable layer")
        );
    }
    for pod_id in pods {
        cri.teardown_pod(&pod_id).await;
    }
    containerd.assert_no_leftovers(&kata);
}
