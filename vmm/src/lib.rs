//! kata-like-vmm: one jailed KVM microVM per pod. Its configuration, command line and API types
//! are the contract crate's (`kata_like_vmm_contract`, vmm/contract/), re-exported here.

pub use kata_like_vmm_contract as contract;

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod jail;
pub mod persist;
pub mod seccomp;
pub mod test_guest;
pub mod vmm;
pub mod vmm_requests;
pub mod vstate;
