//! VM snapshots: the state file's format and what it holds. A snapshot is a directory with
//! two files: `state` (this module: vCPUs, VM, devices) and `memory` (guest RAM, sparse,
//! written by `vstate::memory::write_snapshot_memory` and mapped MAP_PRIVATE on restore).
//!
//! The state file is checked whole before anything is restored:
//! `MAGIC (8) | format version (u32 LE) | 0 (u32) | body length (u64 LE) | SHA-256 of the body (32) | body`
//! and the body is JSON `{"header": SnapshotHeader, "state": MicrovmState}`. The header names
//! what made the snapshot (VMM version, host architecture, CPU vendor, the KVM capabilities
//! the state depends on), and a snapshot from another VMM version or another kind of host is
//! refused by name before its state is even parsed.
//!
//! JSON rather than a binary serde format: the state is small (about 30 KiB a vCPU, mostly
//! the 4 KiB XSAVE area written as numbers) next to the memory file, parses in well under a
//! millisecond, can be read when a restore goes wrong, and serde_json is already a dependency
//! (bincode would be one more for nothing measurable). The checksum is SHA-256 (sha2, already
//! in the workspace's lock file): it catches truncation and corruption alike.

use std::fs::File;
use std::io::Write;

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

const MAGIC: [u8; 8] = *b"KLVMSNAP";
/// Bumped whenever the preamble or the body's layout changes.
pub const FORMAT_VERSION: u32 = 1;
const PREAMBLE_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// A state file is tens of KiB per vCPU; anything past this is not one of ours.
const MAX_BODY_LEN: u64 = 64 << 20;
/// The largest state file `decode` accepts.
pub const MAX_STATE_FILE_LEN: u64 = PREAMBLE_LEN as u64 + MAX_BODY_LEN;
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The KVM capabilities a saved state needs on the host that restores it.
const STATE_CAPS: [(Cap, &str); 7] = [
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::GetTscKhz, "KVM_CAP_GET_TSC_KHZ"),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot state file is {0} bytes: truncated (the preamble alone is {PREAMBLE_LEN})")]
    TooShort(usize),
    #[error("not a kata-like snapshot state file (bad magic)")]
    Magic,
    #[error("snapshot format version {0}, this VMM reads version {FORMAT_VERSION}")]
    FormatVersion(u32),
    #[error("snapshot state file truncated: its preamble announces {announced} body bytes, it has {actual}")]
    Truncated { announced: u64, actual: u64 },
    #[error("snapshot state body of {0} bytes is implausibly large")]
    TooLarge(u64),
    #[error("snapshot state checksum mismatch: the state file is corrupted")]
    Checksum,
    #[error("snapshot state is malformed: {0}")]
    Malformed(String),
    #[error(
        "snapshot made by VMM {0}, this is {VMM_VERSION}: restore it with the VMM that made it"
    )]
    VmmVersion(String),
    #[error("snapshot made on {made}, this host is {here}")]
    Host { made: String, here: String },
    #[error("snapshot needs {0}, which this host's KVM lacks")]
    MissingCap(String),
    #[error("writing the snapshot state: {0}")]
    Write(std::io::Error),
    #[error("encoding the snapshot state: {0}")]
    Encode(serde_json::Error),
}

/// What the host that makes or restores a snapshot is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub arch: String,
    /// CPUID leaf 0's vendor string as KVM reports it (GenuineIntel, AuthenticAMD).
    pub cpu_vendor: String,
    /// The `STATE_CAPS` this host's KVM has, by name.
    pub kvm_caps: Vec<String>,
}

impl HostInfo {
    pub fn probe(kvm: &Kvm, supported_cpuid: &kvm_bindings::CpuId) -> HostInfo {
        let cpu_vendor = supported_cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0)
            .map(|e| {
                let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        HostInfo {
            arch: std::env::consts::ARCH.to_string(),
            cpu_vendor,
            kvm_caps: STATE_CAPS
                .iter()
                .filter(|(cap, _)| kvm.check_extension(*cap))
                .map(|(_, name)| name.to_string())
                .collect(),
        }
    }
}

/// Who made the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vmm_version: String,
    pub host: HostInfo,
}

impl SnapshotHeader {
    pub fn new(host: HostInfo) -> Self {
        SnapshotHeader {
            vmm_version: VMM_VERSION.to_string(),
            host,
        }
    }

    /// Refuses a snapshot this VMM on this host cannot restore faithfully.
    pub fn check_compatible(&self, here: &HostInfo) -> Result<(), Error> {
        if self.vmm_version != VMM_VERSION {
            return Err(Error::VmmVersion(self.vmm_version.clone()));
        }
        let made = &self.host;
        if made.arch != here.arch || made.cpu_vendor != here.cpu_vendor {
            return Err(Error::Host {
                made: format!("{} {}", made.arch, made.cpu_vendor),
                here: format!("{} {}", here.arch, here.cpu_vendor),
            });
        }
        if let Some(missing) = made.kvm_caps.iter().find(|c| !here.kvm_caps.contains(c)) {
            return Err(Error::MissingCap(missing.clone()));
        }
        Ok(())
    }
}

/// Everything of a paused VM but its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Guest RAM size: the memory file's length.
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// One per virtio slot, in slot order.
    pub devices: Vec<TransportSnapshot>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    header: &'a SnapshotHeader,
    state: &'a MicrovmState,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    header: SnapshotHeader,
    /// Parsed only once the header says this VMM can read it.
    state: serde_json::Value,
}

/// The state file's bytes.
pub fn encode(header: &SnapshotHeader, state: &MicrovmState) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(&EnvelopeOut { header, state }).map_err(Error::Encode)?;
    let mut out = Vec::with_capacity(PREAMBLE_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a state file's bytes whole (length, checksum, then compatibility with `here`)
/// and only then parses the state.
pub fn decode(bytes: &[u8], here: &HostInfo) -> Result<(SnapshotHeader, MicrovmState), Error> {
    if bytes.len() < PREAMBLE_LEN {
        return Err(Error::TooShort(bytes.len()));
    }
    let (preamble, body) = bytes.split_at(PREAMBLE_LEN);
    if preamble[..8] != MAGIC {
        return Err(Error::Magic);
    }
    let u32_at = |o: usize| {
        u32::from_le_bytes([
            preamble[o],
            preamble[o + 1],
            preamble[o + 2],
            preamble[o + 3],
        ])
    };
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(Error::FormatVersion(version));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&preamble[16..24]);
    let announced = u64::from_le_bytes(len);
    if announced > MAX_BODY_LEN || body.len() as u64 > MAX_BODY_LEN {
        return Err(Error::TooLarge(announced.max(body.len() as u64)));
    }
    if announced != body.len() as u64 {
        return Err(Error::Truncated {
            announced,
            actual: body.len() as u64,
        });
    }
    if Sha256::digest(body).as_slice() != &preamble[24..56] {
        return Err(Error::Checksum);
    }
    let envelope: EnvelopeIn =
        serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))?;
    envelope.header.check_compatible(here)?;
    let state: MicrovmState =
        serde_json::from_value(envelope.state).map_err(|e| Error::Malformed(e.to_string()))?;
    Ok((envelope.header, state))
}

/// Writes the state file (after the memory file: a state file is only there once the
/// memory it describes is). A full disk fails here with the write's error.
pub fn write_state(file: &mut File, bytes: &[u8]) -> Result<(), Error> {
    file.write_all(bytes).map_err(Error::Write)?;
    file.sync_all().map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{DeviceSnapshot, QueueSnapshot};

    fn host() -> HostInfo {
        HostInfo {
            arch: "x86_64".into(),
            cpu_vendor: "AuthenticAMD".into(),
            kvm_caps: STATE_CAPS.iter().map(|(_, n)| n.to_string()).collect(),
        }
    }

    fn state() -> MicrovmState {
        MicrovmState {
            memory_bytes: 128 << 20,
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: kvm_bindings::kvm_clock_data {
                    clock: 123_456_789,
                    ..Default::default()
                },
            },
            vcpus: vec![VcpuState {
                index: 0,
                cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                    function: 1,
                    eax: 0x800f12,
                    ..Default::default()
                }],
                msrs: vec![kvm_bindings::kvm_msr_entry {
                    index: 0x4b56_4d01,
                    data: 0x1234_5001,
                    ..Default::default()
                }],
                regs: kvm_bindings::kvm_regs {
                    rip: 0xffff_ffff_8100_0000,
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                mp_state: Default::default(),
                vcpu_events: Default::default(),
                tsc_khz: Some(2_000_000),
            }],
            serial: SerialSnapshot {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            devices: vec![TransportSnapshot {
                device_type: 4,
                status: 0xf,
                device_features_sel: 1,
                driver_features_sel: 1,
                acked_features: 1 << 32,
                queue_sel: 0,
                config_generation: 2,
                interrupt_status: 1,
                bad_queue_size: vec![false],
                queues: vec![QueueSnapshot {
                    max_size: 64,
                    size: 64,
                    ready: true,
                    desc_table: 0x10000,
                    avail_ring: 0x10400,
                    used_ring: 0x11000,
                    next_avail: 7,
                    next_used: 7,
                    event_idx: false,
                }],
                broken: false,
                device: DeviceSnapshot::Rng,
            }],
        }
    }

    #[test]
    fn a_state_file_reads_back_as_the_state_it_was_written_from() {
        let header = SnapshotHeader::new(host());
        let bytes = encode(&header, &state()).unwrap();
        let (h, s) = decode(&bytes, &host()).unwrap();
        assert_eq!(h, header);
        assert_eq!(s.memory_bytes, 128 << 20);
        assert_eq!(s.vm.clock.clock, 123_456_789);
        assert_eq!(s.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(s.vcpus[0].msrs[0].data, 0x1234_5001);
        assert_eq!(s.vcpus[0].cpuid[0].eax, 0x800f12);
        assert_eq!(s.vcpus[0].tsc_khz, Some(2_000_000));
        assert_eq!(s.serial, state().serial);
        assert_eq!(s.devices, state().devices);
    }

    fn error_of(bytes: &[u8]) -> String {
        match decode(bytes, &host()) {
            Ok(_) => panic!("decoded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_truncated_state_file_is_refused() {
        let bytes = encode(&SnapshotHeader::new(host()), &state()).unwrap();
        let err = error_of(&bytes[..bytes.len() - 100]);
        assert!(err.contains("truncated"), "{err}");
        assert!(error_of(&bytes[..20]).contains("truncated"));
        assert!(error_of(&[]).contains("truncated"));
    }

    #[test]
    fn a_corrupted_state_file_is_refused_by_its_checksum() {
        let mut bytes = encode(&SnapshotHeader::new(host()), &state()).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        assert_eq!(
            error_of(&bytes),
            "snapshot state checksum mismatch: the state file is corrupted"
        );
    }

    #[test]
    fn a_foreign_file_or_format_is_refused() {
        let mut bytes = encode(&SnapshotHeader::new(host()), &state()).unwrap();
        bytes[8] = 9;
        assert_eq!(
            error_of(&bytes),
            "snapshot format version 9, this VMM reads version 1"
        );
        bytes[0] = b'X';
        assert!(error_of(&bytes).contains("bad magic"));
        assert!(error_of(&[0u8; 4096]).contains("bad magic"));
    }

    #[test]
    fn a_snapshot_of_another_vmm_version_is_refused() {
        let header = SnapshotHeader {
            vmm_version: "0.0.9".into(),
            host: host(),
        };
        let err = error_of(&encode(&header, &state()).unwrap());
        assert_eq!(
            err,
            format!("snapshot made by VMM 0.0.9, this is {VMM_VERSION}: restore it with the VMM that made it")
        );
    }

    #[test]
    fn a_snapshot_of_another_host_or_kvm_is_refused() {
        let intel = HostInfo {
            cpu_vendor: "GenuineIntel".into(),
            ..host()
        };
        let bytes = encode(&SnapshotHeader::new(intel), &state()).unwrap();
        assert_eq!(
            error_of(&bytes),
            "snapshot made on x86_64 GenuineIntel, this host is x86_64 AuthenticAMD"
        );
        let poorer = HostInfo {
            kvm_caps: vec![],
            ..host()
        };
        let bytes = encode(&SnapshotHeader::new(host()), &state()).unwrap();
        let err = decode(&bytes, &poorer).err().unwrap().to_string();
        assert_eq!(
            err,
            "snapshot needs KVM_CAP_PIT_STATE2, which this host's KVM lacks"
        );
    }

    #[test]
    fn a_body_that_checks_out_but_is_not_a_state_is_refused() {
        let body = br#"{"header":{"vmm_version":"x"},"state":{}}"#;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(body));
        bytes.extend_from_slice(body);
        assert!(error_of(&bytes).starts_with("snapshot state is malformed"));
    }
}
