//! Our guest kernel and initramfs boot in our VMM to our agent as /init, which answers the
//! shim-agent protocol over the VMM's hybrid vsock socket and powers the VM off on request.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kata_like_protocol::agent_client::AgentClient;
use kata_like_protocol::{
    Empty, HealthRequest, SetTimeRequest, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};
use kata_like_tests::artifact;
use kata_like_tests::console::ConsoleLines;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

/// What the agent prints on the console once it serves requests.
const AGENT_READY: &str = "kata-like-agent: ready";
/// Stops a hung guest from hanging the suite; not a performance bound (TCG is slow).
const GUARD: Duration = Duration::from_secs(300);

/// Host-initiated hybrid vsock connection: `CONNECT <port>\n`, then `OK <hostport>\n`.
async fn connect_vsock(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply).await?;
    if !reply.starts_with("OK ") {
        return Err(std::io::Error::other(format!("vsock handshake: {reply:?}")));
    }
    // The reply line was the only thing the VMM sent; nothing is left buffered.
    Ok(reader.into_inner())
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kata-like-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("jail")).expect("jail dir");
    dir
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/e2e"]
async fn agent_boots_as_init_in_our_jailed_vmm_and_answers_over_vsock() {
    let kernel = artifact("KATA_LIKE_KERNEL");
    let initrd = artifact("KATA_LIKE_INITRD");
    let vmm = artifact("KATA_LIKE_VMM");
    let dir = tmp_dir("guest-boot");
    let uds = dir.join("jail/vsock.sock");
    let mut child = Command::new(&vmm)
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 reboot=t panic=-1 quiet"])
        .args(["--memory-mib", "128", "--console", "stdout"])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--jail-dir")
        .arg(dir.join("jail"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the VMM starts");
    let mut console = ConsoleLines::new(child.stdout.take().expect("piped stdout"));

    let ready = console.wait_for(AGENT_READY, GUARD);
    let Some(ready) = ready else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the agent never reported ready; console:\n{}",
            console.dump()
        );
    };
    println!("guest boot: {ready}");

    // The agent's gRPC server through the hybrid vsock socket, as the shim reaches it.
    let stream = guarded("CONNECT", connect_vsock(&uds, AGENT_VSOCK_PORT))
        .await
        .expect("CONNECT to the agent's port");
    let slot = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            async move {
                taken
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection only"))
            }
        }))
        .await
        .expect("HTTP/2 over the vsock stream");
    let mut agent = AgentClient::new(channel);
    // The shim's first call on every pod VM: the guest takes the host's wall clock.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    guarded(
        "SetTime",
        agent.set_time(SetTimeRequest {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos(),
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("SetTime: {e}; console:\n{}", console.dump()));
    let health = guarded("Health", agent.health(HealthRequest {}))
        .await
        .expect("Health")
        .into_inner();
    assert_eq!(health.protocol_version, PROTOCOL_VERSION);
    assert!(!health.agent_version.is_empty());
    assert!(health.uptime_ms > 0);

    // A clean shutdown through the agent ends the VMM with the guest's status 0.
    guarded("Shutdown", agent.shutdown(Empty {}))
        .await
        .expect("Shutdown");
    let status = wait_with_guard(&mut child, GUARD);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "VMM exit after Shutdown; console:\n{}",
        console.dump()
    );
}

/// Fails the test (instead of hanging it) when a step against the guest never completes.
async fn guarded<T>(step: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(GUARD, future).await {
        Ok(value) => value,
        Err(_) => panic!("{step} did not complete within {GUARD:?}"),
    }
}

fn wait_with_guard(
    child: &mut std::process::Child,
    guard: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + guard;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
