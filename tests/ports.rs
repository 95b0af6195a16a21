//! Port forwards (issue 14): TCP connections into the sandbox through the real relay,
//! the real binary as PID 1 and the reference gateway. Servers in the sandbox run as
//! sessions (python3); the supervisor shares this machine's loopback (no network
//! namespace), so a listener of the test itself also stands in for a sandbox server.

mod common;

use common::*;
use sandbox_supervisor::gateway::{ForwardConn, Sandbox};
use sandbox_supervisor::proto::ErrorCode;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn have_python() -> bool {
    std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens a forward to `port`, retrying while nothing listens yet (the server starts).
async fn forward_when_up(sandbox: &Sandbox, port: u16) -> ForwardConn {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sandbox.forward("", port as u32).await {
            Ok(c) => return c,
            Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                assert!(e.message.contains("connection refused"), "{}", e.message);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("forward to {port}: {e:?}"),
        }
    }
}

/// An HTTP GET through a forward: request, half-close, the whole reply.
async fn get(sandbox: &Sandbox, port: u16, path: &str) -> Vec<u8> {
    let conn = sandbox.forward("127.0.0.1", port as u32).await.unwrap();
    assert_eq!(conn.peer, format!("127.0.0.1:{port}"));
    let (mut r, mut w) = conn.split();
    w.write(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").into_bytes())
        .await
        .unwrap();
    w.eof().await.unwrap();
    drop(w);
    let reply = r.read_to_end().await.unwrap();
    let at = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    assert!(
        reply.starts_with(b"HTTP/1.0 200"),
        "{:?}",
        String::from_utf8_lossy(&reply[..at])
    );
    reply[at + 4..].to_vec()
}

/// 100 concurrent GETs of a random file, each byte-verified, while sessions keep
/// running; then `local`-style serving through a loopback listener of this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_in_the_sandbox_100_concurrent_connections_byte_verified() {
    require!(have_python(), "python3 is not installed");
    let env = Env::new("fwd-http").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let port = free_port();
    // http.server with a listen backlog for 100 at once (its default of 5 overflows,
    // and the kernel's SYN cookies then reset connections the client thinks are up).
    let script = format!(
        "head -c 300000 /dev/urandom > blob && sha256sum blob && exec python3 -c \"import http.server as h; h.ThreadingHTTPServer.request_queue_size = 256; h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()\""
    );
    let mut server = sandbox.exec(sh(&script)).await.unwrap();
    let mut out = Vec::new();
    while !out.contains(&b'\n') {
        match server.next().await {
            Some(sandbox_supervisor::gateway::ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(sandbox_supervisor::gateway::ExecEvent::Stderr(_)) => {}
            other => panic!("server ended: {other:?}\n{}", sup.logs()),
        }
    }
    let want = String::from_utf8_lossy(&out)[..64].to_string();
    drop(forward_when_up(&sandbox, port).await);

    let mut tasks = Vec::new();
    for _ in 0..100 {
        let sb = sandbox.clone();
        tasks.push(tokio::spawn(async move { get(&sb, port, "/blob").await }));
    }
    // Sessions keep working while the forwards run.
    let echo = sandbox
        .exec(sh("echo still-serving"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(echo.stdout, b"still-serving\n");
    for t in tasks {
        let body = t.await.unwrap();
        assert_eq!(body.len(), 300000);
        assert_eq!(hex(&Sha256::digest(&body)), want);
    }

    // Through a listener on this machine, as `local --forward` serves it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let sb = sandbox.clone();
    let serving =
        tokio::spawn(async move { sb.serve_forward(listener, String::new(), port as u32).await });
    let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
    c.write_all(b"GET /blob HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).await.unwrap();
    let at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert_eq!(hex(&Sha256::digest(&reply[at + 4..])), want);
    serving.abort();

    let logs = sup.logs();
    assert!(
        logs.contains("forward.opened") && logs.contains("forward.closed"),
        "{logs}"
    );
    assert!(logs.contains("\"outcome\":\"completed\""), "{logs}");
}

/// Half-close both ways: the client sends, shuts down and still reads the whole reply
/// (the GET test); here the server shuts down first and the client can still send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_server_first_then_client_keeps_sending() {
    require!(have_python(), "python3 is not installed");
    let env = Env::new("fwd-half").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let port = free_port();
    let py = format!(
        r#"
import socket, hashlib, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {port})); s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"server-done-first")
    c.shutdown(socket.SHUT_WR)
    h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(65536)
        if not d: break
        h.update(d); n += len(d)
    c.close()
    print(n, h.hexdigest(), flush=True)
    break
"#
    );
    let server = sandbox
        .exec(sh(&format!(
            "cat > half.py <<'EOF'\n{py}\nEOF\nexec python3 half.py"
        )))
        .await
        .unwrap();
    let conn = forward_when_up(&sandbox, port).await;
    let (mut r, mut w) = conn.split();
    // The server's side is shut down: its bytes, then eof.
    let first = r.read_to_end().await.unwrap();
    assert_eq!(first, b"server-done-first");
    // ...and ours still carries 3 MiB after that.
    let payload: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
    w.write(payload.clone()).await.unwrap();
    w.eof().await.unwrap();
    let out = server.collect().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        text.trim(),
        format!("{} {}", payload.len(), hex(&Sha256::digest(&payload))),
        "{}",
        sup.logs()
    );
    drop((r, w));
    // Both directions done: the forward ends cleanly.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sup.logs().contains("\"outcome\":\"completed\"") {
        assert!(Instant::now() < deadline, "no clean end\n{}", sup.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A 64 MiB transfer to a slow reader completes, and the supervisor does not buffer
/// it: its RSS stays far below the transfer (the server is paced by the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_slow_reader_bounded_supervisor_memory() {
    let env = Env::new("fwd-bp").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    const TOTAL: usize = 64 << 20;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..TOTAL >> 20 {
            s.write_all(&chunk).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let pid = sup.host_pid();
    let before = vm_rss_kib(pid);
    let conn = sandbox.forward("", port as u32).await.unwrap();
    let (mut r, _w) = conn.split();
    let mut got = 0usize;
    let mut peak = before;
    let mut frames = 0u64;
    while let Some(d) = r.read().await.unwrap() {
        assert!(d.iter().all(|b| *b == 0x5a));
        got += d.len();
        frames += 1;
        if frames % 16 == 0 {
            peak = peak.max(vm_rss_kib(pid));
            // A slow reader: ~64 MiB in several seconds.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    server.await.unwrap();
    assert_eq!(got, TOTAL);
    let grew = peak.saturating_sub(before);
    eprintln!(
        "supervisor VmRSS before {before} KiB, peak {peak} KiB (+{grew} KiB) for a {} MiB transfer",
        TOTAL >> 20
    );
    assert!(
        grew < 24 * 1024,
        "supervisor RSS grew by {grew} KiB: the forward buffered instead of pacing the server"
    );
}

/// The errors a gateway sees, each with its code and a message naming the problem,
/// and the `--max-forwards` limit; the supervisor keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_disallowed_address_invalid_port_and_limit() {
    let env = Env::new("fwd-err").await;
    let (sup, sandbox) = env.bound_with(launch(), &["--max-forwards", "2"]).await;
    let closed = free_port();
    let e = sandbox.forward("", closed as u32).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert_eq!(
        e.message,
        format!("connection refused by 127.0.0.1:{closed}: nothing listens there; start the server first")
    );
    for host in ["10.1.2.3", "0.0.0.0", "192.168.0.1"] {
        let e = sandbox.forward(host, 80).await.err().unwrap();
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
        assert!(
            e.message.contains("--forward-allow") && e.message.contains(host),
            "{e:?}"
        );
    }
    for port in [0u32, 65536, 100_000] {
        let e = sandbox.forward("", port).await.err().unwrap();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
        assert!(e.message.contains(&port.to_string()), "{e:?}");
    }
    let e = sandbox.forward("example.com", 80).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");

    // Two open at once is the limit; the third gets no stream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port() as u32;
    let a = sandbox.forward("", port).await.unwrap();
    let b = sandbox.forward("", port).await.unwrap();
    let e = sandbox.forward("", port).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}");
    assert!(e.message.contains("--max-forwards"), "{e:?}");
    drop((a, b));
    // Closing frees the slots.
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match sandbox.forward("", port).await {
            Ok(c) => break c,
            Err(e) if e.code == ErrorCode::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}\n{}", sup.logs()),
        }
    };
    drop(c);
    let echo = sandbox
        .exec(sh("echo ok"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(echo.stdout, b"ok\n");
    assert!(sup.logs().contains("forward.refused"));
}

/// `--forward-allow` lets a listed non-loopback address through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_allow_admits_a_listed_address() {
    // This machine's address on its default route, if it has one.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let ip = match probe
        .connect("10.255.255.1:9")
        .ok()
        .and_then(|_| probe.local_addr().ok())
    {
        Some(a) if !a.ip().is_loopback() && !a.ip().is_unspecified() => a.ip(),
        _ => {
            eprintln!("skipped: no non-loopback address here");
            return;
        }
    };
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let env = Env::new("fwd-allow").await;
    let allow = format!("{ip}/32");
    let (_sup, sandbox) = env.bound_with(launch(), &["--forward-allow", &allow]).await;
    let accept = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hi").await.unwrap();
    });
    let conn = sandbox.forward(&ip.to_string(), port as u32).await.unwrap();
    assert_eq!(conn.peer, format!("{ip}:{port}"));
    let (mut r, _w) = conn.split();
    assert_eq!(r.read_to_end().await.unwrap(), b"hi");
    accept.await.unwrap();
    // Another port of a listed address is fine too; an unlisted address is not.
    let e = sandbox.forward("10.1.2.3", 80).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::PermissionDenied);
}

/// Release closes open forwards before the workload dies: the gateway's reader gets
/// UNAVAILABLE (or the stream's end), the server's connection is closed, and release
/// still wipes and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_close_at_release() {
    let env = Env::new("fwd-rel").await;
    let (mut sup, sandbox) = env.bound(launch()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port() as u32;
    let conn = sandbox.forward("", port).await.unwrap();
    let (mut server_side, _) = listener.accept().await.unwrap();
    let (mut r, w) = conn.split();
    let reading = tokio::spawn(async move { r.read().await });
    let report = sup
        .release_via(
            &sandbox,
            "test",
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await;
    assert!(report.error.is_empty(), "{report:?}");
    let got = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .unwrap()
        .unwrap();
    let e = got.expect_err("the forward must end with an error at release");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), server_side.read(&mut buf))
        .await
        .expect("the server's connection was not closed at release")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(w);
    assert!(
        sup.logs().contains("\"outcome\":\"released\""),
        "{}",
        sup.logs()
    );
}

/// `local --forward PORT:LOCALPORT -- <server>`: the sandbox's server answers on this
/// machine's loopback while the command runs.
#[test]
fn local_forward_serves_the_sandbox_server_on_this_machine() {
    require!(have_python(), "python3 is not installed");
    let (inner, outer) = (free_port(), free_port());
    let dir = TempDir::new("fwd-local");
    let mut child = std::process::Command::new(BIN)
        .args(["local", "--plaintext", "--forward", &format!("{inner}:{outer}"), "--"])
        .args(["sh", "-c", &format!("echo forwarded-ok > hello.txt; timeout 15 python3 -m http.server {inner} --bind 127.0.0.1")])
        .env("TMPDIR", &dir.0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        use std::io::{Read, Write};
        if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", outer)) {
            let _ = c.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n");
            let mut r = Vec::new();
            let _ = c.read_to_end(&mut r);
            if r.starts_with(b"HTTP/1.0 200") {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no reply through local --forward"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        body.ends_with(b"forwarded-ok\n"),
        "{:?}",
        String::from_utf8_lossy(&body)
    );
}
