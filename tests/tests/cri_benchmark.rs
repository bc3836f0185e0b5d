//! Pod start and memory benchmark, kata-like against runc in the same containerd and host.
//!
//! Run (inside the KVM test host when this machine's /dev/kvm cannot boot Linux):
//!   tests/run-e2e cri_pod_start_benchmark        (or the test binary with --ignored --nocapture)
//! `KATA_LIKE_BENCH_PODS` sets the pods per runtime (default 5), `KATA_LIKE_BENCH_IDLE_PODS` the
//! idle pods measured for memory (default 2).
//!
//! Prints per-phase medians (RunPodSandbox, CreateContainer, StartContainer, until the
//! container's exit) for both runtimes and their ratio, then the memory of idle kata-like pods:
//! PSS of shim and VMM (without guest RAM) and the guest RAM actually touched. It asserts only
//! that every pod worked; the numbers are for the report.

// Each test holds the shared containerd's lock for its whole run (tests must not overlap: they
// count VMMs and check for leftovers); every test has its own single-threaded runtime, so
// holding a std lock across its awaits blocks nothing else.
#![allow(clippy::await_holding_lock)]

use std::path::Path;
use std::time::{Duration, Instant};

use kata_like_tests::containerd::{self, BUSYBOX_IMAGE, KATA_RUNTIME_HANDLER};
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod;

const PHASES: [&str; 4] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "until exit",
];

fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Starts one pod with a container that exits at once; returns the phase durations in ms.
async fn one_pod(cri: &mut Cri, log_dir: &Path, handler: &str, name: &str) -> [f64; 4] {
    let pod = cri::pod_config(name, log_dir);
    let t0 = Instant::now();
    let pod_id = cri
        .run_pod(&pod, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
    let t1 = Instant::now();
    let c = cri
        .create_container(
            &pod_id,
            &cri::container_config("main", BUSYBOX_IMAGE, &["true"]),
            &pod,
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer ({handler}): {e}"));
    let t2 = Instant::now();
    cri.start_container(&c)
        .await
        .unwrap_or_else(|e| panic!("StartContainer ({handler}): {e}"));
    let t3 = Instant::now();
    loop {
        let s = cri.container_status(&c).await;
        if s.state == cri::CONTAINER_EXITED {
            assert_eq!(s.exit_code, 0, "{handler} container failed: {s:?}");
            break;
        }
        assert!(
            t3.elapsed() < Duration::from_secs(300),
            "{handler} container never exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t4 = Instant::now();
    cri.teardown_pod(&pod_id).await;
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
    [ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)]
}

/// The number of a smaps field's value such as "   1234 kB".
fn kib_value(rest: &str) -> Option<u64> {
    rest.trim().trim_end_matches("kB").trim().parse().ok()
}

/// kB fields of a smaps-style file, summed by name.
fn smaps_field(text: &str, field: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(field))
        .filter_map(kib_value)
        .sum()
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|t| smaps_field(&t, "Pss:"))
        .unwrap_or(0)
}

/// (Rss, Pss) in KiB of the VMM's guest RAM: its mapping of exactly `guest_mib`.
fn guest_ram_kib(pid: u32, guest_mib: u64) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut result = (0, 0);
    let mut in_guest = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_guest = false;
        }
        if let Some(rest) = line.strip_prefix("Size:") {
            let kb = kib_value(rest).unwrap_or(0);
            in_guest = kb == guest_mib * 1024;
        } else if in_guest {
            if let Some(rest) = line.strip_prefix("Rss:") {
                result.0 += kib_value(rest).unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Pss:") {
                result.1 += kib_value(rest).unwrap_or(0);
            }
        }
    }
    result
}

/// Prints a line of the benchmark's report straight to stdout: `println!` is captured by the
/// test harness, and a benchmark whose numbers only show with `--nocapture` reports nothing.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn cri_pod_start_benchmark() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let pods = env_count("KATA_LIKE_BENCH_PODS", 5).max(1);
    let idle_pods = env_count("KATA_LIKE_BENCH_IDLE_PODS", 2).max(1);
    let log_dir = containerd.log_dir();

    // Warm-up, not counted: the first pod of each runtime fills caches (snapshots, erofs).
    let mut warmup = Vec::new();
    for handler in ["runc", KATA_RUNTIME_HANDLER] {
        warmup.push(one_pod(&mut cri, &log_dir, handler, &format!("warm-{handler}")).await);
    }
    let mut results: Vec<Vec<[f64; 4]>> = vec![Vec::new(), Vec::new()];
    // Interleaved, so that both runtimes see the same machine state.
    for i in 0..pods {
        for (k, handler) in ["runc", KATA_RUNTIME_HANDLER].iter().enumerate() {
            let r = one_pod(&mut cri, &log_dir, handler, &format!("bench-{handler}-{i}")).await;
            results[k].push(r);
        }
    }
    report!(
        "\n=== kata-like pod start benchmark: {pods} pods per runtime, one containerd, one host"
    );
    report!(
        "{:<16} {:>10} {:>13} {:>7}",
        "phase (median)",
        "runc ms",
        "kata-like ms",
        "ratio"
    );
    let mut totals = [Vec::new(), Vec::new()];
    for (k, r) in results.iter().enumerate() {
        totals[k] = r.iter().map(|p| p.iter().sum::<f64>()).collect();
    }
    for (p, phase) in PHASES.iter().enumerate() {
        let runc = median(results[0].iter().map(|r| r[p]).collect());
        let kata_ms = median(results[1].iter().map(|r| r[p]).collect());
        report!(
            "{phase:<16} {runc:>10.1} {kata_ms:>13.1} {:>7.2}",
            kata_ms / runc
        );
    }
    let (runc_total, kata_total) = (median(totals[0].clone()), median(totals[1].clone()));
    report!(
        "{:<16} {runc_total:>10.1} {kata_total:>13.1} {:>7.2}   (target: ratio <= 2.00)",
        "total",
        kata_total / runc_total
    );
    report!(
        "warm-up (first pod, not counted): runc {:.1} ms, kata-like {:.1} ms",
        warmup[0].iter().sum::<f64>(),
        warmup[1].iter().sum::<f64>()
    );

    // The shim's own timings from its log lines: VM boot to a healthy agent, and the rootfs
    // (erofs image from the cache or built now, drive hot-set, guest mount) per container.
    let log = std::fs::read_to_string(containerd.base.join("containerd.log")).unwrap_or_default();
    let field = |line: &str, key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let boots: Vec<f64> = log.lines().filter_map(|l| field(l, "boot_ms=")).collect();
    let rootfs: Vec<f64> = log.lines().filter_map(|l| field(l, "rootfs_ms=")).collect();
    assert!(!boots.is_empty(), "the shim logged no VM boot");
    report!(
        "kata-like VM boot to agent ready: median {:.0} ms over {} boots",
        median(boots.clone()),
        boots.len()
    );
    if let Some((first, rest)) = rootfs.split_first() {
        report!(
            "kata-like rootfs per container: first (mkfs.erofs, uncached) {first:.0} ms, \
             later (cached image) median {:.0} ms",
            median(rest.to_vec())
        );
    }

    // Memory of idle pods: sandbox + one sleeping busybox container each.
    let shims_before = containerd::pids_of(&kata.shim);
    let mut idle = Vec::new();
    for i in 0..idle_pods {
        let pod = cri::pod_config(&format!("idle-{i}"), &log_dir);
        let pod_id = cri
            .run_pod(&pod, KATA_RUNTIME_HANDLER)
            .await
            .expect("RunPodSandbox");
        pod::start_sleeper(&mut cri, &pod_id, &pod, "idle").await;
        idle.push(pod_id);
    }
    // Let boot-time activity settle before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let config = std::fs::read_to_string(&containerd.kata_config).expect("kata config");
    let guest_mib: u64 = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory_mib = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(128);
    let shims: Vec<u32> = containerd::pids_of(&kata.shim)
        .into_iter()
        .filter(|p| !shims_before.contains(p))
        .collect();
    assert_eq!(
        containerd::vmm_instances(&kata.vmm).len(),
        idle_pods,
        "one VMM per idle pod"
    );
    // Every VMM process counts (a jailed VMM is the jail's parent plus the VM process).
    let vmms = containerd::pids_of(&kata.vmm);
    let shim_pss: u64 = shims.iter().map(|p| pss_kib(*p)).sum();
    let vmm_pss: u64 = vmms.iter().map(|p| pss_kib(*p)).sum();
    let (guest_rss, guest_pss): (u64, u64) = vmms
        .iter()
        .map(|p| guest_ram_kib(*p, guest_mib))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let n = idle_pods as f64;
    let mib = |kib: u64| kib as f64 / 1024.0 / n;
    let host_side = mib(shim_pss) + mib(vmm_pss.saturating_sub(guest_pss));
    report!(
        "memory per idle kata-like pod ({idle_pods} pods, {guest_mib} MiB guests): shim PSS {:.1} MiB, \
         VMM PSS without guest RAM {:.1} MiB, guest RAM touched {:.1} MiB",
        mib(shim_pss),
        mib(vmm_pss.saturating_sub(guest_pss)),
        mib(guest_rss)
    );
    report!(
        "  shim + VMM {host_side:.1} MiB (target <= 15), whole pod {:.1} MiB (target <= 64)",
        host_side + mib(guest_rss)
    );
    for pod_id in &idle {
        cri.teardown_pod(pod_id).await;
    }
    containerd.assert_no_leftovers(&kata);
}

/// Host-to-pod network figures of one pod: (HTTP GET throughput in MiB/s of a
/// `NET_BENCH_MIB` file, median over `NET_BENCH_RUNS`; ping round trip in ms, average of
/// `NET_BENCH_PINGS`).
async fn pod_network_figures(
    cri: &mut Cri,
    containerd: &containerd::Containerd,
    handler: &str,
    name: &str,
) -> (f64, f64) {
    let pod = cri::pod_config(name, &containerd.log_dir());
    let pod_id = cri
        .run_pod(&pod, handler)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
    let ip = pod::pod_ip(cri, &pod_id).await;
    let setup = format!("dd if=/dev/zero of=/www/big bs=1M count={NET_BENCH_MIB} 2>/dev/null &&");
    pod::start_container(cri, &pod_id, &pod, &pod::web_server("web", "ready", &setup)).await;
    let base = format!("http://{ip}:{}/", pod::WEB_PORT);
    let ready = pod::fetch_from_host(containerd, &base)
        .unwrap_or_else(|e| panic!("{handler} pod: {e}\n{}", containerd.log_tail()));
    assert_eq!(ready.trim(), "ready");
    let mut rates = Vec::new();
    for _ in 0..NET_BENCH_RUNS {
        let start = Instant::now();
        let out = containerd
            .host_net_command("busybox")
            .args(["wget", "-q", "-O", "/dev/null", &format!("{base}big")])
            .output()
            .expect("busybox wget");
        assert!(out.status.success(), "{handler}: GET big: {out:?}");
        rates.push(NET_BENCH_MIB as f64 / start.elapsed().as_secs_f64());
    }
    let ping = containerd
        .host_net_command("busybox")
        .args([
            "ping",
            "-q",
            "-c",
            &NET_BENCH_PINGS.to_string(),
            "-i",
            "0.2",
            &ip,
        ])
        .output()
        .expect("busybox ping");
    let ping_text = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(ping.status.success(), "{handler}: ping {ip}: {ping_text}");
    // "round-trip min/avg/max = 0.101/0.143/0.201 ms"
    let avg = ping_text
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no round trip in {ping_text:?}"));
    cri.teardown_pod(&pod_id).await;
    (median(rates), avg)
}

const NET_BENCH_MIB: u64 = 16;
const NET_BENCH_RUNS: usize = 3;
const NET_BENCH_PINGS: usize = 10;

/// Host-to-pod TCP throughput (the node fetching a file from a web server in the pod) and
/// ping round trip, kata-like against a runc pod in the same containerd and run; prints the
/// figures and their ratios, asserts only that both pods answered.
#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn cri_network_benchmark() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (runc_rate, runc_rtt) =
        pod_network_figures(&mut cri, &containerd, "runc", "net-bench-runc").await;
    let (kata_rate, kata_rtt) = pod_network_figures(
        &mut cri,
        &containerd,
        KATA_RUNTIME_HANDLER,
        "net-bench-kata",
    )
    .await;
    report!(
        "host-to-pod network ({NET_BENCH_MIB} MiB HTTP GET, median of {NET_BENCH_RUNS}; \
         ping average of {NET_BENCH_PINGS})"
    );
    report!(
        "  throughput MiB/s: runc {runc_rate:.1}, kata-like {kata_rate:.1}, kata-like/runc {:.3}",
        kata_rate / runc_rate
    );
    report!(
        "  round trip ms:    runc {runc_rtt:.3}, kata-like {kata_rtt:.3}, kata-like/runc {:.2}",
        kata_rtt / runc_rtt
    );
    containerd.assert_no_leftovers(&kata);
}
