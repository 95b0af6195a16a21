//! One forward: its `Forward` stream, the TCP connect, and the relay both ways.
//!
//! Frames up, in order: `ForwardAttach`, then `ForwardConnected` (or `Error`, last),
//! then `data`/`ForwardEof` as the server sends, and at most one `Error` (last). The
//! up side ends cleanly once both directions are done (the server's EOF was sent and
//! the gateway's `ForwardEof` applied).
//!
//! Backpressure: socket reads wait for room in a small queue that hyper drains only as
//! the stream's HTTP/2 window allows (a slow gateway stops our reads, so the server's
//! writes block); frames down are read only as fast as the server takes the bytes (a
//! slow server stops us reading the stream, so the gateway's window closes).

use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::ForwardConfig;
use crate::proto::{self, forward_down, forward_up, ErrorCode, ForwardDown, ForwardUp};
use crate::relay::Opener;
use crate::telemetry::forwards::ForwardMetrics;

/// Largest `data` frame up.
const CHUNK: usize = 256 * 1024;
/// Below this much free buffer a fresh `CHUNK` is reserved before reading.
const MIN_READ: usize = 16 * 1024;
/// Frames queued up ahead of hyper (with `CHUNK`, at most ~1 MiB per forward).
const UP_QUEUE: usize = 4;
/// How long a finished forward waits for the gateway to end its side.
const END_WAIT: Duration = Duration::from_secs(5);
/// As [`END_WAIT`] when the supervisor ended the forward (release, a broken socket).
const ABORT_WAIT: Duration = Duration::from_secs(1);

fn up(msg: forward_up::Msg) -> ForwardUp {
    ForwardUp { msg: Some(msg) }
}

fn error_frame(code: ErrorCode, message: String) -> ForwardUp {
    up(forward_up::Msg::Error(proto::Error {
        code: code as i32,
        message,
    }))
}

/// Bytes moved by one forward, for its `forward.closed` event.
#[derive(Default)]
struct Counts {
    to_sandbox: AtomicU64,
    from_sandbox: AtomicU64,
}

/// How the gateway's side of the stream ended.
enum DownEnd {
    /// The gateway answered the call itself with an error: no stream.
    Refused(Status),
    /// The gateway ended its side.
    Ended,
    /// The stream broke or was reset.
    Reset(Status),
    /// Writing to the server failed.
    WriteFailed(std::io::Error),
    /// The gateway broke the frame order (data after its eof).
    Protocol(String),
}

/// Serves one forward until both sides are done; never panics, never blocks a thread.
pub(super) async fn serve(
    req: proto::OpenForward,
    opener: Opener,
    cfg: &ForwardConfig,
    mut closing: watch::Receiver<bool>,
    slot: super::Slot,
) {
    let id = req.forward_id.clone();
    let metrics = &opener.telemetry.metrics.forwards;
    let (tx, rx) = mpsc::channel::<ForwardUp>(UP_QUEUE);
    let attach = up(forward_up::Msg::Attach(proto::ForwardAttach {
        forward_id: id.clone(),
    }));
    let _ = tx.try_send(attach);
    let request = match crate::relay::authed(ReceiverStream::new(rx), &opener.creds.token()) {
        Ok(r) => r,
        Err(e) => {
            metrics.ended("rejected");
            opener
                .refuse(&id, ErrorCode::Unavailable, format!("no stream: {e}"))
                .await;
            return;
        }
    };
    // Frames go up as soon as the request is out (hyper drives the body); the down
    // side waits for the gateway's headers, which some gateways send only with their
    // first message.
    let mut grpc = proto::gateway_client::GatewayClient::new(opener.channel.clone());
    let call = async move { grpc.forward(request).await };
    let counts = Counts::default();
    let (wr_tx, wr_rx) = oneshot::channel::<OwnedWriteHalf>();
    let (eof_tx, mut eof_rx) = oneshot::channel::<()>();
    let mut down = Box::pin(pump_down(call, wr_rx, eof_tx, metrics, &counts));
    let mut down_done = false;

    // The target, then the connect, while watching the stream and the release.
    let started = Instant::now();
    let connected = match super::resolve(&req.host, req.port, &cfg.allow) {
        Err(e) => Err((e.code(), e.to_string(), target_outcome(e.code()))),
        Ok(addr) => tokio::select! {
            r = connect(addr, cfg.connect_timeout) => r
                .map(|s| (s, addr))
                .map_err(|m| (ErrorCode::Unavailable, m, "connect_failed")),
            end = &mut down => {
                let outcome = match end {
                    DownEnd::Refused(s) => {
                        tracing::info!(event = "forward.refused", forward_id = %id, code = ?s.code(), error = s.message(), "the gateway refused the forward's stream");
                        "stream_failed"
                    }
                    _ => "gateway_closed",
                };
                metrics.ended(outcome);
                return;
            }
            _ = released(&mut closing) => Err((ErrorCode::Unavailable, crate::relay::RELEASING.to_string(), "released")),
        },
    };
    let (sock, peer) = match connected {
        Ok(c) => c,
        Err((code, message, outcome)) => {
            tracing::info!(event = "forward.refused", forward_id = %id, host = %req.host, port = req.port, code = ?code, error = %message, "port forward refused");
            metrics.ended(outcome);
            let _ = tx.send(error_frame(code, message)).await;
            drop(wr_tx);
            drop(tx);
            // No connection: the slot is free while the gateway ends its side.
            drop(slot);
            let _ = tokio::time::timeout(END_WAIT, &mut down).await;
            return;
        }
    };
    let _ = sock.set_nodelay(true);
    tracing::info!(event = "forward.opened", forward_id = %id, peer = %peer, connect_ms = started.elapsed().as_millis() as u64, "port forward connected");
    let connected = up(forward_up::Msg::Connected(proto::ForwardConnected {
        peer: peer.to_string(),
    }));
    let (rd, wr) = sock.into_split();
    let _ = wr_tx.send(wr);
    let outcome = if tx.send(connected).await.is_err() {
        "gateway_closed"
    } else {
        let mut up_pump = Box::pin(pump_up(rd, tx.clone(), metrics, &counts));
        let (mut up_done, mut down_eof, mut eof_live) = (false, false, true);
        let outcome = loop {
            if up_done && down_eof {
                break "completed";
            }
            tokio::select! {
                _ = released(&mut closing) => {
                    let m = format!("{}: the forward to {peer} was closed", crate::relay::RELEASING);
                    let _ = tx.send(error_frame(ErrorCode::Unavailable, m)).await;
                    break "released";
                }
                r = &mut up_pump, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(UpError::Gone) => break "gateway_closed",
                    Err(UpError::Read(e)) => {
                        let m = format!("the connection to {peer} broke while reading from it: {e}");
                        let _ = tx.send(error_frame(ErrorCode::Unavailable, m)).await;
                        break "broken";
                    }
                },
                r = &mut eof_rx, if eof_live => {
                    eof_live = false;
                    down_eof = r.is_ok();
                }
                end = &mut down => {
                    down_done = true;
                    break match end {
                        DownEnd::Refused(s) => {
                            tracing::info!(event = "forward.refused", forward_id = %id, code = ?s.code(), error = s.message(), "the gateway refused the forward's stream");
                            "stream_failed"
                        }
                        DownEnd::Ended => "gateway_closed",
                        DownEnd::Reset(s) => {
                            tracing::debug!(event = "forward.stream_reset", forward_id = %id, code = ?s.code(), error = s.message(), "the forward's stream broke");
                            "gateway_closed"
                        }
                        DownEnd::WriteFailed(e) => {
                            let m = format!("the connection to {peer} broke while writing to it: {e}");
                            let _ = tx.send(error_frame(ErrorCode::Unavailable, m)).await;
                            "broken"
                        }
                        DownEnd::Protocol(m) => {
                            let _ = tx.send(error_frame(ErrorCode::InvalidArgument, m)).await;
                            "invalid"
                        }
                    };
                }
            }
        };
        drop(up_pump);
        outcome
    };
    // Our side ends here; the gateway ends its own on seeing that.
    drop(tx);
    if !down_done {
        let wait = if outcome == "completed" {
            END_WAIT
        } else {
            ABORT_WAIT
        };
        let _ = tokio::time::timeout(wait, &mut down).await;
    }
    drop(down);
    metrics.ended(outcome);
    tracing::info!(
        event = "forward.closed",
        forward_id = %id,
        peer = %peer,
        outcome,
        bytes_to_sandbox = counts.to_sandbox.load(Ordering::Relaxed),
        bytes_from_sandbox = counts.from_sandbox.load(Ordering::Relaxed),
        duration_ms = started.elapsed().as_millis() as u64,
        "port forward closed"
    );
}

/// Resolves once the release closes every forward.
async fn released(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn target_outcome(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::PermissionDenied => "denied",
        _ => "invalid",
    }
}

/// Connects with a timeout; the error names the address and what to do.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    use nix::errno::Errno;
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Err(_) => Err(format!(
            "connecting to {addr} timed out after {timeout:?} (--forward-connect-timeout): nothing answered; check the address and that the host is up"
        )),
        Ok(Err(e)) => Err(match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ECONNREFUSED) => format!(
                "connection refused by {addr}: nothing listens there; start the server first"
            ),
            Some(Errno::ENETUNREACH) | Some(Errno::EHOSTUNREACH) => format!(
                "{addr} is unreachable from the sandbox ({e}): check the address and the pod's network"
            ),
            Some(Errno::ETIMEDOUT) => format!(
                "connecting to {addr} timed out ({e}): nothing answered; check the address and that the host is up"
            ),
            _ => format!("connecting to {addr} failed: {e}"),
        }),
    }
}

enum UpError {
    /// The stream's up side is gone (the gateway ended or reset it).
    Gone,
    Read(std::io::Error),
}

/// One read, then whatever else the socket already holds, until `buf` holds `frame`
/// bytes: a fast sender costs one frame (and one wake-up down the relay) per frame's
/// worth of bytes rather than one per socket read. 0 only at EOF with nothing read.
/// Both ends of a forward read this way (the gateway's side too).
pub(crate) async fn read_coalesced(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    frame: usize,
) -> std::io::Result<usize> {
    let mut n = rd.read_buf(buf).await?;
    while n > 0 && buf.len() < frame {
        match rd.try_read_buf(buf) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Socket reads → `data` frames, then `ForwardEof` at the server's EOF.
async fn pump_up(
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<ForwardUp>,
    metrics: &ForwardMetrics,
    counts: &Counts,
) -> Result<(), UpError> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        if buf.capacity() < MIN_READ {
            buf.reserve(CHUNK);
        }
        let n = read_coalesced(&mut rd, &mut buf, CHUNK)
            .await
            .map_err(UpError::Read)?;
        let frame = if n == 0 {
            up(forward_up::Msg::Eof(proto::ForwardEof {}))
        } else {
            metrics.from_sandbox(n);
            counts.from_sandbox.fetch_add(n as u64, Ordering::Relaxed);
            up(forward_up::Msg::Data(buf.split().freeze()))
        };
        tx.send(frame).await.map_err(|_| UpError::Gone)?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// The gateway's frames → the socket; `ForwardEof` shuts down our writing side
/// (signalled on `eof_tx`), then the stream is watched until the gateway ends it.
async fn pump_down<F>(
    call: F,
    wr_rx: oneshot::Receiver<OwnedWriteHalf>,
    eof_tx: oneshot::Sender<()>,
    metrics: &ForwardMetrics,
    counts: &Counts,
) -> DownEnd
where
    F: std::future::Future<Output = Result<tonic::Response<Streaming<ForwardDown>>, Status>>,
{
    let mut down = match call.await {
        Ok(r) => r.into_inner(),
        Err(s) => return DownEnd::Refused(s),
    };
    // Nothing is read before the connection is up: the gateway's bytes wait in the
    // stream's window. No connection (the connect failed): frames are discarded.
    let mut wr = wr_rx.await.ok();
    let connected = wr.is_some();
    let mut eof_tx = Some(eof_tx);
    loop {
        match down.message().await {
            Ok(Some(ForwardDown {
                msg: Some(forward_down::Msg::Data(d)),
            })) => match wr.as_mut() {
                Some(w) => {
                    if let Err(e) = w.write_all(&d).await {
                        return DownEnd::WriteFailed(e);
                    }
                    metrics.to_sandbox(d.len());
                    counts
                        .to_sandbox
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                None if connected => {
                    return DownEnd::Protocol(
                        "ForwardDown data after ForwardEof: the gateway's side was already shut down; send no data after eof".into(),
                    )
                }
                None => {}
            },
            Ok(Some(ForwardDown {
                msg: Some(forward_down::Msg::Eof(_)),
            })) => {
                if let Some(mut w) = wr.take() {
                    if let Err(e) = w.shutdown().await {
                        return DownEnd::WriteFailed(e);
                    }
                }
                if let Some(t) = eof_tx.take() {
                    let _ = t.send(());
                }
            }
            Ok(Some(ForwardDown { msg: None })) => {}
            Ok(None) => return DownEnd::Ended,
            Err(s) => return DownEnd::Reset(s),
        }
    }
}
