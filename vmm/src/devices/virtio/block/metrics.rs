//! Per-drive counters, reported by the API's `metrics` op.

#[derive(Clone, Debug, Default, serde::Serialize)]
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
