//! virtio-vsock with the hybrid Unix socket host side (Firecracker / Cloud Hypervisor
//! protocol): host-initiated `CONNECT <port>\n` -> `OK <hostport>\n`, guest-initiated
//! connections to host port P go to the Unix socket `<uds>_<P>`.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod packet;

pub use device::Vsock;
