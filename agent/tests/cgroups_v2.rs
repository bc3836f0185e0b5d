//! Tests that need cgroup v2 controllers (the guest's setup). The host's controllers are bound to
//! v1 hierarchies, so these are ignored here and run inside the KVM test host
//! (`tests/kvm-host/run`, see agent/README.md). They fail, not skip, without cgroup v2.

mod common;

use common::*;
use kata_like_protocol::*;
use tokio_stream::StreamExt;

fn require_cgroup_v2() {
    assert!(
        kata_like_agent::cgroups::is_unified(),
        "/sys/fs/cgroup is not a cgroup v2 hierarchy: run these tests through tests/kvm-host/run"
    );
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    for c in ["memory", "pids", "cpu"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "cgroup v2 controller {c} missing: {controllers}"
        );
    }
}

async fn stats(agent: &mut TestAgent, id: &str) -> StatsContainerResponse {
    agent
        .client
        .stats_container(ContainerRequest {
            container_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn memory_hog_is_oom_killed_and_the_event_arrives() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-oom").await;
    let mut events = agent
        .client
        .oom_events(Empty {})
        .await
        .unwrap()
        .into_inner();
    let mut s = spec(&[
        "sh",
        "-c",
        "a=xxxxxxxxxxxxxxxx; while true; do a=\"$a$a\"; done",
    ]);
    s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 32 << 20, "swap": 32 << 20});
    let result = run(&mut agent, "hog", &s).await;
    assert_eq!(result.status, 128 + libc::SIGKILL);
    let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
        .await
        .expect("an OOM event")
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "hog");
    assert!(event.at_unix_nanos > 0);
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn pids_limit_stops_a_fork_bomb() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-pids").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 64 ]; do sleep 1000 & i=$((i+1)); done; echo all-forked",
    ]);
    s["linux"]["resources"]["pids"] = serde_json::json!({"limit": 10});
    create(&mut agent, "bomb", &s, stdio(false, false), true)
        .await
        .unwrap();
    let out = collect_output(&agent.client, "bomb", "", OutputFd::Stdout);
    let err = collect_output(&agent.client, "bomb", "", OutputFd::Stderr);
    start_container(&mut agent.client, "bomb").await.unwrap();
    // The shell cannot fork past the limit: busybox sh gives up with "can't fork".
    let status = wait(&mut agent.client, "bomb", "").await;
    assert_ne!(status, 0);
    assert!(!String::from_utf8_lossy(&out.await.unwrap()).contains("all-forked"));
    let err = String::from_utf8_lossy(&err.await.unwrap()).into_owned();
    assert!(err.contains("fork"), "{err}");
    let pids = stats(&mut agent, "bomb").await.pids.unwrap();
    assert_eq!(pids.limit, 10);
    let events =
        std::fs::read_to_string("/sys/fs/cgroup/kata-like/sb-pids/bomb/pids.events").unwrap();
    let hits: u64 = events
        .trim()
        .strip_prefix("max ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(hits > 0, "pids.events: {events}");
    remove_container(&mut agent.client, "bomb", 0)
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn stats_and_update_use_cgroup_v2() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-stats").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 1000",
    ]);
    s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64 << 20});
    s["linux"]["resources"]["pids"] = serde_json::json!({"limit": 50});
    create_and_start(&mut agent, "c1", &s).await;
    let mut st = stats(&mut agent, "c1").await;
    for _ in 0..500 {
        if st.cpu.as_ref().unwrap().usage_usec > 10_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        st = stats(&mut agent, "c1").await;
    }
    let memory = st.memory.unwrap();
    assert_eq!(memory.usage_limit, 64 << 20);
    assert!(memory.usage > 0);
    assert!(st.cpu.unwrap().usage_usec > 10_000);
    assert_eq!(st.pids.unwrap().limit, 50);
    assert!(st.timestamp_unix_nanos > 0);

    update_container(
        &mut agent.client,
        "c1",
        br#"{"memory":{"limit":134217728},"pids":{"limit":77}}"#,
    )
    .await
    .unwrap();
    let st = stats(&mut agent, "c1").await;
    assert_eq!(st.memory.unwrap().usage_limit, 128 << 20);
    assert_eq!(st.pids.unwrap().limit, 77);
    let err = update_container(&mut agent.client, "c1", b"{bad")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Pause freezes the cgroup (cgroup.freeze), resume thaws it.
    pause_container(&mut agent.client, "c1").await.unwrap();
    let dir = std::path::Path::new("/sys/fs/cgroup/kata-like/sb-stats/c1");
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    resume_container(&mut agent.client, "c1").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "0"
    );
    remove_container(&mut agent.client, "c1", 0).await.unwrap();
    assert!(!dir.exists(), "the cgroup is removed with the container");
}

/// The device rules containerd (and runc's own defaults) give every container: deny everything,
/// then mknod of anything, /dev/null, zero, full, random, urandom, tty, console, ptmx, pts, tun.
fn default_device_rules() -> Vec<serde_json::Value> {
    let allow = |typ: &str, major: Option<i64>, minor: Option<i64>, access: &str| {
        let mut rule = serde_json::json!({"allow": true, "type": typ, "access": access});
        if let Some(major) = major {
            rule["major"] = major.into();
        }
        if let Some(minor) = minor {
            rule["minor"] = minor.into();
        }
        rule
    };
    vec![
        serde_json::json!({"allow": false, "access": "rwm"}),
        allow("c", None, None, "m"),
        allow("b", None, None, "m"),
        allow("c", Some(1), Some(3), "rwm"),
        allow("c", Some(1), Some(5), "rwm"),
        allow("c", Some(1), Some(7), "rwm"),
        allow("c", Some(1), Some(8), "rwm"),
        allow("c", Some(1), Some(9), "rwm"),
        allow("c", Some(5), Some(0), "rwm"),
        allow("c", Some(5), Some(1), "rwm"),
        allow("c", Some(5), Some(2), "rwm"),
        allow("c", Some(136), None, "rwm"),
        allow("c", Some(10), Some(200), "rwm"),
    ]
}

/// Run inside a container (root, CAP_MKNOD): makes nodes for /dev/kmsg (c 1:11, not in the
/// default list; a write-only open needs no capability) and for a virtio disk (b 254:0, what the
/// pod's rootfs drives are in the guest), checks that the default devices work and reports
/// whether the two nodes open. Without a device filter the kmsg write succeeds and the disk open
/// fails with ENXIO (no such disk here), so "Operation not permitted" is the filter's answer.
const DEVICE_PROBE: &str = "rm -f /dev/probe-kmsg /dev/probe-disk
mknod /dev/probe-kmsg c 1 11 || exit 90
mknod /dev/probe-disk b 254 0 || exit 91
echo x > /dev/null || exit 92
n=$(head -c 3 /dev/zero | wc -c); [ $n -eq 3 ] || exit 93
n=$(head -c 3 /dev/urandom | wc -c); [ $n -eq 3 ] || exit 94
if echo kata-like-device-probe > /dev/probe-kmsg; then echo kmsg=open; else echo kmsg=denied; fi
if head -c 1 /dev/probe-disk > /dev/null; then echo disk=open; else echo disk=denied; fi";

const KMSG_DENIED: &str = "can't create /dev/probe-kmsg: Operation not permitted";
const DISK_DENIED: &str = "/dev/probe-disk: Operation not permitted";

/// `ulimit -l` of a process exec'd in the container.
async fn exec_memlock(agent: &mut TestAgent, id: &str, exec_id: &str) -> String {
    exec(
        agent,
        id,
        exec_id,
        &["sh", "-c", "ulimit -l"],
        stdio(false, false),
    )
    .await
    .expect("exec");
    let out = collect_output(&agent.client, id, exec_id, OutputFd::Stdout);
    assert_eq!(wait(&mut agent.client, id, exec_id).await, 0);
    let out = String::from_utf8_lossy(&out.await.unwrap())
        .trim()
        .to_string();
    assert!(!out.is_empty());
    out
}

async fn exec_probe(agent: &mut TestAgent, id: &str, exec_id: &str) -> (i32, String, String) {
    exec(
        agent,
        id,
        exec_id,
        &["sh", "-c", DEVICE_PROBE],
        stdio(false, false),
    )
    .await
    .expect("exec");
    let out = collect_output(&agent.client, id, exec_id, OutputFd::Stdout);
    let err = collect_output(&agent.client, id, exec_id, OutputFd::Stderr);
    let status = wait(&mut agent.client, id, exec_id).await;
    let out = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    let err = String::from_utf8_lossy(&err.await.unwrap()).into_owned();
    (status, out, err)
}

/// DEVICE_PROBE's result when neither probed device may be opened.
fn assert_both_probes_denied(result: &RunResult) {
    let (out, err) = (result.stdout(), result.stderr());
    assert_eq!(result.status, 0, "stdout: {out} stderr: {err}");
    assert_eq!(out, "kmsg=denied\ndisk=denied\n", "stderr: {err}");
    assert!(err.contains(KMSG_DENIED), "{err}");
    assert!(err.contains(DISK_DENIED), "{err}");
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn device_cgroup_denies_devices_outside_the_allow_list() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-dev-deny").await;
    let mut s = spec(&["sh", "-c", DEVICE_PROBE]);
    s["linux"]["resources"]["devices"] = default_device_rules().into();
    let result = run(&mut agent, "deny", &s).await;
    assert_both_probes_denied(&result);
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn device_cgroup_applies_to_a_spec_without_resources() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-dev-nores").await;
    let mut s = spec(&["sh", "-c", DEVICE_PROBE]);
    s["linux"].as_object_mut().unwrap().remove("resources");
    let result = run(&mut agent, "nores", &s).await;
    assert_both_probes_denied(&result);
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn device_cgroup_allows_a_listed_device_also_after_an_update() {
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-dev-allow").await;
    let mut s = spec(&["sleep", "1000"]);
    let mut rules = default_device_rules();
    rules.push(
        serde_json::json!({"allow": true, "type": "c", "major": 1, "minor": 11, "access": "rw"}),
    );
    s["linux"]["resources"]["devices"] = rules.into();
    create_and_start(&mut agent, "allow", &s).await;
    let memlock_before = exec_memlock(&mut agent, "allow", "memlock1").await;
    let (status, out, err) = exec_probe(&mut agent, "allow", "probe1").await;
    assert_eq!(status, 0, "stdout: {out} stderr: {err}");
    assert_eq!(out, "kmsg=open\ndisk=denied\n", "stderr: {err}");
    assert!(!err.contains("probe-kmsg"), "{err}");
    assert!(err.contains(DISK_DENIED), "{err}");

    // An update without device rules (what most updates are) keeps the container's rules.
    update_container(&mut agent.client, "allow", br#"{"pids":{"limit":99}}"#)
        .await
        .unwrap();
    assert_eq!(stats(&mut agent, "allow").await.pids.unwrap().limit, 99);
    let (status, out, err) = exec_probe(&mut agent, "allow", "probe2").await;
    assert_eq!(status, 0, "stdout: {out} stderr: {err}");
    assert_eq!(out, "kmsg=open\ndisk=denied\n", "stderr: {err}");
    assert!(err.contains(DISK_DENIED), "{err}");
    // Loading the device filter raises RLIMIT_MEMLOCK; the agent's own limit (which exec'd
    // processes inherit) stays what it was.
    assert_eq!(
        exec_memlock(&mut agent, "allow", "memlock2").await,
        memlock_before
    );
    remove_container(&mut agent.client, "allow", 0)
        .await
        .unwrap();
}

/// `ulimit -l` as busybox prints it for this process's RLIMIT_MEMLOCK (the agent inherits it).
fn own_memlock_as_ulimit_prints_it() -> String {
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut own) },
        0
    );
    if own.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        (own.rlim_cur / 1024).to_string()
    }
}

#[tokio::test]
#[ignore = "needs cgroup v2 controllers: run through tests/e2e"]
async fn the_device_filter_does_not_raise_the_containers_memlock_limit() {
    // libcgroups raises RLIMIT_MEMLOCK to 128 MiB to load the device filter; the container must
    // still see the limit it would inherit under runc (the runtime's own).
    require_cgroup_v2();
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-memlock").await;
    let mut s = spec(&["sh", "-c", "ulimit -l"]);
    s["linux"]["resources"]["devices"] = default_device_rules().into();
    let result = run(&mut agent, "memlock", &s).await;
    assert_eq!(result.status, 0, "stderr: {}", result.stderr());
    assert_eq!(result.stdout().trim(), own_memlock_as_ulimit_prints_it());
}
