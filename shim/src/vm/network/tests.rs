use super::*;

fn veth(index: u32, name: &str, mac: [u8; 6], addresses: &[(&str, u8)]) -> ObservedLink {
    ObservedLink {
        index,
        name: name.into(),
        up: true,
        loopback: false,
        ethernet: true,
        kind: "ether".into(),
        mac: mac.to_vec(),
        mtu: 1500,
        addresses: addresses
            .iter()
            .map(|(ip, p)| (ip.parse().expect("ip"), *p))
            .collect(),
    }
}

fn lo() -> ObservedLink {
    ObservedLink {
        index: 1,
        name: "lo".into(),
        up: true,
        loopback: true,
        ethernet: false,
        kind: "loopback".into(),
        mac: vec![0; 6],
        mtu: 65536,
        addresses: vec![("127.0.0.1".parse().expect("ip"), 8)],
    }
}

fn route(dest: Option<(&str, u8)>, gateway: Option<&str>, oif: u32, kernel: bool) -> ObservedRoute {
    ObservedRoute {
        destination: dest.map(|(ip, p)| (ip.parse().expect("ip"), p)),
        gateway: gateway.map(|g| g.parse().expect("ip")),
        oif: Some(oif),
        source: None,
        kernel,
        unicast: true,
        main_table: true,
    }
}

const MAC: [u8; 6] = [0x6a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];
const NETNS: &str = "/var/run/netns/cni-test";

/// A namespace as containerd's CNI bridge + host-local + loopback leave it.
fn cni_bridge_namespace() -> Observed {
    let mut tunl0 = veth(3, "tunl0", [0; 6], &[]);
    tunl0.up = false;
    tunl0.ethernet = false;
    tunl0.kind = "ipip".into();
    Observed {
        links: vec![lo(), veth(2, "eth0", MAC, &[("10.88.0.5", 16)]), tunl0],
        routes: vec![
            route(Some(("10.88.0.0", 16)), None, 2, true),
            route(None, Some("10.88.0.1"), 2, false),
            route(Some(("10.96.0.0", 12)), None, 2, false),
        ],
        neighbours: vec![
            ObservedNeighbour {
                ifindex: 2,
                ip: "10.88.0.1".parse().expect("ip"),
                mac: vec![2, 0, 0, 0, 0, 1],
                permanent: false,
            },
            ObservedNeighbour {
                ifindex: 2,
                ip: "10.88.0.9".parse().expect("ip"),
                mac: vec![2, 0, 0, 0, 0, 9],
                permanent: true,
            },
        ],
    }
}

#[test]
fn a_cni_bridge_namespace_gives_the_guest_the_veths_mac_address_and_routes() {
    let plan = plan(Path::new(NETNS), &cni_bridge_namespace()).expect("plan");
    assert_eq!(
        plan.links,
        vec![PlannedLink {
            index: 2,
            name: "eth0".into(),
            mac: MAC,
            mtu: 1500
        }]
    );
    let iface = &plan.setup.interfaces[0];
    assert_eq!(
        plan.setup.interfaces.len(),
        1,
        "lo and the down tunnel stay out"
    );
    assert_eq!(iface.mac, "6a:1b:2c:3d:4e:5f");
    assert_eq!((iface.name.as_str(), iface.mtu), ("eth0", 1500));
    assert_eq!(iface.addresses[0].address, "10.88.0.5");
    assert_eq!(iface.addresses[0].prefix_len, 16);
    // The kernel's subnet route is the guest kernel's business; on-link routes come before
    // the ones through a gateway.
    let routes: Vec<(&str, &str, &str)> = plan
        .setup
        .routes
        .iter()
        .map(|r| {
            (
                r.destination.as_str(),
                r.gateway.as_str(),
                r.device.as_str(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        vec![
            ("10.96.0.0/12", "", "eth0"),
            ("default", "10.88.0.1", "eth0")
        ]
    );
    assert_eq!(plan.setup.neighbors.len(), 1, "only permanent neighbours");
    assert_eq!(plan.setup.neighbors[0].ip, "10.88.0.9");
    assert_eq!(plan.setup.neighbors[0].mac, "02:00:00:00:00:09");
}

#[test]
fn several_interfaces_each_get_a_nic_with_their_own_routes() {
    let mut observed = cni_bridge_namespace();
    observed.links.push(veth(
        4,
        "net1",
        [2, 0, 0, 0, 0, 0x42],
        &[("192.168.7.3", 24), ("fd00::3", 64)],
    ));
    observed.routes.push(route(
        Some(("192.168.0.0", 16)),
        Some("192.168.7.1"),
        4,
        false,
    ));
    let plan = plan(Path::new(NETNS), &observed).expect("plan");
    let names: Vec<&str> = plan.links.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["eth0", "net1"]);
    assert_eq!(plan.setup.interfaces[1].addresses.len(), 2);
    assert!(plan
        .setup
        .routes
        .iter()
        .any(|r| r.destination == "192.168.0.0/16" && r.device == "net1"));
}

#[test]
fn interfaces_the_vm_cannot_carry_are_refused_by_name() {
    let refuse = |change: &dyn Fn(&mut Observed), expect: &str| {
        let mut observed = cni_bridge_namespace();
        change(&mut observed);
        let err = plan(Path::new(NETNS), &observed).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains(NETNS), "{err}");
    };
    refuse(
        &|o| {
            o.links[2].up = true;
        },
        "interface tunl0 is a ipip link; only Ethernet interfaces",
    );
    refuse(
        &|o| o.links[1].mac = vec![0; 6],
        "eth0 has no usable unicast MAC",
    );
    refuse(
        &|o| o.links[1].mac = vec![1, 2, 3],
        "eth0 has no usable unicast MAC",
    );
    refuse(
        &|o| o.links[1].mac[0] = 0x01,
        "eth0 has no usable unicast MAC",
    );
    refuse(&|o| o.links[1].mtu = 0, "eth0 has MTU 0");
    refuse(
        &|o| o.links.push(veth(9, "eth1", MAC, &[])),
        "interfaces share the MAC 6a:1b:2c:3d:4e:5f",
    );
    refuse(
        &|o| o.links.push(veth(9, "tap0_kl", [2, 0, 0, 0, 0, 7], &[])),
        "a TAP of an earlier pod VM",
    );
    refuse(
        &|o| {
            for i in 0..MAX_INTERFACES as u8 {
                o.links.push(veth(
                    10 + u32::from(i),
                    &format!("x{i}"),
                    [2, 0, 0, 0, 1, i],
                    &[],
                ));
            }
        },
        "a pod VM takes at most 8",
    );
    refuse(
        &|o| o.neighbours[1].mac = vec![1, 2, 3, 4, 5, 6, 7, 8],
        "permanent neighbour 10.88.0.9 has a link address of 8 bytes",
    );
}

#[test]
fn the_sandbox_spec_names_the_network_namespace_or_none() {
    let spec =
        |namespaces: serde_json::Value| serde_json::json!({"linux": {"namespaces": namespaces}});
    let path = netns_of_spec(&spec(serde_json::json!([
        {"type": "pid"},
        {"type": "network", "path": "/var/run/netns/cni-1234"}
    ])))
    .expect("ok");
    assert_eq!(path, Some(PathBuf::from("/var/run/netns/cni-1234")));
    // Host network: no entry. A new empty namespace: no path. Neither has anything to connect.
    assert_eq!(
        netns_of_spec(&spec(serde_json::json!([{"type": "pid"}]))).expect("ok"),
        None
    );
    assert_eq!(
        netns_of_spec(&spec(serde_json::json!([{"type": "network"}]))).expect("ok"),
        None
    );
    assert_eq!(netns_of_spec(&serde_json::json!({})).expect("ok"), None);
    for bad in [
        serde_json::json!([{"type": "network", "path": "netns/x"}]),
        serde_json::json!([{"type": "network", "path": "/var/run/netns/../../etc"}]),
        serde_json::json!([{"type": "network", "path": 7}]),
        serde_json::json!({"type": "network"}),
    ] {
        assert!(netns_of_spec(&spec(bad.clone())).is_err(), "{bad}");
    }
}

#[test]
fn a_vanished_namespace_is_a_clear_error() {
    let err = PodNetwork::connect(Path::new("/run/netns/kata-like-test-gone"), "pod")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/run/netns/kata-like-test-gone") && err.contains("cannot be opened"),
        "{err}"
    );
    // Nothing to undo in a namespace that is gone.
    disconnect(&NetworkRecord {
        netns: "/run/netns/kata-like-test-gone".into(),
        connections: vec![Connection {
            interface: "eth0".into(),
            tap: "tap0_kl".into(),
        }],
    })
    .expect("nothing to do");
}

#[test]
fn a_file_that_is_not_a_network_namespace_is_refused() {
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    let err = PodNetwork::connect(file.path(), "pod")
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a network namespace"), "{err}");
}

/// `ip` in a namespace; its stdout.
fn ip(args: &[&str]) -> String {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (the test needs iproute2 and root)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace holding a veth pair, removed on drop.
struct TestNamespace {
    name: String,
}

impl TestNamespace {
    fn new(tag: &str) -> TestNamespace {
        let name = format!("kl-test-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = TestNamespace { name };
        let n = ns.name.as_str();
        // No IPv6 autoconfiguration traffic (router solicitations, DAD) in the namespace: the
        // tests count the frames that cross the redirect.
        ip(&[
            "netns",
            "exec",
            n,
            "sh",
            "-c",
            "for c in all default; do echo 1 > /proc/sys/net/ipv6/conf/$c/disable_ipv6; done",
        ]);
        ip(&[
            "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ip(&[
            "-n",
            n,
            "link",
            "set",
            "eth0",
            "address",
            "6a:1b:2c:3d:4e:5f",
            "mtu",
            "1400",
            "up",
        ]);
        ip(&["-n", n, "link", "set", "peer0", "up"]);
        ip(&["-n", n, "address", "add", "10.99.0.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            "10.99.0.1",
            "dev",
            "eth0",
        ]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("tc", &all)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Root only (as CI and the KVM test host run): a real namespace, real TAPs and tc filters.
#[test]
fn connecting_a_namespace_redirects_both_ways_and_teardown_leaves_nothing() {
    use std::io::Write;
    let ns = TestNamespace::new("connect");
    let mut network = PodNetwork::connect(&ns.path(), "pod").expect("connect");
    // eth0 and its peer are both up Ethernet links of the namespace: two NICs.
    let mut taps: Vec<&str> = network
        .record
        .connections
        .iter()
        .map(|c| c.tap.as_str())
        .collect();
    taps.sort_unstable();
    assert_eq!(taps, ["tap0_kl", "tap1_kl"]);
    let at = network
        .record
        .connections
        .iter()
        .position(|c| c.interface == "eth0")
        .expect("eth0 connected");
    let eth0_tap = network.record.connections[at].tap.clone();
    assert_eq!(network.nics[at].mac, MAC);
    let eth0 = &network.setup.interfaces[at];
    assert_eq!((eth0.name.as_str(), eth0.mtu), ("eth0", 1400));
    assert_eq!(eth0.addresses[0].address, "10.99.0.2");
    assert!(network
        .setup
        .routes
        .iter()
        .any(|r| r.destination == "default" && r.gateway == "10.99.0.1"));
    let tap0 = ns.ip(&["-d", "link", "show", &eth0_tap]);
    assert!(tap0.contains("mtu 1400") && tap0.contains("UP"), "{tap0}");
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("protocol all")
            && filters.contains(&format!("Egress Redirect to device {eth0_tap}")),
        "{filters}"
    );
    // A frame the guest sends (written to the TAP) leaves through eth0.
    let tx_before = ns.ip(&["-s", "-j", "link", "show", "eth0"]);
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.resize(60, 0);
    network.nics[at]
        .tap
        .write_all(&frame)
        .expect("write a frame");
    let tx_after = ns.ip(&["-s", "-j", "link", "show", "eth0"]);
    let tx = |json: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(json).expect("ip -j");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    };
    assert_eq!(tx(&tx_after), tx(&tx_before) + 1, "{tx_after}");

    // The VMM's end closes the TAP fds; the shim's teardown removes the rest.
    let record = network.record.clone();
    network.nics.clear();
    disconnect(&record).expect("disconnect");
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains("_kl"), "{links}");
    for dev in ["eth0", "peer0"] {
        let qdiscs = ns.tc(&["qdisc", "show", "dev", dev]);
        assert!(!qdiscs.contains("ingress"), "{dev}: {qdiscs}");
    }
    // eth0 keeps what CNI gave it.
    assert!(ns.ip(&["address", "show", "eth0"]).contains("10.99.0.2/24"));
    disconnect(&record).expect("a second teardown finds nothing to do");
}

#[test]
fn a_failed_connection_leaves_nothing_in_the_namespace() {
    let ns = TestNamespace::new("fail");
    // Another tc user already holds peer0's ingress: the second interface cannot be connected.
    ns.tc(&["qdisc", "add", "dev", "peer0", "ingress"]);
    let err = PodNetwork::connect(&ns.path(), "pod")
        .unwrap_err()
        .to_string();
    assert!(err.contains("add an ingress qdisc to peer0"), "{err}");
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains("_kl"), "{links}");
    let qdiscs = ns.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}
