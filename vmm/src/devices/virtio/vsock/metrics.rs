//! virtio-vsock counters.

#[derive(Clone, Debug, Default, serde::Serialize)]
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
