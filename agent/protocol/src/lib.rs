//! The shim-agent protocol of kata-like.
//!
//! The agent serves [`agent_server::Agent`] over vsock port [`AGENT_VSOCK_PORT`] inside the pod
//! VM; the shim uses [`agent_client::AgentClient`]. The `.proto` file is the specification; its
//! comments say what each call does and which errors it returns.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Generated types and services of `kata_like.agent.v1`.
pub mod v1 {
    tonic::include_proto!("kata_like.agent.v1");
}

pub use v1::*;

pub mod cgroup_stats;
pub mod relay;

/// vsock port the agent's gRPC server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// vsock port where any connection asks the agent to power the guest off cleanly.
pub const POWER_VSOCK_PORT: u32 = 1025;
/// Most `PortForward` calls (forwarded TCP connections) the agent serves at once.
pub const MAX_PORT_FORWARDS: usize = 64;
/// Version number of this protocol, reported by `Health`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest gRPC message either side accepts (CopyFile chunks and stdin writes stay below it).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Checks an id (sandbox, container, exec, storage) against the protocol's rule:
/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`. Ids become path components in the guest, so this rule
/// is what keeps `..`, `/` and NUL out of them.
pub fn is_valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn ids_follow_the_protocol_rule() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("0123abc_def.ghi-jkl"));
        assert!(is_valid_id(&"x".repeat(128)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".."));
        assert!(!is_valid_id("-a"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a\0b"));
        assert!(!is_valid_id(&"x".repeat(129)));
    }

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
            rootfs: Some(Rootfs {
                lower_dirs: vec!["/run/kata-like/storage/l1".into()],
                writable: true,
                upper_size_bytes: 0,
            }),
            stdio: Some(Stdio {
                terminal: true,
                stdin: false,
            }),
            pid_namespace: PidNamespaceMode::Target as i32,
            pid_namespace_target: "c0".into(),
        };
        let bytes = req.encode_to_vec();
        let back = CreateContainerRequest::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, req);
        assert!(CreateContainerRequest::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
