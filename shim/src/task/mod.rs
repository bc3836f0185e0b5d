//! containerd's task API v2: the service that translates it, its events and its metrics.

pub mod events;
pub mod metrics;
pub mod service;
