//! virtio-rng counters.

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RngMetrics {
    pub requests: u64,
    pub bytes: u64,
    pub invalid_requests: u64,
}
