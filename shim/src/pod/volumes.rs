//! Host volumes made visible in the guest: a host directory bind becomes a guest tmpfs that
//! the shim fills with a copy of the directory (there is no shared filesystem yet).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::vm::vm::Vm;

/// Files copied into the guest for one host directory bind, at most.
const MAX_DIR_FILES: usize = 4096;
const MAX_DIR_BYTES: u64 = 256 * 1024 * 1024;

/// Copies a host directory's regular files into a guest directory (a tmpfs storage), keeping
/// the relative layout. Bounded in file count and bytes.
pub(super) async fn copy_dir(vm: &Vm, host: &Path, guest_root: &str) -> Result<()> {
    let mut stack: Vec<PathBuf> = vec![host.to_path_buf()];
    let (mut files, mut bytes) = (0usize, 0u64);
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("read {}", dir.display())))?;
            let ft = entry
                .file_type()
                .map_err(Error::io(format!("stat {}", entry.path().display())))?;
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let rel = path.strip_prefix(host).map_err(|_| {
                    Error::Other(format!("{} escapes {}", path.display(), host.display()))
                })?;
                let rel = rel.to_str().ok_or_else(|| {
                    Error::InvalidArgument(format!("{} is not UTF-8", path.display()))
                })?;
                files += 1;
                bytes += vm.copy_file(&path, &format!("{guest_root}/{rel}")).await?;
                if files > MAX_DIR_FILES || bytes > MAX_DIR_BYTES {
                    return Err(Error::InvalidArgument(format!(
                        "host directory {} is too big to copy into the pod VM \
                         (more than {MAX_DIR_FILES} files or {MAX_DIR_BYTES} bytes)",
                        host.display()
                    )));
                }
            }
        }
    }
    Ok(())
}
