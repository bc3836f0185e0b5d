//! End-to-end tests of containerd's CRI streaming server with kata-like pods, through a real
//! client speaking what kubectl speaks (the Kubernetes channel protocol over WebSocket,
//! tests/src/streaming.rs): port-forward to a server that listens only on the guest's
//! 127.0.0.1, exec with and without a tty, resize, and attach.

// Each test holds the shared containerd's lock for its whole run (see cri_pods.rs).
#![allow(clippy::await_holding_lock)]

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kata_like_tests::containerd::BUSYBOX_IMAGE;
use kata_like_tests::cri::{self, Cri};
use kata_like_tests::pod;
use kata_like_tests::streaming::{
    channel_message, exit_code_of_status, ChannelSocket, ERROR, STDERR, STDIN, STDOUT,
};
use tokio_tungstenite::tungstenite::Message;

/// Bound on one whole streaming exchange: a hang fails the test instead of the run.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(300);
/// The guest server's port (on the guest's 127.0.0.1 only).
const SERVER_PORT: u16 = 8080;
/// Concurrent port-forward streams in one session.
const STREAMS: usize = 4;

/// busybox httpd on 127.0.0.1:8080 only, with a CGI that echoes the POST body: bytes go both
/// ways through the forward and come back exactly.
const ECHO_SERVER: &str = r#"mkdir -p /www/cgi-bin && printf '%s\n' '#!/bin/sh' 'printf "Content-Type: application/octet-stream\r\n\r\n"' 'exec head -c "$CONTENT_LENGTH"' > /www/cgi-bin/echo && chmod +x /www/cgi-bin/echo && exec httpd -f -p 127.0.0.1:8080 -h /www"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes that differ per stream and per position (a swapped or shifted chunk shows).
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + i / 251) as u8).wrapping_add(seed.wrapping_mul(97)))
        .collect()
}

/// Polls (bounded) until the container's `netstat -ltn` shows `address` listening.
async fn wait_listening(cri: &mut Cri, container: &str, address: &str) {
    for _ in 0..120 {
        let r = cri
            .exec_sync(container, &["netstat", "-ltn"], 60)
            .await
            .expect("ExecSync netstat");
        if text(&r.stdout).contains(address) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the server in {container} never listened on {address}");
}

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
async fn port_forward_reaches_localhost_server() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let (pod_id, pod_config) = pod::run_kata_pod(&mut cri, &containerd, "kata-port-forward").await;
    let server = pod::start_container(
        &mut cri,
        &pod_id,
        &pod_config,
        &cri::container_config("echo-server", BUSYBOX_IMAGE, &["sh", "-c", ECHO_SERVER]),
    )
    .await;
    wait_listening(&mut cri, &server, &format!("127.0.0.1:{SERVER_PORT}")).await;

    // STREAMS port-forward sessions at once (a URL is good for one session), each one
    // connection through the forward, each with a payload of its own.
    let payloads: Vec<Vec<u8>> = (0..STREAMS)
        .map(|i| payload(96 * 1024 + i * 4099, i as u8))
        .collect();
    let mut urls = Vec::new();
    for _ in 0..STREAMS {
        let url = cri
            .runtime
            .port_forward(cri::v1::PortForwardRequest {
                pod_sandbox_id: pod_id.clone(),
                port: vec![i32::from(SERVER_PORT)],
            })
            .await
            .expect("CRI PortForward")
            .into_inner()
            .url;
        urls.push(url);
    }
    let netns = containerd.netns_path();
    let sessions = urls
        .iter()
        .zip(&payloads)
        .map(|(url, p)| forward_session(&netns, url, p));
    let results = tokio::time::timeout(EXCHANGE_LIMIT, futures::future::join_all(sessions))
        .await
        .expect("the port-forward sessions did not end");
    let channels: HashMap<u8, Vec<u8>> = results
        .into_iter()
        .enumerate()
        .flat_map(|(i, (data, errors))| [((2 * i) as u8, data), ((2 * i + 1) as u8, errors)])
        .collect();

    for (i, sent) in payloads.iter().enumerate() {
        let data = channels.get(&((2 * i) as u8)).cloned().unwrap_or_default();
        let errors = channels
            .get(&((2 * i + 1) as u8))
            .cloned()
            .unwrap_or_default();
        // Each channel starts with its port, little endian.
        assert!(
            errors.len() >= 2 && data.len() >= 2,
            "stream {i}: no port prefix (data {} bytes, error {:?})",
            data.len(),
            text(&errors)
        );
        assert_eq!(&errors[..2], &SERVER_PORT.to_le_bytes());
        assert_eq!(&data[..2], &SERVER_PORT.to_le_bytes());
        assert!(
            errors.len() == 2,
            "stream {i}: port-forward error: {}",
            text(&errors[2..])
        );
        let response = &data[2..];
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "stream {i}: no HTTP response: {:?}",
                    text(&response[..response.len().min(200)])
                )
            });
        let head = text(&response[..split]);
        assert!(head.starts_with("HTTP/1.1 200"), "stream {i}: {head}");
        let body = &response[split + 4..];
        assert_eq!(body.len(), sent.len(), "stream {i}: echoed length");
        assert!(body == sent.as_slice(), "stream {i}: echoed bytes differ");
    }

    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

/// One port-forward session to SERVER_PORT: POSTs `payload` to the echo CGI and reads until
/// containerd closes the session; returns what the data and error channels carried.
async fn forward_session(netns: &std::path::Path, url: &str, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let socket = ChannelSocket::connect(netns, url, &format!("?port={SERVER_PORT}")).await;
    let (mut sink, mut source) = socket.split();
    let mut request = format!(
        "POST /cgi-bin/echo HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    request.extend_from_slice(payload);
    let writer = async move {
        for chunk in request.chunks(8192) {
            sink.send(channel_message(0, chunk))
                .await
                .expect("send to the port-forward stream");
        }
        sink
    };
    let reader = async move {
        let (mut data, mut errors) = (Vec::new(), Vec::new());
        while let Some(message) = source.next().await {
            match message {
                Ok(Message::Binary(frame)) => match frame.split_first() {
                    Some((0, rest)) => data.extend_from_slice(rest),
                    Some((1, rest)) => errors.extend_from_slice(rest),
                    _ => {}
                },
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        (data, errors)
    };
    let (_sink, result) = futures::join!(writer, reader);
    result
}

/// Reads until `out` (stdout, where a tty's output goes) has the answer of one `stty size`
/// past `seen`: a `ROWS COLUMNS` line, or busybox's "stty: standard input" when the terminal
/// is still 0x0 (busybox counts a zero size as an error; the resize may reach the pty after
/// the line does, so that answer only means "not yet"). Returns it and moves `seen` past it.
async fn next_size_line(socket: &mut ChannelSocket, out: &mut String, seen: &mut usize) -> String {
    loop {
        while let Some(end) = out[*seen..].find('\n') {
            let line = out[*seen..*seen + end].trim_end_matches('\r').to_string();
            *seen += end + 1;
            let numbers: Vec<&str> = line.split(' ').collect();
            if numbers.len() == 2 && numbers.iter().all(|n| n.parse::<u32>().is_ok())
                || line.starts_with("stty: ")
            {
                return line;
            }
        }
        match socket.recv().await {
            Some((STDOUT, data)) => out.push_str(&text(&data)),
            Some((ERROR, status)) if !status.is_empty() => {
                panic!("the tty exec ended early: {}\noutput: {out}", text(&status))
            }
            Some(_) => {}
            None => panic!("the tty exec's session closed; output: {out}"),
        }
    }
}

/// Sends a resize, then a line to the shell (which prints `stty size` for each line), until
/// the new size shows: the resize travels a path of its own (ResizePty), so the first line may
/// still see the old size. Bounded.
async fn resize_until_seen(
    socket: &mut ChannelSocket,
    out: &mut String,
    seen: &mut usize,
    columns: u16,
    rows: u16,
) {
    socket.resize(columns, rows).await;
    let want = format!("{rows} {columns}");
    let mut last = String::new();
    for _ in 0..50 {
        socket.send(STDIN, b"s\n").await;
        last = next_size_line(socket, out, seen).await;
        if last == want {
            return;
        }
    }
    panic!("after a resize to {columns}x{rows}, stty size still says {last:?}; output: {out}");
}

/// Reads a non-tty exec or attach session until its status; returns (stdout, stderr, exit).
async fn read_to_status(socket: &mut ChannelSocket) -> (String, String, i32) {
    let (mut out, mut err) = (String::new(), String::new());
    loop {
        match socket.recv().await {
            Some((STDOUT, data)) => out.push_str(&text(&data)),
            Some((STDERR, data)) => err.push_str(&text(&data)),
            Some((ERROR, status)) if !status.is_empty() => {
                return (out, err, exit_code_of_status(&status))
            }
            Some(_) => {}
            None => panic!("the session closed without a status; stdout {out:?} stderr {err:?}"),
        }
    }
}

async fn exec_url(cri: &mut Cri, container: &str, cmd: &[&str], tty: bool, stdin: bool) -> String {
    cri.runtime
        .exec(cri::v1::ExecRequest {
            container_id: container.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })
        .await
        .expect("CRI Exec")
        .into_inner()
        .url
}

/// Lists the container's processes with their state and kernel wait channel.
const GUEST_PROCESSES: &str = r#"for p in /proc/[0-9]*; do echo "${p#/proc/} $(cut -d' ' -f3 $p/stat) $(cat $p/wchan) $(tr '\0' ' ' < $p/cmdline)"; done"#;

#[tokio::test]
#[ignore = "needs a Linux-capable KVM: run through tests/run-e2e"]
async fn exec_tty_and_attach_through_streaming() {
    let (containerd, kata, mut cri) = pod::clean_node().await;
    let netns = containerd.netns_path();
    let (pod_id, pod_config) = pod::run_kata_pod(&mut cri, &containerd, "kata-streaming").await;
    // A container with stdin open that answers each line on stdout and on stderr (attach).
    let mut echoer = cri::container_config(
        "echoer",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            r#"while read -r l; do echo "got:$l"; echo "err:$l" >&2; done"#,
        ],
    );
    echoer.stdin = true;
    let c = pod::start_container(&mut cri, &pod_id, &pod_config, &echoer).await;

    // Which exchange runs, for the message when one hangs.
    let stage = std::cell::Cell::new("tty exec");
    let exchanges = tokio::time::timeout(EXCHANGE_LIMIT, async {
        // exec with a tty: output, resizes seen by `stty size`, the exit code on the error
        // channel.
        let url = exec_url(
            &mut cri,
            &c,
            &[
                "sh",
                "-c",
                r#"echo tty-ready; while read -r l; do stty size; [ "$l" = q ] && exit 5; done"#,
            ],
            true,
            true,
        )
        .await;
        let mut socket = ChannelSocket::connect(&netns, &url, "").await;
        let (mut out, mut seen) = (String::new(), 0usize);
        resize_until_seen(&mut socket, &mut out, &mut seen, 123, 45).await;
        resize_until_seen(&mut socket, &mut out, &mut seen, 77, 22).await;
        assert!(out.contains("tty-ready"), "tty output: {out}");
        socket.send(STDIN, b"q\n").await;
        let exit = loop {
            match socket.recv().await {
                Some((STDOUT, data)) => out.push_str(&text(&data)),
                Some((ERROR, status)) if !status.is_empty() => break exit_code_of_status(&status),
                Some(_) => {}
                None => panic!("the tty exec closed without a status; output: {out}"),
            }
        };
        assert_eq!(exit, 5, "tty exec exit code; output: {out}");
        socket.close().await;

        stage.set("exec without a tty");
        // exec without a tty: stdin in, stdout and stderr apart, the exit code.
        let url = exec_url(
            &mut cri,
            &c,
            &[
                "sh",
                "-c",
                r#"read -r l; echo "out:$l"; echo "err:$l" >&2; exit 3"#,
            ],
            false,
            true,
        )
        .await;
        let mut socket = ChannelSocket::connect(&netns, &url, "").await;
        socket.send(STDIN, b"hello\n").await;
        let (stdout, stderr, exit) = read_to_status(&mut socket).await;
        assert_eq!(
            (stdout.as_str(), stderr.as_str(), exit),
            ("out:hello\n", "err:hello\n", 3)
        );
        socket.close().await;

        stage.set("successful exec");
        // A successful exec reports Success.
        let url = exec_url(&mut cri, &c, &["echo", "fine"], false, false).await;
        let mut socket = ChannelSocket::connect(&netns, &url, "").await;
        let (stdout, stderr, exit) = read_to_status(&mut socket).await;
        assert_eq!((stdout.as_str(), stderr.as_str(), exit), ("fine\n", "", 0));
        socket.close().await;

        stage.set("attach");
        // attach to the running container's stdio.
        let url = cri
            .runtime
            .attach(cri::v1::AttachRequest {
                container_id: c.clone(),
                stdin: true,
                tty: false,
                stdout: true,
                stderr: true,
            })
            .await
            .expect("CRI Attach")
            .into_inner()
            .url;
        let mut socket = ChannelSocket::connect(&netns, &url, "").await;
        socket.send(STDIN, b"ping\n").await;
        let (mut out, mut err) = (String::new(), String::new());
        while !(out.contains("got:ping\n") && err.contains("err:ping\n")) {
            match socket.recv().await {
                Some((STDOUT, data)) => out.push_str(&text(&data)),
                Some((STDERR, data)) => err.push_str(&text(&data)),
                Some((ERROR, status)) if !status.is_empty() => {
                    panic!(
                        "attach ended: {}; stdout {out:?} stderr {err:?}",
                        text(&status)
                    )
                }
                Some(_) => {}
                None => panic!("attach closed; stdout {out:?} stderr {err:?}"),
            }
        }
        socket.close().await;
    })
    .await;
    if exchanges.is_err() {
        // What the container's processes are doing (does the agent still answer at all?).
        let listing = tokio::time::timeout(
            Duration::from_secs(90),
            cri.exec_sync(&c, &["sh", "-c", GUEST_PROCESSES], 60),
        )
        .await;
        let listing = match listing {
            Ok(Ok(r)) => format!("{}{}", text(&r.stdout), text(&r.stderr)),
            Ok(Err(e)) => format!("ExecSync failed: {e}"),
            Err(_) => "ExecSync did not answer within 90 s".to_string(),
        };
        panic!(
            "a streaming session hung (the {} exchange, {EXCHANGE_LIMIT:?}); the container's \
             processes:\n{listing}\nthe node:\n{}",
            stage.get(),
            containerd.pod_diagnostics()
        );
    }

    // Detaching left the container running.
    assert_eq!(
        cri.container_status(&c).await.state,
        cri::CONTAINER_RUNNING,
        "the attached container must still run after the client detached"
    );
    cri.teardown_pod(&pod_id).await;
    containerd.assert_no_leftovers(&kata);
}

#[test]
fn payloads_differ_per_stream() {
    assert_ne!(payload(1000, 0), payload(1000, 1));
    assert_eq!(payload(1000, 2).len(), 1000);
}
