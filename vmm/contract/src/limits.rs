//! Every limit and fixed number of the contract. The VMM checks its own architecture constants
//! against these at compile time, so the two cannot drift apart.

/// Fewest MiB of guest memory a VM may have. 64 MiB is what a pod VM needs to boot: the guest
/// kernel with its page tables and slab (~20 MiB), the initramfs image and its unpacked copy
/// holding the agent (~2 x 8 MiB), and room for the first container's processes. The VMM
/// itself could run a smaller guest, but a smaller pod VM would only fail later and less clearly.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most MiB of guest memory a VM may have (1 TiB): far above any pod, low enough that
/// `memory_mib << 20` cannot overflow.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most vCPUs: as many as the VMM's MP table can describe (its `MAX_CPUS`, asserted equal to
/// this at compile time).
pub const MAX_VCPUS: u8 = 254;
/// Most virtio devices (drives, net, vsock and rng together): each takes one IOAPIC pin, and
/// pins below the VMM's virtio IRQ base belong to the legacy devices (24 pins - base 5). The
/// VMM asserts `IOAPIC_PINS - VIRTIO_IRQ_BASE` equals this.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest drive id: the virtio-blk serial (VIRTIO_BLK_T_GET_ID) is 20 bytes.
pub const MAX_DRIVE_ID_LEN: usize = 20;
/// Longest virtio-fs tag: the config space's `tag` field is 36 bytes.
pub const MAX_FS_TAG_LEN: usize = 36;
/// Longest TAP interface name (IFNAMSIZ minus the terminating NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Lowest guest vsock CID: 0-2 are reserved (hypervisor, local, host).
pub const MIN_VSOCK_CID: u64 = 3;
/// Highest guest vsock CID: CIDs are 32 bits on the wire.
pub const MAX_VSOCK_CID: u64 = u32::MAX as u64;
/// Lowest fd that may be named on the command line (`fd:N`, `fd=N`): 0-2 are stdio.
pub const MIN_INHERITED_FD: i32 = 3;
/// Longest API line, in either direction.
pub const MAX_LINE: usize = 64 * 1024;
/// Guest vsock port where the agent serves gRPC. The same number as the agent protocol's
/// `AGENT_VSOCK_PORT` (the shim, which sees both crates, asserts they agree).
pub const AGENT_PORT: u32 = 1024;
/// Guest vsock port whose connection asks the agent to power the guest off (graceful `stop`);
/// the agent protocol's `POWER_VSOCK_PORT`.
pub const POWER_PORT: u32 = 1025;
/// How long a graceful `stop` waits for the guest when the request names no timeout.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 5_000;
