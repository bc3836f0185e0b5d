//! Legacy port I/O devices.

pub mod serial;
