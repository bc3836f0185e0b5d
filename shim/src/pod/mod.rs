//! The pod model: its containers and their processes, root filesystems, specs and stdio.

pub mod process;
pub mod rootfs;
pub mod spec;
pub mod stdio;
