//! kata-like-vmm: one jailed KVM microVM per pod.

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod jail;
pub mod resources;
pub mod seccomp;
pub mod test_guest;
pub mod vmm;
pub mod vmm_config;
pub mod vstate;
