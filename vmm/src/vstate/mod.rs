//! KVM state: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
