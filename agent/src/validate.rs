//! Checks of names the shim sends that both the sandbox and its containers use: ids and the
//! hostname. A leaf module, so that `sandbox` and `container` need not import each other.

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
