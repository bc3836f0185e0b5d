//! What the API's `metrics` op reports: the VM's counters and one entry per virtio device, in
//! the VMM's device order. The field names are the wire format. Reading is lenient (missing
//! counters are 0, an unknown device type is [`DeviceCounters::Other`]) so that a newer VMM
//! with more counters still reads.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmMetrics {
    pub vcpus: usize,
    pub paused: bool,
    /// Bytes the guest wrote to its consoles (8250 and virtio-console).
    pub console_bytes: u64,
    /// Console bytes the host sink did not take at once (a full pipe: the shim fell behind)
    /// and that were dropped, so that the guest never waits for the host.
    pub console_dropped_bytes: u64,
    pub devices: Vec<DeviceMetrics>,
}

/// One virtio device: its transport's status register (0 never probed, 0xf driver ready) and
/// its own counters, whose `type` says which device it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    #[serde(default)]
    pub status: u32,
    #[serde(flatten)]
    pub counters: DeviceCounters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceCounters {
    Block {
        #[serde(default)]
        id: String,
        #[serde(default)]
        capacity_sectors: u64,
        #[serde(flatten)]
        counters: BlockMetrics,
    },
    Net(NetMetrics),
    Vsock {
        #[serde(default)]
        open_connections: usize,
        #[serde(flatten)]
        counters: VsockMetrics,
    },
    Rng(RngMetrics),
    Console(ConsoleMetrics),
    /// virtio-fs (vhost-user-fs): the backend does the I/O, so these count the frontend's part.
    Fs {
        #[serde(default)]
        tag: String,
        #[serde(flatten)]
        counters: FsMetrics,
    },
    /// A device type this reader does not know.
    #[serde(other)]
    Other,
}

impl DeviceCounters {
    /// The device type, as in the `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceCounters::Block { .. } => "block",
            DeviceCounters::Net(_) => "net",
            DeviceCounters::Vsock { .. } => "vsock",
            DeviceCounters::Rng(_) => "rng",
            DeviceCounters::Console(_) => "console",
            DeviceCounters::Fs { .. } => "fs",
            DeviceCounters::Other => "other",
        }
    }
}

/// Per-drive counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockMetrics {
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    pub get_id_requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub invalid_requests: u64,
    pub io_errors: u64,
    pub unsupported_requests: u64,
    pub backing_changes: u64,
}

/// virtio-net counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetMetrics {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_invalid: u64,
    pub tap_errors: u64,
}

/// virtio-vsock counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VsockMetrics {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub invalid_packets: u64,
    pub resets_sent: u64,
}

/// virtio-rng counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RngMetrics {
    pub requests: u64,
    pub bytes: u64,
    pub invalid_requests: u64,
}

/// virtio-fs counters: guest notifications passed to the backend, backend completion signals
/// turned into interrupts, times the backend hung up, requests answered with ENOTCONN after.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FsMetrics {
    pub kicks: u64,
    pub interrupts: u64,
    pub backend_failures: u64,
    pub failed_requests: u64,
}

/// virtio-console counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsoleMetrics {
    /// Transmit chains written to the console sink.
    pub tx_chains: u64,
    pub tx_bytes: u64,
    /// Transmit chains refused (device-writable or out-of-range buffer, over 64 KiB).
    pub invalid_chains: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_entries_are_flat_objects_tagged_by_type() {
        let m = VmMetrics {
            vcpus: 1,
            devices: vec![
                DeviceMetrics {
                    status: 15,
                    counters: DeviceCounters::Block {
                        id: "slot0".into(),
                        capacity_sectors: 8,
                        counters: BlockMetrics {
                            read_requests: 2,
                            ..Default::default()
                        },
                    },
                },
                DeviceMetrics {
                    status: 7,
                    counters: DeviceCounters::Rng(RngMetrics::default()),
                },
            ],
            ..Default::default()
        };
        let v = serde_json::to_value(&m).expect("encode");
        assert_eq!(v["devices"][0]["type"], "block");
        assert_eq!(v["devices"][0]["id"], "slot0");
        assert_eq!(v["devices"][0]["status"], 15);
        assert_eq!(v["devices"][0]["read_requests"], 2);
        assert_eq!(v["devices"][1]["type"], "rng");
        assert_eq!(serde_json::from_value::<VmMetrics>(v).expect("decode"), m);
    }

    #[test]
    fn partial_and_unknown_entries_still_read() {
        let m: VmMetrics = serde_json::from_str(
            r#"{"console_bytes":3,"devices":[{"type":"block","status":1},
                {"type":"gpu","status":2,"frames":9}],"future":1}"#,
        )
        .expect("decode");
        assert_eq!(m.console_bytes, 3);
        assert_eq!(m.devices[0].counters.kind(), "block");
        assert_eq!(m.devices[1].status, 2);
        assert_eq!(m.devices[1].counters, DeviceCounters::Other);
    }
}
