//! Guest network setup through rtnetlink: interfaces (found by MAC, renamed, MTU, addresses,
//! up), routes and permanent ARP/NDP neighbours. Everything is validated before the first change.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use kata_like_protocol::SetupNetworkRequest;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::error::{invalid, Error};

const MAX_ITEMS: usize = 1024;

pub fn parse_mac(text: &str) -> Result<[u8; 6], Error> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid(format!("MAC {text:?} is not aa:bb:cc:dd:ee:ff")));
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(invalid(format!("MAC {text:?} is not aa:bb:cc:dd:ee:ff")));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| invalid(format!("MAC {text:?} is not aa:bb:cc:dd:ee:ff")))?;
    }
    Ok(mac)
}

pub fn check_ifname(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(format!("interface name {name:?} is not valid")));
    }
    Ok(())
}

fn parse_ip(text: &str) -> Result<IpAddr, Error> {
    text.parse()
        .map_err(|_| invalid(format!("{text:?} is not an IP address")))
}

/// A route's gateway: "" for none.
fn parse_gateway(text: &str) -> Result<Option<IpAddr>, Error> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse_ip(text).map(Some)
    }
}

fn check_prefix(ip: IpAddr, prefix: u32) -> Result<u8, Error> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid(format!("prefix /{prefix} is too long for {ip}")));
    }
    Ok(prefix as u8)
}

/// "10.0.0.0/8", "fd00::/64" or "default" (family from `family_hint`).
fn parse_destination(text: &str, family_hint: Option<IpAddr>) -> Result<(IpAddr, u8), Error> {
    if text == "default" {
        let any = match family_hint {
            Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        };
        return Ok((any, 0));
    }
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (
            parse_ip(ip)?,
            prefix
                .parse::<u32>()
                .map_err(|_| invalid(format!("{text:?} is not a CIDR")))?,
        ),
        None => {
            let ip = parse_ip(text)?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    Ok((ip, check_prefix(ip, prefix)?))
}

/// Validates the whole request before anything changes.
pub fn validate(req: &SetupNetworkRequest) -> Result<(), Error> {
    if req.interfaces.len() > MAX_ITEMS
        || req.routes.len() > MAX_ITEMS
        || req.neighbors.len() > MAX_ITEMS
    {
        return Err(Error::resource_exhausted("too many network items"));
    }
    for iface in &req.interfaces {
        parse_mac(&iface.mac)?;
        if !iface.name.is_empty() {
            check_ifname(&iface.name)?;
        }
        if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
            return Err(invalid(format!("MTU {} is out of range", iface.mtu)));
        }
        for address in &iface.addresses {
            let ip = parse_ip(&address.address)?;
            check_prefix(ip, address.prefix_len)?;
        }
    }
    for route in &req.routes {
        let gateway = parse_gateway(&route.gateway)?;
        let (dest, _) = parse_destination(&route.destination, gateway)?;
        if let Some(gw) = gateway {
            if gw.is_ipv4() != dest.is_ipv4() {
                return Err(invalid("route gateway and destination families differ"));
            }
        }
        if !route.device.is_empty() {
            check_ifname(&route.device)?;
        }
        if !route.source.is_empty() {
            parse_ip(&route.source)?;
        }
        if route.device.is_empty() && gateway.is_none() {
            return Err(invalid("a route needs a gateway or a device"));
        }
    }
    for neighbor in &req.neighbors {
        parse_ip(&neighbor.ip)?;
        parse_mac(&neighbor.mac)?;
        check_ifname(&neighbor.device)?;
    }
    Ok(())
}

fn bad_route(e: impl std::fmt::Display) -> Error {
    invalid(format!("route: {e}"))
}

fn netlink_error(what: &str, e: rtnetlink::Error) -> Error {
    Error::internal(format!("{what}: {e}"))
}

/// Applies one link change; `what` names it in the error.
async fn set_link(handle: &mut Handle, change: LinkMessage, what: &str) -> Result<(), Error> {
    handle
        .link()
        .set(change)
        .execute()
        .await
        .map_err(|e| netlink_error(what, e))
}

async fn links(handle: &mut Handle) -> Result<Vec<LinkMessage>, Error> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("listing links", e))
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Applies the request in the agent's network namespace (the pod's network in the guest).
pub async fn setup(req: &SetupNetworkRequest) -> Result<(), Error> {
    validate(req)?;
    let (connection, mut handle, _) =
        rtnetlink::new_connection().map_err(|e| Error::internal(format!("netlink: {e}")))?;
    let connection = tokio::spawn(connection);
    let result = apply(&mut handle, req).await;
    connection.abort();
    result?;
    tracing::info!(
        interfaces = req.interfaces.len(),
        routes = req.routes.len(),
        "network set up"
    );
    Ok(())
}

async fn apply(handle: &mut Handle, req: &SetupNetworkRequest) -> Result<(), Error> {
    let existing = links(handle).await?;
    // Loopback first, whatever else the pod has: a runc pod's containers always have it
    // (localhost sidecars, readiness probes through 127.0.0.1).
    if let Some(lo) = existing
        .iter()
        .find(|l| link_name(l).as_deref() == Some("lo"))
    {
        let up = LinkUnspec::new_with_index(lo.header.index).up().build();
        set_link(handle, up, "setting lo up").await?;
    }
    for iface in &req.interfaces {
        let mac = parse_mac(&iface.mac)?;
        let link = existing
            .iter()
            .find(|l| link_mac(l).as_deref() == Some(&mac[..]))
            .ok_or_else(|| Error::not_found(format!("no interface with MAC {}", iface.mac)))?;
        let index = link.header.index;
        if !iface.name.is_empty() && link_name(link).as_deref() != Some(iface.name.as_str()) {
            // A link must be down to be renamed.
            let down = LinkUnspec::new_with_index(index).down().build();
            set_link(handle, down, "setting link down").await?;
            let renamed = LinkUnspec::new_with_index(index)
                .name(iface.name.clone())
                .build();
            set_link(handle, renamed, "renaming link").await?;
        }
        if iface.mtu != 0 {
            let mtu = LinkUnspec::new_with_index(index).mtu(iface.mtu).build();
            set_link(handle, mtu, "setting MTU").await?;
        }
        for address in &iface.addresses {
            let ip = parse_ip(&address.address)?;
            let prefix = check_prefix(ip, address.prefix_len)?;
            handle
                .address()
                .add(index, ip, prefix)
                .replace()
                .execute()
                .await
                .map_err(|e| netlink_error(&format!("adding {ip}/{prefix}"), e))?;
        }
        let up = LinkUnspec::new_with_index(index).up().build();
        set_link(handle, up, "setting link up").await?;
    }

    // Names after renaming.
    let by_name: HashMap<String, u32> = links(handle)
        .await?
        .iter()
        .filter_map(|l| Some((link_name(l)?, l.header.index)))
        .collect();
    let index_of = |name: &str| {
        by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::not_found(format!("no interface named {name}")))
    };

    for route in &req.routes {
        let gateway = parse_gateway(&route.gateway)?;
        let (dest, prefix) = parse_destination(&route.destination, gateway)?;
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dest, prefix)
            .map_err(bad_route)?;
        if let Some(gw) = gateway {
            builder = builder.gateway(gw).map_err(bad_route)?;
        } else {
            builder = builder.scope(RouteScope::Link);
        }
        if !route.device.is_empty() {
            builder = builder.output_interface(index_of(&route.device)?);
        }
        if !route.source.is_empty() {
            builder = builder
                .pref_source(parse_ip(&route.source)?)
                .map_err(bad_route)?;
        }
        handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("adding route {}", route.destination), e))?;
    }

    for neighbor in &req.neighbors {
        let ip = parse_ip(&neighbor.ip)?;
        let mac = parse_mac(&neighbor.mac)?;
        handle
            .neighbours()
            .add(index_of(&neighbor.device)?, ip)
            .link_local_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("adding neighbour {ip}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_like_protocol::{Interface, IpAddress, Neighbor, Route};

    #[test]
    fn requests_are_validated() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:0f").unwrap(),
            [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]
        );
        let good = SetupNetworkRequest {
            interfaces: vec![Interface {
                mac: "02:00:00:00:00:01".into(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec![IpAddress {
                    address: "10.0.0.2".into(),
                    prefix_len: 24,
                }],
            }],
            routes: vec![Route {
                destination: "default".into(),
                gateway: "10.0.0.1".into(),
                device: "eth0".into(),
                source: String::new(),
            }],
            neighbors: vec![Neighbor {
                ip: "10.0.0.1".into(),
                mac: "02:00:00:00:00:02".into(),
                device: "eth0".into(),
            }],
        };
        assert!(validate(&good).is_ok());
        let mut bad = good.clone();
        bad.interfaces[0].mac = "zz:00:00:00:00:01".into();
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad.interfaces[0].name = "../../etc".into();
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad.interfaces[0].addresses[0].prefix_len = 33;
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad.routes[0].gateway = "fd00::1".into();
        bad.routes[0].destination = "10.0.0.0/8".into();
        assert!(validate(&bad).is_err());
        let mut bad = good;
        bad.interfaces[0].mtu = 10;
        assert!(validate(&bad).is_err());
    }
}
