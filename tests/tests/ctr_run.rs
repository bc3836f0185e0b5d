//! `ctr run --runtime io.containerd.kata-like.v2` smoke test: a container without any CRI
//! annotations gets a VM of its own, its output reaches ctr, its exit code is ctr's.

use kata_like_tests::containerd::{self, KataArtifacts, BUSYBOX_IMAGE, KATA_RUNTIME_TYPE};

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn ctr_run_with_the_kata_like_runtime() {
    let containerd = containerd::shared();
    let kata = KataArtifacts::from_env();
    let out = containerd
        .ctr()
        .args([
            "run",
            "--rm",
            "--runtime",
            KATA_RUNTIME_TYPE,
            "--runtime-config-path",
        ])
        .arg(&containerd.kata_config)
        .args([
            BUSYBOX_IMAGE,
            "ctr-smoke",
            "sh",
            "-c",
            "uname -r; echo smoke-ok; exit 5",
        ])
        .output()
        .expect("run ctr");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "ctr's exit code is the container's; stdout: {stdout}\nstderr: {stderr}\n{}",
        containerd.log_tail()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_ne!(
        lines[0].trim(),
        host.trim(),
        "the container ran under the guest kernel"
    );
    assert_eq!(lines[1], "smoke-ok");
    containerd.assert_no_leftovers(&kata);
}

fn ctr_ok(containerd: &containerd::Containerd, args: &[&str]) -> String {
    let out = containerd.ctr().args(args).output().expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn task_status(containerd: &containerd::Containerd, id: &str) -> String {
    let list = ctr_ok(containerd, &["tasks", "ls"]);
    list.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn ctr_task_lifecycle_pause_resume_ps_metrics_exec_kill() {
    let containerd = containerd::shared();
    let kata = KataArtifacts::from_env();
    let id = "ctr-lifecycle";
    let config = containerd.kata_config.display().to_string();
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--runtime",
            KATA_RUNTIME_TYPE,
            "--runtime-config-path",
            &config,
            BUSYBOX_IMAGE,
            id,
            "sleep",
            "3600",
        ],
    );
    assert_eq!(task_status(&containerd, id), "RUNNING");

    ctr_ok(&containerd, &["tasks", "pause", id]);
    assert_eq!(task_status(&containerd, id), "PAUSED");
    ctr_ok(&containerd, &["tasks", "resume", id]);
    assert_eq!(task_status(&containerd, id), "RUNNING");

    // The guest's view of the container's processes: the sleeper.
    let ps = ctr_ok(&containerd, &["tasks", "ps", id]);
    assert!(
        ps.lines().count() >= 2,
        "a header and at least one pid: {ps}"
    );

    // cgroup v2 metrics decoded by containerd.
    let metrics = ctr_ok(&containerd, &["tasks", "metrics", id]);
    assert!(metrics.contains("memory"), "{metrics}");

    // An exec with stdin: everything written comes back, then EOF ends it (CloseIO).
    let mut child = containerd
        .ctr()
        .args(["tasks", "exec", "--exec-id", "cat1", id, "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctr exec");
    let input: String = (0..500).map(|i| format!("stdin line {i}\n")).collect();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("exec output");
    assert!(out.status.success(), "exec exited {}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), input);

    ctr_ok(&containerd, &["tasks", "kill", "-s", "SIGKILL", id]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while task_status(&containerd, id) != "STOPPED" {
        assert!(std::time::Instant::now() < deadline, "task never stopped");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    ctr_ok(&containerd, &["tasks", "rm", id]);
    ctr_ok(&containerd, &["containers", "rm", id]);
    containerd.assert_no_leftovers(&kata);
}

#[test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
fn ctr_run_with_a_terminal_gets_its_size() {
    let containerd = containerd::shared();
    let kata = KataArtifacts::from_env();
    // `script` gives ctr a pseudo-terminal of a known size; ctr passes it on with ResizePty, and
    // the container's terminal in the guest reports it. ctr sends the size only after the task
    // started (as it does with runc), so the container waits for it as a terminal program
    // would for SIGWINCH: busybox's `stty size` fails while the terminal has no size yet.
    let ctr = format!(
        "stty rows 33 cols 77; /usr/bin/ctr --address {} -n k8s.io run -t --rm --runtime {} \
         --runtime-config-path {} {} ctr-tty sh -c 'for i in $(seq 100); do \
         stty size 2>/dev/null && break; sleep 0.1; done; [ -t 0 ] && echo is-a-tty'",
        containerd.socket.display(),
        KATA_RUNTIME_TYPE,
        containerd.kata_config.display(),
        BUSYBOX_IMAGE
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail()
    );
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    // (`script` turns its stdin's EOF into a byte on the terminal, which the container's tty
    // may echo as "^@" in front of the first line.)
    assert!(
        lines.iter().any(|l| l.ends_with("33 77")),
        "terminal size reached the guest: {stdout:?}"
    );
    assert!(lines.contains(&"is-a-tty"), "{stdout:?}");
    containerd.assert_no_leftovers(&kata);
}
