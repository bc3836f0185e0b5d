//! Container lifecycle through the agent on the host (root, Unix socket).

mod common;

use common::*;
use kata_like_protocol::*;

#[tokio::test]
async fn health_reports_version_and_uptime() {
    let mut agent = TestAgent::start().await;
    let health = agent
        .client
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.protocol_version, PROTOCOL_VERSION);
    assert_eq!(health.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(health.uptime_ms > 0);
}

#[tokio::test]
async fn exit_code_and_output_are_reported() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-exit").await;
    let result = run(
        &mut agent,
        "c1",
        &spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(result.status, 3);
    assert_eq!(result.stdout(), "out\n");
    assert_eq!(result.stderr(), "err\n");
    assert!(
        agent.mounts_under_state().is_empty(),
        "{:?}",
        agent.mounts_under_state()
    );
}

#[tokio::test]
async fn signalled_processes_report_128_plus_signal() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-sig").await;
    create_and_start(&mut agent, "c1", &spec(&["sleep", "1000"])).await;
    // An exec'd process (not the pid namespace's init, which ignores unhandled signals).
    exec(
        &mut agent,
        "c1",
        "e1",
        &["sleep", "1000"],
        stdio(false, false),
    )
    .await
    .unwrap();
    signal(&mut agent, "c1", "e1", libc::SIGTERM).await.unwrap();
    assert_eq!(
        wait(&mut agent.client, "c1", "e1").await,
        128 + libc::SIGTERM
    );
    signal(&mut agent, "c1", "", libc::SIGKILL).await.unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "").await, 128 + libc::SIGKILL);
    // The process is gone: signalling it again is NOT_FOUND, waiting again still answers.
    let err = signal(&mut agent, "c1", "", libc::SIGKILL)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(wait(&mut agent.client, "c1", "").await, 137);
    remove(&mut agent, "c1").await;
    assert!(agent.mounts_under_state().is_empty());
}

#[tokio::test]
async fn exec_runs_real_binaries_with_their_exit_codes_and_output() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-exec").await;
    create_and_start(&mut agent, "c1", &spec(&["sleep", "1000"])).await;
    exec(
        &mut agent,
        "c1",
        "true",
        &["/usr/bin/gnu-true"],
        stdio(false, false),
    )
    .await
    .unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "true").await, 0);
    exec(
        &mut agent,
        "c1",
        "cat",
        &["/usr/bin/gnu-cat", "/etc/group"],
        stdio(false, false),
    )
    .await
    .unwrap();
    let out = collect_output(&agent.client, "c1", "cat", OutputFd::Stdout);
    assert_eq!(wait(&mut agent.client, "c1", "cat").await, 0);
    assert!(String::from_utf8(out.await.unwrap())
        .unwrap()
        .contains("extra:x:2000:"));
    exec(
        &mut agent,
        "c1",
        "seven",
        &["sh", "-c", "exit 7"],
        stdio(false, false),
    )
    .await
    .unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "seven").await, 7);
    // A missing binary fails the exec itself.
    let err = exec(
        &mut agent,
        "c1",
        "missing",
        &["/no/such/binary"],
        stdio(false, false),
    )
    .await;
    assert!(err.is_err(), "exec of a missing binary must fail");
    // Duplicate exec id.
    let err = exec(&mut agent, "c1", "seven", &["true"], stdio(false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    remove(&mut agent, "c1").await;
}

#[tokio::test]
async fn stdin_round_trips_through_cat() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-stdin").await;
    create(
        &mut agent,
        "c1",
        &spec(&["/usr/bin/gnu-cat"]),
        stdio(false, true),
        true,
    )
    .await
    .unwrap();
    let out = collect_output(&agent.client, "c1", "", OutputFd::Stdout);
    start(&mut agent, "c1").await;
    let mut expected = Vec::new();
    for i in 0..200 {
        let line = format!("line {i} {}\n", "x".repeat(i * 50));
        expected.extend_from_slice(line.as_bytes());
        let written = agent
            .client
            .write_stdin(WriteStdinRequest {
                container_id: "c1".into(),
                exec_id: String::new(),
                data: line.clone().into_bytes(),
            })
            .await
            .unwrap()
            .into_inner()
            .written;
        assert_eq!(written as usize, line.len());
    }
    agent
        .client
        .close_stdin(ProcessRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "").await, 0);
    assert_eq!(out.await.unwrap(), expected);
    remove(&mut agent, "c1").await;
}

#[tokio::test]
async fn output_of_100_mib_arrives_byte_for_byte() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-big").await;
    let lines = 13_500_000u64;
    let result = run(&mut agent, "c1", &spec(&["seq", "1", &lines.to_string()])).await;
    assert_eq!(result.status, 0);
    let mut expected = Vec::with_capacity(result.stdout.len());
    for i in 1..=lines {
        expected.extend_from_slice(i.to_string().as_bytes());
        expected.push(b'\n');
    }
    assert!(expected.len() > 100 << 20);
    assert_eq!(result.stdout.len(), expected.len());
    assert!(result.stdout == expected, "output differs from seq's");
}

/// The kernel function a process sleeps in (`/proc/<pid>/wchan`).
fn wchan(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
}

#[tokio::test]
async fn slow_reader_back_pressures_instead_of_dropping() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-slow").await;
    let pid = create(
        &mut agent,
        "c1",
        &spec(&["seq", "1", "300000"]),
        stdio(false, false),
        true,
    )
    .await
    .unwrap();
    start(&mut agent, "c1").await;
    // Nobody reads yet: the writer ends up blocked in pipe_write instead of losing output.
    let mut blocked = false;
    for _ in 0..500 {
        if wchan(pid).ends_with("pipe_write") {
            blocked = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        blocked,
        "writer not blocked on its pipe: wchan={:?}",
        wchan(pid)
    );
    let mut stream = agent
        .client
        .process_output(ProcessOutputRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
            fd: OutputFd::Stdout as i32,
        })
        .await
        .unwrap()
        .into_inner();
    // One reader at a time.
    let second = agent
        .client
        .process_output(ProcessOutputRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
            fd: OutputFd::Stdout as i32,
        })
        .await;
    assert_eq!(second.unwrap_err().code(), tonic::Code::AlreadyExists);
    // Read slowly: every byte arrives, in order.
    let mut got = Vec::new();
    use tokio_stream::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.data.len() <= 64 * 1024);
        got.extend_from_slice(&chunk.data);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert_eq!(wait(&mut agent.client, "c1", "").await, 0);
    let expected: String = (1..=300000).map(|i| format!("{i}\n")).collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected.as_bytes());
    remove(&mut agent, "c1").await;
}

#[tokio::test]
async fn tty_processes_get_a_terminal_and_window_size() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-tty").await;
    create(
        &mut agent,
        "c1",
        &spec(&["sh", "-c", "tty; stty size; echo done"]),
        stdio(true, false),
        true,
    )
    .await
    .unwrap();
    agent
        .client
        .resize_tty(ResizeTtyRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
            rows: 40,
            columns: 100,
        })
        .await
        .unwrap();
    let out = collect_output(&agent.client, "c1", "", OutputFd::Stdout);
    let err = collect_output(&agent.client, "c1", "", OutputFd::Stderr);
    start(&mut agent, "c1").await;
    assert_eq!(wait(&mut agent.client, "c1", "").await, 0);
    let out = String::from_utf8(out.await.unwrap()).unwrap();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("40 100\r\n"), "{out:?}");
    assert!(out.contains("done\r\n"), "{out:?}");
    assert!(
        err.await.unwrap().is_empty(),
        "a tty has no separate stderr"
    );
    // A process without a tty cannot be resized.
    remove(&mut agent, "c1").await;
}

#[tokio::test]
async fn tty_exec_with_stdin() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-ttyexec").await;
    create_and_start(&mut agent, "c1", &spec(&["sleep", "1000"])).await;
    exec(&mut agent, "c1", "sh", &["sh"], stdio(true, true))
        .await
        .unwrap();
    let out = collect_output(&agent.client, "c1", "sh", OutputFd::Stdout);
    agent
        .client
        .write_stdin(WriteStdinRequest {
            container_id: "c1".into(),
            exec_id: "sh".into(),
            data: b"echo hi-$((6*7)); exit 5\n".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "sh").await, 5);
    let out = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    assert!(out.contains("hi-42"), "{out:?}");
    remove(&mut agent, "c1").await;
}

#[tokio::test]
async fn read_only_rootfs_is_read_only() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-ro").await;
    let mut s = spec(&["sh", "-c", "touch /newfile"]);
    s["root"]["readonly"] = true.into();
    let result = run(&mut agent, "c1", &s).await;
    assert_ne!(result.status, 0);
    assert!(
        result.stderr().contains("Read-only file system"),
        "{}",
        result.stderr()
    );
    // The image was not touched either.
    assert!(!agent.state.join("images/busybox/newfile").exists());
}

#[tokio::test]
async fn writable_rootfs_writes_go_to_the_upper_layer_only() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-rw").await;
    let result = run(
        &mut agent,
        "c1",
        &spec(&["sh", "-c", "echo x > /newfile && cat /newfile"]),
    )
    .await;
    assert_eq!(result.status, 0, "{}", result.stderr());
    assert_eq!(result.stdout(), "x\n");
    assert!(!agent.state.join("images/busybox/newfile").exists());
}

#[tokio::test]
async fn seccomp_blocks_the_listed_syscall() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-seccomp").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /tmp/file && echo touched; mkdir /tmp/dir",
    ]);
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let result = run(&mut agent, "c1", &s).await;
    assert_eq!(result.stdout(), "touched\n");
    assert_ne!(result.status, 0);
    assert!(
        result.stderr().contains("Operation not permitted"),
        "{}",
        result.stderr()
    );
}

#[tokio::test]
async fn user_groups_capabilities_and_no_new_privs_are_applied() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-user").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "id -u; id -g; id -G; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
    ]);
    s["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [2000]});
    s["process"]["capabilities"] =
        serde_json::json!({"bounding": ["CAP_KILL"], "effective": [], "permitted": []});
    let result = run(&mut agent, "c1", &s).await;
    assert_eq!(result.status, 0, "{}", result.stderr());
    let out = result.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    assert!(lines[2].split_whitespace().any(|g| g == "2000"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000020"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[tokio::test]
async fn namespaces_hostname_masked_paths_and_rlimits() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-ns").await;
    let mut s = spec(&["sh", "-c", "echo pid=$$; hostname; wc -c < /proc/timer_list; ulimit -n; ls /sys/class/net; echo x > /proc/sys/kernel/domainname || echo ro-proc"]);
    s["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
    let result = run(&mut agent, "c1", &s).await;
    let out = result.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1", "{out}");
    assert_eq!(lines[1], "container");
    assert_eq!(lines[2].trim(), "0", "masked /proc/timer_list reads empty");
    assert_eq!(lines[3], "123");
    assert_eq!(lines[4], "lo", "a fresh network namespace has only lo");
    assert!(out.contains("ro-proc"), "{out}");
}

#[tokio::test]
async fn sandbox_hostname_hosts_and_resolv_conf_reach_containers() {
    let mut agent = TestAgent::start().await;
    agent
        .client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb-files".into(),
            hostname: "my-pod".into(),
            resolv_conf: b"nameserver 10.0.0.10\n".to_vec(),
            hosts: Vec::new(),
            sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
            shared_pid_namespace: false,
        })
        .await
        .unwrap();
    let mut s = spec(&[
        "sh",
        "-c",
        "hostname; cat /etc/resolv.conf; grep my-pod /etc/hosts",
    ]);
    s.as_object_mut().unwrap().remove("hostname");
    let result = run(&mut agent, "c1", &s).await;
    assert_eq!(result.status, 0, "{}", result.stderr());
    let out = result.stdout();
    assert!(out.starts_with("my-pod\n"), "{out}");
    assert!(out.contains("nameserver 10.0.0.10"), "{out}");
    assert!(out.contains("127.0.1.1\tmy-pod"), "{out}");
    let dup = agent
        .client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
}

#[tokio::test]
async fn shared_pid_namespace_lets_containers_see_each_other() {
    let mut agent = TestAgent::start().await;
    agent
        .client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb-pidns".into(),
            shared_pid_namespace: true,
            ..Default::default()
        })
        .await
        .unwrap();
    agent.pid_namespace = PidNamespaceMode::Pod as i32;
    create_and_start(&mut agent, "a", &spec(&["sleep", "4242"])).await;
    // PID 1 of the pod's namespace is the sandbox init, confined: nobody, no capabilities,
    // no_new_privs, chrooted into an empty directory.
    let result = run(
        &mut agent,
        "b",
        &spec(&[
            "sh",
            "-c",
            "ps -o args; cat /proc/1/comm; grep -E '^(Uid|CapEff|CapPrm|NoNewPrivs)' /proc/1/status",
        ]),
    )
    .await;
    let out = result.stdout();
    assert!(out.contains("sleep 4242"), "{out}");
    assert!(out.contains("pidns-init"), "{out}");
    for line in [
        "Uid:	65534	65534	65534	65534",
        "CapEff:	0000000000000000",
        "CapPrm:	0000000000000000",
        "NoNewPrivs:	1",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    // A container with a pid namespace of its own sees only itself.
    agent.pid_namespace = PidNamespaceMode::Own as i32;
    let own = run(&mut agent, "c", &spec(&["sh", "-c", "ps -o args"])).await;
    assert!(!own.stdout().contains("sleep 4242"), "{}", own.stdout());
    // TARGET joins the named container's namespace.
    let target = agent
        .client
        .create_container(CreateContainerRequest {
            container_id: "d".into(),
            oci_spec_json: serde_json::to_vec(&spec(&["sh", "-c", "ps -o args"])).unwrap(),
            rootfs: Some(agent.rootfs(true)),
            stdio: stdio(false, false),
            pid_namespace: PidNamespaceMode::Target as i32,
            pid_namespace_target: "a".into(),
        })
        .await;
    assert!(target.is_ok(), "{target:?}");
    let out = collect_output(&agent.client, "d", "", OutputFd::Stdout);
    start(&mut agent, "d").await;
    assert_eq!(wait(&mut agent.client, "d", "").await, 0);
    let out = out.await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).contains("sleep 4242"),
        "{out:?}"
    );
    remove(&mut agent, "d").await;
    remove(&mut agent, "a").await;
    agent.client.destroy_sandbox(Empty {}).await.unwrap();
    assert!(agent.mounts_under_state().is_empty());
}

#[tokio::test]
async fn pause_resume_list_and_remove_with_leftovers() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-pause").await;
    // Start twice: the second is a state error.
    create_and_start(
        &mut agent,
        "c1",
        &spec(&["sh", "-c", "sleep 1000 & sleep 1001"]),
    )
    .await;
    let err = start_container(&mut agent.client, "c1").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let mut names = Vec::new();
    for _ in 0..100 {
        names = list_processes(&mut agent.client, "c1")
            .await
            .unwrap()
            .iter()
            .map(|p| p.command.clone())
            .collect::<Vec<_>>();
        if names.iter().filter(|n| n.as_str() == "sleep").count() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        names.iter().filter(|n| n.as_str() == "sleep").count() == 2,
        "{names:?}"
    );
    pause_container(&mut agent.client, "c1").await.unwrap();
    let err = exec(&mut agent, "c1", "e", &["true"], stdio(false, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    resume_container(&mut agent.client, "c1").await.unwrap();
    exec(&mut agent, "c1", "e", &["true"], stdio(false, false))
        .await
        .unwrap();
    assert_eq!(wait(&mut agent.client, "c1", "e").await, 0);
    // Remove while running: everything is killed and unmounted.
    let pids: Vec<u32> = list_processes(&mut agent.client, "c1")
        .await
        .unwrap()
        .iter()
        .map(|p| p.pid)
        .collect();
    remove_container(&mut agent.client, "c1", 100)
        .await
        .unwrap();
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "pid {pid} still alive: {state}"
        );
    }
    assert!(
        agent.mounts_under_state().is_empty(),
        "{:?}",
        agent.mounts_under_state()
    );
    let err = agent
        .client
        .wait_process(ProcessRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn hooks_run_at_their_lifecycle_points_and_sysctls_apply() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-hooks").await;
    let marks = agent.state.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}/{name}", marks.display())]});
    let mut s = spec(&["sh", "-c", "cat /proc/sys/net/ipv4/ip_forward"]);
    s["hooks"] = serde_json::json!({
        "createRuntime": [hook("createRuntime")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")]
    });
    s["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"});
    let result = run(&mut agent, "c1", &s).await;
    assert_eq!(result.status, 0, "{}", result.stderr());
    assert_eq!(result.stdout(), "1\n");
    for name in ["createRuntime", "poststart", "poststop"] {
        // Hooks get the container's state on stdin.
        let state = std::fs::read_to_string(marks.join(name)).unwrap_or_default();
        assert!(state.contains("\"id\":\"c1\""), "{name}: {state:?}");
    }
}

#[tokio::test]
async fn signal_all_kills_every_process_and_waiters_all_get_the_status() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-all").await;
    create_and_start(
        &mut agent,
        "c1",
        &spec(&["sh", "-c", "sleep 1000 & sleep 1001"]),
    )
    .await;
    // Several concurrent waiters on the same process.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let mut client = agent.client.clone();
            tokio::spawn(async move { wait(&mut client, "c1", "").await })
        })
        .collect();
    let mut count = 0;
    for _ in 0..100 {
        count = list_processes(&mut agent.client, "c1").await.unwrap().len();
        if count == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(count, 2, "two sleeps (sh execs the last command)");
    agent
        .client
        .signal_process(SignalProcessRequest {
            container_id: "c1".into(),
            exec_id: String::new(),
            signal: libc::SIGKILL as u32,
            all: true,
        })
        .await
        .unwrap();
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), 128 + libc::SIGKILL);
    }
    remove(&mut agent, "c1").await;
    assert!(agent.mounts_under_state().is_empty());
}

/// The status lines that make up a process's confinement.
const CONFINEMENT_LINES: &str =
    "^(Uid|Gid|Groups|Seccomp|Seccomp_filters|NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):";

/// Runs `args` as an exec whose process is the container's own (as containerd copies it) in
/// container `id`; returns (exit status, stdout, stderr).
async fn exec_as_container(
    agent: &mut TestAgent,
    id: &str,
    exec_id: &str,
    container_spec: &serde_json::Value,
    args: &[&str],
) -> (i32, String, String) {
    let mut process = container_spec["process"].clone();
    process["args"] = serde_json::json!(args);
    exec_process(agent, id, exec_id, &process, stdio(false, false))
        .await
        .expect("exec");
    let out = collect_output(&agent.client, id, exec_id, OutputFd::Stdout);
    let err = collect_output(&agent.client, id, exec_id, OutputFd::Stderr);
    let status = wait(&mut agent.client, id, exec_id).await;
    let out = String::from_utf8(out.await.unwrap()).unwrap();
    let err = String::from_utf8(err.await.unwrap()).unwrap();
    (status, out, err)
}

/// An exec'd process gets its container's seccomp filter, capabilities (five sets),
/// no_new_privs, user and groups: with and without no_new_privs (the filter goes in before or
/// after the capability drop), as a user other than root.
#[tokio::test]
async fn exec_gets_the_containers_seccomp_capabilities_no_new_privs_and_user() {
    let mut agent = TestAgent::start().await;
    agent.sandbox("sb-exec-confined").await;
    for (id, no_new_privileges) in [("nnp", Some(true)), ("no-nnp", None)] {
        let mut s = spec(&["sleep", "1000"]);
        s["process"]["user"] =
            serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [2000]});
        s["process"]["capabilities"] = serde_json::json!({
            "bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "inheritable": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_NET_BIND_SERVICE"]
        });
        match no_new_privileges {
            Some(nnp) => s["process"]["noNewPrivileges"] = nnp.into(),
            None => {
                s["process"]
                    .as_object_mut()
                    .unwrap()
                    .remove("noNewPrivileges");
            }
        }
        s["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        create_and_start(&mut agent, id, &s).await;
        let script = format!(
            "grep -E '{CONFINEMENT_LINES}' /proc/1/status; echo --; \
             grep -E '{CONFINEMENT_LINES}' /proc/self/status; echo --; \
             touch /dev/shm/mine && chmod 600 /dev/shm/mine && echo chmod-allowed"
        );
        let (status, out, err) =
            exec_as_container(&mut agent, id, "probe", &s, &["sh", "-c", &script]).await;
        let parts: Vec<&str> = out.split("--\n").collect();
        assert_eq!(parts.len(), 3, "{id}: {out} {err}");
        let (init, exec) = (parts[0], parts[1]);
        assert!(
            init.contains("Seccomp:\t2"),
            "{id}: the init is filtered: {init}"
        );
        assert!(init.contains("Uid:\t1000"), "{id}: {init}");
        assert_eq!(exec, init, "{id}: the exec's confinement is the init's");
        assert_ne!(status, 0, "{id}: chmod is denied in the exec: {out} {err}");
        assert!(!out.contains("chmod-allowed"), "{id}: {out}");
        assert!(err.contains("Operation not permitted"), "{id}: {err}");
        remove(&mut agent, id).await;
    }
}
