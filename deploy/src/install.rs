//! `kata-like install` and `kata-like uninstall`: idempotent, and undone exactly.
//!
//! Install copies the payload (shim, VMM, this tool, guest kernel and initramfs) under the
//! prefix, writes the shim's configuration once, registers the runtime with containerd through
//! a drop-in (see `containerd_config` for why the drop-in carries the whole CRI section),
//! restarts containerd and labels the node. Everything it changed outside the prefix is in the
//! receipt (`state/install.json`) with the original bytes of containerd's main file, so that
//! uninstall puts that file back byte for byte. A failure half-way undoes what was done.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::containerd_config::{self, RuntimeEntry};
use crate::error::{Error, Result};
use crate::layout::{self, Layout};

/// The node label that tells the scheduler (RuntimeClass `scheduling.nodeSelector`) that
/// kata-like pods can run here.
pub const NODE_LABEL_KEY: &str = "kata-like.io/runtime";
pub const NODE_LABEL_VALUE: &str = "installed";

/// How containerd is restarted after its configuration changed.
#[derive(Debug, Clone)]
pub enum Restart {
    /// A shell command, e.g. `systemctl restart containerd`.
    Command(String),
    /// The operator restarts it; install/uninstall say so.
    Skip,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub layout: Layout,
    /// The payload directory (bin/, share/kata-like/), this process's view.
    pub from: PathBuf,
    pub containerd_bin: PathBuf,
    pub restart: Restart,
    pub node_name: Option<String>,
    /// Uninstall even with kata-like pods running (they lose their runtime).
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub format: u32,
    /// sha256 of each payload file as installed, by its path under the prefix.
    pub files: Vec<(String, String)>,
    /// sha256 of the shim configuration this install wrote, if it wrote one.
    pub shim_config_sha256: Option<String>,
    pub containerd_config: PathBuf,
    /// Whether containerd's main file existed before the first install (its bytes are in
    /// `state/containerd-config.toml.orig`).
    pub containerd_config_existed: bool,
    /// sha256 of the main file as the install left it.
    pub containerd_config_written_sha256: String,
    pub added_imports_key: bool,
    pub drop_in: PathBuf,
    pub created_drop_in_dir: bool,
    /// The prefix and those of its parents that the first install created (node view),
    /// deepest first: uninstall removes them when empty.
    pub created_dirs: Vec<PathBuf>,
    pub node_label: Option<String>,
}

const RECEIPT_FORMAT: u32 = 1;

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::new(format!("cannot read {}: {e}", path.display()))),
    }
}

fn utf8(bytes: &[u8], path: &Path) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::new(format!("{} is not UTF-8 text", path.display())))
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    }
    let tmp = path.with_extension("kata-like-tmp");
    std::fs::write(&tmp, data).map_err(Error::io("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename into place", path))
}

pub fn load_receipt(layout: &Layout) -> Result<Option<Receipt>> {
    let path = layout.host(&layout.installed(layout::RECEIPT));
    let Some(bytes) = read_optional(&path)? else {
        return Ok(None);
    };
    let receipt: Receipt = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(format!(
            "{} is not a kata-like install receipt ({e}): remove it only if nothing is installed",
            path.display()
        ))
    })?;
    if receipt.format != RECEIPT_FORMAT {
        return Err(Error::new(format!(
            "{} has receipt format {}, this tool writes {RECEIPT_FORMAT}: uninstall with the \
             kata-like that installed it",
            path.display(),
            receipt.format
        )));
    }
    Ok(Some(receipt))
}

/// The shim configuration a first install writes: the installed VMM, kernel and initramfs.
fn shim_config_text(layout: &Layout) -> String {
    format!(
        "# kata-like shim configuration (shim/README.md). Written by the first `kata-like \
         install`;\n# yours from now on: later installs keep it, uninstall removes it only if \
         unchanged.\nvirtiofsd = {:?}\n[vmm]\npath = {:?}\nkernel = {:?}\ninitrd = {:?}\n",
        layout.installed(layout::VIRTIOFSD).display().to_string(),
        layout.installed(layout::VMM).display().to_string(),
        layout.installed(layout::KERNEL).display().to_string(),
        layout.installed(layout::INITRAMFS).display().to_string(),
    )
}

/// `containerd config dump` of the main file as it would be without our import.
fn effective_config(o: &Options, main_text: &str) -> Result<String> {
    let layout = &o.layout;
    let main = layout.host(&layout.containerd_config);
    let import = layout.drop_in().display().to_string();
    let without =
        containerd_config::remove_import(main_text, &main.display().to_string(), &import, false)?;
    // Next to the main file: containerd resolves relative imports from the file's directory.
    let dir = main.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let tmp = dir.join(format!(".kata-like-install-{}.toml", std::process::id()));
    std::fs::write(&tmp, without).map_err(Error::io("write", &tmp))?;
    let out = Command::new(&o.containerd_bin)
        .arg("--config")
        .arg(&tmp)
        .args(["config", "dump"])
        .output();
    let _ = std::fs::remove_file(&tmp);
    let out = out.map_err(|e| {
        Error::new(format!(
            "cannot run {} (containerd, to read its effective configuration): {e}; pass \
             --containerd-bin",
            o.containerd_bin.display()
        ))
    })?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "containerd cannot read {}: {}",
            main.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restart_containerd(restart: &Restart) -> Result<()> {
    match restart {
        Restart::Skip => {
            println!(
                "containerd: not restarted (--no-restart): restart it for the change to apply"
            );
            Ok(())
        }
        Restart::Command(cmd) => {
            println!("containerd: restarting ({cmd})");
            let status = Command::new("/bin/sh")
                .args(["-c", cmd])
                .status()
                .map_err(|e| Error::new(format!("cannot run `{cmd}`: {e}")))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::new(format!(
                    "restarting containerd with `{cmd}` failed ({status}): fix it and run the \
                     command again (or pass --restart-command)"
                )))
            }
        }
    }
}

fn kubectl_label(node: &str, label: &str) {
    match Command::new("kubectl")
        .args(["label", "node", node, label, "--overwrite"])
        .status()
    {
        Ok(s) if s.success() => println!("node {node}: label {label}"),
        Ok(s) => println!(
            "node {node}: `kubectl label node {node} {label}` failed ({s}): run it yourself"
        ),
        Err(_) => println!(
            "node {node}: kubectl is not available: run `kubectl label node {node} {label}`"
        ),
    }
}

/// What a failed install must take back.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    main_config: Option<(PathBuf, Option<Vec<u8>>)>,
    dirs: Vec<PathBuf>,
    /// The prefix of a first install: its directories go if empty, then these.
    prefix: Option<PathBuf>,
    created_dirs: Vec<PathBuf>,
}

impl Undo {
    fn run(self) {
        if let Some((path, original)) = self.main_config {
            let _ = match original {
                Some(bytes) => std::fs::write(&path, bytes),
                None => std::fs::remove_file(&path),
            };
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        if let Some(prefix) = self.prefix {
            remove_empty_prefix_dirs(&prefix);
        }
        for d in &self.created_dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The prefix's directories that are empty, deepest first, the prefix itself last.
fn remove_empty_prefix_dirs(prefix: &Path) {
    for dir in ["share/kata-like", "share", "bin", "etc", "state", ""] {
        let _ = std::fs::remove_dir(prefix.join(dir));
    }
}

pub fn install(o: &Options) -> Result<()> {
    let layout = &o.layout;
    // 1. Everything that can be checked before anything changes.
    for rel in layout::PAYLOAD {
        let src = o.from.join(rel);
        if !src.is_file() {
            return Err(Error::new(format!(
                "the payload has no {rel} (looked for {}): build the payload with \
                 deploy/build-payload and pass its directory with --from",
                src.display()
            )));
        }
    }
    let main_path = layout.host(&layout.containerd_config);
    let main_bytes = read_optional(&main_path)?;
    let main_text = match &main_bytes {
        Some(b) => utf8(b, &main_path)?,
        None => String::new(),
    };
    if !main_text.trim().is_empty() {
        containerd_config::check_main(&main_text, &main_path.display().to_string())?;
    }
    let receipt = load_receipt(layout)?;
    let dump = effective_config(o, &main_text)?;
    let entry = RuntimeEntry {
        shim: layout.installed(layout::SHIM).display().to_string(),
        shim_config: layout.installed(layout::SHIM_CONFIG).display().to_string(),
    };
    let drop_in_text = containerd_config::drop_in(&dump, &entry)?;

    let mut undo = Undo::default();
    let result = apply(o, receipt, main_bytes, &main_text, &drop_in_text, &mut undo);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            undo.run();
            Err(e)
        }
    }
}

fn apply(
    o: &Options,
    receipt: Option<Receipt>,
    main_bytes: Option<Vec<u8>>,
    main_text: &str,
    drop_in_text: &str,
    undo: &mut Undo,
) -> Result<()> {
    let layout = &o.layout;
    let first = receipt.is_none();
    let created_dirs: Vec<PathBuf> = match &receipt {
        Some(r) => r.created_dirs.clone(),
        // The prefix and its ancestors that do not exist yet, deepest first.
        None => layout
            .prefix
            .ancestors()
            .take_while(|d| !layout.host(d).exists())
            .map(Path::to_path_buf)
            .collect(),
    };
    if first {
        undo.prefix = Some(layout.host(&layout.prefix));
        undo.created_dirs = created_dirs.iter().map(|d| layout.host(d)).collect();
    }
    // 2. The payload under the prefix (unchanged files are left alone).
    let mut files = Vec::new();
    for rel in layout::PAYLOAD {
        let src = o.from.join(rel);
        let data = std::fs::read(&src).map_err(Error::io("read", &src))?;
        let sha = sha256_hex(&data);
        let dest = layout.host(&layout.installed(rel));
        let same = read_optional(&dest)?.is_some_and(|d| sha256_hex(&d) == sha);
        if !same {
            if first {
                undo.files.push(dest.clone());
            }
            let mode = if rel.starts_with("bin/") {
                0o755
            } else {
                0o644
            };
            write_atomic(&dest, &data, mode)?;
        }
        files.push((rel.to_string(), sha));
    }
    println!("payload: installed under {}", layout.prefix.display());
    // 3. The shim's configuration, once.
    let shim_config = layout.host(&layout.installed(layout::SHIM_CONFIG));
    let mut shim_config_sha256 = receipt.as_ref().and_then(|r| r.shim_config_sha256.clone());
    if !shim_config.exists() {
        let text = shim_config_text(layout);
        write_atomic(&shim_config, text.as_bytes(), 0o644)?;
        undo.files.push(shim_config.clone());
        shim_config_sha256 = Some(sha256_hex(text.as_bytes()));
        println!(
            "shim configuration: {}",
            layout.installed(layout::SHIM_CONFIG).display()
        );
    }
    // 4. The drop-in, regenerated from the node's current CRI settings.
    let drop_in = layout.host(&layout.drop_in());
    let drop_in_dir = drop_in.parent().unwrap_or(Path::new("/")).to_path_buf();
    let created_drop_in_dir = match &receipt {
        Some(r) => r.created_drop_in_dir,
        None => !drop_in_dir.exists(),
    };
    if first && created_drop_in_dir {
        undo.dirs.push(drop_in_dir.clone());
    }
    if first {
        undo.files.push(drop_in.clone());
    }
    write_atomic(&drop_in, drop_in_text.as_bytes(), 0o644)?;
    println!(
        "containerd: runtime `kata-like` in {}",
        layout.drop_in().display()
    );
    // 5. The import line in the main file; its original bytes kept for uninstall.
    let main_path = layout.host(&layout.containerd_config);
    let import = layout.drop_in().display().to_string();
    let mut written_sha = receipt
        .as_ref()
        .map(|r| r.containerd_config_written_sha256.clone())
        .unwrap_or_default();
    let mut added_key = receipt.as_ref().is_some_and(|r| r.added_imports_key);
    if !containerd_config::imports(main_text, &import) {
        let (text, key) =
            containerd_config::add_import(main_text, &main_path.display().to_string(), &import)?;
        if first {
            let backup = layout.host(&layout.installed(layout::CONFIG_BACKUP));
            write_atomic(&backup, main_bytes.as_deref().unwrap_or_default(), 0o600)?;
            undo.files.push(backup);
            added_key = key;
        }
        undo.main_config = Some((main_path.clone(), main_bytes.clone()));
        write_atomic(&main_path, text.as_bytes(), 0o644)?;
        written_sha = sha256_hex(text.as_bytes());
        println!(
            "containerd: {} imports the drop-in",
            layout.containerd_config.display()
        );
    }
    // 6. The receipt, then containerd, then the node label.
    let receipt = Receipt {
        format: RECEIPT_FORMAT,
        files,
        shim_config_sha256,
        containerd_config: layout.containerd_config.clone(),
        containerd_config_existed: match &receipt {
            Some(r) => r.containerd_config_existed,
            None => main_bytes.is_some(),
        },
        containerd_config_written_sha256: written_sha,
        added_imports_key: added_key,
        drop_in: layout.drop_in(),
        created_drop_in_dir,
        created_dirs,
        node_label: o.node_name.clone().or(receipt.and_then(|r| r.node_label)),
    };
    let receipt_path = layout.host(&layout.installed(layout::RECEIPT));
    let json = serde_json::to_vec_pretty(&receipt)
        .map_err(|e| Error::new(format!("cannot encode the install receipt: {e}")))?;
    write_atomic(&receipt_path, &json, 0o600)?;
    if first {
        undo.files.push(receipt_path);
    }
    restart_containerd(&o.restart)?;
    if let Some(node) = &o.node_name {
        kubectl_label(node, &format!("{NODE_LABEL_KEY}={NODE_LABEL_VALUE}"));
    }
    println!("kata-like: installed; `kata-like check` says whether this node can run its pods");
    Ok(())
}

/// Processes running the installed shim (pods that would lose their runtime).
fn running_shims(layout: &Layout) -> Vec<u32> {
    let shim = layout.host(&layout.installed(layout::SHIM));
    let Ok(entries) = std::fs::read_dir(layout.host(Path::new("/proc"))) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe == shim || exe == layout.installed(layout::SHIM))
        })
        .collect()
}

pub fn uninstall(o: &Options) -> Result<()> {
    let layout = &o.layout;
    let Some(receipt) = load_receipt(layout)? else {
        println!(
            "kata-like: nothing to uninstall under {} (no install receipt)",
            layout.prefix.display()
        );
        return Ok(());
    };
    let shims = running_shims(layout);
    if !shims.is_empty() && !o.force {
        return Err(Error::new(format!(
            "kata-like pods are running on this node (shim pids {shims:?}): drain the node \
             (kubectl drain) or delete them first, or pass --force to uninstall under them"
        )));
    }
    // containerd's main file: back to its original bytes, unless someone edited it since.
    let main_path = layout.host(&receipt.containerd_config);
    let import = receipt.drop_in.display().to_string();
    if let Some(current) = read_optional(&main_path)? {
        let backup_path = layout.host(&layout.installed(layout::CONFIG_BACKUP));
        if sha256_hex(&current) == receipt.containerd_config_written_sha256 {
            if receipt.containerd_config_existed {
                let original =
                    std::fs::read(&backup_path).map_err(Error::io("read", &backup_path))?;
                write_atomic(&main_path, &original, 0o644)?;
            } else {
                std::fs::remove_file(&main_path).map_err(Error::io("remove", &main_path))?;
            }
            println!(
                "containerd: {} restored as it was",
                receipt.containerd_config.display()
            );
        } else {
            let text = utf8(&current, &main_path)?;
            let text = containerd_config::remove_import(
                &text,
                &main_path.display().to_string(),
                &import,
                receipt.added_imports_key,
            )?;
            write_atomic(&main_path, text.as_bytes(), 0o644)?;
            println!(
                "containerd: {} was edited since the install: removed only the kata-like import",
                receipt.containerd_config.display()
            );
        }
    }
    let drop_in = layout.host(&receipt.drop_in);
    match std::fs::remove_file(&drop_in) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::new(format!(
                "cannot remove {}: {e}",
                drop_in.display()
            )))
        }
    }
    if receipt.created_drop_in_dir {
        if let Some(dir) = drop_in.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    restart_containerd(&o.restart)?;
    if let Some(node) = o.node_name.as_ref().or(receipt.node_label.as_ref()) {
        kubectl_label(node, &format!("{NODE_LABEL_KEY}-"));
    }
    // The prefix: the payload, the shim config if still ours, the receipt and backup.
    let mut remove: Vec<PathBuf> = receipt
        .files
        .iter()
        .map(|(rel, _)| layout.host(&layout.installed(rel)))
        .collect();
    let shim_config = layout.host(&layout.installed(layout::SHIM_CONFIG));
    if let Some(current) = read_optional(&shim_config)? {
        if Some(sha256_hex(&current)) == receipt.shim_config_sha256 {
            remove.push(shim_config);
        } else {
            println!(
                "shim configuration {} was edited: kept",
                shim_config.display()
            );
        }
    }
    remove.push(layout.host(&layout.installed(layout::CONFIG_BACKUP)));
    remove.push(layout.host(&layout.installed(layout::RECEIPT)));
    for f in &remove {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::new(format!("cannot remove {}: {e}", f.display()))),
        }
    }
    remove_empty_prefix_dirs(&layout.host(&layout.prefix));
    for d in &receipt.created_dirs {
        let _ = std::fs::remove_dir(layout.host(d));
    }
    println!("kata-like: uninstalled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node in a directory: root with /etc/containerd/config.toml, a payload, and a fake
    /// containerd whose `config dump` prints a fixed effective configuration.
    struct Node {
        dir: tempfile::TempDir,
    }

    const MAIN: &str = "# node config\nversion = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n";
    const DUMP: &str = "version = 2\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n    [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n      [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes]\n        [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n          runtime_type = \"io.containerd.runc.v2\"\n";

    impl Node {
        fn new(main: Option<&str>) -> Node {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().join("root");
            std::fs::create_dir_all(root.join("etc/containerd")).expect("mkdir");
            if let Some(text) = main {
                std::fs::write(root.join("etc/containerd/config.toml"), text).expect("w");
            }
            for rel in layout::PAYLOAD {
                let p = dir.path().join("payload").join(rel);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                std::fs::write(&p, format!("contents of {rel}")).expect("w");
            }
            let fake = dir.path().join("containerd");
            std::fs::write(&fake, format!("#!/bin/sh\ncat <<'EOF'\n{DUMP}EOF\n")).expect("w");
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("x");
            Node { dir }
        }

        fn options(&self) -> Options {
            Options {
                layout: Layout {
                    root: self.dir.path().join("root"),
                    prefix: "/opt/kata-like".into(),
                    containerd_config: "/etc/containerd/config.toml".into(),
                },
                from: self.dir.path().join("payload"),
                containerd_bin: self.dir.path().join("containerd"),
                restart: Restart::Command(format!(
                    "echo restarted >> {}",
                    self.dir.path().join("restarts").display()
                )),
                node_name: None,
                force: false,
            }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        /// Every file under the root, with its contents.
        fn tree(&self) -> Vec<(PathBuf, Vec<u8>)> {
            let mut out = Vec::new();
            let mut stack = vec![self.root()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        out.push((p.clone(), Vec::new()));
                        stack.push(p);
                    } else {
                        out.push((p.clone(), std::fs::read(&p).expect("read")));
                    }
                }
            }
            out.sort();
            out
        }

        fn restarts(&self) -> usize {
            std::fs::read_to_string(self.dir.path().join("restarts"))
                .map(|s| s.lines().count())
                .unwrap_or(0)
        }
    }

    #[test]
    fn install_twice_then_uninstall_leaves_the_node_as_it_was() {
        for main in [Some(MAIN), None] {
            let node = Node::new(main);
            let before = node.tree();
            let o = node.options();
            install(&o).expect("install");
            let installed = node.tree();
            let drop_in = node.root().join("etc/containerd/conf.d/kata-like.toml");
            let text = std::fs::read_to_string(&drop_in).expect("drop-in");
            assert!(
                text.contains("runtime_path = \"/opt/kata-like/bin/containerd-shim-kata-like-v2\"")
            );
            let main_text =
                std::fs::read_to_string(node.root().join("etc/containerd/config.toml")).expect("r");
            assert!(
                main_text.contains("/etc/containerd/conf.d/kata-like.toml"),
                "{main_text}"
            );
            assert!(node
                .root()
                .join("opt/kata-like/share/kata-like/vmlinux")
                .is_file());
            install(&o).expect("install again");
            assert_eq!(node.tree(), installed, "a second install changes nothing");
            uninstall(&o).expect("uninstall");
            assert_eq!(node.tree(), before, "uninstall restores every byte");
            assert_eq!(node.restarts(), 3);
            uninstall(&o).expect("a second uninstall is a no-op");
            assert_eq!(node.restarts(), 3);
        }
    }

    #[test]
    fn a_main_file_edited_after_install_keeps_the_edit_and_loses_only_the_import() {
        let node = Node::new(Some(MAIN));
        let o = node.options();
        install(&o).expect("install");
        let main = node.root().join("etc/containerd/config.toml");
        let mut text = std::fs::read_to_string(&main).expect("r");
        text.push_str("[debug]\n  level = \"debug\"\n");
        std::fs::write(&main, &text).expect("w");
        uninstall(&o).expect("uninstall");
        let after = std::fs::read_to_string(&main).expect("r");
        assert_eq!(after, format!("{MAIN}[debug]\n  level = \"debug\"\n"));
    }

    #[test]
    fn a_failed_install_leaves_nothing_behind() {
        let node = Node::new(Some(MAIN));
        let before = node.tree();
        let mut o = node.options();
        o.restart = Restart::Command("exit 3".into());
        let e = install(&o).unwrap_err();
        assert!(e.to_string().contains("restarting containerd"), "{e}");
        assert_eq!(node.tree(), before);
    }

    #[test]
    fn bad_input_is_refused_before_anything_changes() {
        let node = Node::new(Some("version = 1\n"));
        let before = node.tree();
        let e = install(&node.options()).unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
        assert_eq!(node.tree(), before);

        let node = Node::new(Some(MAIN));
        std::fs::remove_file(node.dir.path().join("payload").join(layout::KERNEL)).expect("rm");
        let before = node.tree();
        let e = install(&node.options()).unwrap_err();
        assert!(e.to_string().contains("share/kata-like/vmlinux"), "{e}");
        assert!(e.to_string().contains("deploy/build-payload"), "{e}");
        assert_eq!(node.tree(), before);
    }
}
