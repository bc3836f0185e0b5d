//! The retry rule of tests/run-e2e (issue 17), tested on the scripts themselves, without KVM:
//! tests/e2e-verdict on sample logs of libtest runs with the child processes' output interleaved,
//! then tests/run-e2e's retry loop on a fake test binary, a fake test host and a fake cargo.
//!
//! The rule: a test is retried only for a fault of the test host: exit status 125, or a fault
//! signature (a pod VM's triple fault, a silent agent) in that test's own part of the log, inside
//! the nested test host; once per test; every retry is reported.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const USING_THE_TEST_HOST: &str = "kvm-host/run: this machine's /dev/kvm cannot boot Linux at speed ({\"linux_capable\":false,\"loop_ms\":2113}): using the test host";

const TRIPLE_FAULT: &str = "2026-12-05T03:05:01.000001Z  WARN kata_like_vmm::vstate::vcpu: guest shutdown (triple fault or reset) vcpu=1 state=rip=0x0 gs_base=0x0";

const PANIC_RESET: &str = "2026-12-05T03:12:44.123456Z  WARN kata_like_vmm::vstate::vcpu: guest shutdown (triple fault or reset) vcpu=0 state=rip=0xffffffff8100a1b2";

/// The run of issue 17: boots_two_vcpus_in_the_jail_as_nobody fails with an empty console; the
/// only triple-fault line is guest_panic_exits_non_zero_and_keeps_the_console's, which asks for
/// the reset and passes.
fn linux_boot_log(first_test_output: &str) -> String {
    format!(
        "=== run-e2e: linux_boot-5f0e2a9c1b7d3e44
{USING_THE_TEST_HOST}

running 4 tests
test boots_two_vcpus_in_the_jail_as_nobody ... {first_test_output}FAILED
test graceful_stop_asks_the_guest_through_the_power_port ... ok
test guest_panic_exits_non_zero_and_keeps_the_console ... {PANIC_RESET}
ok
test virtio_blk_reads_and_writes_host_files_jailed ... ok

failures:

---- boots_two_vcpus_in_the_jail_as_nobody stdout ----

thread 'boots_two_vcpus_in_the_jail_as_nobody' panicked at vmm/tests/common/mod.rs:120:13:
VM did not exit; console:

note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    boots_two_vcpus_in_the_jail_as_nobody

test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 402.13s

"
    )
}

/// A pod VM that never answers: the shim's error reaches the test through CRI, in its panic.
const SILENT_AGENT_LOG: &str = r#"=== run-e2e: cri_pods-0c1d2e3f4a5b6c7d
kvm-host/run: this machine's /dev/kvm cannot boot Linux at speed ({"linux_capable":false,"loop_ms":1980}): using the test host

running 3 tests
test exec_in_a_running_pod ... ok
test pod_with_two_containers_shares_the_vm ... time="2026-12-05T03:20:11Z" level=info msg="starting containerd" revision= version=1.6.20
FAILED
test vm_death_under_a_live_shim_is_reported ... 2026-12-05T03:24:02Z ERROR containerd_shim_kata_like_v2::service: the pod VM died sandbox_id=7a1c status=137 reason=killed console=""
ok

failures:

---- pod_with_two_containers_shares_the_vm stdout ----

thread 'pod_with_two_containers_shares_the_vm' panicked at tests/tests/cri_pods.rs:212:10:
RunPodSandbox: Status { code: Unknown, message: "the agent did not answer within 60s: connection reset by peer; vCPU 0 rip=0xffffffff81c01234 halted, virtio-vsock features acked, no tx" }
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    pod_with_two_containers_shares_the_vm

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 190.02s

"#;

/// The test host froze in the middle of a test: kvm-host/run stops it and exits 125.
const FROZEN_LOG: &str = r#"=== run-e2e: ctr_run-9a8b7c6d5e4f3a2b
kvm-host/run: this machine's /dev/kvm cannot boot Linux at speed ({"linux_capable":false,"loop_ms":2050}): using the test host

running 2 tests
test ctr_run_prints_the_output ... ok
test ctr_run_tty_reports_the_size ... kvm-host/run: the test host froze (no heartbeat for 120s; QEMU used 100% of a CPU over the last 2 s), stopping it
"#;

/// An ordinary assertion failure, with an unrelated triple fault of a passing test before it.
const ASSERTION_LOG: &str = r#"=== run-e2e: guest_boot-1234abcd5678ef90
kvm-host/run: this machine's /dev/kvm cannot boot Linux at speed ({"linux_capable":false,"loop_ms":2101}): using the test host

running 2 tests
test agent_boots_and_reports_ready ... 2026-12-05T03:30:00Z  WARN kata_like_vmm::vstate::vcpu: guest shutdown (triple fault or reset) vcpu=0
ok
test agent_reports_its_uptime ... FAILED

failures:

---- agent_reports_its_uptime stdout ----

thread 'agent_reports_its_uptime' (4121) panicked at tests/tests/guest_boot.rs:88:5:
assertion `left == right` failed: uptime_ms missing
  left: None
 right: Some(1900)


failures:
    agent_reports_its_uptime

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 61.40s

"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kata-like-run-e2e-retry-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tests_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs tests/e2e-verdict on `log` as the output of a run that exited with `status`.
fn verdict(name: &str, log: &str, status: i32, retried: &[&str]) -> String {
    let dir = scratch(name);
    let path = dir.join("log");
    std::fs::write(&path, log).unwrap();
    let mut cmd = Command::new(tests_dir().join("e2e-verdict"));
    for test in retried {
        cmd.arg("--retried").arg(test);
    }
    let out = cmd
        .arg(&path)
        .arg(status.to_string())
        .output()
        .expect("run tests/e2e-verdict");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "e2e-verdict failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_triple_fault_in_the_failing_tests_own_segment_is_retried() {
    let log = linux_boot_log(&format!("{TRIPLE_FAULT}\n"));
    let v = verdict("own-triple-fault", &log, 101, &[]);
    assert_eq!(
        v,
        format!("retry boots_two_vcpus_in_the_jail_as_nobody triple-fault {TRIPLE_FAULT}\n")
    );
}

#[test]
fn a_reset_asked_for_by_another_passing_test_does_not_make_a_failure_retryable() {
    // Issue 17's linux_boot run: the failure is a real question, not the emulator's.
    let v = verdict("other-tests-reset", &linux_boot_log(""), 101, &[]);
    assert_eq!(
        v,
        "fail boots_two_vcpus_in_the_jail_as_nobody failed \
         panicked at vmm/tests/common/mod.rs:120:13: VM did not exit; console:\n"
    );
}

#[test]
fn a_failed_or_frozen_test_host_is_retried() {
    let v = verdict("frozen", FROZEN_LOG, 125, &[]);
    assert!(
        v.starts_with("retry ctr_run_tty_reports_the_size test-host-failed "),
        "{v}"
    );
    assert!(v.contains("the test host froze"), "{v}");
    assert_eq!(v.lines().count(), 1, "{v}");
    // 125 is the test host's even for a test already retried once.
    let again = verdict(
        "frozen-again",
        FROZEN_LOG,
        125,
        &["ctr_run_tty_reports_the_size"],
    );
    assert!(again.starts_with("retry "), "{again}");
}

#[test]
fn a_silent_agent_in_the_failing_tests_own_segment_is_retried() {
    let v = verdict("silent-agent", SILENT_AGENT_LOG, 101, &[]);
    assert!(
        v.starts_with("retry pod_with_two_containers_shares_the_vm silent-agent "),
        "{v}"
    );
    assert!(v.contains("the agent did not answer within 60s"), "{v}");
    assert_eq!(v.lines().count(), 1, "{v}");
}

#[test]
fn a_plain_assertion_failure_is_not_retried() {
    let v = verdict("assertion", ASSERTION_LOG, 101, &[]);
    assert_eq!(
        v,
        "fail agent_reports_its_uptime failed \
         panicked at tests/tests/guest_boot.rs:88:5: assertion `left == right` failed: uptime_ms missing\n"
    );
}

#[test]
fn a_test_that_faults_a_second_time_fails() {
    let log = linux_boot_log(&format!("{TRIPLE_FAULT}\n"));
    let v = verdict(
        "second-fault",
        &log,
        101,
        &["boots_two_vcpus_in_the_jail_as_nobody"],
    );
    assert_eq!(
        v,
        format!("fail boots_two_vcpus_in_the_jail_as_nobody triple-fault-again {TRIPLE_FAULT}\n")
    );
}

#[test]
fn signatures_count_only_in_the_nested_test_host_and_a_pass_is_a_pass() {
    let direct = linux_boot_log(&format!("{TRIPLE_FAULT}\n")).replace(
        USING_THE_TEST_HOST,
        "kvm-host/run: this machine's /dev/kvm boots Linux ({\"linux_capable\":true}): running directly",
    );
    let v = verdict("direct", &direct, 101, &[]);
    assert!(
        v.starts_with("fail boots_two_vcpus_in_the_jail_as_nobody failed "),
        "{v}"
    );
    assert_eq!(verdict("pass", ASSERTION_LOG, 0, &[]), "pass\n");
}

/// A fake world for tests/run-e2e: a copy of the scripts, a cargo that lists one test binary, a
/// test host that runs the command directly, and a linux_boot binary that behaves, attempt after
/// attempt, as the lines of `scenario` say (pass, fault, plain, freeze, none).
fn run_e2e(name: &str, scenario: &[&str]) -> (i32, String, String) {
    let dir = scratch(name);
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    for script in ["run-e2e", "e2e-verdict", "e2e-env"] {
        let text = std::fs::read_to_string(tests_dir().join(script)).unwrap();
        write(&format!("root/tests/{script}"), &text);
    }
    write(
        "root/tests/kvm-host/run",
        &format!(
            "#!/usr/bin/env bash\nwhile [ \"$1\" != -- ]; do shift; done; shift\necho \"{}\" >&2\nexec \"$@\"\n",
            USING_THE_TEST_HOST.replace('"', "\\\"")
        ),
    );
    write(
        "bin/cargo",
        "#!/usr/bin/env bash\necho '{\"reason\":\"compiler-artifact\",\"profile\":{\"opt_level\":\"3\",\"test\":true},\"executable\":\"'\"$FAKE_DIR\"'/target/linux_boot-fake\",\"fresh\":true}'\n",
    );
    write(
        "target/linux_boot-fake",
        &format!(
            r#"#!/usr/bin/env bash
if [ "$1" = --list ]; then printf 'boots: test\npanics: test\n'; exit 0; fi
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/count"
echo "$*" >> "$FAKE_DIR/calls"
step=$(sed -n "${{n}}p" "$FAKE_DIR/scenario")
case "$*" in *--exact*) exact=1 ;; *) exact=0 ;; esac
echo
if [ "$step" = none ]; then printf 'running 0 tests\n\ntest result: ok. 0 passed\n\n'; exit 0; fi
if [ $exact = 1 ]; then echo "running 1 test"; else echo "running 2 tests"; fi
case $step in
  pass) echo "test boots ... ok" ;;
  fault) echo "test boots ... {TRIPLE_FAULT}"; echo FAILED ;;
  plain) echo "test boots ... FAILED" ;;
  freeze) echo "test boots ... kvm-host/run: the test host froze (no heartbeat for 120s), stopping it"; exit 125 ;;
esac
if [ $exact = 0 ]; then echo "test panics ... {PANIC_RESET}"; echo ok; fi
if [ "$step" = pass ]; then printf '\ntest result: ok. 2 passed\n\n'; exit 0; fi
cat <<'END'

failures:

---- boots stdout ----

thread 'boots' panicked at vmm/tests/linux_boot.rs:177:5:
VM did not exit; console:


failures:
    boots

test result: FAILED. 1 passed; 1 failed

END
exit 101
"#
        ),
    );
    std::fs::write(dir.join("scenario"), scenario.join("\n") + "\n").unwrap();
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(dir.join("root/tests/run-e2e"))
        .env("PATH", path)
        .env("FAKE_DIR", &dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env("KATA_LIKE_KERNEL", "unused")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tests/run-e2e");
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    std::fs::remove_dir_all(&dir).unwrap();
    let code = out.status.code().expect("run-e2e exited");
    (
        code,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        calls,
    )
}

#[test]
fn run_e2e_reruns_only_the_faulted_test_once_and_reports_it() {
    let (code, err, calls) = run_e2e("loop-retry", &["fault", "pass"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        calls, "--ignored --test-threads=1\n--ignored --test-threads=1 --exact boots\n",
        "{err}"
    );
    assert!(err.contains("1 retry for faults of the test host"), "{err}");
    assert!(
        err.contains(&format!(
            "linux_boot-fake attempt 1: boots: triple-fault: {TRIPLE_FAULT}"
        )),
        "{err}"
    );
    assert!(
        err.contains("passed, but only after the 1 retry above"),
        "{err}"
    );
}

#[test]
fn run_e2e_fails_a_test_that_faults_twice_and_never_retries_a_plain_failure() {
    let (code, err, calls) = run_e2e("loop-twice", &["fault", "fault", "pass"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(calls.lines().count(), 2, "no third attempt: {err}");
    assert!(err.contains("triple-fault-again"), "{err}");
    assert!(err.contains("FAILED in linux_boot-fake"), "{err}");

    let (code, err, calls) = run_e2e("loop-plain", &["plain", "pass"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(calls.lines().count(), 1, "{err}");
    assert!(!err.contains("retr"), "{err}");
}

#[test]
fn run_e2e_retries_a_frozen_test_host_with_the_same_tests_and_checks_what_a_rerun_ran() {
    let (code, err, calls) = run_e2e("loop-freeze", &["freeze", "fault", "pass"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        calls,
        "--ignored --test-threads=1\n--ignored --test-threads=1\n--ignored --test-threads=1 --exact boots\n",
        "{err}"
    );
    assert!(
        err.contains("2 retries for faults of the test host"),
        "{err}"
    );

    // A rerun that names a test and runs none must not pass.
    let (code, err, _) = run_e2e("loop-none", &["fault", "none"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not run the 1 test(s) it named"), "{err}");
}

/// A run of linux_boot in which every test passed.
const PASSING_LOG: &str = r#"kvm-host/run: this machine's /dev/kvm cannot boot Linux at speed ({"linux_capable":false,"loop_ms":2113}): using the test host

running 4 tests
test boots_two_vcpus_in_the_jail_as_nobody ... ok
test graceful_stop_asks_the_guest_through_the_power_port ... ok
test guest_panic_exits_non_zero_and_keeps_the_console ... 2026-12-05T04:01:02.000003Z  WARN kata_like_vmm::vstate::vcpu: guest shutdown (triple fault or reset) vcpu=0
ok
test virtio_blk_reads_and_writes_host_files_jailed ... ok

test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 380.50s

"#;

/// tests/soak's report part, on the per-run logs a soak leaves: runs, failures and rate per test,
/// and each failure with the verdict's reason.
#[test]
fn soak_reports_each_tests_failure_rate_with_the_reasons() {
    let dir = scratch("soak-report");
    let runs = [
        ("1-linux_boot", PASSING_LOG.to_string(), 0),
        (
            "2-linux_boot",
            linux_boot_log(&format!("{TRIPLE_FAULT}\n")),
            101,
        ),
        ("3-linux_boot", linux_boot_log(""), 101),
    ];
    for (name, log, status) in &runs {
        std::fs::write(dir.join(format!("{name}.log")), log).unwrap();
        std::fs::write(dir.join(format!("{name}.status")), format!("{status}\n")).unwrap();
    }
    let out = Command::new(tests_dir().join("soak"))
        .arg("--report")
        .arg(&dir)
        .output()
        .expect("run tests/soak --report");
    std::fs::remove_dir_all(&dir).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{report}");
    let row = |test: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("linux_boot::{test} ")))
            .unwrap_or_else(|| panic!("no row for {test}:\n{report}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        row("boots_two_vcpus_in_the_jail_as_nobody"),
        "3 2 66.7%",
        "{report}"
    );
    assert_eq!(
        row("guest_panic_exits_non_zero_and_keeps_the_console"),
        "3 0 0.0%",
        "{report}"
    );
    assert!(
        report.contains(&format!("    #2 retry triple-fault: {TRIPLE_FAULT}\n")),
        "{report}"
    );
    assert!(
        report.contains(
            "    #3 fail failed: panicked at vmm/tests/common/mod.rs:120:13: VM did not exit; console:\n"
        ),
        "{report}"
    );
}
