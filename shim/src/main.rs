//! containerd-shim-kata-like-v2: see the crate documentation and shim/README.md.

use containerd_shim::Config as ShimConfig;
use kata_like_shim::shim::{KataLikeShim, RUNTIME_ID};

fn main() {
    // Serving mode logs to containerd's log FIFO; start/delete are short and log to stderr,
    // which containerd shows when they fail.
    let serving = !std::env::args()
        .skip(1)
        .any(|a| a == "start" || a == "delete");
    let level = kata_like_shim::config::Config::load(None)
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "info".into());
    if serving {
        kata_like_shim::logging::init(&level);
    }
    // One thread: a shim per pod must stay small; nothing it does is CPU-bound.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = ShimConfig {
        // Logging is ours (tracing, above).
        no_setup_logger: true,
        // The shim's only child is the VMM, reaped by tokio; no orphans are reparented to us.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    runtime.block_on(containerd_shim::asynchronous::run::<KataLikeShim>(
        RUNTIME_ID,
        Some(config),
    ));
}
