//! Issue 14's figures: the file channel and TCP forwards, each beside a local baseline
//! measured in the same run on the same machine.

use crate::common::*;
use crate::{ms, pct, Row};
use bytes::Bytes;
use sandbox_supervisor::gateway::WriteOptions;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn gibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / (1u64 << 30) as f64
}

fn verdict(ratio: f64) -> &'static str {
    if ratio >= 0.5 {
        "met"
    } else {
        "not met"
    }
}

/// Deterministic incompressible bytes (xorshift64), without a crate.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_sh(script: &str) -> f64 {
    let t = Instant::now();
    let st = Command::new("sh").args(["-c", script]).status().unwrap();
    assert!(st.success(), "{script}: {st}");
    t.elapsed().as_secs_f64()
}

/// Upload of `mib` MiB through `write_file` (atomic: temp file, fsync, rename) vs
/// `dd conv=fsync` of the same bytes from a file into the same volume directory;
/// download through `read_file_to` into a file on the same volume vs `cat` of the same
/// file into a file there (issue 14's baseline: the same bytes, page cache to page cache).
pub async fn files(launch: Launch, mib: u64) -> Vec<Row> {
    let env = Env::new("benchfiles").await;
    let (_sup, sandbox) = env.bound(launch).await;
    let bytes = mib << 20;
    let data = Bytes::from(pseudo_random(bytes as usize));
    let vol = env.volume().join("workspace");
    let src = vol.join("src.bin");
    std::fs::write(&src, &data).unwrap();

    // Baseline first, so the page cache holds the source for it as it holds `data` for us.
    let base_up = run_sh(&format!(
        "dd if={} of={} bs=1M conv=fsync status=none",
        src.display(),
        vol.join("dd.bin").display()
    ));
    let t = Instant::now();
    sandbox
        .write_file("up.bin", data.clone(), WriteOptions::default())
        .await
        .unwrap();
    let ours_up = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::metadata(vol.join("up.bin")).unwrap().len(), bytes);

    // Alternated three times, `sync` (untimed) between runs so neither pays for the
    // other's writeback; medians.
    let down = vol.join("down.bin");
    let (mut base_runs, mut ours_runs) = (vec![], vec![]);
    for _ in 0..3 {
        base_runs.push(run_sh(&format!(
            "cat {} > {}",
            vol.join("up.bin").display(),
            vol.join("cat.bin").display()
        )));
        let _ = std::fs::remove_file(vol.join("cat.bin"));
        run_sh("sync");
        let mut sink = std::fs::File::create(&down).unwrap();
        let t = Instant::now();
        let n = sandbox.read_file_to("up.bin", &mut sink).await.unwrap();
        ours_runs.push(t.elapsed().as_secs_f64());
        drop(sink);
        assert_eq!(n, bytes);
        run_sh("sync");
    }
    assert!(
        std::fs::read(&down).unwrap() == data[..],
        "download differs from the upload"
    );
    let (base_down, ours_down) = (median(&mut base_runs), median(&mut ours_runs));
    for f in ["src.bin", "dd.bin", "up.bin", "down.bin"] {
        let _ = std::fs::remove_file(vol.join(f));
    }

    let row = |what: String, base: &str, b: f64, o: f64| {
        let (b, o) = (gibs(bytes, b), gibs(bytes, o));
        Row {
            what,
            baseline: format!("{base} {b:.2} GiB/s"),
            ours: format!("{o:.2} GiB/s"),
            ratio: format!("{:.0}%", 100.0 * o / b),
            target: "≥ 50 %".into(),
            verdict: verdict(o / b),
        }
    };
    vec![
        row(
            format!("files: upload {mib} MiB (write_file, fsync'd)"),
            "dd conv=fsync file → file",
            base_up,
            ours_up,
        ),
        row(
            format!("files: download {mib} MiB (read_file_to a file)"),
            "cat file > file",
            base_down,
            ours_down,
        ),
    ]
}

/// A TCP sink in the sandbox: each connection is read to EOF, answered `ok`, closed.
const SINK: &str = r#"import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    try:
        while c.recv_into(buf):
            pass
        c.sendall(b"ok")
    except OSError:
        pass
    c.close()
"#;

/// `mib` MiB through one forward into a python3 sink in the sandbox vs the same bytes
/// over a direct loopback connection to the same sink; connect latency (forward() up to
/// `Connected`) vs a direct loopback connect, medians over `n`.
pub async fn forward(launch: Launch, mib: u64, n: usize) -> Vec<Row> {
    let env = Env::new("benchfwd").await;
    let (_sup, sandbox) = env.bound(launch).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = sandbox
        .exec(spec(&["python3", "-c", SINK, &port.to_string()]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the python3 sink did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chunk = Bytes::from(pseudo_random(1 << 20));
    let bytes = mib << 20;

    let t = Instant::now();
    let mut direct = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    for _ in 0..mib {
        direct.write_all(&chunk).await.unwrap();
    }
    direct.shutdown().await.unwrap();
    let mut reply = vec![];
    direct.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"ok");
    let base_tp = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let (mut r, mut w) = sandbox.forward("", port as u32).await.unwrap().split();
    for _ in 0..mib {
        w.write(chunk.clone()).await.unwrap();
    }
    w.eof().await.unwrap();
    drop(w);
    assert_eq!(r.read_to_end().await.unwrap(), b"ok");
    let ours_tp = t.elapsed().as_secs_f64();

    let (mut base_c, mut ours_c) = (vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        let c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        base_c.push(t.elapsed().as_secs_f64());
        drop(c);
        let t = Instant::now();
        let conn = sandbox.forward("", port as u32).await.unwrap();
        ours_c.push(t.elapsed().as_secs_f64());
        conn.writer.reset().await;
    }
    drop(server);

    let (b, o) = (gibs(bytes, base_tp), gibs(bytes, ours_tp));
    let (b50, o50) = (pct(&mut base_c, 0.5), pct(&mut ours_c, 0.5));
    let (b99, o99) = (pct(&mut base_c, 0.99), pct(&mut ours_c, 0.99));
    vec![
        Row {
            what: format!("forward: {mib} MiB into a python3 sink in the sandbox"),
            baseline: format!("direct loopback {b:.2} GiB/s"),
            ours: format!("{o:.2} GiB/s"),
            ratio: format!("{:.0}%", 100.0 * o / b),
            target: "≥ 50 %".into(),
            verdict: verdict(o / b),
        },
        Row {
            what: format!("forward: connect latency (n={n})"),
            baseline: format!("direct connect p50 {} / p99 {}", ms(b50), ms(b99)),
            ours: format!("forward()+Connected p50 {} / p99 {}", ms(o50), ms(o99)),
            ratio: format!("{:.1}× (overhead p50 {})", o50 / b50, ms(o50 - b50)),
            target: "reported".into(),
            verdict: "-",
        },
    ]
}
