//! Processes the shim started, found again from the pid files it wrote (a VMM, a virtiofsd),
//! for the cleanup after a crashed shim.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// Kills the process whose pid `pid_file` records if one of its arguments is `marker` (so a
/// reused pid is spared); waits until it is gone or a zombie. Returns its pid if killed.
pub fn kill_recorded_pid(pid_file: &Path, marker: &str) -> Result<Option<u32>> {
    let pid: u32 = match std::fs::read_to_string(pid_file) {
        Ok(text) => match text.trim().parse() {
            Ok(pid) => pid,
            Err(_) => return Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", pid_file.display()))(e)),
    };
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == marker.as_bytes());
    if !ours {
        return Ok(None);
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Wait until it is gone or a zombie (whoever is its parent reaps it).
    for _ in 0..200 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => break,
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next());
                if state == Some("Z") || state == Some("X") {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Some(pid))
}
