//! Benchmarks for kata-like-vmm (numbers, not pass/fail): binary size, exec to first guest
//! exit, VMM memory overhead, and boot-to-marker time against `qemu-system-x86_64 -M microvm`
//! with the same kernel, initramfs and command line. See vmm/README.md ("Benchmarks").

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_like_vmm::test_guest::tiny_elf;
use kata_like_vmm::vstate::vcpu::monotonic_ns;

const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";
const MEMORY_MIB: u64 = 256;

struct Options {
    vmm: PathBuf,
    runs: usize,
    local: bool,
    boot: bool,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    qemu: String,
    /// `tests/kvm-host/run`: give every timed Linux boot a test host of its own.
    fresh_host: Option<PathBuf>,
    /// Internal (`--one-boot ours|qemu`): the single boot run inside one such test host.
    one_boot: Option<String>,
    case: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: kata-like-vmm-bench [--vmm PATH] [--runs N] [--local-only | --boot-only] \
         [--kernel VMLINUX --initrd CPIO] [--qemu PATH] [--fresh-host tests/kvm-host/run]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut o = Options {
        vmm: exe_dir.join("kata-like-vmm"),
        runs: 10,
        local: true,
        boot: true,
        kernel: std::env::var_os("KATA_LIKE_KERNEL").map(PathBuf::from),
        initrd: std::env::var_os("KATA_LIKE_VMM_TEST_INITRD").map(PathBuf::from),
        qemu: "qemu-system-x86_64".into(),
        fresh_host: None,
        one_boot: None,
        case: "marker".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--vmm" => o.vmm = PathBuf::from(value()),
            "--runs" => o.runs = value().parse().unwrap_or_else(|_| usage()),
            "--local-only" => o.boot = false,
            "--boot-only" => o.local = false,
            "--kernel" => o.kernel = Some(PathBuf::from(value())),
            "--initrd" => o.initrd = Some(PathBuf::from(value())),
            "--qemu" => o.qemu = value(),
            "--fresh-host" => o.fresh_host = Some(PathBuf::from(value())),
            "--one-boot" => o.one_boot = Some(value()),
            "--case" => o.case = value(),
            _ => usage(),
        }
    }
    if o.runs == 0 {
        usage();
    }
    o
}

/// (median, min, max)
fn stats(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    (median, samples[0], samples[n - 1])
}

fn report(name: &str, unit: &str, samples: &mut [f64]) -> f64 {
    let (median, min, max) = stats(samples);
    println!(
        "{name:<46} median {median:>9.2} {unit}  min {min:>9.2}  max {max:>9.2}  (n={})",
        samples.len()
    );
    median
}

/// Resident memory of `pid`: (total KiB, KiB in the guest RAM mapping of `guest_bytes`).
fn rss_kib(pid: u32, guest_bytes: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                current_size = e - s;
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            total += kib;
            if current_size == guest_bytes {
                guest += kib;
            }
        }
    }
    Some((total, guest))
}

fn api_call(sock: &Path, line: &str) -> Option<String> {
    let s = UnixStream::connect(sock).ok()?;
    (&s).write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).ok()?;
    Some(resp)
}

fn wait_for_socket(sock: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if api_call(sock, r#"{"op":"ping"}"#).is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Fewest exec -> first exit samples of the tiny guest.
const TINY_GUEST_RUNS: usize = 50;

fn local_benchmarks(o: &Options, dir: &Path) {
    println!("== local (this machine's /dev/kvm)");
    match std::fs::metadata(&o.vmm) {
        Ok(m) => println!(
            "{:<46} {:.2} MiB ({} bytes)",
            "VMM binary size",
            m.len() as f64 / 1048576.0,
            m.len()
        ),
        Err(e) => {
            eprintln!("cannot stat {}: {e}", o.vmm.display());
            std::process::exit(1);
        }
    }

    // A guest whose first instruction writes the exit port.
    let tiny = dir.join("first-exit.elf");
    std::fs::write(&tiny, tiny_elf(&[0xe6, 0xf4], true)).expect("write tiny kernel");
    let mut first_exit = Vec::new();
    let mut process = Vec::new();
    // At least TINY_GUEST_RUNS samples whatever --runs says: a run costs a few ms, and on a
    // host where some runs wait for the kernel (KVM_SET_USER_MEMORY_REGION waits for an SRCU
    // grace period, ending on a host tick) the distribution is bimodal, so ten samples give a
    // median that jumps between the two modes from one bench run to the next.
    for _ in 0..o.runs.max(TINY_GUEST_RUNS) {
        let t0 = monotonic_ns();
        let out = Command::new(&o.vmm)
            .args([
                "run",
                "--no-jail",
                "--console",
                "null",
                "--log-level",
                "info",
                "--memory-mib",
                "128",
                "--kernel",
            ])
            .arg(&tiny)
            .output()
            .expect("run the VMM");
        let t1 = monotonic_ns();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr
            .split_whitespace()
            .find_map(|w| w.strip_prefix("first_exit_monotonic_ns="))
            .and_then(|v| v.parse::<u64>().ok());
        match (out.status.code(), first) {
            (Some(0), Some(ns)) if ns > t0 => {
                first_exit.push((ns - t0) as f64 / 1e6);
                process.push((t1 - t0) as f64 / 1e6);
            }
            _ => eprintln!("tiny guest run failed: {:?} {stderr}", out.status),
        }
    }
    if !first_exit.is_empty() {
        report(
            "exec -> first guest exit (tiny guest)",
            "ms",
            &mut first_exit,
        );
        let over = first_exit.iter().filter(|&&ms| ms > 10.0).count();
        println!(
            "{:<46} {over} of {} (target: median <= 10 ms)",
            "  runs over 10 ms",
            first_exit.len()
        );
        report("exec -> VMM exited (tiny guest)", "ms", &mut process);
    }

    // Memory overhead with a running (spinning) tiny guest and every device type but net.
    let spin = dir.join("spin.elf");
    std::fs::write(&spin, tiny_elf(&[0xeb, 0xfe], true)).expect("write spin kernel");
    let sock = dir.join("api.sock");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("disk image");
    let mut child = Command::new(&o.vmm)
        .args([
            "run",
            "--no-jail",
            "--console",
            "null",
            "--memory-mib",
            &MEMORY_MIB.to_string(),
            "--rng",
            "--kernel",
        ])
        .arg(&spin)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--drive")
        .arg(format!("id=disk0,path={}", img.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .spawn()
        .expect("run the VMM");
    if wait_for_socket(&sock) {
        std::thread::sleep(Duration::from_millis(200));
        print_vmm_rss(child.id(), "VMM RSS excluding guest memory (tiny guest)");
        let _ = api_call(&sock, r#"{"op":"stop","force":true}"#);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Prints the RSS of the VMM `pid` without its guest RAM (a mapping of MEMORY_MIB), when
/// /proc lets us read it.
fn print_vmm_rss(pid: u32, what: &str) {
    if let Some((total, guest)) = rss_kib(pid, MEMORY_MIB << 20) {
        println!(
            "{:<46} {:.2} MiB (total RSS {:.2} MiB, guest RAM {:.2} MiB)",
            what,
            (total - guest) as f64 / 1024.0,
            total as f64 / 1024.0,
            guest as f64 / 1024.0
        );
    }
}

/// The guest's kernel clock when it ran /init, from the test init's `KL_BOOT_TIMES` line.
fn guest_init_ms(console: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(console).ok()?;
    text.lines()
        .filter(|l| l.starts_with("KL_BOOT_TIMES"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("init_ms="))
        })
        .and_then(|v| v.parse().ok())
}

fn probe_linux_capable(vmm: &Path) -> bool {
    Command::new(vmm)
        .arg("probe")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"linux_capable\":true"))
        .unwrap_or(false)
}

/// Boots `case` of the test init once with kata-like-vmm; the time from exec to the VMM's
/// exit with the guest's status 0, or None.
fn boot_ours(o: &Options, kernel: &Path, initrd: &Path, case: &str, console: &Path) -> Option<f64> {
    let mut vmm = Command::new(&o.vmm);
    vmm.args(["run", "--no-jail", "--console"])
        .arg(console)
        .args(["--memory-mib", &MEMORY_MIB.to_string(), "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", &format!("{CMDLINE} kl_test={case}")]);
    timed_boot("kata-like-vmm", &mut vmm, 0)
}

/// Runs `cmd` to its end; the milliseconds it took when it exited with `ok`, else None.
fn timed_boot(name: &str, cmd: &mut Command, ok: i32) -> Option<f64> {
    let t0 = Instant::now();
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let elapsed = t0.elapsed().as_secs_f64() * 1e3;
    if st.code() == Some(ok) {
        Some(elapsed)
    } else {
        eprintln!("{name} boot failed: {st}");
        None
    }
}

/// The same with `qemu-system-x86_64 -M microvm`.
fn boot_qemu(o: &Options, kernel: &Path, initrd: &Path, case: &str, console: &Path) -> Option<f64> {
    let mut qemu = Command::new(&o.qemu);
    qemu.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
    ])
    .args([
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-no-reboot", "-serial"])
    .arg(format!("file:{}", console.display()))
    .args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", &format!("{CMDLINE} kl_test={case}")]);
    // isa-debug-exit turns the guest's 0 into QEMU exit status (0 << 1) | 1.
    timed_boot("qemu microvm", &mut qemu, 1)
}

/// Boot to marker under both VMMs, and the ratio of the medians (when both have samples).
fn report_marker_boots(ours: &mut [f64], qemu: &mut [f64]) {
    if ours.is_empty() || qemu.is_empty() {
        return;
    }
    let a = report("kata-like-vmm: exec -> marker", "ms", ours);
    let b = report("qemu -M microvm: exec -> marker", "ms", qemu);
    println!(
        "{:<46} {:.3} (target <= 0.8)",
        "ratio kata-like-vmm / qemu microvm (medians)",
        a / b
    );
}

/// The guest kernel's clock at /init under both VMMs (when both have samples).
fn report_guest_clock(ours: &mut [f64], qemu: &mut [f64]) {
    if ours.is_empty() || qemu.is_empty() {
        return;
    }
    report("kata-like-vmm: guest clock at /init", "ms", ours);
    report("qemu -M microvm: guest clock at /init", "ms", qemu);
}

/// Boots with guest time measured: this many extra `poweroff` runs per VMM.
const GUEST_CLOCK_RUNS: usize = 3;

/// `path` as found on PATH when it has no slash.
fn resolve_program(path: &str) -> Option<PathBuf> {
    if path.contains('/') {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(path))
            .find(|p| p.is_file())
    })
}

/// The shared libraries `binary` loads, from `ldd`.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Reads every file either VMM loads to boot (binaries, their libraries, QEMU's firmware and
/// modules, kernel, initramfs) into the page cache, so that a test host's first boot does not
/// also time reads through its 9p root.
fn warm_page_cache(o: &Options, kernel: &Path, initrd: &Path) {
    let mut files = vec![o.vmm.clone(), kernel.to_path_buf(), initrd.to_path_buf()];
    files.extend(shared_libraries(&o.vmm));
    if let Some(qemu) = resolve_program(&o.qemu) {
        files.extend(shared_libraries(&qemu));
        if let Some(prefix) = qemu.parent().and_then(Path::parent) {
            files.push(prefix.join("share/qemu/qboot.rom"));
            if let Ok(modules) = std::fs::read_dir(prefix.join("lib/x86_64-linux-gnu/qemu")) {
                files.extend(modules.flatten().map(|e| e.path()));
            }
        }
        files.push(qemu);
    }
    for f in files {
        if let Ok(mut file) = std::fs::File::open(&f) {
            let _ = std::io::copy(&mut file, &mut std::io::sink());
        }
    }
}

/// `--one-boot ours|qemu`: one timed boot of `--case` in a test host that has not run a VM yet;
/// prints `KL_BENCH_BOOT ms=<exec to exit> init_ms=<guest clock at /init, poweroff case>`.
fn one_boot(o: &Options, which: &str, dir: &Path) -> i32 {
    let (Some(kernel), Some(initrd)) = (o.kernel.as_deref(), o.initrd.as_deref()) else {
        eprintln!("--one-boot needs --kernel and --initrd");
        return 2;
    };
    warm_page_cache(o, kernel, initrd);
    let console = dir.join("console.log");
    let ms = match which {
        "ours" => boot_ours(o, kernel, initrd, &o.case, &console),
        "qemu" => boot_qemu(o, kernel, initrd, &o.case, &console),
        _ => usage(),
    };
    let Some(ms) = ms else {
        return 1;
    };
    let init_ms = guest_init_ms(&console).map_or("?".into(), |v| v.to_string());
    println!("KL_BENCH_BOOT ms={ms:.2} init_ms={init_ms}");
    0
}

/// Runs this benchmark binary with `args` in a fresh test host (`host`: tests/kvm-host/run);
/// its standard output, or None after three frozen hosts (status 125) or another failure.
fn in_fresh_host(o: &Options, host: &Path, args: &[std::ffi::OsString]) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    for attempt in 1..=3 {
        let out = Command::new(host)
            .args(["--timeout", "900", "--"])
            .arg(&exe)
            .args(["--vmm".as_ref(), o.vmm.as_os_str()])
            .args(["--qemu", &o.qemu])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        eprintln!(
            "test host run failed ({}, attempt {attempt} of 3): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        if out.status.code() != Some(125) {
            return None;
        }
    }
    None
}

/// One boot of `case` with `which` VMM in a fresh test host: (exec to exit ms, guest init ms).
fn fresh_boot(
    o: &Options,
    host: &Path,
    which: &str,
    case: &str,
    kernel: &Path,
    initrd: &Path,
) -> Option<(f64, Option<f64>)> {
    let args: Vec<std::ffi::OsString> = vec![
        "--one-boot".into(),
        which.into(),
        "--case".into(),
        case.into(),
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        initrd.into(),
    ];
    let out = in_fresh_host(o, host, &args)?;
    let line = out.lines().find(|l| l.starts_with("KL_BENCH_BOOT"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((field("ms=")?, field("init_ms=")))
}

/// The boot benchmark with every timed boot in a test host of its own. In the nested test host a
/// boot is slowed by the boots before it. Measured in a 1-CPU test host, five boots in a row:
/// the guest clock at /init was 0.61 s in the first and 1.52-1.61 s in each of the others; the
/// extra second is the guest's first writes to its RAM (initialising `struct page`s: 26 ms in a
/// host's first boot, ~1 s later), with 2 MiB nested pages and no huge-page fallback in any of
/// them. The likely cause is the emulator (QEMU TCG) tracking writes to host memory that held
/// the earlier guests' kernel code, which it had translated. Which VMM's boot lands on such
/// memory is chance (one bench run had ours fast and QEMU's slow in every pair), so back-to-back
/// samples are neither independent nor fair; a fresh host per boot is both.
fn fresh_host_benchmarks(o: &Options, host: &Path, kernel: &Path, initrd: &Path) {
    println!(
        "== boot to marker, every boot in a fresh test host (the first thing /init does is \
         write the exit port)"
    );
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for run in 0..o.runs {
        // Alternating which goes first, so that a drift of the machine hits both.
        let order = if run % 2 == 0 {
            ["ours", "qemu"]
        } else {
            ["qemu", "ours"]
        };
        for which in order {
            let sample = fresh_boot(o, host, which, "marker", kernel, initrd);
            let samples = if which == "ours" {
                &mut ours
            } else {
                &mut qemu
            };
            samples.extend(sample.map(|(ms, _)| ms));
        }
    }
    report_marker_boots(&mut ours, &mut qemu);
    let (mut ours_guest, mut qemu_guest) = (Vec::new(), Vec::new());
    for _ in 0..GUEST_CLOCK_RUNS {
        for (which, samples) in [("ours", &mut ours_guest), ("qemu", &mut qemu_guest)] {
            if let Some((_, Some(init_ms))) = fresh_boot(o, host, which, "poweroff", kernel, initrd)
            {
                samples.push(init_ms);
            }
        }
    }
    report_guest_clock(&mut ours_guest, &mut qemu_guest);
}

fn boot_benchmarks(o: &Options, dir: &Path) {
    let (Some(kernel), Some(initrd)) = (o.kernel.as_deref(), o.initrd.as_deref()) else {
        eprintln!("boot benchmark needs --kernel and --initrd (or KATA_LIKE_KERNEL / KATA_LIKE_VMM_TEST_INITRD)");
        std::process::exit(2);
    };
    if let Some(host) = o.fresh_host.as_deref() {
        fresh_host_benchmarks(o, host, kernel, initrd);
        println!(
            "== back-to-back in one test host (each boot inherits the memory of the one before)"
        );
        let args: Vec<std::ffi::OsString> = vec![
            "--boot-only".into(),
            "--runs".into(),
            o.runs.to_string().into(),
            "--kernel".into(),
            kernel.into(),
            "--initrd".into(),
            initrd.into(),
        ];
        match in_fresh_host(o, host, &args) {
            Some(out) => out
                .lines()
                .filter(|l| !l.starts_with('['))
                .for_each(|l| println!("{l}")),
            None => println!("failed: the test host did not complete the run"),
        }
        return;
    }
    println!("== boot to marker (the first thing /init does is write the exit port)");
    if !probe_linux_capable(&o.vmm) {
        println!("skipped: this /dev/kvm cannot boot Linux (run it inside tests/kvm-host/run, see README)");
        return;
    }
    // Alternating runs, so that a slow phase of the host hits both.
    let console = dir.join("marker-console.log");
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        ours.extend(boot_ours(o, kernel, initrd, "marker", &console));
        qemu.extend(boot_qemu(o, kernel, initrd, "marker", &console));
    }
    report_marker_boots(&mut ours, &mut qemu);
    // Where the time goes: the guest kernel's clock when it ran /init (the test init prints it
    // in `poweroff`, after the marker's point) is the same guest work under both VMMs; the rest
    // of each total is the VMM's own (start, kernel loading, exits, teardown).
    let (mut ours_guest, mut qemu_guest) = (Vec::new(), Vec::new());
    for run in 0..GUEST_CLOCK_RUNS {
        let console = dir.join(format!("ours-{run}.log"));
        if boot_ours(o, kernel, initrd, "poweroff", &console).is_some() {
            ours_guest.extend(guest_init_ms(&console));
        }
        let console = dir.join(format!("qemu-{run}.log"));
        if boot_qemu(o, kernel, initrd, "poweroff", &console).is_some() {
            qemu_guest.extend(guest_init_ms(&console));
        }
    }
    report_guest_clock(&mut ours_guest, &mut qemu_guest);

    // VMM overhead with Linux up and idle.
    let console = dir.join("console.log");
    let sock = dir.join("api-linux.sock");
    let mut child = Command::new(&o.vmm)
        .args([
            "run",
            "--no-jail",
            "--memory-mib",
            &MEMORY_MIB.to_string(),
            "--rng",
            "--kernel",
        ])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", &format!("{CMDLINE} kl_test=idle")])
        .arg("--console")
        .arg(&console)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v2.sock").display()))
        .spawn()
        .expect("run the VMM");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("KL_IDLE")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    print_vmm_rss(child.id(), "VMM RSS excluding guest memory (Linux idle)");
    let _ = api_call(&sock, r#"{"op":"stop","force":true}"#);
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let o = parse_options();
    let dir = std::env::temp_dir().join(format!("kata-like-vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    if let Some(which) = o.one_boot.as_deref() {
        let status = one_boot(&o, which, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::process::exit(status);
    }
    if o.local {
        local_benchmarks(&o, &dir);
    }
    if o.boot {
        boot_benchmarks(&o, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
