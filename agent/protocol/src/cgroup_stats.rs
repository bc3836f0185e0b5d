//! Statistics of one cgroup v2 directory, read straight from its files so that they map 1:1
//! onto [`StatsContainerResponse`]: the agent reads its containers' cgroups in the guest, the
//! shim the pod's cgroup on the host (the VMM, its vCPU threads and the shim), so both report
//! the same fields from the same files, as runc's shim does.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use crate::{
    CpuStats, HugetlbStats, IoDeviceStats, MemoryStats, PidsStats, StatsContainerResponse,
};

/// Reads the statistics of the cgroup v2 directory `dir`; a file that is missing (its
/// controller not enabled there) reads as zeros.
pub fn read_v2_dir(dir: &Path) -> StatsContainerResponse {
    let cpu_stat = read_flat_keyed(&dir.join("cpu.stat"));
    let cpu = CpuStats {
        usage_usec: key(&cpu_stat, "usage_usec"),
        user_usec: key(&cpu_stat, "user_usec"),
        system_usec: key(&cpu_stat, "system_usec"),
        nr_periods: key(&cpu_stat, "nr_periods"),
        nr_throttled: key(&cpu_stat, "nr_throttled"),
        throttled_usec: key(&cpu_stat, "throttled_usec"),
    };
    let stat = read_flat_keyed(&dir.join("memory.stat"));
    let events = read_flat_keyed(&dir.join("memory.events"));
    let memory = MemoryStats {
        usage: read_value(&dir.join("memory.current")),
        usage_limit: read_value(&dir.join("memory.max")),
        swap_usage: read_value(&dir.join("memory.swap.current")),
        swap_limit: read_value(&dir.join("memory.swap.max")),
        anon: key(&stat, "anon"),
        file: key(&stat, "file"),
        kernel_stack: key(&stat, "kernel_stack"),
        slab: key(&stat, "slab"),
        sock: key(&stat, "sock"),
        shmem: key(&stat, "shmem"),
        file_mapped: key(&stat, "file_mapped"),
        file_dirty: key(&stat, "file_dirty"),
        file_writeback: key(&stat, "file_writeback"),
        active_anon: key(&stat, "active_anon"),
        inactive_anon: key(&stat, "inactive_anon"),
        active_file: key(&stat, "active_file"),
        inactive_file: key(&stat, "inactive_file"),
        unevictable: key(&stat, "unevictable"),
        pgfault: key(&stat, "pgfault"),
        pgmajfault: key(&stat, "pgmajfault"),
        workingset_refault_anon: key(&stat, "workingset_refault_anon"),
        workingset_refault_file: key(&stat, "workingset_refault_file"),
        oom: key(&events, "oom"),
        oom_kill: key(&events, "oom_kill"),
        max_events: key(&events, "max"),
        high_events: key(&events, "high"),
        low_events: key(&events, "low"),
    };
    let pids_max = read_value(&dir.join("pids.max"));
    let pids = PidsStats {
        current: read_value(&dir.join("pids.current")),
        limit: if pids_max == u64::MAX { 0 } else { pids_max },
    };
    let io = std::fs::read_to_string(dir.join("io.stat"))
        .map(|text| parse_io_stat(&text))
        .unwrap_or_default();
    let hugetlb = hugetlb_stats(dir);
    StatsContainerResponse {
        cpu: Some(cpu),
        memory: Some(memory),
        pids: Some(pids),
        io,
        hugetlb,
        timestamp_unix_nanos: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
    }
}

pub fn key(map: &HashMap<String, u64>, name: &str) -> u64 {
    map.get(name).copied().unwrap_or(0)
}

/// "key value" lines (cpu.stat, memory.stat, memory.events).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

pub fn read_flat_keyed(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .map(|t| parse_flat_keyed(&t))
        .unwrap_or_default()
}

/// A single-value file; "max" is u64::MAX, missing files are 0.
pub fn parse_value(text: &str) -> u64 {
    let text = text.trim();
    if text == "max" {
        u64::MAX
    } else {
        text.parse().unwrap_or(0)
    }
}

pub fn read_value(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|t| parse_value(&t))
        .unwrap_or(0)
}

/// io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ..." per device.
pub fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut stats = IoDeviceStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for field in fields {
                let Some((k, v)) = field.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => stats.rbytes = v,
                    "wbytes" => stats.wbytes = v,
                    "rios" => stats.rios = v,
                    "wios" => stats.wios = v,
                    _ => {}
                }
            }
            Some(stats)
        })
        .collect()
}

fn hugetlb_stats(dir: &Path) -> Vec<HugetlbStats> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut stats = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(size) = name
            .strip_prefix("hugetlb.")
            .and_then(|rest| rest.strip_suffix(".current"))
        else {
            continue;
        };
        let events = read_flat_keyed(&dir.join(format!("hugetlb.{size}.events")));
        stats.push(HugetlbStats {
            pagesize: size.to_string(),
            current: read_value(&entry.path()),
            max: read_value(&dir.join(format!("hugetlb.{size}.max"))),
            failcnt: key(&events, "max"),
        });
    }
    stats.sort_by(|a, b| a.pagesize.cmp(&b.pagesize));
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_files_are_parsed() {
        let map = parse_flat_keyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\n");
        assert_eq!(map["usage_usec"], 10);
        assert_eq!(parse_value("max\n"), u64::MAX);
        assert_eq!(parse_value("1234\n"), 1234);
        let io = parse_io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(io.len(), 1);
        assert_eq!(
            (io[0].major, io[0].minor, io[0].rbytes, io[0].wios),
            (254, 0, 4096, 2)
        );
    }
}
