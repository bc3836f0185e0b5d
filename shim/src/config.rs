//! Shim configuration: `/etc/kata-like/config.toml`, overridden by containerd's runtime options
//! (`ConfigPath`) and, where it is safe, by pod annotations.
//!
//! Which file is read, first match wins:
//! 1. `ConfigPath` of the runtime options containerd passes on Create (runtime table
//!    `options = { ConfigPath = "..." }`, or `ctr run --runtime-config-path`);
//! 2. the `KATA_LIKE_CONFIG` environment variable of the shim (inherited from containerd);
//! 3. `/etc/kata-like/config.toml`.
//!
//! A missing file at the default path means built-in defaults; a missing file that was named
//! explicitly is an error.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kata_like_vmm_contract::limits::{
    MAX_MEMORY_MIB, MAX_VCPUS, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::pod_limits;

/// Virtio devices of a pod VM besides its drive slots: vsock, rng and console.
const NON_DRIVE_DEVICES: u32 = 3;
/// Most drive slots: the VMM's device limit minus the other devices.
const MAX_DRIVE_SLOTS: u32 = MAX_VIRTIO_DEVICES as u32 - NON_DRIVE_DEVICES;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kata-like/config.toml";
pub const CONFIG_ENV: &str = "KATA_LIKE_CONFIG";

/// Prefix of the pod annotations the shim reads. Any other annotation under it is refused, so a
/// typo never silently falls back to a default.
pub const ANNOTATION_PREFIX: &str = "io.kata-like.";
pub const ANNOTATION_VCPUS: &str = "io.kata-like.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.kata-like.memory-mib";
pub const ANNOTATION_DEBUG_CONSOLE: &str = "io.kata-like.debug-console";
/// Every annotation the shim reads; only those listed in `[annotations] allowed` take effect.
pub const KNOWN_ANNOTATIONS: [&str; 3] = [
    ANNOTATION_VCPUS,
    ANNOTATION_MEMORY_MIB,
    ANNOTATION_DEBUG_CONSOLE,
];

/// Largest config file accepted (a config is a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub vmm: VmmConfig,
    pub jail: JailConfig,
    pub limits: Limits,
    pub sizing: SizingConfig,
    pub annotations: AnnotationsConfig,
    pub console_log: ConsoleLogConfig,
    /// Per-sandbox state (sockets, pid file, console log, jail dir) lives under
    /// `<state_dir>/<16 hex digits of sha256(namespace/sandbox id)>/`.
    pub state_dir: PathBuf,
    /// Cache of erofs images of read-only snapshot layers, shared by all pods of the host.
    pub rootfs_cache_dir: PathBuf,
    /// How many images the cache keeps (least recently used ones go first).
    pub rootfs_cache_entries: usize,
    /// mkfs.erofs binary (erofs-utils).
    pub mkfs_erofs: PathBuf,
    /// virtiofsd binary (the Rust virtiofsd), the backend of every pod's shared file system.
    pub virtiofsd: PathBuf,
    /// Log level of the shim (tracing filter), e.g. "info" or "debug".
    pub log_level: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmConfig {
    pub path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Base kernel command line; the VMM appends its virtio-mmio device list.
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Empty virtio-blk slots created at boot; rootfs layers are hot-set into them. One slot per
    /// distinct read-only layer in use by the pod at a time.
    pub drive_slots: u32,
    /// How long the guest may take from VMM start to a healthy agent.
    pub boot_timeout_ms: u64,
    /// Deadline of one ordinary agent call (long-running waits and streams have none).
    pub agent_call_timeout_ms: u64,
    /// Keep the guest console log and boot the kernel with verbose output.
    pub debug_console: bool,
    pub hugepages: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Run the VMM in its jail (namespaces, chroot, seccomp). Turn off only to debug.
    pub enabled: bool,
    /// The block of ids the pods' VMMs run as, `"<first>:<count>"`: each pod VMM gets one id
    /// of its own (uid = gid), leased for the pod's life (`vm::vmm_ids`); see the VMM README's
    /// threat model.
    pub id_range: IdRange,
}

/// A block of ids `first..first + count`, written `"<first>:<count>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

/// Lowest id a range may start at: above nobody (65534) and every ordinary user and group.
pub const MIN_FIRST_ID: u32 = 65536;

impl Default for IdRange {
    /// 65536 ids at the top of systemd's container range (524288..=1879048191), which
    /// systemd-nspawn allocates from the bottom: far above normal users, nobody and the
    /// ranges of user namespaces Kubernetes or Podman hand out by default.
    fn default() -> Self {
        IdRange {
            first: 1_878_982_656,
            count: 65536,
        }
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.first, self.count)
    }
}

impl FromStr for IdRange {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = "jail.id_range must be \"<first id>:<count>\", e.g. \"1878982656:65536\"";
        let (first, count) = s
            .split_once(':')
            .ok_or_else(|| format!("{usage}, got {s:?}"))?;
        let first: u32 = first
            .parse()
            .map_err(|_| format!("{usage}, got {s:?} (first id is not a number)"))?;
        let count: u32 = count
            .parse()
            .map_err(|_| format!("{usage}, got {s:?} (count is not a number)"))?;
        if first < MIN_FIRST_ID {
            return Err(format!(
                "jail.id_range {s:?} starts below {MIN_FIRST_ID}: the VMMs' ids must not be \
                 those of nobody or of ordinary users; pick a block above them"
            ));
        }
        if count == 0 {
            return Err(format!(
                "jail.id_range {s:?} is empty: give at least one id per pod that may run at once"
            ));
        }
        // u32::MAX is (uid_t)-1, "no change" to setresuid: never an id.
        if u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(format!(
                "jail.id_range {s:?} goes past the largest id {}",
                u32::MAX - 1
            ));
        }
        Ok(IdRange { first, count })
    }
}

impl TryFrom<String> for IdRange {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

/// The host-side guest console log, `<pod state dir>/console.log`: the shim writes it from a
/// pipe the VMM writes the console into, and rotates it so that a guest flooding its console
/// keeps at most `max_bytes * (1 + files)` bytes on the host, the newest ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleLogConfig {
    /// Largest size of `console.log` and of each rotated file.
    pub max_bytes: u64,
    /// Rotated files kept (`console.log.1` newest ... `console.log.N`); 0 keeps only the
    /// current file, which then starts over when full.
    pub files: u32,
}

/// Smallest `console_log.max_bytes`: the failure reports quote the console's last 4 KiB.
pub const MIN_CONSOLE_LOG_BYTES: u64 = 4096;
/// Largest `console_log.max_bytes` (1 GiB): the log lives under /run, in memory.
pub const MAX_CONSOLE_LOG_BYTES: u64 = 1 << 30;
/// Most rotated console log files.
pub const MAX_CONSOLE_LOG_FILES: u32 = 16;

impl Default for ConsoleLogConfig {
    fn default() -> Self {
        ConsoleLogConfig {
            max_bytes: 1024 * 1024,
            files: 2,
        }
    }
}

/// Upper bounds for values a pod may ask for through annotations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
}

/// How the pod's resource limits (containerd's `io.kubernetes.cri.sandbox-*` annotations, the sum
/// of its containers' limits) size its VM. A pod without limits gets `[vmm] vcpus`/`memory_mib`;
/// a pod with limits gets at least its limits plus these overheads, within `[limits]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizingConfig {
    /// Guest memory on top of the pod's memory limit: the guest kernel, the agent, page tables
    /// and page cache (the pod's containers are held to their own limits by the guest's cgroups).
    pub memory_overhead_mib: u32,
    /// vCPUs on top of the pod's CPU limit (rounded up to whole vCPUs).
    pub vcpus_overhead: u32,
}

/// Which `io.kata-like.*` pod annotations take effect. They change the VM (its size, its debug
/// console), which the scheduler does not see and which a pod must not choose on its own, so none
/// is allowed unless the operator lists it here.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationsConfig {
    /// Annotation names, e.g. `["io.kata-like.memory-mib"]`; values stay within `[limits]`.
    pub allowed: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vmm: VmmConfig::default(),
            jail: JailConfig::default(),
            limits: Limits::default(),
            sizing: SizingConfig::default(),
            annotations: AnnotationsConfig::default(),
            console_log: ConsoleLogConfig::default(),
            state_dir: PathBuf::from("/run/kata-like"),
            rootfs_cache_dir: PathBuf::from("/run/kata-like/rootfs-cache"),
            rootfs_cache_entries: 64,
            mkfs_erofs: PathBuf::from("/usr/bin/mkfs.erofs"),
            virtiofsd: PathBuf::from("/usr/libexec/virtiofsd"),
            log_level: "info".into(),
        }
    }
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            path: PathBuf::from("/usr/local/bin/kata-like-vmm"),
            kernel: PathBuf::from("/usr/share/kata-like/vmlinux"),
            initrd: Some(PathBuf::from("/usr/share/kata-like/initramfs.cpio")),
            kernel_params: "console=hvc0 panic=-1 reboot=t quiet".into(),
            vcpus: 1,
            memory_mib: 128,
            drive_slots: 8,
            boot_timeout_ms: 60_000,
            agent_call_timeout_ms: 60_000,
            debug_console: false,
            hugepages: false,
        }
    }
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            id_range: IdRange::default(),
        }
    }
}

impl Default for SizingConfig {
    fn default() -> Self {
        SizingConfig {
            memory_overhead_mib: 96,
            vcpus_overhead: 0,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vcpus: 8,
            max_memory_mib: 16 * 1024,
        }
    }
}

impl Config {
    /// Parses a config file's text and checks its values.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::InvalidConfig(format!("{e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Loads the config from `explicit` (runtime options), `$KATA_LIKE_CONFIG` or the default
    /// path, in that order.
    pub fn load(explicit: Option<&Path>) -> Result<Config> {
        let env_path = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let (path, named) = match (explicit, env_path) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) if !p.as_os_str().is_empty() => (p, true),
            _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
                let config = Config::default();
                config.validate()?;
                return Ok(config);
            }
            Err(e) => {
                return Err(Error::InvalidConfig(format!(
                    "cannot read config {}: {e}",
                    path.display()
                )))
            }
            Ok(meta) if meta.len() > MAX_CONFIG_BYTES => {
                return Err(Error::InvalidConfig(format!(
                    "config {} is larger than {MAX_CONFIG_BYTES} bytes",
                    path.display()
                )))
            }
            Ok(_) => {}
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::InvalidConfig(format!("cannot read config {}: {e}", path.display()))
        })?;
        Config::parse(&text)
            .map_err(|e| Error::InvalidConfig(format!("config {}: {e}", path.display())))
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidConfig(what));
        for (name, path) in [
            ("vmm.path", &self.vmm.path),
            ("vmm.kernel", &self.vmm.kernel),
            ("state_dir", &self.state_dir),
            ("rootfs_cache_dir", &self.rootfs_cache_dir),
            ("mkfs_erofs", &self.mkfs_erofs),
            ("virtiofsd", &self.virtiofsd),
        ] {
            if !path.is_absolute() {
                return bad(format!("{name} must be an absolute path, got {path:?}"));
            }
        }
        if let Some(initrd) = &self.vmm.initrd {
            if !initrd.is_absolute() {
                return bad(format!(
                    "vmm.initrd must be an absolute path, got {initrd:?}"
                ));
            }
        }
        if self.limits.max_vcpus == 0 || self.limits.max_vcpus > u32::from(MAX_VCPUS) {
            return bad(format!(
                "limits.max_vcpus must be 1..={MAX_VCPUS}, got {}",
                self.limits.max_vcpus
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&u64::from(self.limits.max_memory_mib)) {
            return bad(format!(
                "limits.max_memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {}",
                self.limits.max_memory_mib
            ));
        }
        if self.vmm.vcpus == 0 || self.vmm.vcpus > self.limits.max_vcpus {
            return bad(format!(
                "vmm.vcpus must be 1..={}, got {}",
                self.limits.max_vcpus, self.vmm.vcpus
            ));
        }
        if u64::from(self.vmm.memory_mib) < MIN_MEMORY_MIB
            || self.vmm.memory_mib > self.limits.max_memory_mib
        {
            return bad(format!(
                "vmm.memory_mib must be {MIN_MEMORY_MIB}..={}, got {}",
                self.limits.max_memory_mib, self.vmm.memory_mib
            ));
        }
        if self.vmm.drive_slots == 0 || self.vmm.drive_slots > MAX_DRIVE_SLOTS {
            return bad(format!(
                "vmm.drive_slots must be 1..={MAX_DRIVE_SLOTS} (the VMM's {MAX_VIRTIO_DEVICES} \
                 virtio devices minus vsock, rng and console), got {}",
                self.vmm.drive_slots
            ));
        }
        if self.sizing.memory_overhead_mib > self.limits.max_memory_mib
            || self.sizing.vcpus_overhead > self.limits.max_vcpus
        {
            return bad(format!(
                "sizing.memory_overhead_mib must be at most limits.max_memory_mib ({}) and \
                 sizing.vcpus_overhead at most limits.max_vcpus ({})",
                self.limits.max_memory_mib, self.limits.max_vcpus
            ));
        }
        if !(MIN_CONSOLE_LOG_BYTES..=MAX_CONSOLE_LOG_BYTES).contains(&self.console_log.max_bytes) {
            return bad(format!(
                "console_log.max_bytes must be {MIN_CONSOLE_LOG_BYTES}..={MAX_CONSOLE_LOG_BYTES}, \
                 got {}",
                self.console_log.max_bytes
            ));
        }
        if self.console_log.files > MAX_CONSOLE_LOG_FILES {
            return bad(format!(
                "console_log.files must be 0..={MAX_CONSOLE_LOG_FILES}, got {}",
                self.console_log.files
            ));
        }
        if self.vmm.boot_timeout_ms == 0 || self.vmm.agent_call_timeout_ms == 0 {
            return bad("vmm.boot_timeout_ms and vmm.agent_call_timeout_ms must be > 0".into());
        }
        for name in &self.annotations.allowed {
            if !KNOWN_ANNOTATIONS.contains(&name.as_str()) {
                return bad(format!(
                    "annotations.allowed: {name:?} is not an annotation the kata-like runtime \
                     reads (known: {})",
                    KNOWN_ANNOTATIONS.join(", ")
                ));
            }
        }
        if self.vmm.kernel_params.len() > 2048 || self.vmm.kernel_params.contains('\0') {
            return bad("vmm.kernel_params must be at most 2048 bytes without NUL".into());
        }
        Ok(())
    }
}

/// The VM shape of one pod after annotations were applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub debug_console: bool,
}

/// Largest annotation value the shim looks at; anything bigger is refused outright.
const MAX_ANNOTATION_VALUE: usize = 64;

/// Applies the pod's `io.kata-like.*` annotations to the configured VM shape. Only the VM size
/// and the debug console may be chosen by a pod, and only those the operator allowed in
/// `[annotations] allowed`; paths (kernel, VMM, jail) never come from annotations. An unknown or
/// not allowed annotation, or a value outside the configured limits, is refused with the reason.
///
/// Before those, the pod's own limits size the VM (see [`SizingConfig`]); a pod whose limits need
/// more than `[limits]` allows is refused with both numbers.
pub fn vm_shape(config: &Config, annotations: &HashMap<String, String>) -> Result<VmShape> {
    let mut shape = VmShape {
        vcpus: config.vmm.vcpus,
        memory_mib: config.vmm.memory_mib,
        debug_console: config.vmm.debug_console,
    };
    let pod = pod_limits::from_annotations(annotations)?;
    if let Some(limit) = pod.memory_mib {
        let need = limit.saturating_add(u64::from(config.sizing.memory_overhead_mib));
        if need > u64::from(config.limits.max_memory_mib) {
            return Err(Error::InvalidArgument(format!(
                "the pod's memory limit ({limit} MiB, {}) needs a {need} MiB VM with the \
                 configured overhead of {} MiB, above the runtime's limits.max_memory_mib = {}; \
                 lower the pod's limits or raise the maximum",
                pod_limits::SANDBOX_MEMORY,
                config.sizing.memory_overhead_mib,
                config.limits.max_memory_mib
            )));
        }
        // need <= max_memory_mib, a u32.
        shape.memory_mib = shape.memory_mib.max(need as u32);
    }
    if let Some(limit) = pod.vcpus {
        let need = limit.saturating_add(u64::from(config.sizing.vcpus_overhead));
        if need > u64::from(config.limits.max_vcpus) {
            return Err(Error::InvalidArgument(format!(
                "the pod's CPU limit ({limit} CPUs, {} / {}) needs {need} vCPUs, above the \
                 runtime's limits.max_vcpus = {}; lower the pod's limits or raise the maximum",
                pod_limits::SANDBOX_CPU_QUOTA,
                pod_limits::SANDBOX_CPU_PERIOD,
                config.limits.max_vcpus
            )));
        }
        shape.vcpus = shape.vcpus.max(need as u32);
    }
    for (key, value) in annotations {
        if !key.starts_with(ANNOTATION_PREFIX) {
            continue;
        }
        if !KNOWN_ANNOTATIONS.contains(&key.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "annotation {key:?} is not one the kata-like runtime accepts ({})",
                KNOWN_ANNOTATIONS.join(", ")
            )));
        }
        if !config.annotations.allowed.iter().any(|a| a == key) {
            return Err(Error::InvalidArgument(format!(
                "annotation {key} is not allowed by the kata-like runtime's configuration: it \
                 changes the pod VM, so the node's operator must allow it first by adding \
                 {key:?} to `[annotations] allowed` in the shim's config file \
                 ({DEFAULT_CONFIG_PATH} or the runtime's ConfigPath); or remove the annotation"
            )));
        }
        if value.len() > MAX_ANNOTATION_VALUE {
            return Err(Error::InvalidArgument(format!(
                "annotation {key}: value longer than {MAX_ANNOTATION_VALUE} bytes"
            )));
        }
        match key.as_str() {
            ANNOTATION_VCPUS => {
                shape.vcpus = parse_bounded(key, value, 1, config.limits.max_vcpus)?;
            }
            ANNOTATION_MEMORY_MIB => {
                // MIN_MEMORY_MIB fits u32 (it is 64).
                let min = MIN_MEMORY_MIB as u32;
                shape.memory_mib = parse_bounded(key, value, min, config.limits.max_memory_mib)?;
            }
            ANNOTATION_DEBUG_CONSOLE => {
                shape.debug_console = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "annotation {key}: expected true or false, got {value:?}"
                        )))
                    }
                }
            }
            // Unknown keys were refused above; this arm only keeps the match total.
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "annotation {key:?} is not one the kata-like runtime accepts"
                )))
            }
        }
    }
    Ok(shape)
}

fn parse_bounded(key: &str, value: &str, min: u32, max: u32) -> Result<u32> {
    let n: u32 = value.parse().map_err(|_| {
        Error::InvalidArgument(format!("annotation {key}: {value:?} is not a number"))
    })?;
    if n < min || n > max {
        return Err(Error::InvalidArgument(format!(
            "annotation {key}: {n} is outside {min}..={max}"
        )));
    }
    Ok(n)
}

/// Decodes containerd's runtime options (`runtimeoptions.v1.Options`: field 1 `type_url`, field 2
/// `config_path`) from the raw protobuf bytes of the Any's value, returning `config_path`.
/// containerd 1.6's CRI sends this type for runtimes other than runc; ctr sends it for
/// `--runtime-config-path`. Other option types are ignored (None).
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    use containerd_shim_protos::protobuf::CodedInputStream;
    let mut input = CodedInputStream::from_bytes(value);
    let mut config_path = None;
    let malformed = |e: containerd_shim_protos::protobuf::Error| {
        Error::InvalidArgument(format!("malformed runtime options: {e}"))
    };
    while !input.eof().map_err(malformed)? {
        let tag = input.read_raw_varint32().map_err(malformed)?;
        match (tag >> 3, tag & 7) {
            (2, 2) => config_path = Some(input.read_string().map_err(malformed)?),
            (_, 2) => {
                input.read_bytes().map_err(malformed)?;
            }
            (_, 0) => {
                input.read_raw_varint64().map_err(malformed)?;
            }
            (field, wire) => {
                return Err(Error::InvalidArgument(format!(
                    "malformed runtime options: field {field} has wire type {wire}"
                )))
            }
        }
    }
    match config_path {
        Some(p) if !p.is_empty() => {
            let path = PathBuf::from(&p);
            if !path.is_absolute() || p.len() > 4096 {
                return Err(Error::InvalidArgument(format!(
                    "runtime option ConfigPath must be an absolute path, got {p:?}"
                )));
            }
            Ok(Some(path))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_range_parses_first_and_count() {
        assert_eq!(
            "100000:5".parse::<IdRange>(),
            Ok(IdRange {
                first: 100_000,
                count: 5
            })
        );
        assert_eq!(
            IdRange::default().to_string().parse(),
            Ok(IdRange::default())
        );
    }

    #[test]
    fn id_range_refuses_low_empty_overflowing_and_garbled_ranges() {
        for (text, says) in [
            ("1000:10", "starts below 65536"),
            ("65534:10", "starts below 65536"),
            ("100000:0", "is empty"),
            ("4294967000:1000", "goes past the largest id"),
            ("100000", "\"<first id>:<count>\""),
            ("x:1", "first id is not a number"),
            ("100000:-1", "count is not a number"),
        ] {
            let err = text.parse::<IdRange>().expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn full_config_parses() {
        let config = Config::parse(
            r#"
            state_dir = "/run/x"
            [vmm]
            path = "/opt/vmm"
            kernel = "/opt/vmlinux"
            initrd = "/opt/initrd"
            vcpus = 2
            memory_mib = 256
            debug_console = true
            [jail]
            enabled = false
            id_range = "100000:10"
            "#,
        )
        .expect("parses");
        assert_eq!(config.vmm.vcpus, 2);
        assert_eq!(config.vmm.memory_mib, 256);
        assert_eq!(config.state_dir, PathBuf::from("/run/x"));
        assert_eq!(
            config.jail.id_range,
            IdRange {
                first: 100_000,
                count: 10
            }
        );
        assert!(!config.jail.enabled);
        assert!(config.vmm.debug_console);
        // Unset keys keep their defaults.
        assert_eq!(config.vmm.drive_slots, 8);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = Config::parse("[vmm]\nvcpus = 0\n").unwrap_err().to_string();
        assert!(err.contains("vmm.vcpus"), "{err}");
        let err = Config::parse("[vmm]\nkernel = \"vmlinux\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute"), "{err}");
        let err = Config::parse("[vmm]\nno_such_key = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such_key"), "{err}");
        let err = Config::parse("[vmm]\nmemory_mib = 1000000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_mib"), "{err}");
        assert!(Config::parse("this is not toml").is_err());
    }

    #[test]
    fn console_log_cap_defaults_and_bounds() {
        let config = Config::parse("").expect("defaults");
        assert_eq!(config.console_log.max_bytes, 1024 * 1024);
        assert_eq!(config.console_log.files, 2);
        let config = Config::parse("[console_log]\nmax_bytes = 4096\nfiles = 0\n").expect("ok");
        assert_eq!(config.console_log.max_bytes, 4096);
        assert_eq!(config.console_log.files, 0);
        for (text, key) in [
            ("[console_log]\nmax_bytes = 100\n", "console_log.max_bytes"),
            (
                "[console_log]\nmax_bytes = 2147483648\n",
                "console_log.max_bytes",
            ),
            ("[console_log]\nfiles = 17\n", "console_log.files"),
            ("[console_log]\nrotate = 1\n", "rotate"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn vm_limits_are_the_vmm_contract_limits() {
        let min = MIN_MEMORY_MIB;
        assert!(Config::parse(&format!("[vmm]\nmemory_mib = {min}\n")).is_ok());
        let err = Config::parse(&format!("[vmm]\nmemory_mib = {}\n", min - 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vmm.memory_mib"), "{err}");
        assert!(Config::parse(&format!("[vmm]\ndrive_slots = {MAX_DRIVE_SLOTS}\n")).is_ok());
        let err = Config::parse(&format!("[vmm]\ndrive_slots = {}\n", MAX_DRIVE_SLOTS + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vmm.drive_slots"), "{err}");
        let err = Config::parse(&format!("[limits]\nmax_vcpus = {}\n", MAX_VCPUS as u32 + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_vcpus"), "{err}");
    }

    #[test]
    fn explicitly_named_missing_config_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/kata-like.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/kata-like.toml"), "{err}");
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The default config with every known annotation allowed.
    fn config_allowing_all() -> Config {
        let mut config = Config::default();
        config.annotations.allowed = KNOWN_ANNOTATIONS.iter().map(|a| a.to_string()).collect();
        config
    }

    #[test]
    fn annotations_size_the_vm_within_limits() {
        let config = config_allowing_all();
        let shape = vm_shape(
            &config,
            &annotations(&[
                ("io.kata-like.vcpus", "2"),
                ("io.kata-like.memory-mib", "512"),
                ("io.kata-like.debug-console", "true"),
                ("io.kubernetes.cri.sandbox-id", "abc"),
            ]),
        )
        .expect("accepted");
        assert_eq!(
            shape,
            VmShape {
                vcpus: 2,
                memory_mib: 512,
                debug_console: true
            }
        );
        let plain = vm_shape(&config, &HashMap::new()).expect("accepted");
        assert_eq!(plain.vcpus, config.vmm.vcpus);
    }

    #[test]
    fn the_pods_limits_size_the_vm_within_the_maximum() {
        let config = Config::default();
        let gib = (1u64 << 30).to_string();
        let sized = vm_shape(
            &config,
            &annotations(&[
                (pod_limits::SANDBOX_MEMORY, &gib),
                (pod_limits::SANDBOX_CPU_QUOTA, "150000"),
                (pod_limits::SANDBOX_CPU_PERIOD, "100000"),
            ]),
        )
        .expect("sized");
        assert_eq!(sized.memory_mib, 1024 + config.sizing.memory_overhead_mib);
        assert_eq!(sized.vcpus, 2);
        // Small limits never shrink the VM below the configured default.
        let small = vm_shape(
            &config,
            &annotations(&[(pod_limits::SANDBOX_MEMORY, "1048576")]),
        )
        .expect("sized");
        assert_eq!(small.memory_mib, config.vmm.memory_mib);
        assert_eq!(small.vcpus, config.vmm.vcpus);
        // Above the maximum: refused with the numbers and the annotation.
        let too_big = (u64::from(config.limits.max_memory_mib) << 20).to_string();
        let err = vm_shape(
            &config,
            &annotations(&[(pod_limits::SANDBOX_MEMORY, &too_big)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("max_memory_mib") && err.contains(pod_limits::SANDBOX_MEMORY),
            "{err}"
        );
        let err = vm_shape(
            &config,
            &annotations(&[(pod_limits::SANDBOX_CPU_QUOTA, "10000000")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_vcpus"), "{err}");
        // An operator-allowed size annotation still has the last word.
        let allowed = config_allowing_all();
        let shape = vm_shape(
            &allowed,
            &annotations(&[
                (pod_limits::SANDBOX_MEMORY, &gib),
                (ANNOTATION_MEMORY_MIB, "2048"),
            ]),
        )
        .expect("sized");
        assert_eq!(shape.memory_mib, 2048);
    }

    #[test]
    fn hostile_annotations_are_refused() {
        let config = config_allowing_all();
        for (key, value, expect) in [
            ("io.kata-like.vcpus", "0", "outside"),
            ("io.kata-like.vcpus", "100000", "outside"),
            ("io.kata-like.vcpus", "-1", "not a number"),
            (
                "io.kata-like.memory-mib",
                "18446744073709551616",
                "not a number",
            ),
            ("io.kata-like.debug-console", "yes", "true or false"),
            ("io.kata-like.kernel", "/tmp/evil", "not one"),
        ] {
            let err = vm_shape(&config, &annotations(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{key}={value}: {err}");
        }
        let huge = "9".repeat(10_000);
        let err = vm_shape(&config, &annotations(&[("io.kata-like.vcpus", &huge)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than"), "{err}");
    }

    #[test]
    fn vm_annotations_are_refused_unless_the_config_allows_them() {
        let config = Config::default();
        assert!(
            config.annotations.allowed.is_empty(),
            "none allowed by default"
        );
        for (key, value) in [
            (ANNOTATION_VCPUS, "2"),
            (ANNOTATION_MEMORY_MIB, "512"),
            (ANNOTATION_DEBUG_CONSOLE, "true"),
        ] {
            let err = vm_shape(&config, &annotations(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "names the annotation: {err}");
            assert!(
                err.contains("not allowed") && err.contains("[annotations] allowed"),
                "says how the operator allows it: {err}"
            );
        }
        // Annotations of others (kubelet's, containerd's) are none of the shim's business.
        let plain = vm_shape(
            &config,
            &annotations(&[("io.kubernetes.cri.sandbox-id", "abc")]),
        )
        .expect("accepted");
        assert_eq!(plain.memory_mib, config.vmm.memory_mib);
    }

    #[test]
    fn allowing_one_annotation_allows_only_that_one_within_its_limit() {
        let config = Config::parse(
            "[annotations]\nallowed = [\"io.kata-like.memory-mib\"]\n\
             [limits]\nmax_memory_mib = 1024\n",
        )
        .expect("parses");
        let shape = vm_shape(&config, &annotations(&[(ANNOTATION_MEMORY_MIB, "1024")]))
            .expect("allowed and within the maximum");
        assert_eq!(shape.memory_mib, 1024);
        let err = vm_shape(&config, &annotations(&[(ANNOTATION_MEMORY_MIB, "1025")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ANNOTATION_MEMORY_MIB) && err.contains("outside"),
            "{err}"
        );
        let err = vm_shape(&config, &annotations(&[(ANNOTATION_DEBUG_CONSOLE, "true")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ANNOTATION_DEBUG_CONSOLE) && err.contains("not allowed"),
            "{err}"
        );
    }

    #[test]
    fn unknown_annotations_are_refused_even_when_allowing_everything() {
        let err = vm_shape(
            &config_allowing_all(),
            &annotations(&[("io.kata-like.kernel-params", "init=/bin/sh")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("io.kata-like.kernel-params") && err.contains("not one"),
            "{err}"
        );
    }

    #[test]
    fn config_allowing_an_unknown_annotation_is_refused() {
        let err = Config::parse("[annotations]\nallowed = [\"io.kata-like.memory\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("annotations.allowed") && err.contains("io.kata-like.memory"),
            "{err}"
        );
    }

    #[test]
    fn runtime_options_config_path_is_decoded() {
        // type_url (1) = "x", config_path (2) = "/etc/k.toml"
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 11];
        bytes.extend_from_slice(b"/etc/k.toml");
        let path = config_path_from_options("runtimeoptions.v1.Options", &bytes).expect("decodes");
        assert_eq!(path, Some(PathBuf::from("/etc/k.toml")));
        assert_eq!(
            config_path_from_options("containerd.runc.v1.Options", &bytes).expect("ignored"),
            None
        );
        let relative = [0x12, 3, b'a', b'/', b'b'];
        assert!(config_path_from_options("runtimeoptions.v1.Options", &relative).is_err());
        assert!(config_path_from_options("runtimeoptions.v1.Options", &[0x12, 50, b'a']).is_err());
    }
}
