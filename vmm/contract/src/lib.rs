//! The contract between kata-like's VMM (`kata-like-vmm`) and the programs that drive it (the
//! shim, the tests): the typed form of vmm/CONTRACT.md.
//!
//! - [`config`]: the VM's static configuration, with [`VmConfig::validate`];
//! - [`args`]: the codec between that configuration and the `kata-like-vmm run ...` arguments;
//! - [`api`]: the run-time API's requests and responses (JSON lines on the API socket);
//! - [`metrics`]: what the API's `metrics` op reports;
//! - [`limits`]: every limit and fixed number of the contract, in one place;
//! - [`tap`]: opening a TAP, the device behind `--net`.
//!
//! The VMM parses with these types and the shim builds with them, so a change to the contract is
//! a compile error on both sides rather than a surprise at run time.

pub mod api;
pub mod args;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod tap;

pub use api::{
    parse_request, parse_response, Request, RequestError, Response, ResponseError, SnapshotInfo,
};
pub use config::{
    parse_mac, BootConfig, ConfigError, ConsoleConfig, DriveConfig, FsConfig, JailConfig,
    MachineConfig, NetBackend, NetConfig, SeccompViolation, VmConfig, VsockConfig, DEFAULT_MAC,
};
pub use metrics::{
    BlockMetrics, ConsoleMetrics, DeviceCounters, DeviceMetrics, FsMetrics, NetMetrics, RngMetrics,
    VmMetrics, VsockMetrics,
};
