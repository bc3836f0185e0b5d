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
