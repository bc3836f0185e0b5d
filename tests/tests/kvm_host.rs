//! The KVM test host (tests/kvm-host/run): runs a command in a VM where /dev/kvm boots Linux,
//! returns its status, and leaves nothing behind after a timeout.

use std::process::Command;

use kata_like_tests::repo_root;

fn kvm_host() -> Command {
    Command::new(repo_root().join("tests/kvm-host/run"))
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
            if text.contains(needle) {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// A run of the test host in a private TMPDIR: the run directory (shared into the VM, named on
/// QEMU's command line) lives under it, so it identifies this run's processes and files.
/// Returns the output and what the run left behind: processes, then files.
fn run_privately(
    name: &str,
    configure: impl FnOnce(&mut Command),
) -> (std::process::Output, Vec<String>, Vec<std::path::PathBuf>) {
    let tmp = std::env::temp_dir().join(format!("kvm-host-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("private tmp");
    let mut cmd = kvm_host();
    cmd.env("TMPDIR", &tmp);
    configure(&mut cmd);
    let out = cmd.output().expect("run starts");
    let leftovers = processes_mentioning(tmp.to_str().expect("utf-8 tmp"));
    let files = std::fs::read_dir(&tmp)
        .expect("tmp")
        .flatten()
        .map(|e| e.path())
        .collect();
    let _ = std::fs::remove_dir_all(&tmp);
    (out, leftovers, files)
}

/// The run left no process and no file of its private TMPDIR behind.
fn assert_left_nothing(leftovers: &[String], files: &[std::path::PathBuf]) {
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
    assert!(files.is_empty(), "files left: {files:?}");
}

#[test]
fn runs_the_command_inside_and_returns_its_exit_status() {
    let script = "echo inside:$(hostname):$(test -c /dev/kvm && echo kvm):$(stat -f -c %T /sys/fs/cgroup); exit 7";
    let out = kvm_host()
        .args(["--timeout", "300", "--", "sh", "-c", script])
        .output()
        .expect("run starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("inside:kvm-host:kvm:cgroup2fs"),
        "stdout: {stdout}"
    );
}

#[test]
fn a_timeout_stops_the_test_host_and_leaves_nothing_behind() {
    let (out, leftovers, files) = run_privately("timeout", |cmd| {
        cmd.args(["--timeout", "20", "--", "sleep", "3600"]);
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {stderr}");
    assert!(stderr.contains("timed out"), "stderr: {stderr}");
    assert_left_nothing(&leftovers, &files);
}

#[test]
fn refuses_a_call_without_a_command() {
    let out = kvm_host().arg("--").output().expect("run starts");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no command"));
}

#[test]
fn a_frozen_test_host_is_detected_and_stopped() {
    // Stopping the heartbeat inside looks, from outside, exactly like a frozen emulator.
    let (out, leftovers, files) = run_privately("frozen", |cmd| {
        cmd.env("KVM_HOST_STALL_SECONDS", "15")
            .args(["--timeout", "600", "--", "sh", "-c"])
            .arg("kill -STOP $(cat /run/kvm-host/heartbeat.pid) && echo heartbeat-stopped && sleep 3600");
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("heartbeat-stopped"), "stdout: {stdout}");
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("froze"), "stderr: {stderr}");
    assert_left_nothing(&leftovers, &files);
}

#[test]
fn an_emulator_that_does_not_start_gives_125_and_leaves_nothing_behind() {
    let (out, leftovers, files) = run_privately("no-emulator", |cmd| {
        cmd.env("KVM_HOST_QEMU", "/nonexistent/qemu-system-x86_64")
            .args(["--timeout", "60", "--", "true"]);
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(
        stderr.contains("/nonexistent/qemu-system-x86_64"),
        "stderr: {stderr}"
    );
    assert_left_nothing(&leftovers, &files);
}

#[test]
fn a_caller_working_under_tmp_finds_its_tree_in_the_test_host() {
    // The test host mounts a fresh /tmp; a checkout under /tmp must still be there, writable
    // inside (builds and tests write next to it) without the writes reaching this host.
    let top = std::path::PathBuf::from(format!("/tmp/kvm-host-checkout-{}", std::process::id()));
    let sub = top.join("repo/sub");
    std::fs::create_dir_all(&sub).expect("checkout dir");
    std::fs::write(top.join("repo/marker"), "from the host\n").expect("marker");
    let out = kvm_host()
        .current_dir(&sub)
        .args(["--timeout", "300", "--", "sh", "-c"])
        .arg("pwd && cat ../marker && echo written > new && cat new")
        .output()
        .expect("run starts");
    let wrote_through = sub.join("new").exists();
    let _ = std::fs::remove_dir_all(&top);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains(&format!("{}\nfrom the host\nwritten\n", sub.display())),
        "stdout: {stdout}"
    );
    assert!(
        !wrote_through,
        "a write inside the test host reached this host"
    );
}
