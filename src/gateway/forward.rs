//! Port forwards as the gateway drives them: `Sandbox::forward` opens one TCP
//! connection inside the sandbox on a `Forward` stream of its own, and
//! `Sandbox::serve_forward` relays every connection accepted on a local listener
//! through a forward of its own (what `local --forward` does).

use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::channels::Attached;
use super::driver::ExecError;
use super::sandbox::Sandbox;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::{self, forward_down, forward_up, ErrorCode, ForwardDown, ForwardUp};

/// Largest `data` frame down (well under the relay's message limit).
pub const FORWARD_FRAME: usize = 256 * 1024;

static NEXT_FORWARD: AtomicU64 = AtomicU64::new(1);

fn error(code: ErrorCode, message: String) -> ExecError {
    ExecError { code, message }
}

/// One forwarded TCP connection, connected. Split it to read and write at once.
pub struct ForwardConn {
    /// The address the supervisor connected to, e.g. "127.0.0.1:8000".
    pub peer: String,
    pub id: String,
    pub reader: ForwardReader,
    pub writer: ForwardWriter,
}

/// What the sandbox's server sends.
pub struct ForwardReader {
    up: Streaming<ForwardUp>,
    /// Keeps the gateway's side open until the server's side has ended, even when the
    /// writer is gone (a client that sent its eof and dropped its writer still reads).
    keep: Option<mpsc::Sender<Result<ForwardDown, Status>>>,
    done: bool,
}

/// What goes to the sandbox's server.
pub struct ForwardWriter {
    down: mpsc::Sender<Result<ForwardDown, Status>>,
    eof: bool,
}

impl ForwardConn {
    pub fn split(self) -> (ForwardReader, ForwardWriter) {
        (self.reader, self.writer)
    }
}

impl ForwardReader {
    /// The next bytes from the server; `None` once it shut down its sending side
    /// (and on every call after). An `Error` frame, or a stream that ends without the
    /// server's eof, is an error.
    pub async fn read(&mut self) -> Result<Option<Bytes>, ExecError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let msg = self.up.message().await;
            match msg {
                Ok(Some(ForwardUp {
                    msg: Some(forward_up::Msg::Data(d)),
                })) => {
                    if d.is_empty() {
                        continue;
                    }
                    return Ok(Some(d));
                }
                Ok(Some(ForwardUp {
                    msg: Some(forward_up::Msg::Eof(_)),
                })) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(ForwardUp {
                    msg: Some(forward_up::Msg::Error(e)),
                })) => {
                    self.finish();
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                    return Err(error(code, e.message));
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    self.finish();
                    return Err(error(
                        ErrorCode::Unavailable,
                        "the forward's stream ended before the server's eof".into(),
                    ));
                }
                Err(s) => {
                    self.finish();
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("the forward's stream broke: {}", s.message()),
                    ));
                }
            }
        }
    }

    /// Reads everything up to the server's eof.
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, ExecError> {
        let mut out = Vec::new();
        while let Some(d) = self.read().await? {
            out.extend_from_slice(&d);
        }
        Ok(out)
    }

    fn finish(&mut self) {
        self.done = true;
        self.keep = None;
    }
}

impl ForwardWriter {
    /// Sends bytes to the server (in frames of at most [`FORWARD_FRAME`]); waits while
    /// the stream's window is full.
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), ExecError> {
        let mut data: Bytes = data.into();
        if self.eof {
            return Err(error(
                ErrorCode::FailedPrecondition,
                "write after eof: this side of the forward is shut down".into(),
            ));
        }
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(FORWARD_FRAME));
            self.send(forward_down::Msg::Data(chunk)).await?;
        }
        Ok(())
    }

    /// Half-closes: the server reads EOF, and its replies still arrive.
    pub async fn eof(&mut self) -> Result<(), ExecError> {
        if self.eof {
            return Ok(());
        }
        self.eof = true;
        self.send(forward_down::Msg::Eof(proto::ForwardEof {}))
            .await
    }

    async fn send(&self, msg: forward_down::Msg) -> Result<(), ExecError> {
        self.down
            .send(Ok(ForwardDown { msg: Some(msg) }))
            .await
            .map_err(|_| {
                error(
                    ErrorCode::Unavailable,
                    "the forward's stream is closed".into(),
                )
            })
    }

    /// Resets the forward: the supervisor closes its connection at once.
    pub async fn reset(self) {
        let _ = self
            .down
            .send(Err(Status::cancelled("the gateway closed the forward")))
            .await;
    }
}

impl Sandbox {
    /// Opens a TCP connection to `host:port` inside the sandbox (empty host:
    /// 127.0.0.1). Errors: the supervisor's `ChannelFailed` (releasing, too many
    /// forwards) or the stream's `Error` (refused or unreachable port, an address not
    /// allowed, an invalid port).
    pub async fn forward(&self, host: &str, port: u32) -> Result<ForwardConn, ExecError> {
        let id = format!("fwd-{}", NEXT_FORWARD.fetch_add(1, Ordering::Relaxed));
        let open = GwMsg::OpenForward(proto::OpenForward {
            forward_id: id.clone(),
            host: host.to_owned(),
            port,
        });
        let Attached::Forward(opened) = self.open_channel(&id, open).await? else {
            return Err(error(
                ErrorCode::Internal,
                format!("request {id} was answered with a stream of another kind"),
            ));
        };
        let mut up = opened.up;
        let peer = loop {
            match up.message().await {
                Ok(Some(ForwardUp {
                    msg: Some(forward_up::Msg::Connected(c)),
                })) => break c.peer,
                Ok(Some(ForwardUp {
                    msg: Some(forward_up::Msg::Error(e)),
                })) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                    return Err(error(code, e.message));
                }
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!("forward {id}: the stream ended before the connection was up"),
                    ))
                }
                Err(s) => {
                    return Err(error(
                        ErrorCode::Unavailable,
                        format!(
                            "forward {id}: the stream broke before the connection was up: {}",
                            s.message()
                        ),
                    ))
                }
            }
        };
        Ok(ForwardConn {
            peer,
            id,
            reader: ForwardReader {
                up,
                keep: Some(opened.down.clone()),
                done: false,
            },
            writer: ForwardWriter {
                down: opened.down,
                eof: false,
            },
        })
    }

    /// Accepts connections on `listener` (a port of this machine) and relays each
    /// through its own forward to `host:port` in the sandbox, with half-close both
    /// ways. Runs until the listener fails; a forward that cannot be opened closes its
    /// client connection (logged as `gateway.forward_failed`).
    pub async fn serve_forward(
        &self,
        listener: TcpListener,
        host: String,
        port: u32,
    ) -> std::io::Result<()> {
        loop {
            let (client, from) = listener.accept().await?;
            let sandbox = self.clone();
            let host = host.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                match sandbox.forward(&host, port).await {
                    Ok(conn) => relay(client, conn).await,
                    Err(e) => {
                        tracing::warn!(event = "gateway.forward_failed", from = %from, port, code = ?e.code, error = %e.message, "could not forward a connection into the sandbox");
                    }
                }
            });
        }
    }
}

/// Relays one local TCP connection through a forward until both directions end.
pub async fn relay(client: TcpStream, conn: ForwardConn) {
    let (mut rd, mut wr) = client.into_split();
    let (mut reader, mut writer) = conn.split();
    let to_sandbox = async move {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(FORWARD_FRAME);
            match crate::ports::read_coalesced(&mut rd, &mut buf, FORWARD_FRAME).await {
                Ok(0) => {
                    let _ = writer.eof().await;
                    return;
                }
                Ok(_) => {
                    if writer.write(buf.split().freeze()).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    writer.reset().await;
                    return;
                }
            }
        }
    };
    let from_sandbox = async move {
        loop {
            match reader.read().await {
                Ok(Some(d)) => {
                    if wr.write_all(&d).await.is_err() {
                        return false;
                    }
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return true;
                }
                Err(e) => {
                    tracing::debug!(event = "gateway.forward_ended", code = ?e.code, error = %e.message, "forward ended with an error");
                    return false;
                }
            }
        }
    };
    tokio::pin!(to_sandbox, from_sandbox);
    tokio::select! {
        () = &mut to_sandbox => { from_sandbox.await; }
        clean = &mut from_sandbox => {
            // A broken forward ends the client's connection too; a clean eof leaves
            // the client's sending side running.
            if clean {
                to_sandbox.await;
            }
        }
    }
}
