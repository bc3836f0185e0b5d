//! End-to-end volume tests through containerd's CRI (issue 14): configMap, secret and
//! projected (service-account token) volumes as kubelet writes them on the node (its
//! AtomicWriter layout, `tests/src/atomic_writer.rs`), with their live updates, and a memory
//! emptyDir bounded by its sizeLimit and kept for the pod's lifetime.

// Each test holds the shared containerd's lock for its whole run (tests must not overlap: they
// count VMMs and check for leftovers); every test has its own single-threaded runtime, so
// holding a std lock across its awaits blocks nothing else.
#![allow(clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_like_tests::atomic_writer::{AtomicVolumeDir, PayloadFile};
use kata_like_tests::containerd::{Containerd, BUSYBOX_IMAGE, VSOCK_PROBE_IMAGE};
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod;

/// How long a condition the test waits for may take under the nested test host's emulation
/// (a bound against hanging, not a measurement: the update latency is printed).
const WAIT_LIMIT: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// kubelet's directory of a pod's volume of plugin `plugin` (`kubernetes.io~configmap`, ...).
fn kubelet_volume_dir(containerd: &Containerd, pod_uid: &str, plugin: &str, name: &str) -> PathBuf {
    containerd
        .base
        .join("kubelet/pods")
        .join(pod_uid)
        .join("volumes")
        .join(plugin)
        .join(name)
}

fn pod_uid(config: &cri::v1::PodSandboxConfig) -> String {
    config.metadata.as_ref().expect("metadata").uid.clone()
}

fn volume_mount(container_path: &str, host_path: &Path, readonly: bool) -> cri::v1::Mount {
    cri::v1::Mount {
        container_path: container_path.into(),
        host_path: host_path.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// `sh -c script` in the container: its stdout, or a panic with its stderr.
async fn sh(cri: &mut Cri, container: &str, script: &str) -> String {
    cri.exec_sh(container, script).await
}

/// Polls `script`'s output in the container until `done` accepts it; returns it and how long
/// it took.
async fn wait_for(
    cri: &mut Cri,
    container: &str,
    script: &str,
    done: impl Fn(&str) -> bool,
) -> (String, Duration) {
    let started = Instant::now();
    loop {
        let out = match cri.exec_sync(container, &["sh", "-c", script], 60).await {
            Ok(r) => text(&r.stdout) + &text(&r.stderr),
            Err(e) => e.to_string(),
        };
        if done(&out) {
            return (out, started.elapsed());
        }
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "{script:?} still says {out:?} after {WAIT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The container's stdout lines so far.
fn stdout_lines(log_path: &str) -> Vec<String> {
    cri::stream_lines(&cri::read_log(Path::new(log_path)), "stdout")
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
async fn configmap_keys_and_live_update() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-configmap").await;
    let dir = kubelet_volume_dir(
        &containerd,
        &pod_uid(&pod),
        "kubernetes.io~configmap",
        "app-config",
    );
    let volume = AtomicVolumeDir::create(
        &dir,
        &[
            PayloadFile::new("app.conf", "color=blue\n"),
            PayloadFile::new("nested/level.txt", "deep\n"),
        ],
    );
    let first = volume.generation();

    // The application: a watcher of the volume, as a reloading server has.
    let mut config =
        cri::container_config("app", VSOCK_PROBE_IMAGE, &["inotify-watch", "/etc/config"]);
    config.mounts = vec![volume_mount("/etc/config", &dir, true)];
    let c = pod::start_container(&mut cri, &pod_id, &pod, &config).await;
    let log_path = cri.container_status(&c).await.log_path;

    // kubelet's exact layout: keys are symlinks through ..data to the generation.
    assert_eq!(
        sh(&mut cri, &c, "cat /etc/config/app.conf").await,
        "color=blue\n"
    );
    assert_eq!(
        sh(&mut cri, &c, "cat /etc/config/nested/level.txt").await,
        "deep\n"
    );
    assert_eq!(
        sh(&mut cri, &c, "readlink /etc/config/app.conf")
            .await
            .trim(),
        "..data/app.conf"
    );
    assert_eq!(
        sh(&mut cri, &c, "readlink /etc/config/..data").await.trim(),
        first
    );
    assert_eq!(
        sh(&mut cri, &c, "ls -a /etc/config | sort | tr '\\n' ' '")
            .await
            .trim(),
        format!(". .. {first} ..data app.conf nested")
    );
    let listing = sh(&mut cri, &c, "stat -c '%a %n' /etc/config/..data/app.conf").await;
    assert_eq!(listing.trim(), "644 /etc/config/..data/app.conf");
    // Read-only for the container, as kubelet mounts it.
    let r = cri
        .exec_sync(&c, &["sh", "-c", "echo x > /etc/config/new"], 60)
        .await
        .expect("ExecSync");
    assert_ne!(r.exit_code, 0, "the volume is read-only");

    // The watcher is up before the update.
    let started = Instant::now();
    while !stdout_lines(&log_path)
        .iter()
        .any(|l| l == "watching /etc/config")
    {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "inotify-watch did not start: {:?}",
            stdout_lines(&log_path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kubelet's update: a changed key, a vanished one, a new one.
    let second = volume.write(&[
        PayloadFile::new("app.conf", "color=green\n"),
        PayloadFile::new("added", "new key\n"),
    ]);
    let (_, latency) = wait_for(&mut cri, &c, "cat /etc/config/app.conf", |out| {
        out == "color=green\n"
    })
    .await;
    eprintln!("configmap update visible in the container after {latency:?}");
    assert_eq!(
        sh(&mut cri, &c, "readlink /etc/config/..data").await.trim(),
        second
    );
    assert_eq!(sh(&mut cri, &c, "cat /etc/config/added").await, "new key\n");
    assert_eq!(
        sh(&mut cri, &c, "ls -a /etc/config | sort | tr '\\n' ' '")
            .await
            .trim(),
        format!(". .. {second} ..data added app.conf"),
        "the old generation and the vanished key are gone"
    );
    // The container's watcher saw the swap as on a node: ..data moved into place.
    let started = Instant::now();
    while !stdout_lines(&log_path)
        .iter()
        .any(|l| l == "moved_to\t..data")
    {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "the watcher never saw ..data move: {:?}",
            stdout_lines(&log_path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A volume with a symlink out of it is refused when the container's task is created
    // (containerd's CRI creates it at StartContainer), naming it; the pod and its running
    // container are unaffected.
    let evil = kubelet_volume_dir(
        &containerd,
        &pod_uid(&pod),
        "kubernetes.io~configmap",
        "evil",
    );
    AtomicVolumeDir::create(&evil, &[PayloadFile::new("ok", "1")]);
    std::os::unix::fs::symlink("/etc", evil.join("host-etc")).expect("symlink");
    let mut bad = cri::container_config("bad", BUSYBOX_IMAGE, &["sleep", "3600"]);
    bad.mounts = vec![volume_mount("/etc/evil", &evil, true)];
    let bad = cri
        .create_container(&pod_id, &bad, &pod)
        .await
        .expect("CreateContainer (containerd's metadata only)");
    let err = cri
        .start_container(&bad)
        .await
        .expect_err("a volume with a symlink to /etc must be refused");
    assert!(err.message().contains("host-etc"), "{err}");
    assert_eq!(
        sh(&mut cri, &c, "cat /etc/config/app.conf").await,
        "color=green\n"
    );

    // Updates stop with the volume: the container's deletion leaves nothing behind.
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
async fn secret_and_service_account_token_volume() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-secret").await;
    let uid = pod_uid(&pod);
    // A secret with defaultMode 0440 and fsGroup 2000, as kubelet writes it.
    let secret_dir = kubelet_volume_dir(&containerd, &uid, "kubernetes.io~secret", "db-creds");
    AtomicVolumeDir::create(
        &secret_dir,
        &[PayloadFile {
            path: "password".into(),
            content: b"s3cret".to_vec(),
            mode: 0o440,
            owner: Some((0, 2000)),
        }],
    );
    // The service-account token: kubelet's projected volume kube-api-access-*.
    let token_dir = kubelet_volume_dir(
        &containerd,
        &uid,
        "kubernetes.io~projected",
        "kube-api-access-x7k2p",
    );
    let sa_payload = |token: &str| {
        [
            PayloadFile::new("token", token),
            PayloadFile::new(
                "ca.crt",
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            ),
            PayloadFile::new("namespace", "default"),
        ]
    };
    let token_volume = AtomicVolumeDir::create(&token_dir, &sa_payload("token-1"));

    // A non-root container in the fsGroup, as a pod with securityContext.fsGroup runs.
    let mut config = cri::container_config("app", BUSYBOX_IMAGE, &["sleep", "3600"]);
    if let Some(context) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        context.run_as_user = Some(cri::v1::Int64Value { value: 1000 });
        context.supplemental_groups = vec![2000];
    }
    config.mounts = vec![
        volume_mount("/etc/db", &secret_dir, true),
        volume_mount(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            &token_dir,
            true,
        ),
    ];
    let c = pod::start_container(&mut cri, &pod_id, &pod, &config).await;

    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    assert_eq!(
        sh(&mut cri, &c, &format!("cat {sa}/token")).await,
        "token-1"
    );
    assert_eq!(
        sh(&mut cri, &c, &format!("cat {sa}/namespace")).await,
        "default"
    );
    assert!(sh(&mut cri, &c, &format!("cat {sa}/ca.crt"))
        .await
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        sh(&mut cri, &c, &format!("readlink {sa}/token"))
            .await
            .trim(),
        "..data/token"
    );
    // The secret keeps its mode and group, and the fsGroup member reads it.
    assert_eq!(
        sh(&mut cri, &c, "stat -L -c '%a %u %g' /etc/db/password")
            .await
            .trim(),
        "440 0 2000"
    );
    assert_eq!(sh(&mut cri, &c, "cat /etc/db/password").await, "s3cret");

    // Token rotation: kubelet rewrites the projected volume; the new token arrives.
    let rotated = token_volume.write(&sa_payload("token-2"));
    let (_, latency) = wait_for(&mut cri, &c, &format!("cat {sa}/token"), |out| {
        out == "token-2"
    })
    .await;
    eprintln!("token rotation visible in the container after {latency:?}");
    assert_eq!(
        sh(&mut cri, &c, &format!("readlink {sa}/..data"))
            .await
            .trim(),
        rotated
    );
    assert_eq!(
        sh(&mut cri, &c, &format!("cat {sa}/namespace")).await,
        "default"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// Mounts a tmpfs as kubelet does for an emptyDir with `medium: Memory` and a sizeLimit.
fn mount_memory_empty_dir(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).expect("mkdir emptyDir");
    let status = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0777"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .expect("mount");
    assert!(
        status.success(),
        "mounting the emptyDir's tmpfs on {}",
        dir.display()
    );
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
async fn emptydir_memory_size_limit() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-emptydir").await;
    let dir = kubelet_volume_dir(
        &containerd,
        &pod_uid(&pod),
        "kubernetes.io~empty-dir",
        "cache",
    );
    mount_memory_empty_dir(&dir, "4m");

    let with_cache = |name: &str, attempt: u32| {
        let mut config = cri::container_config(name, BUSYBOX_IMAGE, &["sleep", "3600"]);
        if let Some(metadata) = config.metadata.as_mut() {
            metadata.attempt = attempt;
        }
        config.mounts = vec![volume_mount("/cache", &dir, false)];
        config
    };
    let writer = pod::start_container(&mut cri, &pod_id, &pod, &with_cache("writer", 0)).await;
    let reader = pod::start_container(&mut cri, &pod_id, &pod, &with_cache("reader", 0)).await;

    // Bounded by its sizeLimit: a tmpfs of 4 MiB in the guest.
    let df = sh(&mut cri, &writer, "df -k /cache | tail -n1").await;
    let total_kib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("df: {df}"));
    assert_eq!(total_kib, 4096, "{df}");
    let r = cri
        .exec_sync(
            &writer,
            &["sh", "-c", "dd if=/dev/zero of=/cache/big bs=1M count=8"],
            60,
        )
        .await
        .expect("ExecSync dd");
    assert_ne!(r.exit_code, 0, "8 MiB do not fit a 4 MiB emptyDir");
    assert!(
        text(&r.stderr).contains("No space left"),
        "{}",
        text(&r.stderr)
    );
    sh(
        &mut cri,
        &writer,
        "rm /cache/big; echo kept > /cache/marker; stat -c %a /cache",
    )
    .await;

    // Shared by the pod's containers.
    assert_eq!(sh(&mut cri, &reader, "cat /cache/marker").await, "kept\n");

    // Kept for the pod's lifetime: every container gone, a restarted one finds it.
    for c in [&writer, &reader] {
        cri.stop_container(c, 5).await.expect("StopContainer");
        cri.remove_container(c).await.expect("RemoveContainer");
    }
    let restarted = pod::start_container(&mut cri, &pod_id, &pod, &with_cache("writer", 1)).await;
    assert_eq!(
        sh(&mut cri, &restarted, "cat /cache/marker").await,
        "kept\n"
    );

    cri.teardown_pod(&pod_id).await;
    let _ = std::process::Command::new("umount").arg(&dir).status();
    containerd.assert_no_leftovers(&kata);
}
