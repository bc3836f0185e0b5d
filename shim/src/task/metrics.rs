//! Container stats in the type containerd 1.6's CRI decodes on cgroup v2 hosts:
//! `io.containerd.cgroups.v2.Metrics` (github.com/containerd/cgroups/v2/stats), packed in an Any
//! whose type URL is the bare message name (containerd's typeurl looks it up in the proto
//! registry by that name).

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, HugeTlbStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use kata_like_protocol::StatsContainerResponse;

use crate::error::{Error, Result};

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Converts cgroup v2 stats: a guest container's (from the agent) or the pod's host cgroup's.
pub fn from_cgroup_stats(stats: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = &stats.cpu {
        m.cpu = Some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = &stats.memory {
        m.memory = Some(MemoryStat {
            usage: mem.usage,
            usage_limit: mem.usage_limit,
            swap_usage: mem.swap_usage,
            swap_limit: mem.swap_limit,
            anon: mem.anon,
            file: mem.file,
            kernel_stack: mem.kernel_stack,
            slab: mem.slab,
            sock: mem.sock,
            shmem: mem.shmem,
            file_mapped: mem.file_mapped,
            file_dirty: mem.file_dirty,
            file_writeback: mem.file_writeback,
            active_anon: mem.active_anon,
            inactive_anon: mem.inactive_anon,
            active_file: mem.active_file,
            inactive_file: mem.inactive_file,
            unevictable: mem.unevictable,
            pgfault: mem.pgfault,
            pgmajfault: mem.pgmajfault,
            // cgroup v2 splits refaults by anon/file; the v2 stats type has one counter.
            workingset_refault: mem
                .workingset_refault_anon
                .saturating_add(mem.workingset_refault_file),
            ..Default::default()
        })
        .into();
        m.memory_events = Some(MemoryEvents {
            low: mem.low_events,
            high: mem.high_events,
            max: mem.max_events,
            oom: mem.oom,
            oom_kill: mem.oom_kill,
            ..Default::default()
        })
        .into();
    }
    if let Some(pids) = &stats.pids {
        m.pids = Some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        })
        .into();
    }
    if !stats.io.is_empty() {
        m.io = Some(IOStat {
            usage: stats
                .io
                .iter()
                .map(|d| IOEntry {
                    major: d.major,
                    minor: d.minor,
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .into();
    }
    m.hugetlb = stats
        .hugetlb
        .iter()
        .map(|h| HugeTlbStat {
            current: h.current,
            max: h.max,
            pagesize: h.pagesize.clone(),
            failcnt: h.failcnt,
            ..Default::default()
        })
        .collect();
    m
}

/// Host-side stats of the VM itself (the sandbox's "process" is the VMM): CPU time and resident
/// memory of the VMM process from /proc.
pub fn for_vmm_process(pid: u32) -> Result<Metrics> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(Error::io(format!("read /proc/{pid}/stat")))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state(0) ... utime(11) stime(12) ... rss(21) in pages.
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf only reads system constants.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let user_usec = num(11) * 1_000_000 / ticks;
    let system_usec = num(12) * 1_000_000 / ticks;
    let mut m = Metrics::new();
    m.cpu = Some(CPUStat {
        usage_usec: user_usec + system_usec,
        user_usec,
        system_usec,
        ..Default::default()
    })
    .into();
    m.memory = Some(MemoryStat {
        usage: num(21) * page,
        ..Default::default()
    })
    .into();
    m.pids = Some(PidsStat {
        current: 1,
        ..Default::default()
    })
    .into();
    Ok(m)
}

pub fn to_any(metrics: &Metrics) -> Result<Any> {
    let value = metrics
        .write_to_bytes()
        .map_err(|e| Error::Other(format!("encode metrics: {e}")))?;
    Ok(Any {
        type_url: METRICS_TYPE_URL.to_string(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_like_protocol::{CpuStats, MemoryStats, PidsStats};

    #[test]
    fn agent_stats_become_cgroup_v2_metrics() {
        let stats = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 1500,
                user_usec: 1000,
                system_usec: 500,
                ..Default::default()
            }),
            memory: Some(MemoryStats {
                usage: 4096,
                usage_limit: u64::MAX,
                anon: 1024,
                oom_kill: 2,
                workingset_refault_anon: 1,
                workingset_refault_file: 2,
                ..Default::default()
            }),
            pids: Some(PidsStats {
                current: 3,
                limit: 0,
            }),
            ..Default::default()
        };
        let any = to_any(&from_cgroup_stats(&stats)).expect("encodes");
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        // Decoding as the v2 type (what containerd does) gives the values back.
        let back = Metrics::parse_from_bytes(&any.value).expect("decodes");
        assert_eq!(back.cpu.usage_usec, 1500);
        assert_eq!(back.memory.usage, 4096);
        assert_eq!(back.memory.anon, 1024);
        assert_eq!(back.memory.workingset_refault, 3);
        assert_eq!(back.memory_events.oom_kill, 2);
        assert_eq!(back.pids.current, 3);
        assert!(back.io.is_none());
    }

    #[test]
    fn vmm_process_stats_come_from_proc() {
        let m = for_vmm_process(std::process::id()).expect("own process");
        assert!(m.memory.usage > 0);
        assert!(for_vmm_process(u32::MAX).is_err());
    }
}
