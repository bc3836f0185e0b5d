//! One unprivileged uid/gid per pod VMM, leased from `[jail] id_range`.
//!
//! Two pods' VMMs must not share an identity: a VMM that a guest took over could otherwise
//! signal, ptrace or read `/proc` of another pod's VMM and open what it owns. Each pod VMM runs
//! as `uid = gid = id`, with `id` leased from the configured range.
//!
//! Leases are files `<state_dir>/vmm-ids/<id>` holding the owning shim's pid, that pid's start
//! time and the pod's state dir name. Concurrent shims allocate under an exclusive `flock` of
//! `<state_dir>/vmm-ids/.lock` (held for the directory scan and one file create, never across
//! an await), so two shims never take one id. A lease whose shim died (pid gone, or reused by a
//! process that started at another time) is reclaimed by the next allocation; the pod's own
//! teardown (`vm::cleanup_state_dir`, every path) releases it through the record `vmm-id` in the
//! pod's state dir.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::config::IdRange;
use crate::error::{Error, Result};

/// Lease directory under the configured `state_dir`.
pub const LEASE_DIR: &str = "vmm-ids";
/// The pod state dir's record of its lease (the lease file's path).
const RECORD: &str = "vmm-id";
const LOCK: &str = ".lock";

/// What a lease file says.
#[derive(Debug, PartialEq, Eq)]
struct Lease {
    pid: u32,
    start_time: u64,
    owner: String,
}

impl Lease {
    fn parse(text: &str) -> Option<Lease> {
        let mut it = text.split_whitespace();
        let lease = Lease {
            pid: it.next()?.parse().ok()?,
            start_time: it.next()?.parse().ok()?,
            owner: it.next()?.to_string(),
        };
        it.next().is_none().then_some(lease)
    }

    fn text(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start_time, self.owner)
    }

    /// Whether the shim that took it still runs (same pid, same start time).
    fn owner_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// A process's start time (clock ticks after boot, field 22 of `/proc/PID/stat`): with the
/// pid, it names one process even after the pid is reused.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it follow the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after ')'; field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Leases a free id of `range` for the pod whose state dir is `pod_state_dir` (under the
/// configured state dir, whose `vmm-ids/` holds the leases) and records it there.
pub fn lease(range: IdRange, pod_state_dir: &Path) -> Result<u32> {
    let (dir, owner) = lease_dir_and_owner(pod_state_dir)?;
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let lock_path = dir.join(LOCK);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(format!("open {}", lock_path.display())))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Other(format!("lock {}: {e}", lock_path.display())))?;
    let pid = std::process::id();
    let start_time = process_start_time(pid)
        .ok_or_else(|| Error::Other("cannot read this shim's start time in /proc".into()))?;
    let mut taken = HashSet::new();
    let entries = std::fs::read_dir(&dir).map_err(Error::io(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(Error::io(format!("list {}", dir.display())))?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        // An unreadable or garbled lease is kept (and its id skipped): only a lease known
        // to be dead is ever reclaimed.
        let live = match std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| Lease::parse(&t))
        {
            Some(lease) if !lease.owner_alive() => {
                tracing::info!(id, owner = %lease.owner, pid = lease.pid, "reclaiming the VMM id of a shim that is gone");
                std::fs::remove_file(&path).is_err()
            }
            _ => true,
        };
        if live {
            taken.insert(id);
        }
    }
    let id = (range.first..range.first.saturating_add(range.count))
        .find(|id| !taken.contains(id))
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "every VMM id of jail.id_range {range} is leased to a running pod ({} leases in \
                 {}): widen jail.id_range or run fewer pods on this node",
                taken.len(),
                dir.display()
            ))
        })?;
    let path = dir.join(id.to_string());
    let lease = Lease {
        pid,
        start_time,
        owner,
    };
    write_new(&path, &lease.text())?;
    let record = pod_state_dir.join(RECORD);
    if let Err(e) = std::fs::write(&record, path.as_os_str().as_encoded_bytes()) {
        let _ = std::fs::remove_file(&path);
        return Err(Error::io(format!("write {}", record.display()))(e));
    }
    Ok(id)
}

fn write_new(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io(format!("create lease {}", path.display())))?;
    if let Err(e) = file.write_all(text.as_bytes()) {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(format!("write lease {}", path.display()))(e));
    }
    Ok(())
}

/// Releases the id the pod in `pod_state_dir` leased, if any: the lease goes only if it still
/// names this pod (an id reclaimed and leased again belongs to another pod now).
pub fn release(pod_state_dir: &Path) -> Result<()> {
    let record = pod_state_dir.join(RECORD);
    let path = match std::fs::read(&record) {
        Ok(bytes) => PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("read {}", record.display()))(e)),
    };
    let (_, owner) = lease_dir_and_owner(pod_state_dir)?;
    if let Some(lease) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| Lease::parse(&t))
    {
        if lease.owner == owner {
            std::fs::remove_file(&path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .map_err(Error::io(format!("remove lease {}", path.display())))?;
        }
    }
    std::fs::remove_file(&record).map_err(Error::io(format!("remove {}", record.display())))
}

/// `<state_dir>/vmm-ids` and the pod's state dir name, from `<state_dir>/<pod>`.
fn lease_dir_and_owner(pod_state_dir: &Path) -> Result<(PathBuf, String)> {
    match (
        pod_state_dir.parent(),
        pod_state_dir.file_name().and_then(|n| n.to_str()),
    ) {
        (Some(parent), Some(name)) if !name.contains(char::is_whitespace) => {
            Ok((parent.join(LEASE_DIR), name.to_string()))
        }
        _ => Err(Error::Other(format!(
            "pod state dir {} has no parent or no plain name",
            pod_state_dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_dir(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("pod dir");
        dir
    }

    const RANGE: IdRange = IdRange {
        first: 100_000,
        count: 3,
    };

    #[test]
    fn each_pod_gets_its_own_id_and_release_frees_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (pod_dir(root.path(), "a"), pod_dir(root.path(), "b"));
        let id_a = lease(RANGE, &a).expect("lease a");
        let id_b = lease(RANGE, &b).expect("lease b");
        assert_eq!((id_a, id_b), (100_000, 100_001));
        release(&a).expect("release a");
        assert!(!a.join(RECORD).exists());
        assert!(!root.path().join(LEASE_DIR).join("100000").exists());
        let c = pod_dir(root.path(), "c");
        assert_eq!(lease(RANGE, &c).expect("lease c"), 100_000);
        // Releasing twice, or a pod that never leased, is a no-op.
        release(&a).expect("release a again");
        release(&pod_dir(root.path(), "d")).expect("release d");
    }

    #[test]
    fn an_exhausted_range_is_refused_naming_the_setting() {
        let root = tempfile::tempdir().expect("tempdir");
        for name in ["a", "b", "c"] {
            lease(RANGE, &pod_dir(root.path(), name)).expect("lease");
        }
        let err = lease(RANGE, &pod_dir(root.path(), "d")).expect_err("exhausted");
        let text = err.to_string();
        assert!(text.contains("jail.id_range 100000:3"), "{text}");
        assert!(!root.path().join("d").join(RECORD).exists());
    }

    #[test]
    fn a_dead_shims_lease_is_reclaimed_and_a_live_or_garbled_one_is_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join(LEASE_DIR);
        std::fs::create_dir_all(&dir).expect("lease dir");
        // A child that has exited and been reaped: its pid names no process any more.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        std::fs::write(dir.join("100000"), format!("{dead} 1 gone\n")).expect("dead lease");
        // This process, at its real start time: alive.
        let me = std::process::id();
        let start = process_start_time(me).expect("own start time");
        std::fs::write(dir.join("100001"), format!("{me} {start} live\n")).expect("live lease");
        // This process's pid with another start time: a reused pid, so the owner is gone.
        std::fs::write(dir.join("100002"), format!("{me} {} reused\n", start + 1))
            .expect("reused lease");
        let a = pod_dir(root.path(), "a");
        assert_eq!(lease(RANGE, &a).expect("lease a"), 100_000);
        let b = pod_dir(root.path(), "b");
        assert_eq!(lease(RANGE, &b).expect("lease b"), 100_002);
        std::fs::write(dir.join("100000"), "garbled").expect("garbled lease");
        release(&a).expect("release a: its lease was overwritten, so it is not a's");
        assert!(dir.join("100000").exists());
        let c = pod_dir(root.path(), "c");
        lease(RANGE, &c).expect_err("100000 garbled, 100001 live, 100002 b's");
    }

    #[test]
    fn concurrent_leases_never_share_an_id() {
        let root = tempfile::tempdir().expect("tempdir");
        let range = IdRange {
            first: 200_000,
            count: 64,
        };
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let dir = pod_dir(root.path(), &format!("pod{i}"));
                std::thread::spawn(move || lease(range, &dir).expect("lease"))
            })
            .collect();
        let ids: HashSet<u32> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(ids.len(), 16);
    }

    #[test]
    fn start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX), None);
    }
}
