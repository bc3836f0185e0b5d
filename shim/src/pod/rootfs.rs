//! Container root file systems as block devices for the guest.
//!
//! containerd hands the shim the rootfs as mounts: with the overlayfs snapshotter one `overlay`
//! mount whose `lowerdir=` lists the image's committed (immutable) layer snapshots, top first,
//! plus an `upperdir` that is empty for a new container. Each layer directory becomes one erofs
//! image (mkfs.erofs keeps overlay whiteouts: 0/0 char devices and `trusted.overlay.*` xattrs),
//! cached host-wide by the layer directory's identity, so the second pod of an image pays
//! nothing. The guest mounts each image read-only and the agent stacks them with a tmpfs upper.
//! No host mount is made for any of this, so nothing can be left mounted on the host.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::vm::storage::LayerImage;

/// Most layers one container may have (each needs a drive slot while in use).
pub const MAX_LAYERS: usize = 32;
/// Longest mount option string looked at.
const MAX_OPTIONS_BYTES: usize = 64 * 1024;

/// One rootfs mount as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// A read-only layer directory that becomes one erofs image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub dir: PathBuf,
    /// Committed snapshots never change and may be cached; a container's own upper may.
    pub immutable: bool,
}

/// Turns containerd's rootfs mounts (or the bundle's `rootfs` directory when there are none)
/// into the layer directories to image, top layer first. Refuses anything it does not know.
pub fn layers_from_mounts(mounts: &[RootfsMount], bundle_rootfs: &Path) -> Result<Vec<Layer>> {
    let layers = match mounts {
        [] => vec![Layer {
            dir: bundle_rootfs.to_path_buf(),
            immutable: false,
        }],
        [m] if m.fs_type == "overlay" => overlay_layers(m)?,
        [m] if m.fs_type == "bind"
            || m.fs_type == "rbind"
            || m.options.iter().any(|o| o == "bind" || o == "rbind") =>
        {
            vec![Layer {
                dir: checked_dir(&m.source)?,
                immutable: false,
            }]
        }
        [m] => {
            return Err(Error::InvalidArgument(format!(
                "rootfs mount type {:?} is not supported (overlay or bind)",
                m.fs_type
            )))
        }
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{} rootfs mounts given; exactly one (overlay or bind) is supported",
                mounts.len()
            )))
        }
    };
    if layers.len() > MAX_LAYERS {
        return Err(Error::InvalidArgument(format!(
            "image has {} layers; at most {MAX_LAYERS} are supported",
            layers.len()
        )));
    }
    Ok(layers)
}

fn overlay_layers(m: &RootfsMount) -> Result<Vec<Layer>> {
    if m.options.iter().map(String::len).sum::<usize>() > MAX_OPTIONS_BYTES {
        return Err(Error::InvalidArgument("overlay options too long".into()));
    }
    let mut lower = None;
    let mut upper = None;
    for opt in &m.options {
        if let Some(v) = opt.strip_prefix("lowerdir=") {
            lower = Some(v);
        } else if let Some(v) = opt.strip_prefix("upperdir=") {
            upper = Some(v);
        }
    }
    let lower = lower.ok_or_else(|| {
        Error::InvalidArgument("overlay rootfs mount without lowerdir=".to_string())
    })?;
    let mut layers = Vec::new();
    if let Some(upper) = upper {
        let dir = checked_dir(upper)?;
        // containerd's upper is empty for a new container; content there (a restarted task)
        // is carried over as the top read-only layer, rebuilt every time.
        let empty = std::fs::read_dir(&dir)
            .map_err(Error::io(format!("read upperdir {}", dir.display())))?
            .next()
            .is_none();
        if !empty {
            layers.push(Layer {
                dir,
                immutable: false,
            });
        }
    }
    for dir in lower.split(':') {
        if dir.is_empty() {
            return Err(Error::InvalidArgument(
                "empty path in overlay lowerdir=".into(),
            ));
        }
        layers.push(Layer {
            dir: checked_dir(dir)?,
            immutable: true,
        });
    }
    Ok(layers)
}

fn checked_dir(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute()
        || path.len() > 4096
        || p.components().any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Error::InvalidArgument(format!(
            "rootfs layer path {path:?} must be absolute without \"..\""
        )));
    }
    let meta = std::fs::symlink_metadata(p)
        .map_err(|e| Error::InvalidArgument(format!("rootfs layer {path:?}: {e}")))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "rootfs layer {path:?} is not a directory"
        )));
    }
    Ok(p.to_path_buf())
}

/// The identity of a layer directory: path, device, inode and change time. A committed snapshot
/// keeps all four for its life; a new snapshot at a reused path has another inode or ctime.
pub fn layer_key(dir: &Path) -> Result<String> {
    let meta = std::fs::metadata(dir).map_err(Error::io(format!("stat {}", dir.display())))?;
    let mut h = Sha256::new();
    h.update(dir.as_os_str().as_encoded_bytes());
    h.update([0]);
    for n in [
        meta.dev(),
        meta.ino(),
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
    ] {
        h.update(n.to_le_bytes());
    }
    let digest = h.finalize();
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// Builds erofs images and keeps the cache of immutable layers.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    pub mkfs_erofs: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_entries: usize,
}

impl ImageBuilder {
    /// Returns the image of one layer: from the cache when the layer is immutable and was built
    /// before, else built now with mkfs.erofs. `scratch_dir` receives uncached images (the
    /// sandbox state dir, removed with the pod).
    pub async fn image(&self, layer: &Layer, scratch_dir: &Path) -> Result<LayerImage> {
        let key = layer_key(&layer.dir)?;
        if layer.immutable {
            let cached_path = self.cache_dir.join(format!("{key}.erofs"));
            if let Ok(file) = std::fs::File::open(&cached_path) {
                // Mark as recently used for the eviction order.
                let _ = file.set_modified(SystemTime::now());
                return Ok(LayerImage {
                    storage_id: format!("layer-{key}"),
                    file,
                    cached: true,
                });
            }
            std::fs::create_dir_all(&self.cache_dir)
                .map_err(Error::io(format!("create {}", self.cache_dir.display())))?;
            let tmp = self
                .cache_dir
                .join(format!(".{key}.{}.tmp", std::process::id()));
            self.mkfs(&layer.dir, &tmp).await?;
            std::fs::rename(&tmp, &cached_path).map_err(Error::io(format!(
                "move image into cache {}",
                cached_path.display()
            )))?;
            let file = std::fs::File::open(&cached_path)
                .map_err(Error::io(format!("open {}", cached_path.display())))?;
            self.evict();
            Ok(LayerImage {
                storage_id: format!("layer-{key}"),
                file,
                cached: false,
            })
        } else {
            std::fs::create_dir_all(scratch_dir)
                .map_err(Error::io(format!("create {}", scratch_dir.display())))?;
            let path = scratch_dir.join(format!("{key}.erofs"));
            self.mkfs(&layer.dir, &path).await?;
            let file = std::fs::File::open(&path)
                .map_err(Error::io(format!("open {}", path.display())))?;
            // The open fd keeps the image alive for the VMM; the name is not needed any more.
            let _ = std::fs::remove_file(&path);
            Ok(LayerImage {
                storage_id: format!("rw-{key}"),
                file,
                cached: false,
            })
        }
    }

    async fn mkfs(&self, dir: &Path, out: &Path) -> Result<()> {
        let output = tokio::process::Command::new(&self.mkfs_erofs)
            .arg("--quiet")
            .arg(out)
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(Error::io(format!("run {}", self.mkfs_erofs.display())))?;
        if !output.status.success() {
            let _ = std::fs::remove_file(out);
            return Err(Error::Other(format!(
                "mkfs.erofs {} failed ({}): {}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Keeps the cache at `cache_entries` images, dropping the least recently used. Images in
    /// use stay valid: the VMM holds an open fd.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.cache_dir) else {
            return;
        };
        let mut images: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".erofs"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if images.len() <= self.cache_entries {
            return;
        }
        images.sort();
        let excess = images.len() - self.cache_entries;
        for (_, path) in images.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn overlay(lower: &str, upper: &str) -> RootfsMount {
        RootfsMount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={upper}/../work"),
                format!("upperdir={upper}"),
                format!("lowerdir={lower}"),
            ],
        }
    }

    #[test]
    fn overlay_mount_gives_lower_layers_top_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["l1", "l2", "up"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let p = |d: &str| dir.path().join(d).display().to_string();
        let layers = layers_from_mounts(
            &[overlay(&format!("{}:{}", p("l2"), p("l1")), &p("up"))],
            Path::new("/unused"),
        )
        .expect("layers");
        assert_eq!(
            layers,
            vec![
                Layer {
                    dir: dir.path().join("l2"),
                    immutable: true
                },
                Layer {
                    dir: dir.path().join("l1"),
                    immutable: true
                },
            ]
        );
        // A non-empty upper becomes the top layer, never cached.
        std::fs::write(dir.path().join("up/file"), "x").expect("write");
        let layers = layers_from_mounts(&[overlay(&p("l1"), &p("up"))], Path::new("/unused"))
            .expect("layers");
        assert_eq!(layers[0].dir, dir.path().join("up"));
        assert!(!layers[0].immutable);
        assert_eq!(layers.len(), 2);
    }

    #[test]
    fn hostile_or_unknown_mounts_are_refused() {
        let cases = [
            (overlay("relative/dir", "/tmp"), "absolute"),
            (overlay("/tmp/../etc", "/tmp"), "absolute"),
            (overlay("/nonexistent-layer", "/tmp"), "nonexistent-layer"),
            (overlay("/etc/passwd", "/tmp"), "not a directory"),
            (overlay("/tmp::/tmp", "/tmp"), "empty path"),
            (
                RootfsMount {
                    fs_type: "nfs".into(),
                    source: "x".into(),
                    options: vec![],
                },
                "not supported",
            ),
        ];
        for (m, expect) in cases {
            let err = layers_from_mounts(std::slice::from_ref(&m), Path::new("/x"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{m:?}: {err}");
        }
        let no_lower = RootfsMount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec!["upperdir=/tmp".into()],
        };
        assert!(layers_from_mounts(&[no_lower], Path::new("/x")).is_err());
        let many = format!("lowerdir={}", vec!["/tmp"; MAX_LAYERS + 1].join(":"));
        let m = RootfsMount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec![many],
        };
        let err = layers_from_mounts(&[m], Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers"), "{err}");
    }

    #[test]
    fn no_mounts_means_the_bundle_rootfs() {
        let layers = layers_from_mounts(&[], Path::new("/b/rootfs")).expect("layers");
        assert_eq!(
            layers,
            vec![Layer {
                dir: PathBuf::from("/b/rootfs"),
                immutable: false
            }]
        );
    }

    fn erofs_magic(file: &mut std::fs::File) -> u32 {
        let mut magic = [0u8; 4];
        file.seek(SeekFrom::Start(1024)).expect("seek");
        file.read_exact(&mut magic).expect("read");
        u32::from_le_bytes(magic)
    }

    #[tokio::test]
    async fn images_are_built_once_and_cached_by_layer_identity() {
        if !Path::new("/usr/bin/mkfs.erofs").exists() {
            panic!("mkfs.erofs (erofs-utils) is required for this test");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let layer_dir = dir.path().join("layer");
        std::fs::create_dir_all(layer_dir.join("bin")).expect("mkdir");
        std::fs::write(layer_dir.join("bin/hello"), "hello").expect("write");
        let builder = ImageBuilder {
            mkfs_erofs: "/usr/bin/mkfs.erofs".into(),
            cache_dir: dir.path().join("cache"),
            cache_entries: 1,
        };
        let layer = Layer {
            dir: layer_dir.clone(),
            immutable: true,
        };
        let mut first = builder
            .image(&layer, &dir.path().join("scratch"))
            .await
            .expect("build");
        assert!(!first.cached);
        assert_eq!(erofs_magic(&mut first.file), 0xE0F5_E1E2);
        let second = builder
            .image(&layer, &dir.path().join("scratch"))
            .await
            .expect("cached");
        assert!(second.cached);
        assert_eq!(first.storage_id, second.storage_id);

        // A second layer evicts the first (cache of one entry); the open image stays readable.
        let other_dir = dir.path().join("other");
        std::fs::create_dir(&other_dir).expect("mkdir");
        let other = builder
            .image(
                &Layer {
                    dir: other_dir,
                    immutable: true,
                },
                &dir.path().join("scratch"),
            )
            .await
            .expect("build");
        assert_ne!(other.storage_id, first.storage_id);
        let cached: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
            .expect("cache")
            .collect();
        assert_eq!(cached.len(), 1);
        assert_eq!(erofs_magic(&mut first.file), 0xE0F5_E1E2);

        // Mutable layers are built into the scratch dir and never cached.
        let rw = builder
            .image(
                &Layer {
                    dir: layer_dir,
                    immutable: false,
                },
                &dir.path().join("scratch"),
            )
            .await
            .expect("build");
        assert!(rw.storage_id.starts_with("rw-"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("scratch"))
                .expect("scratch")
                .count(),
            0,
            "the uncached image is unlinked once open"
        );
    }

    #[tokio::test]
    async fn mkfs_failure_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let builder = ImageBuilder {
            mkfs_erofs: "/bin/false".into(),
            cache_dir: dir.path().join("cache"),
            cache_entries: 4,
        };
        let err = builder
            .image(
                &Layer {
                    dir: dir.path().to_path_buf(),
                    immutable: true,
                },
                dir.path(),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("mkfs.erofs"), "{err}");
    }
}
