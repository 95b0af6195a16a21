//! Probes and metrics across the lifecycle, through the real binary: readiness is never
//! claimed while seeding, binding, releasing or refused; a scrape parses as Prometheus
//! text and reports what happened; probe endpoints expose no secret.

mod common;

use common::*;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// (state, ready) as seen by each /readyz poll.
type Seen = Arc<Mutex<Vec<(String, bool)>>>;

/// Polls /readyz every few ms in the background.
fn watch_readiness(port: u16) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Some((code, body)) = get(port, "/readyz").await {
                s.lock()
                    .unwrap()
                    .push((body.trim().to_owned(), code == 200));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_lifecycle_and_metrics_parse() {
    let env = Env::new("obs").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let launch = launch();
    let (seen, watcher) = watch_readiness(port);
    let (mut sup, sandbox) = env.bound_with(launch, &["--listen-probes", &listen]).await;
    // `Accepted` reaches the gateway before the binding record is durable (the two
    // overlap, PROTOCOL.md 4.1); the pod reports ready only once both hold.
    common::identity::wait_readyz(port, 200, Duration::from_secs(5))
        .await
        .unwrap_or_else(|last| {
            panic!("never ready after Accepted (last {last:?})\n{}", sup.logs())
        });

    // Liveness and the exec-probe helper.
    assert_eq!(get(port, "/livez").await.map(|r| r.0), Some(200));
    let probe = std::process::Command::new(BIN)
        .args(["probe", "ready", "--addr", &listen])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let probe = std::process::Command::new(BIN)
        .args(["probe", "live", "--addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(probe.status.code(), Some(1), "a probe of nothing must fail");
    assert!(String::from_utf8_lossy(&probe.stderr).contains("cannot connect"));

    let out = sandbox
        .exec(sh("printf abc; printf de >&2"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"abc");
    let _ = sandbox.exec(spec(&["no-such-binary"])).await;

    let (code, text) = get(port, "/metrics").await.expect("scrape");
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).expect("metrics must parse as Prometheus text");
    let value = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("sandbox_supervisor_state", Some(("state", "bound"))),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("sandbox_supervisor_state", Some(("state", "warm"))),
        Some(0.0),
        "{text}"
    );
    assert!(
        value(
            "sandbox_supervisor_sessions_total",
            Some(("outcome", "exited"))
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        value(
            "sandbox_supervisor_sessions_total",
            Some(("outcome", "failed"))
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        value(
            "sandbox_supervisor_output_bytes_total",
            Some(("stream", "stdout"))
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{text}"
    );
    assert!(
        value("sandbox_supervisor_seed_duration_seconds", None).unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        value("sandbox_supervisor_reaped_processes_total", None).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("sandbox_supervisor_bind_duration_seconds_count 1"),
        "{text}"
    );
    assert!(!text.contains("eyJ"), "metrics must not expose tokens");

    sandbox
        .release("done", Duration::from_secs(1), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        sup.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        sup.logs()
    );
    watcher.abort();

    let seen = seen.lock().unwrap().clone();
    for (state, ready) in &seen {
        let may_be_ready = matches!(state.as_str(), "warm" | "bound");
        assert!(!*ready || may_be_ready, "ready while {state}: {seen:?}");
    }
    assert!(
        seen.iter().any(|(s, r)| s == "bound" && *r),
        "never observed ready+bound"
    );
    assert!(
        seen.iter().any(|(s, r)| s == "releasing" && !*r)
            || seen.iter().all(|(s, _)| s != "releasing")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_supervisor_is_never_ready_and_exits_65() {
    let env = Env::new("obsref").await;
    // A tombstone from an earlier tenant: the pod must never be handed out again.
    let launch = launch();
    let (mut sup, sandbox) = env.bound(launch).await;
    sandbox
        .release(
            "first tenant done",
            Duration::from_secs(1),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(sup.wait_exit(Duration::from_secs(20)), Some(0));

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (seen, watcher) = watch_readiness(port);
    let mut again = env.spawn(launch, &["--listen-probes", &listen]);
    assert_eq!(
        again.wait_exit(Duration::from_secs(20)),
        Some(65),
        "{}",
        again.logs()
    );
    watcher.abort();
    assert!(seen.lock().unwrap().iter().all(|(_, ready)| !ready));
    let refused = again
        .events()
        .into_iter()
        .find(|e| e["event"] == "reuse.refused")
        .expect("reuse.refused logged");
    assert_eq!(refused["reason"], "tombstone", "{refused}");
    assert!(
        !again.has_event("identity.parked"),
        "a refused supervisor must never register"
    );
}
