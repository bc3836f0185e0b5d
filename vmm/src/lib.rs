//! kata-like-vmm: one jailed KVM microVM per pod.

pub mod arch;
pub mod devices;
pub mod test_guest;
pub mod vstate;
