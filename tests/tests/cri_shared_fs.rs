//! End-to-end tests of the pod's shared file system (virtio-fs: the VMM's vhost-user-fs device
//! on a per-pod virtiofsd) through containerd's CRI: a hostPath volume is the host's directory
//! itself, both ways; a symlink in it never reaches past it on the host; an emptyDir (kubelet's
//! directory on the node's disk) is shared by the pod's containers and outlives their restarts.
//! Host-side files are checked by the test directly.

// Each test holds the shared containerd's lock for its whole run (tests must not overlap: they
// count VMMs and check for leftovers); every test has its own single-threaded runtime, so
// holding a std lock across its awaits blocks nothing else.
#![allow(clippy::await_holding_lock)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kata_like_tests::containerd::{Containerd, BUSYBOX_IMAGE};
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh host directory under the test's containerd base (what kubelet hands over).
fn host_dir(containerd: &Containerd, name: &str) -> PathBuf {
    let dir = containerd
        .base
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the host directory");
    dir
}

fn volume(container_path: &str, host: &Path, readonly: bool) -> cri::v1::Mount {
    cri::v1::Mount {
        container_path: container_path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// A busybox container that sleeps, with `mounts`, running as root (it chowns).
fn sleeper(name: &str, mounts: Vec<cri::v1::Mount>) -> cri::v1::ContainerConfig {
    let mut config = cri::container_config(name, BUSYBOX_IMAGE, &["sleep", "3600"]);
    config.mounts = mounts;
    config
}

/// Runs `script` with sh in container `c`; returns stdout, failing the test on a non-zero exit.
async fn sh(cri: &mut Cri, c: &str, script: &str) -> String {
    cri.exec_sh(c, script).await
}

/// Runs `script`, which must fail; returns stdout and stderr.
async fn sh_fails(cri: &mut Cri, c: &str, script: &str) -> String {
    let r = cri
        .exec_sync(c, &["sh", "-c", script], 60)
        .await
        .unwrap_or_else(|e| panic!("ExecSync {script:?}: {e}"));
    assert_ne!(r.exit_code, 0, "{script:?} must fail: {}", text(&r.stdout));
    format!("{}{}", text(&r.stdout), text(&r.stderr))
}

/// Issue 14 item 1: a read-write hostPath is the host directory itself. Every change either
/// side makes (create, write, rename, delete, chmod, chown, mtime, empty directories) is what
/// the other side sees next; a read-only hostPath stays read-only in the guest.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn hostpath_rw_both_ways() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let host = host_dir(&containerd, "hostpath-rw");
    std::fs::write(host.join("from-host"), "host v1\n").expect("write from-host");
    std::fs::create_dir(host.join("empty-from-host")).expect("mkdir empty-from-host");
    let ro_host = host_dir(&containerd, "hostpath-ro");
    std::fs::write(ro_host.join("kept"), "read only\n").expect("write kept");

    let (pod_id, pod_config) = pod::run_kata_pod(&mut cri, &containerd, "kata-hostpath").await;
    let c = cri
        .create_container(
            &pod_id,
            &sleeper(
                "rw",
                vec![volume("/data", &host, false), volume("/ro", &ro_host, true)],
            ),
            &pod_config,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log_tail()));
    cri.start_container(&c).await.expect("StartContainer");

    // Host -> guest: a file and an empty directory made before the pod.
    assert_eq!(sh(&mut cri, &c, "cat /data/from-host").await, "host v1\n");
    sh(&mut cri, &c, "test -d /data/empty-from-host").await;

    // Guest -> host: create, write, mkdir.
    sh(
        &mut cri,
        &c,
        "echo guest v1 > /data/from-guest && mkdir /data/empty-from-guest",
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(host.join("from-guest")).expect("host reads from-guest"),
        "guest v1\n"
    );
    assert!(host.join("empty-from-guest").is_dir());

    // Host writes after the guest read: the guest reads the new content (no stale cache).
    std::fs::write(host.join("from-host"), "host v2, longer\n").expect("rewrite from-host");
    assert_eq!(
        sh(&mut cri, &c, "cat /data/from-host").await,
        "host v2, longer\n"
    );
    // Guest writes after the host read: the host reads the new content.
    sh(&mut cri, &c, "echo guest v2 >> /data/from-guest").await;
    assert_eq!(
        std::fs::read_to_string(host.join("from-guest")).expect("host rereads from-guest"),
        "guest v1\nguest v2\n"
    );

    // Rename and delete, both ways.
    sh(&mut cri, &c, "mv /data/from-guest /data/renamed-by-guest").await;
    assert!(!host.join("from-guest").exists());
    assert!(host.join("renamed-by-guest").is_file());
    std::fs::rename(host.join("from-host"), host.join("renamed-by-host")).expect("host rename");
    sh(
        &mut cri,
        &c,
        "test ! -e /data/from-host && cat /data/renamed-by-host",
    )
    .await;
    std::fs::remove_file(host.join("renamed-by-guest")).expect("host delete");
    sh(&mut cri, &c, "test ! -e /data/renamed-by-guest").await;
    sh(&mut cri, &c, "rm /data/renamed-by-host").await;
    assert!(!host.join("renamed-by-host").exists());

    // chmod and chown from the guest land on the host.
    sh(
        &mut cri,
        &c,
        "echo m > /data/modes && chmod 640 /data/modes && chown 1234:2345 /data/modes",
    )
    .await;
    let meta = std::fs::metadata(host.join("modes")).expect("stat modes");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    // chmod and mtime from the host reach the guest.
    std::fs::set_permissions(host.join("modes"), std::fs::Permissions::from_mode(0o604))
        .expect("host chmod");
    let mtime = 1_000_000_000; // 2001-09-09
    let status = std::process::Command::new("touch")
        .arg("-m")
        .arg("-d")
        .arg(format!("@{mtime}"))
        .arg(host.join("modes"))
        .status()
        .expect("touch");
    assert!(status.success());
    assert_eq!(
        sh(&mut cri, &c, "stat -c '%a %u %g %Y' /data/modes")
            .await
            .trim(),
        format!("604 1234 2345 {mtime}")
    );

    // The read-only hostPath: readable, not writable, the host file untouched.
    assert_eq!(sh(&mut cri, &c, "cat /ro/kept").await, "read only\n");
    let refused = sh_fails(&mut cri, &c, "echo x > /ro/kept").await;
    assert!(refused.contains("Read-only file system"), "{refused}");
    let refused = sh_fails(&mut cri, &c, "touch /ro/new").await;
    assert!(refused.contains("Read-only file system"), "{refused}");
    assert_eq!(
        std::fs::read_to_string(ro_host.join("kept")).expect("read kept"),
        "read only\n"
    );

    cri.teardown_pod(&pod_id).await;
    // The pod is gone; the host's files stay (they are the host's), and nothing of the shared
    // file system is left (mounts, virtiofsd).
    assert!(host.join("modes").is_file());
    containerd.assert_no_leftovers(&kata);
    let _ = std::fs::remove_dir_all(&host);
    let _ = std::fs::remove_dir_all(&ro_host);
}

/// Issue 14, bad input: symlinks in a hostPath resolve in the guest, never on the host. A link
/// to an absolute host path or one that climbs out with `../` shows the guest's view (here:
/// nothing), and writing through it changes no host file; a link inside the volume works.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn hostpath_symlink_escape_refused() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let host = host_dir(&containerd, "hostpath-links");
    // A host file next to the volume, outside it: it must stay out of the pod's reach.
    let secret = containerd
        .base
        .join(format!("host-secret-{}", std::process::id()));
    std::fs::write(&secret, "HOST SECRET\n").expect("write the host secret");
    let secret_name = secret.file_name().and_then(|n| n.to_str()).expect("name");
    std::fs::write(host.join("inside"), "inside the volume\n").expect("write inside");
    std::os::unix::fs::symlink(&secret, host.join("absolute")).expect("absolute link");
    std::os::unix::fs::symlink(format!("../{secret_name}"), host.join("climbing"))
        .expect("climbing link");
    std::os::unix::fs::symlink("/etc/shadow", host.join("shadow")).expect("shadow link");
    std::os::unix::fs::symlink("inside", host.join("relative")).expect("relative link");

    let (pod_id, pod_config) = pod::run_kata_pod(&mut cri, &containerd, "kata-links").await;
    let c = pod::start_container(
        &mut cri,
        &pod_id,
        &pod_config,
        &sleeper("links", vec![volume("/data", &host, false)]),
    )
    .await;

    // The links are shared as links (what they say is the host's text)...
    assert_eq!(
        sh(&mut cri, &c, "readlink /data/absolute").await.trim(),
        secret.display().to_string()
    );
    assert_eq!(
        sh(&mut cri, &c, "readlink /data/climbing").await.trim(),
        format!("../{secret_name}")
    );
    // ...and resolve in the guest: a link inside the volume reads the volume's file; the
    // escaping ones never read the host's.
    assert_eq!(
        sh(&mut cri, &c, "cat /data/relative").await,
        "inside the volume\n"
    );
    for link in ["absolute", "climbing", "shadow"] {
        let r = cri
            .exec_sync(&c, &["cat", &format!("/data/{link}")], 60)
            .await
            .expect("ExecSync cat");
        assert!(
            !text(&r.stdout).contains("HOST SECRET") && !text(&r.stdout).contains("root:"),
            "/data/{link} must not read a host file: {}",
            text(&r.stdout)
        );
    }
    // The shared file system's root is the pod's volumes only: climbing out of the volume in
    // the guest ends in the guest's own tree.
    let listing = sh(&mut cri, &c, "ls /data/../").await;
    assert!(
        !listing.contains(secret_name),
        "the guest sees the host directory around the volume: {listing}"
    );
    // Writing through an escaping link (the guest creates the target in its own tree) and
    // a guest-made link to the host's path change nothing on the host.
    let _ = cri
        .exec_sync(
            &c,
            &[
                "sh",
                "-c",
                "echo overwritten > /data/climbing; echo overwritten > /data/absolute; \
                 ln -s ../../../../../../../../etc /data/guest-link; ls /data/guest-link/",
            ],
            60,
        )
        .await
        .expect("ExecSync of the writes through links");
    assert_eq!(
        std::fs::read_to_string(&secret).expect("read the host secret"),
        "HOST SECRET\n"
    );
    // The climbing write landed in the guest's own tree, not next to the volume on the host.
    assert_eq!(
        sh(&mut cri, &c, &format!("cat /{secret_name}")).await,
        "overwritten\n"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
    let _ = std::fs::remove_dir_all(&host);
    let _ = std::fs::remove_file(&secret);
}

/// Issue 14 item 3: an emptyDir (kubelet's directory on the node's disk) is shared by the
/// pod's containers, lives on the node's disk (not in guest RAM) and outlives container
/// restarts: a container created after every container that mounted it was removed finds
/// what they wrote.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn emptydir_shared_and_survives_restart() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let empty_dir = host_dir(&containerd, "emptydir");
    let (pod_id, pod_config) = pod::run_kata_pod(&mut cri, &containerd, "kata-emptydir").await;
    let writer = pod::start_container(
        &mut cri,
        &pod_id,
        &pod_config,
        &sleeper("writer", vec![volume("/cache", &empty_dir, false)]),
    )
    .await;
    let reader = pod::start_container(
        &mut cri,
        &pod_id,
        &pod_config,
        &sleeper("reader", vec![volume("/shared", &empty_dir, false)]),
    )
    .await;
    sh(
        &mut cri,
        &writer,
        "echo from writer > /cache/note && dd if=/dev/zero of=/cache/blob bs=1M count=8 2>/dev/null",
    )
    .await;
    assert_eq!(
        sh(&mut cri, &reader, "cat /shared/note").await,
        "from writer\n"
    );
    sh(&mut cri, &reader, "echo from reader > /shared/reply").await;
    assert_eq!(
        sh(&mut cri, &writer, "cat /cache/reply").await,
        "from reader\n"
    );
    // On the node's disk: the bytes are in kubelet's directory.
    assert_eq!(
        std::fs::metadata(empty_dir.join("blob"))
            .expect("blob on the node")
            .len(),
        8 << 20
    );

    // Every container that mounts it goes (a restart of both), then a new one comes.
    for c in [&writer, &reader] {
        cri.stop_container(c, 5).await.expect("StopContainer");
        cri.remove_container(c).await.expect("RemoveContainer");
    }
    let restarted = pod::start_container(
        &mut cri,
        &pod_id,
        &pod_config,
        &sleeper("writer-2", vec![volume("/cache", &empty_dir, false)]),
    )
    .await;
    assert_eq!(
        sh(&mut cri, &restarted, "cat /cache/note /cache/reply").await,
        "from writer\nfrom reader\n"
    );
    assert_eq!(
        sh(&mut cri, &restarted, "stat -c %s /cache/blob")
            .await
            .trim(),
        (8u64 << 20).to_string()
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
    let _ = std::fs::remove_dir_all(&empty_dir);
}
