//! virtio-net counters.

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NetMetrics {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_invalid: u64,
    pub tap_errors: u64,
}
