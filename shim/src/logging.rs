//! Shim logs: tracing, one line per event, into the `log` FIFO containerd opens in the bundle
//! (containerd copies it into its own log), or stderr when there is none.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Sets up logging for the serving shim. `level` is a tracing filter ("info", "debug", ...);
/// `RUST_LOG` overrides it.
pub fn init(level: &str) {
    // The HTTP/2 stack's debug output (every frame) would drown the shim's own events.
    let quiet_deps = format!("{level},h2=info,hyper=info,hyper_util=info,tower=info,tonic=info");
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(quiet_deps))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    // containerd creates the FIFO before starting the serving shim and reads it for the shim's
    // life; opening it non-blocking for writing succeeds only with that reader present.
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open("log");
    let _ = match fifo {
        Ok(file) => {
            // Back to blocking writes: a full FIFO should slow logging, not drop lines.
            let _ = set_blocking(&file);
            builder.with_writer(Mutex::new(file)).try_init()
        }
        Err(_) => builder.with_writer(std::io::stderr).try_init(),
    };
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn set_blocking(file: &std::fs::File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let mut flags = OFlag::from_bits_truncate(flags);
    flags.remove(OFlag::O_NONBLOCK);
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}
