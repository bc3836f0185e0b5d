//! virtio-blk: raw file-backed drives, with empty slots the shim fills after boot.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;
#[cfg(test)]
pub mod test_utils;

pub use device::{Block, BlockConfig};
