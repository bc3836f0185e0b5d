//! CopyFile: writes files into the guest (DNS files, configmaps, secrets) in chunks.
//!
//! Paths are walked one component at a time with O_NOFOLLOW, so a symlink planted anywhere on
//! the way (e.g. by a container in a shared volume) cannot redirect the write. Chunks go to a
//! hidden temporary file beside the target, renamed into place when the last byte arrived, so
//! readers never see a half-written file.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

use kata_like_protocol::CopyFileRequest;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

use crate::error::{invalid, Error};

pub const MAX_CHUNK: usize = 1024 * 1024;
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Checks a CopyFile path; `allowed_root` restricts it further (the state dir on the host).
pub fn check_path(path: &str, allowed_root: Option<&Path>) -> Result<(), Error> {
    let p = Path::new(path);
    if path.len() > 4096 || path.contains('\0') || !p.is_absolute() {
        return Err(invalid(format!("path {path:?} must be an absolute path")));
    }
    if path.ends_with('/') {
        return Err(invalid(format!("path {path:?} names a directory")));
    }
    // Checked on the string: `Path::components` silently drops "." and empty components.
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid(format!(
            "path {path:?} must not contain '.', '..' or empty components"
        )));
    }
    for forbidden in ["/proc", "/sys", "/dev"] {
        if p.starts_with(forbidden) {
            return Err(invalid(format!("path {path:?} is under {forbidden}")));
        }
    }
    if let Some(root) = allowed_root {
        if !p.starts_with(root) {
            return Err(invalid(format!(
                "path {path:?} is outside {} (host mode)",
                root.display()
            )));
        }
    }
    if p.file_name().is_none() {
        return Err(invalid(format!("path {path:?} has no file name")));
    }
    Ok(())
}

fn io_status(what: &str, e: nix::Error) -> Error {
    match e {
        nix::Error::ELOOP | nix::Error::ENOTDIR => invalid(format!(
            "{what}: a path component is a symlink or not a directory"
        )),
        nix::Error::ENOENT => Error::not_found(format!("{what}: {e}")),
        _ => Error::internal(format!("{what}: {e}")),
    }
}

/// Opens the parent directory of `path` without following symlinks, creating it if asked.
fn open_parent(path: &Path, create: bool) -> Result<OwnedFd, Error> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let root = nix::fcntl::open("/", flags, Mode::empty()).map_err(|e| io_status("/", e))?;
    // SAFETY: open returned a new fd that we own.
    let mut dir = unsafe { OwnedFd::from_raw_fd(root) };
    let parent = path.parent().unwrap_or(Path::new("/"));
    for component in parent.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        let fd = match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT) if create => {
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::Error::EEXIST) => {}
                    Err(e) => return Err(io_status("creating parent", e)),
                }
                openat(Some(dir.as_raw_fd()), name, flags, Mode::empty())
                    .map_err(|e| io_status("opening parent", e))?
            }
            Err(e) => return Err(io_status("opening parent", e)),
        };
        // SAFETY: openat returned a new fd that we own.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(dir)
}

/// Writes one chunk; renames the file into place once `file_size` bytes are there.
pub fn copy_chunk(req: &CopyFileRequest, allowed_root: Option<&Path>) -> Result<(), Error> {
    check_path(&req.path, allowed_root)?;
    if req.data.len() > MAX_CHUNK {
        return Err(Error::resource_exhausted("a chunk is at most 1 MiB"));
    }
    if req.file_size > MAX_FILE_SIZE {
        return Err(Error::resource_exhausted("files are at most 64 MiB"));
    }
    let end = req
        .offset
        .checked_add(req.data.len() as u64)
        .ok_or_else(|| invalid("offset overflows"))?;
    if end > req.file_size {
        return Err(invalid("chunk goes past file_size"));
    }
    if req.mode > 0o7777 {
        return Err(invalid("mode has bits beyond 07777"));
    }
    let path = Path::new(&req.path);
    let name = path
        .file_name()
        .ok_or_else(|| invalid("path has no file name"))?;
    let dir = open_parent(path, req.create_parents)?;
    let tmp_name = format!(".{}.kata-like-part", name.to_string_lossy());
    let mut flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if req.offset == 0 {
        flags |= OFlag::O_CREAT | OFlag::O_TRUNC;
    }
    let fd = openat(
        Some(dir.as_raw_fd()),
        tmp_name.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| match e {
        nix::Error::ENOENT => Error::failed_precondition(
            "a chunk at a non-zero offset needs the chunk at offset 0 first",
        ),
        e => io_status("opening the file", e),
    })?;
    // SAFETY: openat returned a new fd that we own.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut written = 0usize;
    while written < req.data.len() {
        let n = nix::sys::uio::pwrite(
            &file,
            &req.data[written..],
            (req.offset + written as u64) as i64,
        )
        .map_err(|e| io_status("writing", e))?;
        written += n;
    }
    if end == req.file_size {
        nix::unistd::ftruncate(&file, req.file_size as i64)
            .map_err(|e| io_status("truncating", e))?;
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(req.mode))
            .map_err(|e| io_status("chmod", e))?;
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(req.uid)),
            Some(nix::unistd::Gid::from_raw(req.gid)),
        )
        .map_err(|e| io_status("chown", e))?;
        let tmp = CString::new(tmp_name).map_err(|_| invalid("bad name"))?;
        let target = CString::new(name.as_encoded_bytes()).map_err(|_| invalid("bad name"))?;
        // SAFETY: both names are valid C strings relative to our directory fd.
        let rc = unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                tmp.as_ptr(),
                dir.as_raw_fd(),
                target.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::internal(format!(
                "renaming into place: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn hostile_paths_are_rejected() {
        for bad in [
            "relative",
            "/a/../etc/passwd",
            "/proc/sys/x",
            "/dev/sda",
            "/sys/x",
            "/a/./b",
            "/",
            "/etc/",
        ] {
            assert_eq!(
                check_path(bad, None).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
        assert!(check_path("/etc/resolv.conf", None).is_ok());
        assert!(check_path("/etc/resolv.conf", Some(Path::new("/run/x"))).is_err());
    }

    #[test]
    fn chunks_are_assembled_and_symlinks_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/file");
        let mut req = CopyFileRequest {
            path: target.to_string_lossy().into(),
            data: b"hello ".to_vec(),
            offset: 0,
            file_size: 11,
            mode: 0o640,
            uid: 0,
            gid: 0,
            create_parents: true,
        };
        copy_chunk(&req, None).unwrap();
        assert!(!target.exists(), "not visible before the last chunk");
        req.data = b"world".to_vec();
        req.offset = 6;
        copy_chunk(&req, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640
        );

        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let req = CopyFileRequest {
            path: dir.path().join("link/file").to_string_lossy().into(),
            data: b"x".to_vec(),
            offset: 0,
            file_size: 1,
            ..Default::default()
        };
        assert_eq!(
            copy_chunk(&req, None).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
