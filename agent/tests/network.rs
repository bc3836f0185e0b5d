//! SetupNetwork through rtnetlink, with the agent in a network namespace of its own.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;
use kata_like_protocol::*;

fn in_agent_netns(agent: &TestAgent, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(agent.pid().to_string())
        .arg("-n")
        .args(args)
        .output()
        .expect("nsenter");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn interfaces_routes_and_neighbours_are_configured() {
    let mut agent = TestAgent::start_with(|command| {
        // SAFETY: unshare is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    })
    .await;
    in_agent_netns(
        &agent,
        &[
            "ip",
            "link",
            "add",
            "tmp0",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "tmp1",
        ],
    );
    let request = SetupNetworkRequest {
        interfaces: vec![Interface {
            mac: "02:00:00:00:00:01".into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![
                IpAddress {
                    address: "10.99.0.2".into(),
                    prefix_len: 24,
                },
                IpAddress {
                    address: "fd00::2".into(),
                    prefix_len: 64,
                },
            ],
        }],
        routes: vec![
            Route {
                destination: "default".into(),
                gateway: "10.99.0.1".into(),
                device: "eth0".into(),
                source: String::new(),
            },
            Route {
                destination: "10.100.0.0/16".into(),
                gateway: String::new(),
                device: "eth0".into(),
                source: "10.99.0.2".into(),
            },
        ],
        neighbors: vec![Neighbor {
            ip: "10.99.0.1".into(),
            mac: "02:00:00:00:00:02".into(),
            device: "eth0".into(),
        }],
    };
    agent.client.setup_network(request).await.unwrap();
    let link = in_agent_netns(&agent, &["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains("02:00:00:00:00:01"), "{link}");
    let addrs = in_agent_netns(&agent, &["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.99.0.2/24"), "{addrs}");
    assert!(addrs.contains("fd00::2/64"), "{addrs}");
    let routes = in_agent_netns(&agent, &["ip", "route"]);
    assert!(
        routes.contains("default via 10.99.0.1 dev eth0"),
        "{routes}"
    );
    assert!(routes.contains("10.100.0.0/16 dev eth0"), "{routes}");
    assert!(routes.contains("src 10.99.0.2"), "{routes}");
    let neigh = in_agent_netns(&agent, &["ip", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh.contains("10.99.0.1 lladdr 02:00:00:00:00:02 PERMANENT"),
        "{neigh}"
    );

    let err = agent
        .client
        .setup_network(SetupNetworkRequest {
            interfaces: vec![Interface {
                mac: "02:00:00:00:00:99".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = agent
        .client
        .setup_network(SetupNetworkRequest {
            routes: vec![Route {
                destination: "10.0.0.0/99".into(),
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
