//! The pod VM's console log on the host, capped and rotated (`[console_log]` of the config).
//!
//! The VMM writes the guest console (hvc0 and ttyS0) into the write end of a pipe; the shim
//! drains the read end into `console.log`, which it rotates to `console.log.1` ... `.N` when it
//! reaches `max_bytes`, so a guest flooding its console keeps at most `max_bytes * (1 + N)`
//! bytes on the host, the newest ones. Why a pipe to the shim rather than a cap in the VMM: the
//! VMM is jailed (chroot, its own unprivileged uid, no capabilities) and cannot rename files in the pod's
//! state dir, and a pipe bounds memory on both sides: the VMM writes it non-blocking and drops
//! (and counts, `console_dropped_bytes` in its metrics) what does not fit when the shim falls
//! behind, so the guest never waits for the host and nothing queues up in memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

/// Bytes read from the pipe at a time.
const READ_CHUNK: usize = 64 * 1024;

/// The CRI annotation with the pod's log directory (containerd 1.6, pkg/cri/annotations).
pub const SANDBOX_LOG_DIRECTORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-log-directory";
/// The folder in the pod's log directory holding the kept guest console log.
pub const KEPT_LOG_DIR: &str = "kata-like-vm";

/// `console.log.<index>`: rotated file `index` (1 is the newest).
pub fn rotated_path(path: &Path, index: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// A log file that rotates at `max_bytes`, keeping `files` rotated files.
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    files: u32,
    file: File,
    len: u64,
}

impl RotatingLog {
    /// Starts an empty log at `path` (an older one is truncated: one pod VM, one log).
    pub fn create(path: &Path, max_bytes: u64, files: u32) -> io::Result<RotatingLog> {
        Ok(RotatingLog {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            files,
            file: open_truncated(path)?,
            len: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `data`, rotating whenever the current file is full.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.len >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.len).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.file.write_all(&data[..n])?;
            self.len += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// `.N-1` -> `.N`, ..., current -> `.1`, then a new current file (the oldest is
    /// overwritten by the rename). Without rotated files the current one starts over.
    fn rotate(&mut self) -> io::Result<()> {
        if self.files > 0 {
            for index in (1..self.files).rev() {
                match std::fs::rename(
                    rotated_path(&self.path, index),
                    rotated_path(&self.path, index + 1),
                ) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated_path(&self.path, 1))?;
        }
        self.file = open_truncated(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

fn open_truncated(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NOFOLLOW: a symlink planted where the log goes is refused, not written through.
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// The console log kept with the pod's logs: `<pod_log_dir>/kata-like-vm/console.log`, rotated
/// with the same limits as the state dir's. kubelet removes the pod's log directory with the pod,
/// so this copy outlives StopPodSandbox and the shim. `pod_log_dir` comes from the sandbox's
/// annotations (outside data): it must be an absolute, existing directory reached without `..`
/// or symlinks.
pub fn create_kept(pod_log_dir: &Path, max_bytes: u64, files: u32) -> io::Result<RotatingLog> {
    let dir = checked_pod_log_dir(pod_log_dir)?;
    let kept = dir.join(KEPT_LOG_DIR);
    match std::fs::create_dir(&kept) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(&kept)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory (a symlink?)", kept.display()),
        ));
    }
    RotatingLog::create(&kept.join("console.log"), max_bytes, files)
}

/// `dir` if it is absolute, has no `..`, exists, is a directory and has no symlink on its way.
fn checked_pod_log_dir(dir: &Path) -> io::Result<PathBuf> {
    use std::path::Component;
    let invalid = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pod log directory {:?} {why}", dir.display().to_string()),
        ))
    };
    if !dir.is_absolute() {
        return invalid("is not an absolute path");
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return invalid("has a `..` component");
    }
    let real = match dir.canonicalize() {
        Ok(real) => real,
        Err(e) => return invalid(&format!("cannot be resolved: {e}")),
    };
    // Equal after resolving: no symlink anywhere on the path (they could lead anywhere).
    if real != dir.components().collect::<PathBuf>() {
        return invalid(&format!("goes through a symlink (to {})", real.display()));
    }
    if !real.is_dir() {
        return invalid("is not a directory");
    }
    Ok(real)
}

/// A pipe for the console: (read end for the shim, write end for the VMM), both close-on-exec
/// (the VMM's end is made inheritable in its child only). The write end is non-blocking, so
/// that the VMM drops rather than waits when the pipe is full (it sets this itself too).
pub fn console_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    fcntl(&write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok((read, write))
}

/// Drains the console pipe into every one of `logs` until the VMM (every holder of the write
/// end) is gone. A log that cannot be written (disk full) loses output but the pipe keeps being
/// drained, so the VMM never sees a full pipe because of it.
pub async fn drain(read: OwnedFd, mut logs: Vec<RotatingLog>, sandbox_id: String) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::error!(sandbox_id, error = %e, "cannot read the guest console pipe: the console log stays empty");
            return;
        }
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut write_failed = vec![false; logs.len()];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(sandbox_id, error = %e, "reading the guest console pipe failed");
                break;
            }
        };
        for (log, failed) in logs.iter_mut().zip(write_failed.iter_mut()) {
            if let Err(e) = log.write(&buf[..n]) {
                if !*failed {
                    tracing::warn!(sandbox_id, path = %log.path.display(), error = %e, "writing the guest console log failed; its output is lost until a write succeeds");
                }
                *failed = true;
            } else {
                *failed = false;
            }
        }
    }
}

/// The last `max` bytes of the console log, reaching into `console.log.1` when the current
/// file was just rotated.
pub fn tail(path: &Path, max: u64) -> String {
    let current = read_tail(path, max);
    let mut bytes = match max.checked_sub(current.len() as u64) {
        Some(missing) if missing > 0 => read_tail(&rotated_path(path, 1), missing),
        _ => Vec::new(),
    };
    bytes.extend_from_slice(&current);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn log_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn rotation_keeps_the_newest_bytes_within_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 10, 2).expect("create");
        // 26 letters in uneven writes: 10 per file, three files at most.
        for chunk in [&b"abc"[..], b"defghijklmnop", b"q", b"rstuvwxyz"] {
            log.write(chunk).expect("write");
        }
        assert_eq!(
            log_files(dir.path()),
            ["console.log", "console.log.1", "console.log.2"]
        );
        assert_eq!(read(&rotated_path(&path, 2)), "abcdefghij");
        assert_eq!(read(&rotated_path(&path, 1)), "klmnopqrst");
        assert_eq!(read(&path), "uvwxyz");
        log.write(b"0123456789ABCDE").expect("write");
        // The oldest bytes are gone; the newest are kept.
        assert_eq!(read(&rotated_path(&path, 2)), "uvwxyz0123");
        assert_eq!(read(&rotated_path(&path, 1)), "456789ABCD");
        assert_eq!(read(&path), "E");
        assert_eq!(log_files(dir.path()).len(), 3);
    }

    #[test]
    fn without_rotated_files_the_log_starts_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 4, 0).expect("create");
        log.write(b"abcdefghij").expect("write");
        assert_eq!(read(&path), "ij");
        assert_eq!(log_files(dir.path()), ["console.log"]);
    }

    #[test]
    fn a_huge_write_never_leaves_more_than_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 4096, 2).expect("create");
        let mut data = vec![b'.'; 1 << 20];
        data.extend_from_slice(b"END");
        log.write(&data).expect("write");
        let total: u64 = log_files(dir.path())
            .iter()
            .map(|n| std::fs::metadata(dir.path().join(n)).expect("stat").len())
            .sum();
        assert!(total <= 3 * 4096, "{total}");
        assert!(tail(&path, 4096).ends_with(".END"));
    }

    #[test]
    fn an_old_log_is_truncated_at_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, "from an earlier VM").expect("write");
        RotatingLog::create(&path, 100, 1).expect("create");
        assert_eq!(read(&path), "");
    }

    #[test]
    fn the_tail_reaches_into_the_rotated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = RotatingLog::create(&path, 8, 1).expect("create");
        log.write(b"01234567ab").expect("write");
        assert_eq!(tail(&path, 4), "67ab");
        assert_eq!(tail(&path, 100), "01234567ab");
        assert_eq!(tail(&dir.path().join("missing"), 4), "");
    }

    #[tokio::test]
    async fn the_drain_copies_the_pipe_into_the_log_until_the_writer_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let (read, write) = console_pipe().expect("pipe");
        let log = RotatingLog::create(&path, 1024, 1).expect("create");
        let kept_dir = tempfile::tempdir().expect("tempdir");
        let kept = create_kept(kept_dir.path(), 1024, 1).expect("kept");
        let kept_path = kept.path().to_path_buf();
        let drained = tokio::spawn(drain(read, vec![log, kept], "pod".into()));
        let mut writer = File::from(write);
        // More than the cap through the pipe: the writer thread must not block forever, the
        // drain keeps up with it.
        let writing = std::thread::spawn(move || {
            let mut send = |mut data: &[u8]| {
                while !data.is_empty() {
                    match writer.write(data) {
                        Ok(n) => data = &data[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                        Err(e) => panic!("pipe write: {e}"),
                    }
                }
            };
            for _ in 0..16 {
                send(&[b'x'; 512]);
            }
            send(b"END");
        });
        tokio::task::spawn_blocking(move || writing.join())
            .await
            .expect("join")
            .expect("writer");
        drained.await.expect("drain");
        assert!(read_tail(&path, 2048).ends_with(b"END"));
        assert!(
            read_tail(&kept_path, 2048).ends_with(b"END"),
            "the kept copy too"
        );
        let total = std::fs::metadata(&path).expect("stat").len()
            + std::fs::metadata(rotated_path(&path, 1))
                .expect("stat")
                .len();
        assert!(total <= 2048, "{total}");
    }

    #[test]
    fn the_kept_log_goes_into_the_pod_log_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut kept = create_kept(dir.path(), 100, 1).expect("kept");
        kept.write(b"agent ready").expect("write");
        let path = dir.path().join(KEPT_LOG_DIR).join("console.log");
        assert_eq!(kept.path(), path);
        assert_eq!(read(&path), "agent ready");
        // A second VM of the same pod (a restart) reuses the folder.
        create_kept(dir.path(), 100, 1).expect("again");
    }

    #[test]
    fn a_pod_log_dir_that_is_relative_dotted_missing_or_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("write");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        let dotted = sub.join("..").join("sub");
        for (bad, why) in [
            (PathBuf::from("var/log/pods/x"), "not an absolute path"),
            (dotted, "`..`"),
            (dir.path().join("missing"), "cannot be resolved"),
            (file, "not a directory"),
        ] {
            let err = create_kept(&bad, 100, 1).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(why)),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_symlink_in_the_pod_log_dir_or_its_kept_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(elsewhere.path(), &link).expect("symlink");
        let err = create_kept(&link, 100, 1).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("symlink")),
            "{err:?}"
        );
        // A planted kata-like-vm symlink in a valid log dir, and a planted console.log symlink.
        let pod_dir = dir.path().join("pod");
        std::fs::create_dir(&pod_dir).expect("mkdir");
        std::os::unix::fs::symlink(elsewhere.path(), pod_dir.join(KEPT_LOG_DIR)).expect("symlink");
        assert!(create_kept(&pod_dir, 100, 1).is_err());
        std::fs::remove_file(pod_dir.join(KEPT_LOG_DIR)).expect("rm");
        std::fs::create_dir(pod_dir.join(KEPT_LOG_DIR)).expect("mkdir");
        let target = elsewhere.path().join("victim");
        std::os::unix::fs::symlink(&target, pod_dir.join(KEPT_LOG_DIR).join("console.log"))
            .expect("symlink");
        assert!(create_kept(&pod_dir, 100, 1).is_err());
        assert!(!target.exists(), "nothing written through the symlink");
    }
}
