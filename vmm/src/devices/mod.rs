//! Devices the guest sees.

pub mod bus;
pub mod console_sink;
pub mod legacy;
pub mod virtio;

/// What a virtio device slot is, for metrics and the API.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub kind: &'static str,
    pub id: Option<String>,
}
