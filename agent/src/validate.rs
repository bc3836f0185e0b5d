//! Checks of what the shim sends that several modules share: ids, the hostname, guest paths.
//! A leaf module, so that `sandbox`, `container` and `storage` need not import each other.

use std::path::{Component, Path, PathBuf};

use kata_like_protocol::is_valid_id;

use crate::error::{invalid, Error};

pub fn check_id(what: &str, id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {id:?} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
        )))
    }
}

/// An exec id: "" (the container's init process) or a valid id.
pub fn check_exec_id(exec_id: &str) -> Result<(), Error> {
    if exec_id.is_empty() {
        Ok(())
    } else {
        check_id("exec id", exec_id)
    }
}

pub fn check_hostname(hostname: &str) -> Result<(), Error> {
    if hostname.len() > 64
        || !hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(invalid(format!("hostname {hostname:?} is not valid")));
    }
    Ok(())
}

/// A guest path given by the shim for use inside a container: absolute, no `..`, no NUL.
pub fn check_container_path(what: &str, path: &Path) -> Result<(), Error> {
    let text = path.to_string_lossy();
    if text.contains('\0') || text.len() > 4096 {
        return Err(invalid(format!("{what} {text:?} is not a valid path")));
    }
    if !path.is_absolute() {
        return Err(invalid(format!("{what} {text:?} must be absolute")));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(invalid(format!("{what} {text:?} must not contain '..'")));
    }
    Ok(())
}

/// Resolves `path` (following symlinks) and checks that it stays under `root`.
pub fn resolve_under(what: &str, path: &Path, root: &Path) -> Result<PathBuf, Error> {
    check_container_path(what, path)?;
    let resolved = std::fs::canonicalize(path)
        .map_err(|e| invalid(format!("{what} {}: {e}", path.display())))?;
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    if !resolved.starts_with(&root) {
        return Err(invalid(format!(
            "{what} {} resolves to {}, outside {}",
            path.display(),
            resolved.display(),
            root.display()
        )));
    }
    Ok(resolved)
}
