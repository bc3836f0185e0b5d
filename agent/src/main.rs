//! kata-like-agent: PID 1 of the pod VM (default, gRPC on vsock port 1024) or, on a host,
//! `kata-like-agent --listen unix:/path --state-dir DIR` for tests and benchmarks.

use std::path::PathBuf;
use std::sync::Arc;

use kata_like_agent::agent::{uptime_ms, Agent, AgentConfig};
use kata_like_agent::reaper::Reaper;
use kata_like_agent::server::{serve, Listen};
use kata_like_agent::{init, runtime};

const USAGE: &str =
    "usage: kata-like-agent [--listen unix:/path|vsock:PORT] [--state-dir DIR] [--debug]
  As PID 1 (in the guest) the defaults are vsock:1024 and /run/kata-like.";

struct Args {
    listen: Listen,
    state_dir: PathBuf,
    debug: bool,
}

fn parse_args(args: &[String], pid1: bool) -> Result<Args, String> {
    let mut parsed = Args {
        listen: Listen::default(),
        state_dir: PathBuf::from("/run/kata-like"),
        debug: false,
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--listen" => {
                parsed.listen = iter.next().ok_or("--listen needs a value")?.parse()?;
            }
            "--state-dir" => {
                parsed.state_dir = PathBuf::from(iter.next().ok_or("--state-dir needs a value")?);
            }
            "--debug" => parsed.debug = true,
            "-h" | "--help" => return Err(USAGE.into()),
            // The kernel passes unknown command-line words to init: ignore them as PID 1.
            _ if pid1 => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(runtime::HELPER_ARG) {
        let code = runtime::helper_main(argv.get(2).map(String::as_str).unwrap_or(""));
        std::process::exit(code);
    }
    let pid1 = std::process::id() == 1;
    let mut args = match parse_args(&argv[1..], pid1) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let mut log_filter = None;
    if pid1 {
        std::panic::set_hook(Box::new(|info| {
            init::fatal(&format!("panic: {info}"));
        }));
        if let Err(e) = init::setup_guest() {
            init::fatal(&e);
        }
        let options =
            init::parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
        args.debug |= options.debug;
        log_filter = options.log;
    } else {
        // Container processes must come back to us (not to the host's init) when their runtime
        // helper exits.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("kata-like-agent: cannot become a child subreaper: {e}");
            std::process::exit(1);
        }
    }
    let filter = log_filter.unwrap_or_else(|| if args.debug { "debug" } else { "info" }.into());
    // Runtime helpers log with the same filter (they read it from the environment).
    std::env::set_var(runtime::LOG_ENV, &filter);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .compact()
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => exit_fatal(pid1, &format!("tokio runtime: {e}")),
    };
    let status = runtime.block_on(run(args, pid1));
    match status {
        Ok(code) => {
            if pid1 {
                eprintln!("kata-like-agent: powering off (status {code})");
                init::poweroff(code);
            }
            std::process::exit(i32::from(code));
        }
        Err(e) => exit_fatal(pid1, &e),
    }
}

fn exit_fatal(pid1: bool, message: &str) -> ! {
    if pid1 {
        init::fatal(message);
    }
    eprintln!("kata-like-agent: {message}");
    std::process::exit(1);
}

async fn run(args: Args, pid1: bool) -> Result<u8, String> {
    let reaper = Reaper::new();
    reaper
        .start()
        .map_err(|e| format!("SIGCHLD handler: {e}"))?;
    let agent = Agent::new(
        AgentConfig {
            state_dir: args.state_dir.clone(),
            guest: pid1,
        },
        Arc::clone(&reaper),
    )
    .map_err(|e| format!("state dir {}: {e}", args.state_dir.display()))?;
    if !pid1 {
        use tokio::signal::unix::{signal, SignalKind};
        let agent = Arc::clone(&agent);
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            agent.shutdown.send_replace(Some(0));
        });
    }
    if pid1 {
        // The pod's loopback is up from boot, NIC or not: servers on 127.0.0.1 (and the
        // port-forward to them, port_forward.rs) work as in a runc pod.
        let loopback_only = kata_like_protocol::SetupNetworkRequest::default();
        if let Err(e) = kata_like_agent::network::setup(&loopback_only).await {
            tracing::warn!(error = %e, "cannot bring the loopback interface up");
        }
    }
    let listen = args.listen.clone();
    let status = serve(Arc::clone(&agent), listen.clone(), || {
        // One line the VMM's console readers and the tests wait for.
        println!(
            "kata-like-agent: ready uptime_ms={} listen={listen:?}",
            uptime_ms()
        );
    })
    .await
    .map_err(|e| format!("server: {e}"))?;
    agent.teardown().await;
    Ok(status)
}
