//! Test images built locally, with no registry: OCI image-layout tarballs that
//! `ctr images import` takes. The busybox image is Debian's busybox-static with a symlink per
//! applet; the pause image is the same layer whose entrypoint sleeps forever (what a pause
//! container does for runc pods; kata-like pods do not run it at all).
//!
//! Layers are uncompressed tars, so their digest is also their diff id.

use std::path::Path;

use serde_json::json;

use super::sha256_hex;

const BUSYBOX: &str = "/bin/busybox";

/// The busybox layer: /bin/busybox, a symlink per applet in /bin, and the usual empty dirs.
pub fn busybox_layer() -> Vec<u8> {
    busybox_layer_with(&[])
}

/// The busybox layer plus executables of our own: (path in the image, program bytes).
pub fn busybox_layer_with(programs: &[(&str, &[u8])]) -> Vec<u8> {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install busybox-static"
    );
    let applets = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("var", 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        tar.append_data(&mut h, format!("{dir}/"), &[][..])
            .expect("tar dir");
    }
    let busybox = std::fs::read(BUSYBOX).expect("read busybox");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", &busybox[..])
        .expect("tar busybox");
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar link");
    }
    for (name, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        tar.append_data(&mut h, name, text.as_bytes())
            .expect("tar file");
    }
    for (path, program) in programs {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(program.len() as u64);
        tar.append_data(&mut h, path, *program)
            .expect("tar program");
    }
    tar.into_inner().expect("finish tar")
}

/// An OCI image-layout tarball of one image `name` with one layer and the given config.
pub fn image_tar(name: &str, layer: &[u8], config: serde_json::Value) -> Vec<u8> {
    let layer_digest = format!("sha256:{}", sha256_hex(layer));
    let mut config = config;
    config["architecture"] = json!("amd64");
    config["os"] = json!("linux");
    config["rootfs"] = json!({"type": "layers", "diff_ids": [layer_digest]});
    let config_bytes = serde_json::to_vec(&config).expect("config json");
    let config_digest = format!("sha256:{}", sha256_hex(&config_bytes));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest_bytes));
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest"),
            },
        }],
    });
    let index_bytes = serde_json::to_vec(&index).expect("index json");

    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).expect("tar entry");
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index_bytes);
    for (digest, data) in [
        (&manifest_digest, &manifest_bytes[..]),
        (&config_digest, &config_bytes[..]),
        (&layer_digest, layer),
    ] {
        add(
            &format!("blobs/sha256/{}", &digest["sha256:".len()..]),
            data,
        );
    }
    tar.into_inner().expect("finish tar")
}

pub fn busybox_image(name: &str) -> Vec<u8> {
    image_tar(
        name,
        &busybox_layer(),
        json!({"config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        }}),
    )
}

/// busybox plus the static VMM test init under two names, each a tool it runs when invoked so:
/// `/bin/vsock-probe` tries vsock connects and prints the errno of each (issue 12's test),
/// `/bin/memhog MIB` allocates and holds memory (issue 15's sizing test), `/bin/inotify-watch
/// DIR` prints DIR's inotify events (issue 14's volume update test; busybox-static has no
/// inotifyd).
pub fn vsock_probe_image(name: &str, test_init_static: &Path) -> Vec<u8> {
    let probe = std::fs::read(test_init_static)
        .unwrap_or_else(|e| panic!("read {}: {e}", test_init_static.display()));
    image_tar(
        name,
        &busybox_layer_with(&[
            ("bin/vsock-probe", &probe),
            ("bin/memhog", &probe),
            ("bin/inotify-watch", &probe),
        ]),
        json!({"config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        }}),
    )
}

/// The node's iptables-nft (Debian's `xtables-nft-multi`, what a service mesh's init container
/// runs) as `/sbin/iptables`, with the libraries and the xtables extensions it loads.
const IPTABLES: &str = "/usr/sbin/xtables-nft-multi";
const MULTIARCH_LIBS: &str = "usr/lib/x86_64-linux-gnu";
const IPTABLES_LIBS: [&str; 5] = [
    "libxtables.so.12",
    "libmnl.so.0",
    "libnftnl.so.11",
    "libc.so.6",
    "ld-linux-x86-64.so.2",
];
const IPTABLES_EXTENSIONS: [&str; 9] = [
    "libxt_standard.so",
    "libxt_tcp.so",
    "libxt_udp.so",
    "libxt_REDIRECT.so",
    "libxt_TPROXY.so",
    "libxt_owner.so",
    "libxt_mark.so",
    "libxt_MARK.so",
    "libxt_socket.so",
];

/// busybox plus the node's iptables (nft backend): issue 13's NET_ADMIN test runs
/// `iptables -t nat ... -j REDIRECT` in a pod, as Istio's init container does.
pub fn iptables_image(name: &str) -> Vec<u8> {
    let read = |path: &str| {
        std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e} (install iptables)"))
    };
    let mut files: Vec<(String, Vec<u8>)> = vec![("sbin/iptables".into(), read(IPTABLES))];
    for lib in IPTABLES_LIBS {
        files.push((
            format!("{MULTIARCH_LIBS}/{lib}"),
            read(&format!("/lib/x86_64-linux-gnu/{lib}")),
        ));
    }
    files.push((
        "lib64/ld-linux-x86-64.so.2".into(),
        read("/lib64/ld-linux-x86-64.so.2"),
    ));
    for ext in IPTABLES_EXTENSIONS {
        files.push((
            format!("{MULTIARCH_LIBS}/xtables/{ext}"),
            read(&format!("/{MULTIARCH_LIBS}/xtables/{ext}")),
        ));
    }
    let programs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(path, bytes)| (path.as_str(), bytes.as_slice()))
        .collect();
    image_tar(
        name,
        &busybox_layer_with(&programs),
        json!({"config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                format!("LD_LIBRARY_PATH=/{MULTIARCH_LIBS}"),
                format!("XTABLES_LIBDIR=/{MULTIARCH_LIBS}/xtables"),
            ],
            "Cmd": ["sh"],
        }}),
    )
}

pub fn pause_image(name: &str) -> Vec<u8> {
    image_tar(
        name,
        &busybox_layer(),
        json!({"config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/sleep", "2147483647"],
        }}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tarball_is_a_consistent_oci_layout() {
        let tar_bytes = busybox_image("registry.test/x/busybox:1");
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let mut files = std::collections::HashMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            files.insert(path, data);
        }
        // Every blob is stored under its own digest.
        for (path, data) in &files {
            if let Some(digest) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(digest, sha256_hex(data), "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("index");
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "registry.test/x/busybox:1"
        );
        // The layer holds busybox and its applet links.
        let layer = files
            .iter()
            .filter(|(p, _)| p.starts_with("blobs/"))
            .map(|(_, d)| d)
            .max_by_key(|d| d.len())
            .expect("layer");
        let mut names = Vec::new();
        for e in tar::Archive::new(&layer[..])
            .entries()
            .expect("layer entries")
        {
            names.push(
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string(),
            );
        }
        assert!(names.contains(&"bin/busybox".to_string()));
        assert!(names.contains(&"bin/sh".to_string()));
        assert!(names.contains(&"bin/uname".to_string()));
    }
}
