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
    agent
        .client
        .start_container(ContainerRequest {
            container_id: "bomb".into(),
        })
        .await
        .unwrap();
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
    agent
        .client
        .remove_container(RemoveContainerRequest {
            container_id: "bomb".into(),
            timeout_ms: 0,
        })
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
    create(&mut agent, "c1", &s, stdio(false, false), true)
        .await
        .unwrap();
    agent
        .client
        .start_container(ContainerRequest {
            container_id: "c1".into(),
        })
        .await
        .unwrap();
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

    agent
        .client
        .update_container(UpdateContainerRequest {
            container_id: "c1".into(),
            oci_linux_resources_json: br#"{"memory":{"limit":134217728},"pids":{"limit":77}}"#
                .to_vec(),
        })
        .await
        .unwrap();
    let st = stats(&mut agent, "c1").await;
    assert_eq!(st.memory.unwrap().usage_limit, 128 << 20);
    assert_eq!(st.pids.unwrap().limit, 77);
    let err = agent
        .client
        .update_container(UpdateContainerRequest {
            container_id: "c1".into(),
            oci_linux_resources_json: b"{bad".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Pause freezes the cgroup (cgroup.freeze), resume thaws it.
    agent
        .client
        .pause_container(ContainerRequest {
            container_id: "c1".into(),
        })
        .await
        .unwrap();
    let dir = std::path::Path::new("/sys/fs/cgroup/kata-like/sb-stats/c1");
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "1"
    );
    agent
        .client
        .resume_container(ContainerRequest {
            container_id: "c1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "0"
    );
    agent
        .client
        .remove_container(RemoveContainerRequest {
            container_id: "c1".into(),
            timeout_ms: 0,
        })
        .await
        .unwrap();
    assert!(!dir.exists(), "the cgroup is removed with the container");
}
