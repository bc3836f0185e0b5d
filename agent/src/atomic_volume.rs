//! Atomic-writer volumes (configMap, secret, projected, downwardAPI) in the guest, laid out
//! exactly as kubelet's AtomicWriter lays them out on a node (kubernetes
//! pkg/volume/util/atomic_writer.go):
//!
//! ```text
//! <root>/..2026_12_06_10_22_00.123456789/   the generation: the payload's files and dirs
//! <root>/..data -> ..2026_12_06_10_22_00.123456789
//! <root>/<key>  -> ..data/<key>              one per top-level entry of the payload
//! ```
//!
//! The shim writes a new generation's files with CopyFile, then [`publish_generation`] makes it
//! current the way AtomicWriter does: a `..data_tmp` symlink renamed over `..data` (one atomic
//! rename: a reader sees the old payload or the new one, never a mix; an inotify watcher of the
//! volume sees the rename), then symlinks for keys that appeared, removal of keys that
//! vanished and of older generations.
//!
//! Every name handled here is one path component checked by [`check_generation`] or read from
//! the generation directory itself, and every symlink created is relative and points inside the
//! root: nothing is ever created outside the storage, whatever the request.

use std::collections::HashSet;
use std::path::Path;

use crate::error::{invalid, Error};

/// The symlink to the current generation, and its temporary name during a swap (kubelet's).
pub const DATA_DIR: &str = "..data";
pub const DATA_DIR_TMP: &str = "..data_tmp";
/// Top-level entries (keys) of one generation, at most: far above what a configMap or secret
/// (1 MiB each) can hold, a bound on what one request makes the agent do.
pub const MAX_KEYS: usize = 16_384;

/// Checks a generation's name: one component, `..` then kubelet's timestamp characters.
pub fn check_generation(generation: &str) -> Result<(), Error> {
    let rest = generation.strip_prefix("..").unwrap_or("");
    if rest.is_empty()
        || generation.len() > 255
        || generation == DATA_DIR
        || generation == DATA_DIR_TMP
        || !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid(format!(
            "volume generation {generation:?} must be \"..\" followed by [A-Za-z0-9._-] \
             (at most 255 bytes), and neither {DATA_DIR} nor {DATA_DIR_TMP}"
        )));
    }
    Ok(())
}

fn internal(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::internal(format!("{what}: {e}"))
}

/// The key symlink's target for `key`: `..data/<key>`.
fn key_target(key: &str) -> String {
    format!("{DATA_DIR}/{key}")
}

/// Makes `generation` (a directory already written under `root`) the volume's current payload
/// (see the module comment). Idempotent: publishing the current generation again only repairs
/// its key symlinks.
pub fn publish_generation(root: &Path, generation: &str) -> Result<(), Error> {
    check_generation(generation)?;
    let gen_dir = root.join(generation);
    match std::fs::symlink_metadata(&gen_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(invalid(format!(
                "volume generation {generation} is not a directory"
            )))
        }
        Err(e) => {
            return Err(invalid(format!(
                "volume generation {generation} was not written: {e}"
            )))
        }
    }
    // The keys: the generation's top-level entries (the shim wrote only those).
    let mut keys = HashSet::new();
    for entry in std::fs::read_dir(&gen_dir).map_err(internal(format!("listing {generation}")))? {
        let entry = entry.map_err(internal(format!("listing {generation}")))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| invalid(format!("a key of {generation} is not UTF-8")))?;
        if name.starts_with("..") {
            return Err(invalid(format!(
                "key {name:?} of {generation} starts with \"..\" (reserved for the volume's own entries)"
            )));
        }
        keys.insert(name.to_string());
        if keys.len() > MAX_KEYS {
            return Err(Error::resource_exhausted(format!(
                "volume generation {generation} has more than {MAX_KEYS} keys"
            )));
        }
    }

    // The swap: ..data_tmp -> generation, renamed over ..data.
    let tmp = root.join(DATA_DIR_TMP);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(internal(format!("removing a stale {DATA_DIR_TMP}"))(e)),
    }
    std::os::unix::fs::symlink(generation, &tmp)
        .map_err(internal(format!("creating {DATA_DIR_TMP}")))?;
    std::fs::rename(&tmp, root.join(DATA_DIR))
        .map_err(internal(format!("renaming {DATA_DIR_TMP} over {DATA_DIR}")))?;

    // Keys that appeared get their symlink; keys that vanished lose theirs; older generations go.
    for key in &keys {
        let link = root.join(key);
        match std::fs::read_link(&link) {
            Ok(target) if target == Path::new(&key_target(key)) => continue,
            Ok(_) => std::fs::remove_file(&link)
                .map_err(internal(format!("replacing the symlink of key {key}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                return Err(Error::failed_precondition(format!(
                    "key {key} of the volume exists and is not a symlink: it cannot be published"
                )))
            }
        }
        std::os::unix::fs::symlink(key_target(key), &link)
            .map_err(internal(format!("creating the symlink of key {key}")))?;
    }
    for entry in std::fs::read_dir(root).map_err(internal("listing the volume".into()))? {
        let entry = entry.map_err(internal("listing the volume".into()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name == DATA_DIR || name == generation {
            continue;
        }
        if name.starts_with("..") {
            // An older (or half-written) generation. remove_dir_all does not follow symlinks.
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir {
                std::fs::remove_dir_all(&path)
                    .map_err(internal(format!("removing the old generation {name}")))?;
            }
            continue;
        }
        let is_our_key_link =
            std::fs::read_link(&path).is_ok_and(|target| target == Path::new(&key_target(name)));
        if is_our_key_link && !keys.contains(name) {
            std::fs::remove_file(&path)
                .map_err(internal(format!("removing the vanished key {name}")))?;
        }
    }
    tracing::info!(volume = %root.display(), generation, keys = keys.len(), "volume generation published");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn write_generation(root: &Path, generation: &str, files: &[(&str, &str)]) {
        for (path, text) in files {
            let path = root.join(generation).join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    fn read(root: &Path, path: &str) -> String {
        std::fs::read_to_string(root.join(path)).unwrap()
    }

    #[test]
    fn first_generation_gets_kubelets_layout() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_generation(root, "..g1", &[("a", "1"), ("conf/b", "2")]);
        publish_generation(root, "..g1").unwrap();
        assert_eq!(
            std::fs::read_link(root.join("..data")).unwrap(),
            Path::new("..g1")
        );
        assert_eq!(
            std::fs::read_link(root.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::read_link(root.join("conf")).unwrap(),
            Path::new("..data/conf")
        );
        assert_eq!(read(root, "a"), "1");
        assert_eq!(read(root, "conf/b"), "2");
        assert!(!root.join("..data_tmp").exists());
    }

    #[test]
    fn a_new_generation_replaces_changed_adds_new_and_drops_vanished_keys() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_generation(root, "..g1", &[("a", "1"), ("gone", "x")]);
        publish_generation(root, "..g1").unwrap();
        write_generation(root, "..g2", &[("a", "changed"), ("new", "n")]);
        publish_generation(root, "..g2").unwrap();
        assert_eq!(read(root, "a"), "changed");
        assert_eq!(read(root, "new"), "n");
        assert!(std::fs::symlink_metadata(root.join("gone")).is_err());
        assert!(!root.join("..g1").exists(), "the old generation is removed");
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["..data", "..g2", "a", "new"]);
        // Publishing the current one again changes nothing.
        publish_generation(root, "..g2").unwrap();
        assert_eq!(read(root, "a"), "changed");
    }

    #[test]
    fn hostile_generation_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "..",
            "g1",
            "..data",
            "..data_tmp",
            "../x",
            "..a/b",
            "..a\0",
        ] {
            let err = publish_generation(dir.path(), bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        }
        // A generation that was never written, or is a symlink out of the volume.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("..evil")).unwrap();
        for missing in ["..nothing", "..evil"] {
            let err = publish_generation(dir.path(), missing).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{missing}");
        }
        assert!(!dir.path().join("..data").exists());
    }

    #[test]
    fn a_key_that_is_not_a_symlink_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a"), "planted").unwrap();
        write_generation(root, "..g1", &[("a", "1")]);
        let err = publish_generation(root, "..g1").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(read(root, "a"), "planted");
    }
}
