//! `kata-like-vmm run ...` and `kata-like-vmm probe` (see CONTRACT.md and README.md).

use kata_like_vmm::builder::{build_vmm, open_resources};
use kata_like_vmm::contract::VmConfig;
use kata_like_vmm::vmm::SeccompSettings;

const USAGE: &str =
    "usage: kata-like-vmm run --kernel PATH [--initrd PATH] [--cmdline STR] [--vcpus N] \
[--memory-mib N] [--hugepages] [--console PATH|fd:N|stdout|null] [--drive id=ID,path=PATH[,ro]] \
[--drive id=ID,empty[,ro]] [--net fd=N|tap=NAME[,mac=MAC]] [--vsock cid=N,uds=PATH] [--fs tag=TAG,socket=PATH] [--rng] \
[--api-sock PATH] [--jail-dir DIR [--uid U --gid G] | --no-jail] [--log-level LEVEL]
       kata-like-vmm probe";

fn init_logging(level: Option<&str>) -> Result<(), String> {
    let level = match level.unwrap_or("warn") {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        other => return Err(format!("unknown log level {other:?}")),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .init();
    Ok(())
}

fn run(args: Vec<String>) -> i32 {
    let config = match VmConfig::from_args(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kata-like-vmm: {e}\n{USAGE}");
            return 2;
        }
    };
    if let Err(e) = init_logging(config.log_level.as_deref()) {
        eprintln!("kata-like-vmm: {e}");
        return 2;
    }
    kata_like_vmm::jail::close_inherited_fds(&config.inherited_fds());
    let mut opened = match open_resources(&config) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("kata-like-vmm: {e}");
            return 1;
        }
    };
    let api_listener = opened.api_listener.take();
    if config.jail.enabled {
        if let Err(e) = kata_like_vmm::jail::enter(&config.jail) {
            eprintln!("kata-like-vmm: jail: {e}");
            return 1;
        }
    }
    let vmm = match build_vmm(&config, opened) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kata-like-vmm: {e}");
            return 1;
        }
    };
    vmm.run(
        api_listener,
        SeccompSettings {
            enabled: config.jail.enabled,
            violation: config.seccomp_violation,
        },
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let status = match args.next().as_deref() {
        Some("run") => run(args.collect()),
        Some("probe") => match kata_like_vmm::test_guest::probe() {
            Ok(r) => match serde_json::to_string(&r) {
                Ok(s) => {
                    println!("{s}");
                    0
                }
                Err(_) => 1,
            },
            Err(e) => {
                eprintln!("kata-like-vmm: probe: {e}");
                1
            }
        },
        Some("--version") => {
            println!("kata-like-vmm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Some("--help") | Some("-h") => {
            println!("{USAGE}");
            0
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(status);
}
