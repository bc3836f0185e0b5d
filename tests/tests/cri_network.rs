//! End-to-end network tests through containerd's CRI with real CNI (bridge, host-local, portmap,
//! loopback): a kata-like pod keeps the IP CNI gave it and is reached on it from the node, from
//! a runc pod on the same bridge and through a hostPort; its teardown leaves nothing.

// Each test holds the shared containerd's lock for its whole run (tests must not overlap: they
// count VMMs and check for leftovers); every test has its own single-threaded runtime, so
// holding a std lock across its awaits blocks nothing else.
#![allow(clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kata_like_tests::containerd::{self, Containerd, KATA_RUNTIME_HANDLER};
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod::{
    self, fetch_from_container, fetch_from_host, pod_ip, web_server, WEB_PORT as PORT,
};

const HOST_PORT: i32 = 18080;

/// The kata-like pod's network namespace, from what its shim recorded in its state dir.
fn kata_pod_netns(containerd: &Containerd) -> PathBuf {
    let entries = std::fs::read_dir(&containerd.kata_state_dir).expect("kata-like state dir");
    for e in entries.flatten() {
        if let Ok(text) = std::fs::read(e.path().join("network.json")) {
            let record: serde_json::Value = serde_json::from_slice(&text).expect("network.json");
            return PathBuf::from(record["netns"].as_str().expect("netns in network.json"));
        }
    }
    panic!(
        "no kata-like pod recorded a connected network in {}",
        containerd.kata_state_dir.display()
    )
}

/// What the guest and the pod's namespace say about the network, for a failure's message.
async fn network_report(cri: &mut Cri, container: &str, containerd: &Containerd) -> String {
    let mut report = String::new();
    for cmd in [
        &["ip", "addr"][..],
        &["ip", "route"],
        &["ip", "neigh"],
        &["cat", "/proc/net/dev"],
    ] {
        let out = match cri.exec_sync(container, cmd, 30).await {
            Ok(r) => text(&r.stdout) + &text(&r.stderr),
            Err(e) => e.to_string(),
        };
        report.push_str(&format!("guest {cmd:?}:\n{out}\n"));
    }
    for netns in containerd::pod_network_namespaces() {
        for (program, args) in [
            ("ip", &["-s", "link"][..]),
            ("tc", &["-s", "filter", "show", "dev", "eth0", "ingress"]),
            ("tc", &["-s", "filter", "show", "dev", "tap0_kl", "ingress"]),
        ] {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .arg(program)
                .args(args)
                .output()
                .map(|o| text(&o.stdout) + &text(&o.stderr))
                .unwrap_or_else(|e| e.to_string());
            report.push_str(&format!("{} {program} {args:?}:\n{out}\n", netns.display()));
        }
    }
    report.push_str(&format!("containerd log:\n{}", containerd.log_tail()));
    report
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn in_netns(netns: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        netns.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn pod_ip_serves_host() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-web").await;
    let ip = pod_ip(&mut cri, &pod_id).await;
    let c = pod::start_container(
        &mut cri,
        &pod_id,
        &pod,
        &web_server("web", "kata-web-ok", ""),
    )
    .await;

    let body = match fetch_from_host(&containerd, &format!("http://{ip}:{PORT}/")) {
        Ok(body) => body,
        Err(e) => panic!("{e}\n{}", network_report(&mut cri, &c, &containerd).await),
    };
    assert_eq!(body.trim(), "kata-web-ok");

    // Inside, the container sees the pod's interface with the CNI address and the veth's MAC,
    // and a loopback that is up.
    let addrs = cri
        .exec_sync(&c, &["ip", "-o", "addr"], 30)
        .await
        .expect("ip addr");
    let addrs = text(&addrs.stdout);
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    // The kernel gives lo its 127.0.0.1 only when lo comes up.
    assert!(addrs.contains("inet 127.0.0.1/8"), "{addrs}");
    let local = fetch_from_container(&mut cri, &c, &format!("http://127.0.0.1:{PORT}/")).await;
    assert_eq!(local.expect("lo").trim(), "kata-web-ok");
    let routes = cri
        .exec_sync(&c, &["ip", "route"], 30)
        .await
        .expect("ip route");
    let routes = text(&routes.stdout);
    assert!(
        routes.contains(&format!("default via {} dev eth0", containerd.bridge_ip())),
        "{routes}"
    );

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn pods_reach_each_other() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let runc_pod = cri::pod_config("runc-peer", &containerd.log_dir());
    let runc_id = cri
        .run_pod(&runc_pod, "runc")
        .await
        .expect("RunPodSandbox (runc)");
    let runc_ip = pod_ip(&mut cri, &runc_id).await;
    let runc_c = pod::start_container(
        &mut cri,
        &runc_id,
        &runc_pod,
        &web_server("web", "runc-ok", ""),
    )
    .await;
    let (kata_id, kata_pod) = pod::run_kata_pod(&mut cri, &containerd, "kata-peer").await;
    let kata_ip = pod_ip(&mut cri, &kata_id).await;
    let kata_c = pod::start_container(
        &mut cri,
        &kata_id,
        &kata_pod,
        &web_server("web", "kata-ok", ""),
    )
    .await;

    let from_kata = fetch_from_container(&mut cri, &kata_c, &format!("http://{runc_ip}:{PORT}/"))
        .await
        .unwrap_or_else(|e| panic!("kata-like -> runc: {e}"));
    assert_eq!(from_kata.trim(), "runc-ok");
    let from_runc = fetch_from_container(&mut cri, &runc_c, &format!("http://{kata_ip}:{PORT}/"))
        .await
        .unwrap_or_else(|e| panic!("runc -> kata-like: {e}"));
    assert_eq!(from_runc.trim(), "kata-ok");

    cri.teardown_pod(&kata_id).await;
    cri.teardown_pod(&runc_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn host_port_maps() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let mut config = cri::pod_config("kata-hostport", &containerd.log_dir());
    config.port_mappings = vec![cri::v1::PortMapping {
        protocol: cri::v1::Protocol::Tcp as i32,
        container_port: i32::from(PORT),
        host_port: HOST_PORT,
        host_ip: String::new(),
    }];
    let pod_id = cri
        .run_pod(&config, KATA_RUNTIME_HANDLER)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    pod::start_container(
        &mut cri,
        &pod_id,
        &config,
        &web_server("web", "kata-hostport-ok", ""),
    )
    .await;

    // The node's own address and the hostPort: portmap's DNAT sends it to the pod's IP.
    let url = format!("http://{}:{HOST_PORT}/", containerd.bridge_ip());
    let body = fetch_from_host(&containerd, &url)
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", containerd.log_tail()));
    assert_eq!(body.trim(), "kata-hostport-ok");

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn network_teardown_leaves_nothing() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, _c) =
        pod::sleeping_kata_pod(&mut cri, &containerd, "kata-net-teardown", "main").await;
    let netns = kata_pod_netns(&containerd);
    // While the pod runs, its interface is joined to the VM's TAP both ways.
    let links = in_netns(&netns, "ip", &["-o", "link", "show"]);
    assert!(links.contains("tap0_kl"), "{links}");
    let filters = in_netns(&netns, "tc", &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("Egress Redirect to device tap0_kl"),
        "{filters}"
    );

    // Keep the namespace alive past containerd's removal of it, to look inside afterwards.
    let held = containerd.base.join("held-netns");
    std::fs::write(&held, "").expect("create the bind target");
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&netns)
        .arg(&held)
        .status()
        .expect("mount");
    assert!(bind.success(), "bind-mount {}", netns.display());

    cri.teardown_pod(&pod_id).await;
    let links = in_netns(&held, "ip", &["-o", "link", "show"]);
    let qdiscs = in_netns(&held, "tc", &["qdisc", "show"]);
    let _ = Command::new("umount").arg(&held).status();
    assert!(!links.contains("_kl"), "TAP left behind: {links}");
    assert!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left behind: {qdiscs}"
    );
    containerd.assert_no_leftovers(&kata);
}
