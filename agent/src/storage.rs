//! Storages (block devices found by their virtio serial, tmpfs) and container rootfs overlays.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{invalid, Error};

/// File systems a block storage may carry.
const ALLOWED_FS_TYPES: &[&str] = &[
    "ext4", "ext3", "ext2", "erofs", "xfs", "btrfs", "squashfs", "vfat",
];
/// Longest wait for a block device the shim may ask for.
const MAX_WAIT_MS: u64 = 60_000;
const DEFAULT_WAIT_MS: u64 = 5_000;

/// A mounted storage.
pub struct Storage {
    pub mount_point: PathBuf,
}

/// Mount flags and data parsed from a validated option list.
#[derive(Debug, PartialEq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

/// Validates mount options against an allow-list and splits them into flags and fs data.
pub fn parse_options(options: &[String], tmpfs: bool) -> Result<MountOptions, Error> {
    if options.len() > 32 {
        return Err(invalid("too many mount options"));
    }
    let mut parsed = MountOptions {
        flags: MsFlags::empty(),
        data: Vec::new(),
    };
    for option in options {
        if option.is_empty() || option.len() > 256 || option.contains([',', '\0', ' ']) {
            return Err(invalid(format!("mount option {option:?} is not valid")));
        }
        let flag = match option.as_str() {
            "ro" => Some(MsFlags::MS_RDONLY),
            "rw" => Some(MsFlags::empty()),
            "nosuid" => Some(MsFlags::MS_NOSUID),
            "nodev" => Some(MsFlags::MS_NODEV),
            "noexec" => Some(MsFlags::MS_NOEXEC),
            "noatime" => Some(MsFlags::MS_NOATIME),
            "nodiratime" => Some(MsFlags::MS_NODIRATIME),
            "relatime" => Some(MsFlags::MS_RELATIME),
            "strictatime" => Some(MsFlags::MS_STRICTATIME),
            "sync" => Some(MsFlags::MS_SYNCHRONOUS),
            "dirsync" => Some(MsFlags::MS_DIRSYNC),
            "lazytime" => Some(MsFlags::MS_LAZYTIME),
            _ => None,
        };
        if let Some(flag) = flag {
            parsed.flags |= flag;
            continue;
        }
        let (key, value) = option.split_once('=').unwrap_or((option.as_str(), ""));
        let value_ok = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let allowed = if tmpfs {
            matches!(key, "size" | "nr_inodes" | "mode" | "uid" | "gid" | "huge")
        } else {
            matches!(
                key,
                "errors"
                    | "data"
                    | "discard"
                    | "nodiscard"
                    | "noload"
                    | "barrier"
                    | "nobarrier"
                    | "commit"
                    | "dax"
                    | "norecovery"
                    | "nouuid"
                    | "cache"
                    | "user_xattr"
                    | "acl"
                    | "noacl"
                    | "journal_checksum"
            )
        };
        if !allowed || !value_ok {
            return Err(invalid(format!("mount option {option:?} is not allowed")));
        }
        parsed.data.push(option.clone());
    }
    Ok(parsed)
}

/// Finds the block device whose virtio serial is `serial`, waiting up to `wait`.
pub async fn find_block_device(serial: &str, wait: Duration) -> Result<PathBuf, Error> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let serial_file = entry.path().join("serial");
                if let Ok(found) = std::fs::read_to_string(&serial_file) {
                    if found.trim_end_matches(['\n', '\0']) == serial {
                        return Ok(Path::new("/dev").join(entry.file_name()));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::not_found(format!(
                "no block device with serial {serial:?} appeared within {} ms",
                wait.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The virtio-fs tag of the pod's shared file system (the shim's `SHARED_FS_TAG`).
pub const SHARED_FS_TAG: &str = "kata-like-shared";
/// Where the shared file system is mounted, once, on first use.
pub const SHARED_FS_ROOT: &str = "/run/kata-like/shared-fs";

/// Mounts the pod's virtio-fs file system at `SHARED_FS_ROOT` unless it already is.
fn ensure_shared_fs() -> Result<(), Error> {
    static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *mounted {
        return Ok(());
    }
    std::fs::create_dir_all(SHARED_FS_ROOT)
        .map_err(|e| Error::internal(format!("creating {SHARED_FS_ROOT}: {e}")))?;
    mount(
        Some(SHARED_FS_TAG),
        SHARED_FS_ROOT,
        Some("virtiofs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        Error::internal(format!(
            "mounting the pod's shared file system (virtiofs {SHARED_FS_TAG}) on {SHARED_FS_ROOT}: {e}"
        ))
    })?;
    *mounted = true;
    Ok(())
}

/// Mounts a storage as requested; returns its mount point. Nothing is left behind on error.
pub async fn add(
    storage_dir: &Path,
    request: &kata_like_protocol::AddStorageRequest,
) -> Result<Storage, Error> {
    use kata_like_protocol::add_storage_request::Source;
    let mount_point = storage_dir.join(&request.storage_id);
    let (source, fs_type, options) = match &request.source {
        Some(Source::Tmpfs(true)) => {
            let options = parse_options(&request.options, true)?;
            (PathBuf::from("tmpfs"), "tmpfs".to_string(), options)
        }
        Some(Source::BlockSerial(serial)) => {
            // virtio-blk serials are at most 20 bytes; the VMM's drive ids follow the id rule.
            if serial.len() > 20 || !kata_like_protocol::is_valid_id(serial) {
                return Err(invalid(format!("block serial {serial:?} is not valid")));
            }
            if !ALLOWED_FS_TYPES.contains(&request.fs_type.as_str()) {
                return Err(invalid(format!(
                    "fs_type {:?} is not one of {}",
                    request.fs_type,
                    ALLOWED_FS_TYPES.join(", ")
                )));
            }
            let options = parse_options(&request.options, false)?;
            let wait_ms = match request.wait_ms {
                0 => DEFAULT_WAIT_MS,
                n => n.min(MAX_WAIT_MS),
            };
            let device = find_block_device(serial, Duration::from_millis(wait_ms)).await?;
            (device, request.fs_type.clone(), options)
        }
        Some(Source::SharedFsDir(dir)) => {
            if !kata_like_protocol::is_valid_id(dir) {
                return Err(invalid(format!("shared fs directory {dir:?} is not valid")));
            }
            let options = parse_options(&request.options, false)?;
            if !options.data.is_empty() {
                return Err(invalid("a shared fs directory takes flag options only"));
            }
            ensure_shared_fs()?;
            (
                Path::new(SHARED_FS_ROOT).join(dir),
                String::new(),
                MountOptions {
                    flags: options.flags | MsFlags::MS_BIND,
                    data: Vec::new(),
                },
            )
        }
        _ => {
            return Err(invalid(
                "storage source: a block serial, tmpfs or shared fs directory is required",
            ))
        }
    };
    std::fs::create_dir_all(storage_dir)
        .map_err(|e| Error::internal(format!("creating {}: {e}", storage_dir.display())))?;
    std::fs::create_dir(&mount_point).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::already_exists(format!("storage {} exists", request.storage_id))
        } else {
            Error::internal(format!("creating {}: {e}", mount_point.display()))
        }
    })?;
    let data = options.data.join(",");
    let flags = options.flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let bind = flags.contains(MsFlags::MS_BIND);
    let mut result = mount(
        Some(&source),
        &mount_point,
        (!bind).then_some(fs_type.as_str()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    );
    if bind && result.is_ok() && flags.contains(MsFlags::MS_RDONLY) {
        // A bind takes its flags only on a remount.
        result = mount(
            None::<&str>,
            &mount_point,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        );
        if result.is_err() {
            let _ = umount2(&mount_point, MntFlags::MNT_DETACH);
        }
    }
    if let Err(e) = result {
        let _ = std::fs::remove_dir(&mount_point);
        return Err(Error::internal(format!(
            "mounting {} ({fs_type}) on {}: {e}",
            source.display(),
            mount_point.display()
        )));
    }
    Ok(Storage { mount_point })
}

/// Unmounts `path` (if mounted) and removes the directory.
pub fn unmount_and_remove(path: &Path) -> Result<(), Error> {
    match umount2(path, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(nix::errno::Errno::EBUSY) => {
            return Err(Error::failed_precondition(format!(
                "{} is still in use",
                path.display()
            )))
        }
        Err(e) => {
            return Err(Error::internal(format!(
                "unmounting {}: {e}",
                path.display()
            )))
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::internal(format!("removing {}: {e}", path.display()))),
    }
}

/// Checks overlay lower dirs: each must resolve to a directory under the state directory and be
/// expressible in overlayfs' option syntax.
pub fn check_lower_dirs(lower_dirs: &[String], state_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    if lower_dirs.is_empty() {
        return Err(invalid("rootfs.lower_dirs must not be empty"));
    }
    if lower_dirs.len() > 128 {
        return Err(invalid("rootfs.lower_dirs: too many layers"));
    }
    let mut resolved = Vec::with_capacity(lower_dirs.len());
    for dir in lower_dirs {
        let path = crate::validate::resolve_under("rootfs lower dir", Path::new(dir), state_dir)?;
        if !path.is_dir() {
            return Err(invalid(format!(
                "rootfs lower dir {dir} is not a directory"
            )));
        }
        let text = path.to_string_lossy();
        if text.contains([':', ',', '\\', '=']) {
            return Err(invalid(format!(
                "rootfs lower dir {dir} has characters overlayfs cannot take"
            )));
        }
        resolved.push(path);
    }
    Ok(resolved)
}

/// Mounts a container's rootfs at `container_dir/rootfs`: an overlay of `lowers` under a tmpfs
/// upper when `writable`, otherwise a read-only bind (one layer) or read-only overlay.
pub fn mount_rootfs(
    container_dir: &Path,
    lowers: &[PathBuf],
    writable: bool,
    upper_size_bytes: u64,
) -> Result<PathBuf, Error> {
    let internal = |what: &str, e: &dyn std::fmt::Display| Error::internal(format!("{what}: {e}"));
    let rootfs = container_dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| internal("creating the rootfs dir", &e))?;
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    if writable {
        let upper_mnt = container_dir.join("upper");
        std::fs::create_dir_all(&upper_mnt).map_err(|e| internal("creating the upper dir", &e))?;
        let size = if upper_size_bytes > 0 {
            format!("size={upper_size_bytes},mode=0755")
        } else {
            "mode=0755".to_string()
        };
        mount(
            Some("tmpfs"),
            &upper_mnt,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(size.as_str()),
        )
        .map_err(|e| internal("mounting the upper tmpfs", &e))?;
        let result = (|| {
            std::fs::create_dir(upper_mnt.join("upper"))?;
            std::fs::create_dir(upper_mnt.join("work"))?;
            let data = format!(
                "lowerdir={lowerdir},upperdir={},workdir={}",
                upper_mnt.join("upper").display(),
                upper_mnt.join("work").display()
            );
            mount(
                Some("overlay"),
                &rootfs,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .map_err(std::io::Error::from)
        })();
        if let Err(e) = result {
            let _ = umount2(&upper_mnt, MntFlags::MNT_DETACH);
            return Err(internal("mounting the rootfs overlay", &e));
        }
    } else if lowers.len() == 1 {
        mount(
            Some(&lowers[0]),
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| internal("binding the rootfs", &e))?;
        if let Err(e) = mount(
            None::<&str>,
            &rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            let _ = umount2(&rootfs, MntFlags::MNT_DETACH);
            return Err(internal("making the rootfs read-only", &e));
        }
    } else {
        let data = format!("lowerdir={lowerdir}");
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .map_err(|e| internal("mounting the read-only rootfs overlay", &e))?;
    }
    Ok(rootfs)
}

/// Unmounts what [`mount_rootfs`] mounted (detaching, so a stuck user cannot pin it).
pub fn unmount_rootfs(container_dir: &Path) {
    for dir in ["rootfs", "upper"] {
        let path = container_dir.join(dir);
        // Lazy: the container's mount namespace is gone or going; the guest must not keep it.
        while umount2(&path, MntFlags::MNT_DETACH).is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_into_flags_and_data() {
        let parsed =
            parse_options(&["ro".into(), "noexec".into(), "size=64m".into()], true).unwrap();
        assert_eq!(parsed.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC);
        assert_eq!(parsed.data, vec!["size=64m".to_string()]);
    }

    #[test]
    fn hostile_options_are_rejected() {
        for bad in [
            "size=1m,exec",
            "upperdir=/etc",
            "context=x",
            "",
            "mode=07 55",
            "errors=../x",
        ] {
            assert!(parse_options(&[bad.to_string()], true).is_err(), "{bad}");
            assert!(parse_options(&[bad.to_string()], false).is_err(), "{bad}");
        }
        assert!(
            parse_options(&["size=1m".into()], false).is_err(),
            "size is tmpfs-only"
        );
    }
}
