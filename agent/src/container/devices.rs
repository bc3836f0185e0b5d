//! `linux.devices` in the guest (issue 12 item 4): a container gets device nodes of the pod VM
//! only, never the node's.
//!
//! containerd resolves devices on the node: a privileged container (unless the runtime's
//! `privileged_without_host_devices` is set) gets every device of the node in `linux.devices`
//! and a device cgroup that allows all devices; a CRI `devices` request becomes the node
//! device's type and numbers. In the guest those numbers name other devices, or none: the
//! node's first disk is, by number, the pod VM's first drive (another container's rootfs).
//!
//! "Privileged" is read from the device cgroup: a spec whose rules end up allowing every device
//! (`a *:* rwm`, what containerd's `WithAllDevicesAllowed` writes next to `WithHostDevices`)
//! asks for all the devices of the machine it runs on, so its `linux.devices` is replaced by the
//! pod VM's own devices, listed from the guest's /dev as containerd lists the node's
//! (`oci.HostDevices`), and its device cgroup keeps allowing them all. CRI allows every device
//! for nothing else, and it is the spec's own statement of what the container may open: unlike
//! the capability sets, which a non-privileged pod may also fill (`capabilities: add: [ALL]`).
//! With `privileged_without_host_devices = true` containerd does not allow every device, and a
//! privileged container then gets the default devices only, as it would under runc.
//!
//! Any other `linux.devices` entry must name a character device (or FIFO) that the guest has
//! at the same path with the same numbers (/dev/fuse, /dev/net/tun): a node device the guest
//! does not have is refused by name, and so is every block device (the guest's block devices
//! are the pod's drives, which reach containers only as their mounts).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Linux, LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType};

use crate::error::{invalid, Error};

/// Most device nodes listed from the guest's /dev (a VM has a few hundred at most).
const MAX_GUEST_DEVICES: usize = 4096;

/// Directories of /dev that are not devices of the machine (containerd skips the same).
const SKIPPED_DIRS: &[&str] = &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];

/// Whether the spec's device cgroup rules, applied in order (last match wins), allow every
/// access to every device.
pub fn allows_every_device(linux: &Linux) -> bool {
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_ref());
    let mut every = false;
    for rule in rules.into_iter().flatten() {
        let wildcard = matches!(rule.typ(), None | Some(LinuxDeviceType::A))
            && rule.major().is_none()
            && rule.minor().is_none();
        if !wildcard {
            continue;
        }
        let access = rule.access().as_deref().unwrap_or("rwm");
        if rule.allow() {
            every = every || ['r', 'w', 'm'].iter().all(|c| access.contains(*c));
        } else {
            every = false;
        }
    }
    every
}

/// Adapts `linux.devices` to the guest whose device nodes are under `guest_dev` (the agent's
/// /dev); see the module comment.
pub fn adapt_devices(linux: &mut Linux, guest_dev: &Path) -> Result<(), Error> {
    if allows_every_device(linux) {
        linux.set_devices(Some(guest_devices(guest_dev)?));
        return Ok(());
    }
    for device in linux.devices().iter().flatten() {
        check_guest_has(device, guest_dev)?;
    }
    Ok(())
}

fn describe(device: &LinuxDevice) -> String {
    format!(
        "linux.devices: {} ({} {}:{})",
        device.path().display(),
        device.typ().as_str(),
        device.major(),
        device.minor()
    )
}

/// Checks that the guest has `device` (a character device or FIFO) as the spec describes it.
fn check_guest_has(device: &LinuxDevice, guest_dev: &Path) -> Result<(), Error> {
    let what = describe(device);
    let relative = device
        .path()
        .strip_prefix("/dev")
        .ok()
        .filter(|r| {
            r.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
                && !r.as_os_str().is_empty()
        })
        .ok_or_else(|| invalid(format!("{what}: a device path must lie below /dev")))?;
    match device.typ() {
        LinuxDeviceType::P => return Ok(()),
        LinuxDeviceType::B => {
            return Err(invalid(format!(
                "{what}: block devices of the pod VM are its drives (container root file \
                 systems and volumes) and only a privileged container gets them; the node's \
                 block devices cannot be passed into a pod VM"
            )))
        }
        LinuxDeviceType::A => {
            return Err(invalid(format!(
                "{what}: a device node needs the type c, u, b or p"
            )))
        }
        LinuxDeviceType::C | LinuxDeviceType::U => {}
    }
    let not_in_guest = || {
        invalid(format!(
            "{what} is not a device of the pod VM: the node's devices cannot be passed into a \
             pod VM; request only devices the guest has (e.g. /dev/fuse)"
        ))
    };
    let meta = guest_dev
        .join(relative)
        .symlink_metadata()
        .map_err(|_| not_in_guest())?;
    let rdev = meta.rdev();
    let same = meta.file_type().is_char_device()
        && i64::from(libc::major(rdev)) == device.major()
        && i64::from(libc::minor(rdev)) == device.minor();
    if same {
        Ok(())
    } else {
        Err(not_in_guest())
    }
}

/// The character and block devices under `guest_dev` as `linux.devices` entries at
/// /dev/<relative path>, skipping what containerd's `HostDevices` skips on a node (pts, shm,
/// fd, mqueue, console, symlinks, FIFOs).
pub fn guest_devices(guest_dev: &Path) -> Result<Vec<LinuxDevice>, Error> {
    let mut devices = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = guest_dev.join(&relative);
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            Error::internal(format!(
                "listing the guest's devices in {}: {e}",
                dir.display()
            ))
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let path = relative.join(&name);
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let kind = meta.file_type();
            if kind.is_dir() {
                if !SKIPPED_DIRS.iter().any(|s| name == *s) {
                    pending.push(path);
                }
                continue;
            }
            let typ = if kind.is_char_device() {
                LinuxDeviceType::C
            } else if kind.is_block_device() {
                LinuxDeviceType::B
            } else {
                continue;
            };
            if name == "console" && relative.as_os_str().is_empty() {
                continue;
            }
            if devices.len() >= MAX_GUEST_DEVICES {
                return Err(Error::internal(format!(
                    "the guest has more than {MAX_GUEST_DEVICES} device nodes"
                )));
            }
            let rdev = meta.rdev();
            let device = LinuxDeviceBuilder::default()
                .path(Path::new("/dev").join(&path))
                .typ(typ)
                .major(i64::from(libc::major(rdev)))
                .minor(i64::from(libc::minor(rdev)))
                .file_mode(meta.mode() & 0o7777)
                .uid(meta.uid())
                .gid(meta.gid())
                .build()
                .map_err(|e| Error::internal(format!("describing {}: {e}", path.display())))?;
            devices.push(device);
        }
    }
    devices.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(json: serde_json::Value) -> Linux {
        serde_json::from_value(json).unwrap()
    }

    /// The device cgroup rules containerd 1.6 writes for a container.
    fn default_rules() -> serde_json::Value {
        serde_json::json!([{"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}])
    }

    #[test]
    fn only_a_device_cgroup_that_ends_up_allowing_everything_counts_as_privileged() {
        let cases = [
            (serde_json::json!([{"allow": true, "access": "rwm"}]), true),
            (
                serde_json::json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "a", "access": "rwm"}]),
                true,
            ),
            (serde_json::json!([{"allow": true}]), true),
            (default_rules(), false),
            (serde_json::json!([{"allow": true, "access": "r"}]), false),
            (
                serde_json::json!([{"allow": true, "access": "rwm"}, {"allow": false, "access": "w"}]),
                false,
            ),
            (
                serde_json::json!([{"allow": true, "type": "c", "access": "rwm"}]),
                false,
            ),
            (serde_json::json!([]), false),
        ];
        for (rules, privileged) in cases {
            let l = linux(serde_json::json!({"resources": {"devices": rules.clone()}}));
            assert_eq!(allows_every_device(&l), privileged, "{rules}");
        }
        assert!(!allows_every_device(&linux(serde_json::json!({}))));
    }

    #[test]
    fn a_privileged_container_gets_the_guests_devices_instead_of_the_nodes() {
        // The node's list: /dev/kvm and a disk, which mean nothing (or another thing) here.
        let mut l = linux(serde_json::json!({
            "resources": {"devices": [{"allow": true, "access": "rwm"}]},
            "devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232},
                        {"path": "/dev/nvme0n1", "type": "b", "major": 259, "minor": 0}]
        }));
        // This host's /dev stands for the guest's.
        adapt_devices(&mut l, Path::new("/dev")).unwrap();
        let devices = l.devices().clone().unwrap();
        assert_eq!(devices, guest_devices(Path::new("/dev")).unwrap());
        let null = devices
            .iter()
            .find(|d| d.path() == Path::new("/dev/null"))
            .expect("/dev/null is listed");
        assert_eq!(
            (null.typ(), null.major(), null.minor()),
            (LinuxDeviceType::C, 1, 3)
        );
        assert!(devices.iter().all(|d| !d.path().starts_with("/dev/pts")
            && d.path() != Path::new("/dev/console")
            && matches!(d.typ(), LinuxDeviceType::C | LinuxDeviceType::B)));
        assert!(
            allows_every_device(&l),
            "its device cgroup still allows them"
        );
    }

    #[test]
    fn guest_devices_are_listed_recursively_from_a_dev_tree() {
        let dev = tempfile::tempdir().unwrap();
        let mknod = |path: &Path, kind: libc::mode_t, major: u32, minor: u32| {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: mknod with a valid NUL-terminated path.
            let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
            assert_eq!(rc, 0, "mknod {}", path.display());
        };
        std::fs::create_dir_all(dev.path().join("net")).unwrap();
        std::fs::create_dir_all(dev.path().join("pts")).unwrap();
        mknod(&dev.path().join("net/tun"), libc::S_IFCHR, 10, 200);
        mknod(&dev.path().join("vda"), libc::S_IFBLK, 254, 0);
        mknod(&dev.path().join("pts/0"), libc::S_IFCHR, 136, 0);
        mknod(&dev.path().join("console"), libc::S_IFCHR, 5, 1);
        mknod(&dev.path().join("fifo"), libc::S_IFIFO, 0, 0);
        std::os::unix::fs::symlink("vda", dev.path().join("root")).unwrap();
        let devices = guest_devices(dev.path()).unwrap();
        let listed: Vec<(String, String, i64, i64, Option<u32>)> = devices
            .iter()
            .map(|d| {
                (
                    d.path().display().to_string(),
                    d.typ().as_str().to_string(),
                    d.major(),
                    d.minor(),
                    d.file_mode(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                (
                    "/dev/net/tun".to_string(),
                    "c".to_string(),
                    10,
                    200,
                    Some(0o644)
                ),
                ("/dev/vda".to_string(), "b".to_string(), 254, 0, Some(0o644)),
            ]
        );
    }

    #[test]
    fn a_container_may_get_a_character_device_the_guest_has() {
        let mut l = linux(serde_json::json!({
            "resources": {"devices": default_rules()},
            "devices": [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
                        {"path": "/dev/myfifo", "type": "p"}]
        }));
        adapt_devices(&mut l, Path::new("/dev")).unwrap();
        assert_eq!(l.devices().as_ref().unwrap().len(), 2, "kept as asked");
    }

    #[test]
    fn node_devices_the_guest_lacks_and_block_devices_are_refused_by_name() {
        for (device, named) in [
            (
                serde_json::json!({"path": "/dev/no-such-device", "type": "c", "major": 10, "minor": 232}),
                "/dev/no-such-device (c 10:232)",
            ),
            (
                serde_json::json!({"path": "/dev/null", "type": "c", "major": 10, "minor": 232}),
                "/dev/null (c 10:232)",
            ),
            (
                serde_json::json!({"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}),
                "/dev/vda (b 254:0)",
            ),
            (
                serde_json::json!({"path": "/dev/../etc/passwd", "type": "c", "major": 1, "minor": 3}),
                "/dev/../etc/passwd",
            ),
        ] {
            let mut l = linux(serde_json::json!({
                "resources": {"devices": default_rules()}, "devices": [device]
            }));
            let err = adapt_devices(&mut l, Path::new("/dev")).unwrap_err();
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
    }
}
