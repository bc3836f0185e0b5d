//! The pod's network, host side: the interfaces CNI put into the pod's network namespace become
//! the pod VM's NICs.
//!
//! For each Ethernet interface that is up (the bridge plugin's veth, or a macvlan, ...) the shim
//! creates a TAP `tap<N>_kl` in the same namespace and joins the two with tc, as Kata's
//! "tcfilter" model does: an ingress qdisc on each, with a u32 match-all filter whose mirred
//! action redirects every frame to the other's egress. Frames pass unchanged both ways, so the
//! guest NIC takes the interface's MAC (what the CNI result, the bridge's FDB and the
//! neighbours know) and the pod keeps the IP, routes and permanent neighbours CNI gave it: the
//! agent sets them up in the guest (SetupNetwork). A bridge in the namespace would do the same
//! job with a learning step and netfilter hooks in the path; the redirect is one lookup.
//!
//! The interface keeps its addresses in the namespace: nothing there uses them (the redirect
//! takes every frame before the namespace's IP stack sees it), and the CNI plugins' DEL reads
//! them back (the bridge plugin removes its masquerade rules by the addresses it finds).
//!
//! Teardown: the TAP vanishes when its last fd closes, and the shim keeps none once the VMM has
//! its own, so a dead VMM takes its TAPs along. The shim removes the ingress qdiscs (their
//! filters go with them) and any TAP still there; what it connected is recorded in the state
//! dir (`network.json`) so that a shim restarted after a crash can undo it too.
//!
//! Netlink sockets and TAPs belong to the network namespace of the thread that opens them; every
//! namespace operation runs on a thread of its own that enters the pod's namespace (setns) and
//! ends with the operation, so no thread of the shim is ever left in the wrong namespace.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use kata_like_protocol as pb;
use kata_like_vmm_contract::config::format_mac;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The record of a connected pod network in the state dir.
pub const RECORD_FILE: &str = "network.json";
/// More interfaces than this is not a pod network the VM can take (each is a virtio device).
pub const MAX_INTERFACES: usize = 8;
/// Suffix of the TAPs the shim creates (`tap0_kl`, ...).
pub const TAP_SUFFIX: &str = "_kl";
/// The main routing table (RT_TABLE_MAIN).
const MAIN_TABLE: u32 = 254;
/// tc's parent handle of an ingress qdisc's filters (`parent ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// One interface of the pod's namespace joined to a TAP, by name (indexes are not stable
/// across a crash, names are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub interface: String,
    pub tap: String,
}

/// What the shim changed in a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    pub connections: Vec<Connection>,
}

/// A NIC of the pod VM: the TAP fd for the VMM and the MAC the guest device gets.
#[derive(Debug)]
pub struct Nic {
    pub tap: File,
    pub mac: [u8; 6],
}

/// A connected pod network.
#[derive(Debug)]
pub struct PodNetwork {
    pub record: NetworkRecord,
    pub nics: Vec<Nic>,
    /// What the agent sets up in the guest.
    pub setup: pb::SetupNetworkRequest,
}

// ---------------------------------------------------------------------------------------------
// What the namespace holds, and what the guest gets: plain data, so the rules are unit-tested.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedLink {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub loopback: bool,
    /// Ethernet framing (ARPHRD_ETHER): what a TAP can carry.
    pub ethernet: bool,
    /// The link type as iproute2 names it, for errors.
    pub kind: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Global-scope addresses with their prefix length (link-local ones the guest makes itself).
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRoute {
    /// None: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    /// Made by the kernel from an address: the guest's kernel makes it too.
    pub kernel: bool,
    pub unicast: bool,
    pub main_table: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNeighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Vec<u8>,
    pub permanent: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: Vec<ObservedLink>,
    pub routes: Vec<ObservedRoute>,
    pub neighbours: Vec<ObservedNeighbour>,
}

/// An interface to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLink {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub links: Vec<PlannedLink>,
    pub setup: pb::SetupNetworkRequest,
}

fn bad_network(netns: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("pod network namespace {}: {what}", netns.display()))
}

/// Decides what to connect and what the guest gets; refuses what the VM cannot carry.
pub fn plan(netns: &Path, observed: &Observed) -> Result<Plan> {
    let mut links = Vec::new();
    let mut setup = pb::SetupNetworkRequest::default();
    for link in &observed.links {
        if link.loopback {
            continue;
        }
        if !link.up {
            // Down links are not the pod's network (a fresh namespace holds the kernel's
            // fallback tunnels, tunl0, sit0, ..., down).
            tracing::debug!(interface = %link.name, "skipping a link that is down");
            continue;
        }
        if link.name.ends_with(TAP_SUFFIX) {
            return Err(bad_network(
                netns,
                format!(
                    "it already holds {}, a TAP of an earlier pod VM; the namespace is in use",
                    link.name
                ),
            ));
        }
        if !link.ethernet {
            return Err(bad_network(
                netns,
                format!(
                    "interface {} is a {} link; only Ethernet interfaces (veth, macvlan, \
                     ipvlan in L2 mode, ...) can be connected to the pod VM",
                    link.name, link.kind
                ),
            ));
        }
        let mac: [u8; 6] = link
            .mac
            .as_slice()
            .try_into()
            .ok()
            .filter(|m: &[u8; 6]| *m != [0u8; 6] && m[0] & 1 == 0)
            .ok_or_else(|| {
                bad_network(
                    netns,
                    format!(
                        "interface {} has no usable unicast MAC ({:02x?})",
                        link.name, link.mac
                    ),
                )
            })?;
        if !(68..=65535).contains(&link.mtu) {
            return Err(bad_network(
                netns,
                format!("interface {} has MTU {}", link.name, link.mtu),
            ));
        }
        if links.iter().any(|l: &PlannedLink| l.mac == mac) {
            return Err(bad_network(
                netns,
                format!(
                    "interfaces share the MAC {}; the guest finds its NICs by MAC",
                    format_mac(&mac)
                ),
            ));
        }
        links.push(PlannedLink {
            index: link.index,
            name: link.name.clone(),
            mac,
            mtu: link.mtu,
        });
        setup.interfaces.push(pb::Interface {
            mac: format_mac(&mac),
            name: link.name.clone(),
            mtu: link.mtu,
            addresses: link
                .addresses
                .iter()
                .map(|(ip, prefix)| pb::IpAddress {
                    address: ip.to_string(),
                    prefix_len: u32::from(*prefix),
                })
                .collect(),
        });
    }
    if links.len() > MAX_INTERFACES {
        return Err(bad_network(
            netns,
            format!(
                "{} interfaces; a pod VM takes at most {MAX_INTERFACES}",
                links.len()
            ),
        ));
    }
    let name_of: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    // On-link routes first: a route through a gateway needs the gateway reachable.
    let mut routes: Vec<&ObservedRoute> = observed
        .routes
        .iter()
        .filter(|r| r.main_table && r.unicast && !r.kernel)
        .collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for route in routes {
        let Some(device) = route.oif.and_then(|i| name_of.get(&i)) else {
            tracing::warn!(
                ?route,
                "skipping a route that leaves through no connected interface"
            );
            continue;
        };
        setup.routes.push(pb::Route {
            destination: match route.destination {
                None => "default".into(),
                Some((ip, prefix)) => format!("{ip}/{prefix}"),
            },
            gateway: route.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: device.to_string(),
            source: route.source.map(|s| s.to_string()).unwrap_or_default(),
        });
    }
    for neighbour in observed.neighbours.iter().filter(|n| n.permanent) {
        let Some(device) = name_of.get(&neighbour.ifindex) else {
            continue;
        };
        let Ok(mac) = <[u8; 6]>::try_from(neighbour.mac.as_slice()) else {
            return Err(bad_network(
                netns,
                format!(
                    "permanent neighbour {} has a link address of {} bytes",
                    neighbour.ip,
                    neighbour.mac.len()
                ),
            ));
        };
        setup.neighbors.push(pb::Neighbor {
            ip: neighbour.ip.to_string(),
            mac: format_mac(&mac),
            device: device.to_string(),
        });
    }
    Ok(Plan { links, setup })
}

/// The network namespace named by a sandbox spec (`linux.namespaces`, type `network`, with a
/// path). None: the pod shares the host's network (no entry) or gets an empty namespace (no
/// path), and the VM gets no NIC.
pub fn netns_of_spec(spec: &serde_json::Value) -> Result<Option<PathBuf>> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else {
        return Ok(None);
    };
    let namespaces = namespaces
        .as_array()
        .ok_or_else(|| Error::InvalidArgument("linux.namespaces is not a list".into()))?;
    for ns in namespaces {
        if ns.get("type").and_then(serde_json::Value::as_str) != Some("network") {
            continue;
        }
        let path = match ns.get("path") {
            None => return Ok(None),
            Some(p) => p.as_str().ok_or_else(|| {
                Error::InvalidArgument("the network namespace's path is not a string".into())
            })?,
        };
        if path.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
            return Err(Error::InvalidArgument(format!(
                "network namespace path {path:?} must be absolute, without '..'"
            )));
        }
        return Ok(Some(path));
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Inside the namespace.

/// Runs `work` on a new thread that has entered the network namespace `netns`, with a
/// single-threaded runtime for netlink; the thread ends with the work.
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let ns = File::open(netns).map_err(|e| {
        bad_network(
            netns,
            format!("cannot be opened ({e}); was the pod's network torn down?"),
        )
    })?;
    let netns_name = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                bad_network(
                    &netns_name,
                    format!("is not a network namespace the shim can enter ({e})"),
                )
            })?;
            drop(ns);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(Error::io("start the netlink runtime"))?;
            runtime.block_on(async {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(Error::io("open a netlink socket"))?;
                let connection = tokio::spawn(connection);
                let result = work(handle).await;
                connection.abort();
                result
            })
        })
        .map_err(Error::io("start the pod-netns thread"))?;
    thread
        .join()
        .map_err(|_| Error::Other("the pod-netns thread panicked".into()))?
}

fn netlink(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| Error::Other(format!("{what}: {e}"))
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn observe_link(link: &LinkMessage, addresses: &[AddressMessage]) -> ObservedLink {
    let mut mac = Vec::new();
    let mut mtu = 0;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(m) => mac = m.clone(),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let index = link.header.index;
    let addresses = addresses
        .iter()
        .filter(|a| a.header.index == index && a.header.scope == AddressScope::Universe)
        .filter_map(|a| {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
            // point-to-point link); IPv6 has only IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            Some((local.or(address)?, a.header.prefix_len))
        })
        .collect();
    ObservedLink {
        index,
        name: link_name(link),
        up: link.header.flags.contains(LinkFlags::Up),
        loopback: link.header.link_layer_type == LinkLayerType::Loopback,
        ethernet: link.header.link_layer_type == LinkLayerType::Ether,
        kind: link.header.link_layer_type.to_string().to_lowercase(),
        mac,
        mtu,
        addresses,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn observe_route(r: &RouteMessage) -> ObservedRoute {
    let mut route = ObservedRoute {
        destination: None,
        gateway: None,
        oif: None,
        source: None,
        kernel: r.header.protocol == RouteProtocol::Kernel,
        unicast: r.header.kind == RouteType::Unicast,
        main_table: u32::from(r.header.table) == MAIN_TABLE,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                route.destination = route_ip(d).map(|ip| (ip, r.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::PrefSource(s) => route.source = route_ip(s),
            RouteAttribute::Table(t) => route.main_table = *t == MAIN_TABLE,
            _ => {}
        }
    }
    if route.destination.is_none() && r.header.destination_prefix_length != 0 {
        // A prefix without an address is not a route we can copy; keep it out.
        route.unicast = false;
    }
    route
}

fn observe_neighbour(n: &NeighbourMessage) -> Option<ObservedNeighbour> {
    let mut ip = None;
    let mut mac = Vec::new();
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLocalAddress(m) => mac = m.clone(),
            _ => {}
        }
    }
    Some(ObservedNeighbour {
        ifindex: n.header.ifindex,
        ip: ip?,
        mac,
        permanent: n.header.state == NeighbourState::Permanent,
    })
}

async fn observe(handle: &Handle) -> Result<Observed> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the namespace's links"))?;
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the namespace's addresses"))?;
    let mut routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the namespace's IPv4 routes"))?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the namespace's IPv6 routes"))?;
    routes.extend(v6);
    let neighbours: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list the namespace's neighbours"))?;
    Ok(Observed {
        links: links.iter().map(|l| observe_link(l, &addresses)).collect(),
        routes: routes.iter().map(observe_route).collect(),
        neighbours: neighbours.iter().filter_map(observe_neighbour).collect(),
    })
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let handle = handle.clone();
    let found: std::result::Result<Vec<LinkMessage>, _> = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_collect()
        .await;
    match found {
        Ok(links) => Ok(links.first().map(|l| l.header.index)),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(netlink(format!("look up link {name}"))(e)),
    }
}

/// Redirects every frame arriving on `from` to the egress of `to`.
async fn redirect(
    handle: &Handle,
    from: (u32, &str),
    to: (u32, &str),
    progress: &mut Progress,
) -> Result<()> {
    let h = handle.clone();
    h.qdisc()
        .add(from.0 as i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!(
            "add an ingress qdisc to {} (does another tc user hold it?)",
            from.1
        )))?;
    progress.ingress.push(from.1.to_string());
    h.traffic_filter(from.0 as i32)
        .add()
        .parent(INGRESS_PARENT)
        // tc keeps the protocol in network byte order (iproute2's `protocol all`).
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to.0)
        .map_err(netlink("build the redirect filter"))?
        .execute()
        .await
        .map_err(netlink(format!(
            "add a filter redirecting {} to {}",
            from.1, to.1
        )))
}

/// Removes the ingress qdisc (and its filters) of `name`, if both exist.
async fn remove_ingress(handle: &Handle, name: &str) -> Result<()> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    let h = handle.clone();
    let mut del = h.qdisc().del(index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
    match del.execute().await {
        Ok(()) => Ok(()),
        // No ingress qdisc there (never added, or removed already).
        Err(rtnetlink::Error::NetlinkError(e))
            if [-libc::ENOENT, -libc::EINVAL].contains(&e.raw_code()) =>
        {
            Ok(())
        }
        Err(e) => Err(netlink(format!("remove the ingress qdisc of {name}"))(e)),
    }
}

async fn remove_link(handle: &Handle, name: &str) -> Result<()> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    let h = handle.clone();
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(netlink(format!("remove {name}"))(e)),
    }
}

/// Removes the ingress qdiscs of `ingress` and the links `taps`, going on after a failed step.
async fn undo(handle: &Handle, ingress: &[String], taps: &[String]) -> Result<()> {
    let mut first_error = None;
    let steps = ingress
        .iter()
        .map(|dev| (dev, true))
        .chain(taps.iter().map(|tap| (tap, false)));
    for (dev, is_ingress) in steps {
        let step = if is_ingress {
            remove_ingress(handle, dev).await
        } else {
            remove_link(handle, dev).await
        };
        if let Err(e) = step {
            tracing::warn!(device = %dev, error = %e, "network teardown step failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What a connection in progress has changed so far, to undo exactly that if it fails.
#[derive(Default)]
struct Progress {
    nics: Vec<Nic>,
    connections: Vec<Connection>,
    /// Devices whose ingress qdisc the shim added.
    ingress: Vec<String>,
    taps: Vec<String>,
}

async fn connect_links(
    handle: &Handle,
    links: &[PlannedLink],
    progress: &mut Progress,
) -> Result<()> {
    for (i, link) in links.iter().enumerate() {
        let tap_name = format!("tap{i}{TAP_SUFFIX}");
        let tap = kata_like_vmm_contract::tap::open_tap(&tap_name)
            .map_err(Error::io(format!("create TAP {tap_name}")))?;
        progress.nics.push(Nic { tap, mac: link.mac });
        progress.taps.push(tap_name.clone());
        let tap_index = link_index(handle, &tap_name).await?.ok_or_else(|| {
            Error::Other(format!("TAP {tap_name} vanished right after its creation"))
        })?;
        let up = LinkUnspec::new_with_index(tap_index)
            .mtu(link.mtu)
            .up()
            .build();
        handle
            .link()
            .set(up)
            .execute()
            .await
            .map_err(netlink(format!("bring {tap_name} up")))?;
        redirect(
            handle,
            (link.index, &link.name),
            (tap_index, &tap_name),
            progress,
        )
        .await?;
        redirect(
            handle,
            (tap_index, &tap_name),
            (link.index, &link.name),
            progress,
        )
        .await?;
        progress.connections.push(Connection {
            interface: link.name.clone(),
            tap: tap_name,
        });
    }
    Ok(())
}

impl PodNetwork {
    /// Reads the pod's namespace and connects each interface to a new TAP. On failure nothing
    /// is left in the namespace.
    pub fn connect(netns: &Path, sandbox_id: &str) -> Result<PodNetwork> {
        let netns_owned = netns.to_path_buf();
        let sandbox = sandbox_id.to_string();
        in_netns(netns, move |handle| async move {
            let observed = observe(&handle).await?;
            let plan = plan(&netns_owned, &observed)?;
            let mut progress = Progress::default();
            if let Err(e) = connect_links(&handle, &plan.links, &mut progress).await {
                // Closing the TAP fds removes the TAPs (and their qdiscs); the rest by hand.
                progress.nics.clear();
                if let Err(undo_error) = undo(&handle, &progress.ingress, &progress.taps).await {
                    tracing::error!(sandbox_id = %sandbox, error = %undo_error, "undoing a half-connected pod network");
                }
                return Err(e);
            }
            tracing::info!(
                sandbox_id = %sandbox,
                netns = %netns_owned.display(),
                interfaces = ?progress.connections,
                routes = plan.setup.routes.len(),
                "pod network connected to the VM's TAPs"
            );
            Ok(PodNetwork {
                record: NetworkRecord {
                    netns: netns_owned,
                    connections: progress.connections,
                },
                nics: progress.nics,
                setup: plan.setup,
            })
        })
    }
}

/// Undoes a recorded connection. A namespace that is gone took everything with it.
pub fn disconnect(record: &NetworkRecord) -> Result<()> {
    if !record.netns.exists() {
        return Ok(());
    }
    let ingress: Vec<String> = record
        .connections
        .iter()
        .flat_map(|c| [c.interface.clone(), c.tap.clone()])
        .collect();
    let taps: Vec<String> = record.connections.iter().map(|c| c.tap.clone()).collect();
    in_netns(&record.netns, move |handle| async move {
        undo(&handle, &ingress, &taps).await
    })
}

/// Writes the record into the state dir (before the VMM starts, so every later failure finds
/// it).
pub fn save_record(state_dir: &Path, record: &NetworkRecord) -> Result<()> {
    let path = state_dir.join(RECORD_FILE);
    let text = serde_json::to_vec(record)
        .map_err(|e| Error::Other(format!("encode the network record: {e}")))?;
    std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))
}

/// Undoes what the state dir's record names, if any.
pub fn disconnect_recorded(state_dir: &Path) -> Result<()> {
    let path = state_dir.join(RECORD_FILE);
    let Some(record): Option<NetworkRecord> = super::read_state_record(
        &path,
        "network record",
        "remove the TAPs and ingress qdiscs by hand",
    )?
    else {
        return Ok(());
    };
    disconnect(&record)
}

#[cfg(test)]
mod tests;
