//! The node tool end to end (issue 15 items 4 and 5): `kata-like install` registers kata-like with
//! a containerd that did not have it, a pod runs through CRI, `kata-like uninstall` leaves
//! containerd's configuration byte-identical; `kata-like check` explains what stops a node.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kata_like_tests::containerd::{Containerd, KataArtifacts, BUSYBOX_IMAGE, KATA_RUNTIME_HANDLER};
use kata_like_tests::cri::{self, Cri};

fn tool() -> PathBuf {
    kata_like_tests::artifact("KATA_LIKE_TOOL")
}

/// The install payload, made by the repository's own script from the artifacts under test.
fn build_payload(dir: &Path) -> PathBuf {
    let out = dir.join("payload");
    let status = Command::new(kata_like_tests::repo_root().join("deploy/build-payload"))
        .arg(&out)
        .status()
        .expect("run deploy/build-payload");
    assert!(status.success(), "deploy/build-payload failed");
    out
}

fn kata_like(args: &[&str], extra: &[&Path]) -> Output {
    let mut cmd = Command::new(tool());
    cmd.args(args);
    cmd.args(extra);
    let out = cmd.output().expect("run kata-like");
    println!(
        "$ kata-like {args:?} {extra:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A CRI client once containerd's CRI plugin has initialized after a (re)start: until then
/// every call fails with "server is not initialized yet".
async fn cri_when_ready(containerd: &Containerd) -> Cri {
    let start = std::time::Instant::now();
    loop {
        let mut cri = Cri::connect(&containerd.socket).await;
        let status = cri
            .runtime
            .status(cri::v1::StatusRequest { verbose: false })
            .await;
        match status {
            Ok(_) => return cri,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(120),
                "containerd's CRI did not initialize: {e}\n{}",
                containerd.log_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn run_pod_with_output(
    cri: &mut Cri,
    containerd: &Containerd,
    marker: &str,
) -> Result<String, String> {
    let config = cri::pod_config("installed", &containerd.log_dir());
    let pod = cri
        .run_pod(&config, KATA_RUNTIME_HANDLER)
        .await
        .map_err(|e| e.message().to_string())?;
    let result = async {
        let container = cri
            .create_container(
                &pod,
                &cri::container_config("echo", BUSYBOX_IMAGE, &["echo", marker]),
                &config,
            )
            .await
            .map_err(|e| e.message().to_string())?;
        cri.start_container(&container)
            .await
            .map_err(|e| e.message().to_string())?;
        let status = cri.wait_exited(&container, Duration::from_secs(120)).await;
        let log = cri::read_log(Path::new(&status.log_path));
        Ok(cri::stream_lines(&log, "stdout").join("\n"))
    }
    .await;
    cri.teardown_pod(&pod).await;
    result
}

/// Runs `kata-like ARGS PATHS --restart-command "kill <containerd>"`, which must succeed, then
/// starts containerd again as its service manager would after the kill.
fn restarting(containerd: &mut Containerd, args: &[&str], paths: &[&Path]) {
    let restart = format!("kill {}", containerd.pid().expect("containerd runs"));
    let restart_args = [Path::new("--restart-command"), Path::new(&restart)];
    let all: Vec<&Path> = paths.iter().copied().chain(restart_args).collect();
    let out = kata_like(args, &all);
    assert!(
        out.status.success(),
        "kata-like {args:?} failed:\n{}",
        text(&out)
    );
    containerd.kill_and_restart();
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "needs a Linux-capable KVM and containerd: run through tests/run-e2e"]
async fn install_run_uninstall() {
    let kata = KataArtifacts::from_env();
    let mut containerd = Containerd::start_unregistered(&kata);
    let mut cri = cri_when_ready(&containerd).await;
    let config = containerd.base.join("config.toml");
    let before = std::fs::read(&config).expect("containerd config");

    // Before the install, containerd has no kata-like runtime.
    let e = run_pod_with_output(&mut cri, &containerd, "never")
        .await
        .expect_err("a kata-like pod before the install");
    assert!(e.contains(KATA_RUNTIME_HANDLER), "{e}");

    let payload = build_payload(&containerd.base);
    let prefix = containerd.base.join("opt/kata-like");
    let common: [&Path; 4] = [
        Path::new("--prefix"),
        &prefix,
        Path::new("--containerd-config"),
        &config,
    ];
    let install: Vec<&Path> = [&payload as &Path].into_iter().chain(common).collect();
    restarting(&mut containerd, &["install", "--from"], &install);
    let drop_in = containerd.base.join("conf.d/kata-like.toml");
    assert!(drop_in.is_file(), "no drop-in at {}", drop_in.display());
    assert_ne!(std::fs::read(&config).expect("config"), before);

    // A second install changes nothing (idempotent) but restarts containerd again.
    let installed = std::fs::read(&config).expect("config");
    restarting(&mut containerd, &["install", "--from"], &install);
    assert_eq!(std::fs::read(&config).expect("config"), installed);

    let out = kata_like(&["check"], &common);
    assert!(out.status.success(), "check after install:\n{}", text(&out));
    assert!(
        text(&out).contains("this node can run kata-like pods"),
        "{}",
        text(&out)
    );

    // A new CRI connection: the restarts closed the old one.
    let mut cri = cri_when_ready(&containerd).await;
    let output = run_pod_with_output(&mut cri, &containerd, "installed-pod-ran")
        .await
        .expect("a kata-like pod after the install");
    assert_eq!(output, "installed-pod-ran");

    // The DaemonSet's installer image, from the repository's script, is a valid OCI archive
    // that containerd imports under the name the manifest uses.
    let archive = containerd.base.join("installer.tar");
    let status = Command::new(kata_like_tests::repo_root().join("deploy/image/build"))
        .arg(&archive)
        .status()
        .expect("run deploy/image/build");
    assert!(status.success(), "deploy/image/build failed");
    let out = containerd
        .ctr()
        .args(["images", "import"])
        .arg(&archive)
        .output()
        .expect("ctr images import");
    assert!(out.status.success(), "ctr images import:\n{}", text(&out));
    let out = containerd
        .ctr()
        .args(["images", "ls", "-q"])
        .output()
        .expect("ctr");
    assert!(
        text(&out).contains("docker.io/library/kata-like-installer:0.1.0"),
        "{}",
        text(&out)
    );

    restarting(&mut containerd, &["uninstall"], &common);
    assert_eq!(
        std::fs::read(&config).expect("config"),
        before,
        "containerd's configuration is not byte-identical after uninstall"
    );
    assert!(!drop_in.exists() && !containerd.base.join("conf.d").exists());
    assert!(
        !prefix.exists(),
        "{} is left after uninstall",
        prefix.display()
    );
    let mut cri = cri_when_ready(&containerd).await;
    let e = run_pod_with_output(&mut cri, &containerd, "never")
        .await
        .expect_err("a kata-like pod after the uninstall");
    assert!(e.contains(KATA_RUNTIME_HANDLER), "{e}");
    containerd.assert_no_leftovers(&kata);
}

/// Asserts `check` failed and explained `what` with a fix.
fn assert_explained(out: &Output, what: &str, detail: &str) {
    let t = text(out);
    assert_eq!(out.status.code(), Some(1), "check must fail:\n{t}");
    let line = t
        .lines()
        .position(|l| l.starts_with(&format!("FAIL {what}:")))
        .unwrap_or_else(|| panic!("no FAIL {what} line:\n{t}"));
    // The finding: its FAIL line and the indented lines under it, down to its fix.
    let lines: Vec<&str> = t.lines().skip(line).collect();
    let end = lines
        .iter()
        .position(|l| l.trim_start().starts_with("fix: "))
        .filter(|&end| lines[1..end].iter().all(|l| l.starts_with("     ")))
        .unwrap_or_else(|| panic!("FAIL {what} has no fix:\n{t}"));
    let finding = lines[..end].join("\n");
    assert!(
        finding.contains(detail),
        "FAIL {what} does not say {detail:?}:\n{t}"
    );
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
fn check_explains_failures() {
    let dir = PathBuf::from(format!("/tmp/kata-like-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let payload = build_payload(&dir);
    let prefix = dir.join("opt/kata-like");
    let config = dir.join("containerd/config.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::write(&config, "version = 2\n").expect("write");
    let common: [&Path; 4] = [
        Path::new("--prefix"),
        &prefix,
        Path::new("--containerd-config"),
        &config,
    ];

    // Nothing installed: containerd does not know the runtime, the files are missing.
    let out = kata_like(&["check"], &common);
    assert_explained(&out, "containerd", "not registered");

    let out = kata_like(
        &["install", "--no-restart", "--from"],
        &[&payload, common[0], common[1], common[2], common[3]],
    );
    assert!(out.status.success(), "install:\n{}", text(&out));
    let out = kata_like(&["check"], &common);
    assert!(
        out.status.success(),
        "check on a good node:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("ok   KVM: /dev/kvm runs guest code at hardware speed"));

    // A kernel that is not the installed one.
    let kernel = prefix.join("share/kata-like/vmlinux");
    let good = std::fs::read(&kernel).expect("kernel");
    let mut bad = good.clone();
    bad.push(0);
    std::fs::write(&kernel, &bad).expect("write");
    assert_explained(
        &kata_like(&["check"], &common),
        "guest kernel",
        "not the file kata-like installed",
    );
    std::fs::write(&kernel, &good).expect("write");

    // A shim configuration with a typo.
    let shim_config = prefix.join("etc/config.toml");
    let original = std::fs::read_to_string(&shim_config).expect("shim config");
    std::fs::write(
        &shim_config,
        format!("{original}[sizing]\nmemory_overhead = 1\n"),
    )
    .expect("w");
    assert_explained(
        &kata_like(&["check"], &common),
        "configuration",
        "memory_overhead",
    );
    std::fs::write(&shim_config, &original).expect("write");

    // containerd without the registration (the import line removed by hand).
    std::fs::write(&config, "version = 2\n").expect("write");
    assert_explained(
        &kata_like(&["check"], &common),
        "containerd",
        "not registered",
    );

    // A KVM that cannot run a guest: /dev/kvm replaced by /dev/null in a mount namespace.
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} check --prefix {} --containerd-config {}",
        tool().display(),
        prefix.display(),
        config.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    println!("{}", text(&out));
    assert_explained(&out, "KVM", "cannot run a guest");
    let _ = std::fs::remove_dir_all(&dir);
}
