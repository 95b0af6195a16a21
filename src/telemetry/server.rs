//! `/livez`, `/readyz` and `/metrics` over plain HTTP/1.1 (inside the pod network; the
//! endpoints expose no secret), and the `probe` exec helper.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Telemetry;

type Refresh = Arc<dyn Fn() + Send + Sync>;

/// Binds the probe listener and serves in a task; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    refresh: Refresh,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/livez", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state((telemetry, refresh));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(event = "telemetry.server_failed", error = %e, "probe server stopped");
        }
    });
    Ok(local)
}

async fn readyz(State((t, _)): State<(Arc<Telemetry>, Refresh)>) -> impl IntoResponse {
    let body = format!("{}\n", t.state());
    if t.is_ready() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn metrics(State((t, refresh)): State<(Arc<Telemetry>, Refresh)>) -> impl IntoResponse {
    refresh();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        t.metrics.encode(),
    )
}

/// `sandbox-supervisor probe live|ready`: a minimal HTTP GET, so images without curl
/// can use exec probes. Returns the HTTP status line on success.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.lines().next().unwrap_or_default().to_owned();
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned();
        if status.split(' ').nth(1) == Some("200") {
            Ok(format!("{status} {body}"))
        } else {
            Err(format!("{path}: {status} {body}"))
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{path}: no answer from {addr} within {timeout:?}"))?
}
