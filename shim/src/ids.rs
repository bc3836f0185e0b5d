//! Ids that come from containerd (namespace, sandbox, container, exec) name files and guest
//! objects: each is checked against the agent protocol's id rule before use.

use crate::error::{Error, Result};

/// Checks an id from containerd (container, exec) against the protocol's id rule.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    if kata_like_protocol::is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} id {:?} is not valid: it must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}",
            id.chars().take(200).collect::<String>()
        )))
    }
}
