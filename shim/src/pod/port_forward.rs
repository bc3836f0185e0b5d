//! Port forwarding for a VM pod (CRI PortForward, `kubectl port-forward`).
//!
//! containerd 1.6 serves PortForward by entering the pod's network namespace on the host and
//! dialing `127.0.0.1:PORT` there (pkg/cri/server/sandbox_portforward_linux.go, `tcp4`
//! `localhost`). For a VM pod nothing listens there: the containers' servers are in the guest.
//!
//! Design (the brief's option b): one netfilter rule in the pod's host namespace, nat OUTPUT,
//! DNATs every locally made TCP connection to 127.0.0.1 (any port) onto one listener of this
//! shim at [`LISTEN_ADDRESS`]:L; for each connection the shim reads the port it was meant for
//! (SO_ORIGINAL_DST) and forwards it as one `PortForward` call to the agent, which dials
//! 127.0.0.1:PORT in the guest (agent/src/port_forward.rs). Bytes are relayed exactly, and a
//! half-close crosses both ways (kata_like_protocol::relay).
//! Why not mirror each listening guest port on the host (option a): that needs a list of the
//! guest's listening sockets kept in sync by polling, and a connection to a server that has just
//! started races the next poll; the rule has no list and no race, and a port nothing listens on
//! in the guest fails like it does for runc (connection refused, as the agent's NOT_FOUND closes
//! the connection).
//! The listener is on 127.0.0.2, not 127.0.0.1, so that no guest port is shadowed by it, and a
//! connection made straight to it (not through the rule) is refused: its original destination
//! is not 127.0.0.1.
//!
//! What this grants, and to whom: the listener and the rule only see loopback connections made
//! in the pod's host network namespace, where only the node's own processes run (containerd's
//! port-forward; CNI plugins): the containers are in the guest, and packets from the pod's
//! interfaces to 127.0.0.0/8 are martians the kernel drops. It reaches TCP ports of the guest's
//! 127.0.0.1, the same thing `kubectl port-forward` reaches in a runc pod. IPv6 (::1) is not
//! redirected: containerd 1.6 dials IPv4 only. At most `MAX_PORT_FORWARDS` connections are
//! forwarded at once (the agent's bound too); more are closed at once and logged.
//!
//! The rule is programmed with the node's `iptables` (iptables-nft or legacy, whichever the node
//! uses, as the CNI plugins do): no crate speaks nftables' netlink with NAT expressions in a
//! well-kept way. It lives only in the pod's namespace, and is deleted when the VM ends (through
//! a namespace fd held since the start, so even after containerd unmounted the namespace); the
//! namespace's removal would drop it anyway. A pod without a network namespace of its own
//! (host network) gets none: containerd then dials the node's own loopback.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kata_like_protocol::relay::{self, RelayError};
use kata_like_protocol::MAX_PORT_FORWARDS;
use nix::sched::CloneFlags;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::error::{Error, Result};
use crate::vm::agent_client::Agent;
use crate::vm::vm::Vm;

/// Where the shim's forwarding listener binds in the pod's namespace.
pub const LISTEN_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The destination containerd dials (and the only one redirected).
pub const FORWARDED_ADDRESS: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The nat rule of a pod: DNAT of local TCP to 127.0.0.1 onto the listener's port. The same
/// words add (`-A`) and delete (`-D`) it.
pub fn nat_rule(action: &str, listener_port: u16) -> Vec<String> {
    [
        "-w",
        "-t",
        "nat",
        action,
        "OUTPUT",
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("{LISTEN_ADDRESS}:{listener_port}")])
    .collect()
}

/// Which guest port a redirected connection was meant for: its original destination must be
/// 127.0.0.1 (anything else did not come through the rule) and a real port.
pub fn forwarded_port(original: SocketAddrV4) -> Result<u16> {
    if *original.ip() != FORWARDED_ADDRESS || original.port() == 0 {
        return Err(Error::InvalidArgument(format!(
            "a connection to the port-forward listener was meant for {original}, not for a port \
             of {FORWARDED_ADDRESS}: only port-forward connections (through the nat rule) are \
             forwarded"
        )));
    }
    Ok(original.port())
}

/// Runs `f` on a thread of its own that entered the network namespace `netns`; sockets it
/// creates, and processes it starts, belong to that namespace. (Namespaces are per thread: the
/// shim's other threads stay where they are.)
fn in_netns<T: Send>(netns: &OwnedFd, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(f())
            })
            .join()
            .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    })
}

/// Runs the node's iptables with `args` in `netns`.
fn iptables(netns: &OwnedFd, args: &[String]) -> Result<()> {
    let output = in_netns(netns, || {
        std::process::Command::new(iptables_binary())
            .args(args)
            .output()
    })
    .and_then(|r| r)
    .map_err(Error::io("run iptables in the pod's network namespace"))?;
    if !output.status.success() {
        return Err(Error::Other(format!(
            "iptables {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The node's iptables: on PATH, else where Debian puts it (containerd may run the shim with a
/// short PATH).
fn iptables_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("iptables"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/iptables"))
}

/// Starts port forwarding for the pod VM `vm` from the namespace at `netns_path`: binds the
/// listener, adds the rule, and serves until the VM ends, then deletes the rule.
pub fn start(vm: Arc<Vm>, netns_path: &Path) -> Result<()> {
    let netns: OwnedFd = std::fs::File::open(netns_path)
        .map_err(Error::io(format!(
            "open the pod's network namespace {}",
            netns_path.display()
        )))?
        .into();
    let listener = in_netns(&netns, || {
        std::net::TcpListener::bind(SocketAddrV4::new(LISTEN_ADDRESS, 0))
    })
    .and_then(|r| r)
    .and_then(|l| l.set_nonblocking(true).map(|()| l))
    .map_err(Error::io(format!(
        "listen on {LISTEN_ADDRESS} in the pod's network namespace {}",
        netns_path.display()
    )))?;
    let listener_port = listener
        .local_addr()
        .map_err(Error::io("port-forward listener address"))?
        .port();
    let listener =
        TcpListener::from_std(listener).map_err(Error::io("register the port-forward listener"))?;
    iptables(&netns, &nat_rule("-A", listener_port))?;
    tracing::info!(
        sandbox_id = %vm.sandbox_id,
        netns = %netns_path.display(),
        listener = %SocketAddrV4::new(LISTEN_ADDRESS, listener_port),
        "port-forward: local TCP to 127.0.0.1 in the pod's namespace goes to the guest"
    );
    tokio::spawn(async move {
        let vm_exit = vm.wait_exit();
        tokio::pin!(vm_exit);
        let slots = Arc::new(Semaphore::new(MAX_PORT_FORWARDS));
        loop {
            tokio::select! {
                _ = &mut vm_exit => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => accept(&vm, &slots, socket),
                    Err(error) => {
                        tracing::warn!(sandbox_id = %vm.sandbox_id, %error, "port-forward accept failed");
                        // A lasting error (fd limit) must not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        let sandbox_id = vm.sandbox_id.clone();
        let removed =
            tokio::task::spawn_blocking(move || iptables(&netns, &nat_rule("-D", listener_port)))
                .await;
        match removed {
            Ok(Ok(())) => tracing::info!(%sandbox_id, "port-forward rule removed"),
            Ok(Err(error)) => {
                tracing::warn!(%sandbox_id, %error, "cannot remove the port-forward rule (it goes with the pod's namespace)")
            }
            Err(error) => tracing::warn!(%sandbox_id, %error, "port-forward teardown failed"),
        }
    });
    Ok(())
}

/// One accepted connection: checked, bounded, then relayed to the guest on a task of its own.
fn accept(vm: &Arc<Vm>, slots: &Arc<Semaphore>, socket: TcpStream) {
    let sandbox_id = &vm.sandbox_id;
    let original = match nix::sys::socket::getsockopt(
        &socket,
        nix::sys::socket::sockopt::OriginalDst,
    ) {
        Ok(addr) => SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ),
        Err(error) => {
            tracing::warn!(%sandbox_id, %error, "port-forward: no original destination; closing");
            return;
        }
    };
    let port = match forwarded_port(original) {
        Ok(port) => port,
        Err(error) => {
            tracing::warn!(%sandbox_id, %error, "port-forward: refused a connection");
            return;
        }
    };
    let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
        tracing::warn!(
            %sandbox_id,
            port,
            "port-forward: {MAX_PORT_FORWARDS} connections are open already; closing this one"
        );
        return;
    };
    let agent = vm.agent.clone();
    let sandbox_id = sandbox_id.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let _ = socket.set_nodelay(true);
        match forward(&agent, socket, port).await {
            Ok(()) => tracing::debug!(%sandbox_id, port, "port-forward connection closed"),
            Err(error) => {
                tracing::info!(%sandbox_id, port, %error, "port-forward connection ended")
            }
        }
    });
}

/// Relays one host connection to guest port `port` until both sides closed or one failed.
async fn forward(agent: &Agent, socket: TcpStream, port: u16) -> Result<()> {
    let (to_guest, to_guest_rx) = mpsc::channel(8);
    // An agent refusal (nothing listens there, too many forwards) drops the socket here: the
    // client sees the connection close, as with a refused port in a runc pod.
    let from_guest = agent.port_forward(port, to_guest_rx).await?;
    match relay::relay(socket, from_guest, to_guest).await {
        Ok(_) | Err(RelayError::PeerGone) => Ok(()),
        Err(e) => Err(Error::Other(format!("guest port {port}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_redirects_only_local_tcp_to_ipv4_loopback_and_deletes_with_the_same_words() {
        let add = nat_rule("-A", 40000);
        let del = nat_rule("-D", 40000);
        assert_eq!(
            add.join(" "),
            "-w -t nat -A OUTPUT -d 127.0.0.1/32 -p tcp -j DNAT --to-destination 127.0.0.2:40000"
        );
        assert_eq!(add.len(), del.len());
        for (a, d) in add.iter().zip(&del) {
            if a != "-A" {
                assert_eq!(a, d);
            }
        }
    }

    #[test]
    fn only_connections_meant_for_loopback_ports_are_forwarded() {
        assert_eq!(
            forwarded_port(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)).unwrap(),
            8080
        );
        for bad in [
            SocketAddrV4::new(LISTEN_ADDRESS, 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        ] {
            let err = forwarded_port(bad).unwrap_err();
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
    }
}
