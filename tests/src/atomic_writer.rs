//! kubelet's AtomicWriter (kubernetes pkg/volume/util/atomic_writer.go), for the volume tests:
//! writes configMap, secret and projected volumes on the node exactly as kubelet does, so that
//! the tests meet the layout and the update a real pod meets:
//!
//! ```text
//! <dir>/..2026_12_06_10_22_00.123456789/<key>   the payload (a generation)
//! <dir>/..data -> ..2026_12_06_10_22_00.123456789
//! <dir>/<key>  -> ..data/<key>
//! ```
//!
//! An update writes a new generation, points a `..data_tmp` symlink at it, renames that over
//! `..data`, creates the symlinks of new keys, removes those of vanished keys and then the old
//! generation.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One file of a payload: its path in the volume (`key` or `dir/key`), content, mode, owner.
#[derive(Debug, Clone)]
pub struct PayloadFile {
    pub path: String,
    pub content: Vec<u8>,
    pub mode: u32,
    /// (uid, gid); kubelet chowns to the pod's fsGroup.
    pub owner: Option<(u32, u32)>,
}

impl PayloadFile {
    /// A file as a configMap's default mode (0644) writes it.
    pub fn new(path: &str, content: &str) -> PayloadFile {
        PayloadFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            mode: 0o644,
            owner: None,
        }
    }
}

/// An atomic-writer volume directory on the node.
pub struct AtomicVolumeDir {
    pub dir: PathBuf,
}

/// kubelet's generation name: `..` + the UTC time as `2006_01_02_15_04_05.` + a unique suffix
/// (Go's MkdirTemp adds a random number; nanoseconds are unique enough here).
fn generation_name() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secs = now.as_secs();
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "..{year:04}_{month:02}_{day:02}_{h:02}_{m:02}_{s:02}.{}",
        now.subsec_nanos()
    )
}

fn top_level(path: &str) -> &str {
    path.split('/').next().unwrap_or(path)
}

impl AtomicVolumeDir {
    /// Creates the volume directory (mode 0777 as kubelet's) and writes its first payload.
    pub fn create(dir: &Path, payload: &[PayloadFile]) -> AtomicVolumeDir {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let volume = AtomicVolumeDir {
            dir: dir.to_path_buf(),
        };
        volume.write(payload);
        volume
    }

    /// The current generation's name (`..data`'s target).
    pub fn generation(&self) -> String {
        std::fs::read_link(self.dir.join("..data"))
            .expect("readlink ..data")
            .to_string_lossy()
            .into_owned()
    }

    /// Writes `payload` as the new generation, exactly as kubelet's AtomicWriter does; returns
    /// the new generation's name.
    pub fn write(&self, payload: &[PayloadFile]) -> String {
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let mut generation = generation_name();
        while old.as_deref() == Some(Path::new(&generation)) {
            generation = generation_name();
        }
        let gen_dir = self.dir.join(&generation);
        std::fs::create_dir(&gen_dir).expect("mkdir generation");
        std::fs::set_permissions(&gen_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for file in payload {
            let path = gen_dir.join(&file.path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, &file.content).expect("write payload file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode))
                .expect("chmod");
            if let Some((uid, gid)) = file.owner {
                chown(&path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename ..data_tmp over ..data");
        let keys: Vec<&str> = payload.iter().map(|f| top_level(&f.path)).collect();
        for key in &keys {
            let link = self.dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link).expect("key symlink");
            }
        }
        for entry in std::fs::read_dir(&self.dir).expect("read volume").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !keys.contains(&name.as_str()) {
                std::fs::remove_file(entry.path()).expect("remove vanished key");
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).expect("remove the old generation");
        }
        generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_swap_data_and_keep_only_current_keys() {
        let dir = std::env::temp_dir().join(format!("atomic-writer-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let volume = AtomicVolumeDir::create(
            &dir,
            &[PayloadFile::new("a", "1"), PayloadFile::new("d/b", "2")],
        );
        let first = volume.generation();
        assert!(first.starts_with("..20"), "{first}");
        assert_eq!(std::fs::read_to_string(dir.join("d/b")).expect("read"), "2");
        let second = volume.write(&[PayloadFile::new("a", "new")]);
        assert_ne!(first, second);
        assert_eq!(std::fs::read_to_string(dir.join("a")).expect("read"), "new");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [second, "..data".to_string(), "a".to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
