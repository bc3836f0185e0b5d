//! virtio-fs counters, reported by the API's `metrics` op. The struct is the contract crate's,
//! so that its wire format is defined once (vmm/contract/src/metrics.rs).

pub use kata_like_vmm_contract::metrics::FsMetrics;
