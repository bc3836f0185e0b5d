//! Bad input: every request gets a clear gRPC error, the agent stays up, nothing is left behind.

mod common;

use common::*;
use kata_like_protocol::*;
use tonic::Code;

/// The agent answers, has no container state left and nothing mounted under its state dir.
async fn assert_clean(agent: &mut TestAgent) {
    agent
        .client
        .health(HealthRequest {})
        .await
        .expect("agent still up");
    let leftovers: Vec<_> = std::fs::read_dir(agent.state.join("containers"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "container dirs left: {leftovers:?}");
    let runtime: Vec<_> = std::fs::read_dir(agent.state.join("runtime"))
        .unwrap()
        .collect();
    assert!(runtime.is_empty(), "runtime state left: {runtime:?}");
    assert!(
        agent.mounts_under_state().is_empty(),
        "{:?}",
        agent.mounts_under_state()
    );
}

#[tokio::test]
async fn unknown_invalid_and_duplicate_ids() {
    let mut agent = TestAgent::start().await;
    let err = create(&mut agent, "c1", &spec(&["true"]), None, true)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "no sandbox yet: {err}"
    );
    agent.sandbox("sb-ids").await;
    for id in ["", "../x", "a/b", "-x", &"x".repeat(200)] {
        let err = create(&mut agent, id, &spec(&["true"]), None, true)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}: {err}");
        let err = start_container(&mut agent.client, id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
    }
    let err = start_container(&mut agent.client, "nope")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agent
        .client
        .wait_process(ProcessRequest {
            container_id: "nope".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = remove_container(&mut agent.client, "nope", 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agent
        .client
        .stats_container(ContainerRequest {
            container_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    create(&mut agent, "c1", &spec(&["sleep", "100"]), None, true)
        .await
        .unwrap();
    let err = create(&mut agent, "c1", &spec(&["true"]), None, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = agent
        .client
        .wait_process(ProcessRequest {
            container_id: "c1".into(),
            exec_id: "no-such-exec".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agent
        .client
        .signal_process(SignalProcessRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
            signal: 1000,
            all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    remove_container(&mut agent.client, "c1", 0).await.unwrap();
    assert_clean(&mut agent).await;
}

#[tokio::test]
async fn malformed_specs_and_hostile_mounts_are_rejected_cleanly() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-hostile").await;
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/", agent.state.join("images/root-link")).unwrap();
    let image = agent.image();
    let mut cases: Vec<(serde_json::Value, Rootfs)> = Vec::new();
    let good_rootfs = agent.rootfs(true);
    let mut s = spec(&["true"]);
    s["mounts"] = serde_json::json!([{"destination": "/x", "type": "bind", "source": "/etc", "options": ["rbind"]}]);
    cases.push((s, good_rootfs.clone()));
    let mut s = spec(&["true"]);
    s["mounts"] =
        serde_json::json!([{"destination": "/../../x", "type": "tmpfs", "source": "tmpfs"}]);
    cases.push((s, good_rootfs.clone()));
    let mut s = spec(&["true"]);
    s["mounts"] = serde_json::json!([{"destination": "/x", "source": format!("{}/../../../etc", image), "options": ["bind"]}]);
    cases.push((s, good_rootfs.clone()));
    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}]);
    cases.push((s, good_rootfs.clone()));
    cases.push((
        spec(&["true"]),
        Rootfs {
            lower_dirs: vec!["/".into()],
            writable: true,
            upper_size_bytes: 0,
        },
    ));
    cases.push((
        spec(&["true"]),
        Rootfs {
            lower_dirs: vec![agent
                .state
                .join("images/root-link")
                .to_string_lossy()
                .into()],
            writable: true,
            upper_size_bytes: 0,
        },
    ));
    cases.push((
        spec(&["true"]),
        Rootfs {
            lower_dirs: vec![outside.path().to_string_lossy().into()],
            writable: false,
            upper_size_bytes: 0,
        },
    ));
    cases.push((
        spec(&["true"]),
        Rootfs {
            lower_dirs: vec![],
            writable: true,
            upper_size_bytes: 0,
        },
    ));
    for (i, (s, rootfs)) in cases.into_iter().enumerate() {
        let err = agent
            .client
            .create_container(CreateContainerRequest {
                container_id: format!("c{i}"),
                oci_spec_json: serde_json::to_vec(&s).unwrap(),
                rootfs: Some(rootfs),
                stdio: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {err}");
        assert!(!err.message().is_empty());
    }
    for bad in [&b"{not json"[..], b"", b"[]", br#"{"ociVersion":"1.0.2"}"#] {
        let err = agent
            .client
            .create_container(CreateContainerRequest {
                container_id: "bad".into(),
                oci_spec_json: bad.to_vec(),
                rootfs: Some(agent.rootfs(true)),
                stdio: None,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // A pid namespace the agent cannot resolve: an unknown mode, a target that is not a running
    // container of the pod, the pod's namespace of a sandbox created without one.
    for (mode, target, code) in [
        (99, "", Code::InvalidArgument),
        (PidNamespaceMode::Target as i32, "nobody", Code::NotFound),
        (
            PidNamespaceMode::Target as i32,
            "../x",
            Code::InvalidArgument,
        ),
        (PidNamespaceMode::Pod as i32, "", Code::FailedPrecondition),
    ] {
        let err = agent
            .client
            .create_container(CreateContainerRequest {
                container_id: "pidns".into(),
                oci_spec_json: serde_json::to_vec(&spec(&["true"])).unwrap(),
                rootfs: Some(agent.rootfs(true)),
                stdio: None,
                pid_namespace: mode,
                pid_namespace_target: target.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "mode {mode} target {target:?}: {err}");
    }
    // A runtime failure after the rootfs was mounted (the binary does not exist) cleans up too.
    let err = create(&mut agent, "nobin", &spec(&["/no/such/binary"]), None, true).await;
    if err.is_ok() {
        start_container(&mut agent.client, "nobin").await.ok();
        let status = wait(&mut agent.client, "nobin", "").await;
        assert_ne!(status, 0);
        remove_container(&mut agent.client, "nobin", 0)
            .await
            .unwrap();
    }
    assert_clean(&mut agent).await;
}

#[tokio::test]
async fn symlinks_in_the_rootfs_cannot_redirect_mounts_out_of_it() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-symlink").await;
    let outside = tempfile::tempdir().unwrap();
    // An image whose /escape points at a host directory.
    std::os::unix::fs::symlink(outside.path(), agent.state.join("images/busybox/escape")).unwrap();
    let mut s = spec(&["sh", "-c", "touch /escape/marker; ls -la /escape"]);
    s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"destination": "/escape", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}
    ));
    let created = create(&mut agent, "c1", &s, stdio(false, false), true).await;
    if created.is_ok() {
        start_container(&mut agent.client, "c1").await.unwrap();
        wait(&mut agent.client, "c1", "").await;
        remove_container(&mut agent.client, "c1", 0).await.unwrap();
    }
    // Either way: nothing was mounted on or written into the host directory.
    assert!(
        mounts_under(outside.path()).is_empty(),
        "mounted outside the rootfs"
    );
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "wrote outside the rootfs"
    );
    assert_clean(&mut agent).await;
}

/// A message whose field 1 is a varint: invalid for every request whose field 1 is a string.
#[derive(Clone, PartialEq, prost::Message)]
struct Bogus {
    #[prost(uint64, tag = "1")]
    number: u64,
    #[prost(bytes = "vec", tag = "2")]
    junk: Vec<u8>,
}

#[tokio::test]
async fn malformed_protobuf_gets_an_error_and_the_agent_stays_up() {
    let mut agent = TestAgent::start().await;
    let channel = {
        let socket = agent.socket.clone();
        tonic::transport::Endpoint::try_from("http://[::]:0")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    };
    for method in [
        "StartContainer",
        "CreateContainer",
        "CopyFile",
        "CreateSandbox",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = format!("/kata_like.agent.v1.Agent/{method}")
            .parse()
            .unwrap();
        let result: Result<tonic::Response<Empty>, _> = grpc
            .unary(
                tonic::Request::new(Bogus {
                    number: 7,
                    junk: vec![0xff; 64],
                }),
                path,
                tonic_prost::ProstCodec::<Bogus, Empty>::default(),
            )
            .await;
        let err = result.unwrap_err();
        assert!(
            matches!(err.code(), Code::Internal | Code::InvalidArgument),
            "{method}: {err}"
        );
    }
    agent.client.health(HealthRequest {}).await.unwrap();
}

#[tokio::test]
async fn huge_requests_are_refused() {
    let mut agent = TestAgent::start().await;
    let err = agent
        .client
        .copy_file(CopyFileRequest {
            path: agent.state.join("big").to_string_lossy().into(),
            data: vec![0u8; 5 << 20],
            offset: 0,
            file_size: 5 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err}"
    );
    let err = agent
        .client
        .copy_file(CopyFileRequest {
            path: agent.state.join("big").to_string_lossy().into(),
            data: vec![0u8; 2 << 20],
            offset: 0,
            file_size: 2 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "chunks are at most 1 MiB"
    );
    let err = agent
        .client
        .write_stdin(WriteStdinRequest {
            container_id: "c".into(),
            exec_id: String::new(),
            data: vec![0; 2 << 20],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    agent.client.health(HealthRequest {}).await.unwrap();
    assert!(!agent.state.join("big").exists());
}

#[tokio::test]
async fn copy_file_writes_chunks_and_refuses_hostile_paths() {
    let mut agent = TestAgent::start().await;
    let target = agent.state.join("shared/cm/config.yaml");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        agent
            .client
            .copy_file(CopyFileRequest {
                path: target.to_string_lossy().into(),
                data: chunk.to_vec(),
                offset: (i << 20) as u64,
                file_size: data.len() as u64,
                mode: 0o600,
                uid: 1000,
                gid: 1000,
                create_parents: true,
            })
            .await
            .unwrap();
    }
    assert_eq!(std::fs::read(&target).unwrap(), data);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o600, 1000, 1000)
    );
    std::os::unix::fs::symlink("/etc", agent.state.join("shared/etc-link")).unwrap();
    for path in [
        "relative".to_string(),
        "/etc/passwd".to_string(),
        format!("{}/../../etc/x", agent.state.display()),
        format!("{}/shared/etc-link/x", agent.state.display()),
        "/proc/sys/kernel/x".to_string(),
    ] {
        let err = agent
            .client
            .copy_file(CopyFileRequest {
                path: path.clone(),
                data: b"x".to_vec(),
                offset: 0,
                file_size: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err}");
    }
    assert!(!std::path::Path::new("/etc/x").exists());
}

#[tokio::test]
async fn storages_are_mounted_validated_and_removed() {
    let mut agent = TestAgent::start().await;
    let response = agent
        .client
        .add_storage(AddStorageRequest {
            storage_id: "vol1".into(),
            source: Some(add_storage_request::Source::Tmpfs(true)),
            fs_type: String::new(),
            options: vec!["size=4m".into(), "noexec".into()],
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.mount_point,
        agent.state.join("storage/vol1").to_string_lossy()
    );
    assert_eq!(
        agent.mounts_under_state(),
        vec![response.mount_point.clone()]
    );
    let dup = agent
        .client
        .add_storage(AddStorageRequest {
            storage_id: "vol1".into(),
            source: Some(add_storage_request::Source::Tmpfs(true)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    for (id, options, source, fs_type) in [
        (
            "bad1",
            vec!["size=1m,exec".to_string()],
            Some(add_storage_request::Source::Tmpfs(true)),
            "",
        ),
        (
            "bad2",
            vec!["upperdir=/etc".to_string()],
            Some(add_storage_request::Source::Tmpfs(true)),
            "",
        ),
        (
            "bad3",
            vec![],
            Some(add_storage_request::Source::BlockSerial("ok".into())),
            "nfs",
        ),
        (
            "bad4",
            vec![],
            Some(add_storage_request::Source::BlockSerial("../../x".into())),
            "ext4",
        ),
        ("bad5", vec![], None, ""),
        (
            "../bad6",
            vec![],
            Some(add_storage_request::Source::Tmpfs(true)),
            "",
        ),
    ] {
        let err = agent
            .client
            .add_storage(AddStorageRequest {
                storage_id: id.into(),
                source,
                fs_type: fs_type.into(),
                options,
                wait_ms: 10,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err}");
    }
    let err = agent
        .client
        .add_storage(AddStorageRequest {
            storage_id: "missing".into(),
            source: Some(add_storage_request::Source::BlockSerial(
                "no-such-serial".into(),
            )),
            fs_type: "ext4".into(),
            options: vec!["ro".into()],
            wait_ms: 50,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    agent
        .client
        .remove_storage(RemoveStorageRequest {
            storage_id: "vol1".into(),
        })
        .await
        .unwrap();
    let err = agent
        .client
        .remove_storage(RemoveStorageRequest {
            storage_id: "vol1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(agent.mounts_under_state().is_empty());
    assert!(!agent.state.join("storage/missing").exists());
}

#[tokio::test]
async fn host_mode_refuses_to_set_the_host_clock() {
    let mut agent = TestAgent::start().await;
    let err = agent
        .client
        .set_time(SetTimeRequest {
            seconds: 1,
            nanos: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = agent
        .client
        .set_time(SetTimeRequest {
            seconds: 1,
            nanos: 2_000_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
