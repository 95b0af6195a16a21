//! One `Session` stream: replays a session's output from the gateway's offsets and
//! applies what the gateway sends down (stdin, resize, signals, acks).

use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::channel::{authed, client};
use crate::exec::output::Read;
use crate::exec::{Session, SessionInputError};
use crate::identity::SandboxCredentials;
use crate::proto::{self, session_down, session_up, SessionUp, StreamKind};
use crate::telemetry::Telemetry;

/// Largest `Output` frame. Small enough to interleave sessions fairly on one
/// connection, large enough that framing costs little per byte.
const MAX_FRAME: usize = 256 * 1024;

fn up(msg: session_up::Msg) -> SessionUp {
    SessionUp { msg: Some(msg) }
}

/// Attaches `session` from the given offsets (which the gateway already holds) and
/// serves the stream until the exit is delivered or the stream breaks. Replaces any
/// stream previously attached to the session.
pub fn attach(
    channel: Channel,
    creds: SandboxCredentials,
    session: Arc<Session>,
    stdout_from: u64,
    stderr_from: u64,
    telemetry: Arc<Telemetry>,
) {
    session.ack(stdout_from, stderr_from);
    let task = tokio::spawn(serve(
        channel,
        creds,
        session.clone(),
        stdout_from,
        stderr_from,
        telemetry,
    ));
    let previous = session
        .attached
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(task.abort_handle());
    if let Some(prev) = previous {
        prev.abort();
    }
}

async fn serve(
    channel: Channel,
    creds: SandboxCredentials,
    session: Arc<Session>,
    stdout_from: u64,
    stderr_from: u64,
    telemetry: Arc<Telemetry>,
) {
    let (tx, rx) = mpsc::channel::<SessionUp>(8);
    let attach = proto::Attach {
        session_id: session.id.clone(),
        stdout_offset: stdout_from,
        stderr_offset: stderr_from,
    };
    let _ = tx.send(up(session_up::Msg::Attach(attach))).await;
    let Ok(req) = authed(ReceiverStream::new(rx), &creds.token()) else {
        return;
    };
    let mut down = match client(channel).session(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            tracing::debug!(event = "relay.session_stream_failed", session_id = %session.id, code = ?status.code(), error = status.message(), "session stream could not be opened");
            return;
        }
    };

    let sender = send_output(&tx, &session, stdout_from, stderr_from, &telemetry);
    let receiver = async {
        loop {
            match down.message().await {
                Ok(Some(msg)) => {
                    if let Err(e) = apply(&session, msg).await {
                        let err = up(session_up::Msg::Error(e.to_proto()));
                        if tx.send(err).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(event = "relay.session_stream_ended", session_id = %session.id, code = ?status.code(), error = status.message(), "session stream ended");
                    return;
                }
            }
        }
    };
    tokio::pin!(sender, receiver);
    tokio::select! {
        delivered = &mut sender => {
            if delivered {
                // Keep applying acks and late input until the gateway ends the stream
                // (it does after it has the exit), bounded so a silent peer cannot pin us.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), &mut receiver).await;
            }
        }
        _ = &mut receiver => {}
    }
}

async fn apply(session: &Session, msg: proto::SessionDown) -> Result<(), SessionInputError> {
    match msg.msg {
        Some(session_down::Msg::Stdin(s)) => session.write_stdin(s.data.into()).await,
        Some(session_down::Msg::StdinEof(_)) => session.close_stdin().await,
        Some(session_down::Msg::Resize(r)) => session.resize(r.cols, r.rows),
        Some(session_down::Msg::Signal(s)) => session.signal(s.signal),
        Some(session_down::Msg::Ack(a)) => {
            session.ack(a.stdout_offset, a.stderr_offset);
            Ok(())
        }
        None => Ok(()),
    }
}

/// Streams output from the cursors until both streams end, then the exit. Returns
/// whether the exit was handed to the stream.
async fn send_output(
    tx: &mpsc::Sender<SessionUp>,
    session: &Session,
    stdout_from: u64,
    stderr_from: u64,
    telemetry: &Telemetry,
) -> bool {
    let mut cursors = [stdout_from, stderr_from];
    let mut exit_rx = session.subscribe_exit();
    loop {
        let out_ready = session.stdout.readable();
        let err_ready = session.stderr.readable();
        tokio::pin!(out_ready, err_ready);
        out_ready.as_mut().enable();
        err_ready.as_mut().enable();

        let mut progressed = false;
        let mut ended = 0;
        for (i, (buf, kind, name)) in [
            (&session.stdout, StreamKind::Stdout, "stdout"),
            (&session.stderr, StreamKind::Stderr, "stderr"),
        ]
        .into_iter()
        .enumerate()
        {
            match buf.read_at(cursors[i], MAX_FRAME) {
                Read::Data(data) => {
                    let n = data.len() as u64;
                    let frame = proto::Output {
                        stream: kind as i32,
                        offset: cursors[i],
                        data: data.into(),
                    };
                    if tx.send(up(session_up::Msg::Output(frame))).await.is_err() {
                        return false;
                    }
                    telemetry.metrics.output_bytes(name, n);
                    cursors[i] += n;
                    progressed = true;
                }
                Read::Eof => ended += 1,
                Read::Pending => {}
                Read::Gone(earliest) => {
                    // The gateway attached below what it acknowledged earlier: those
                    // bytes are gone. Say so precisely and continue from what exists.
                    let e = proto::Error {
                        code: proto::ErrorCode::FailedPrecondition as i32,
                        message: format!("{name} bytes {}..{earliest} of session '{}' were acknowledged earlier and freed; resuming at {earliest}", cursors[i], session.id),
                    };
                    if tx.send(up(session_up::Msg::Error(e))).await.is_err() {
                        return false;
                    }
                    cursors[i] = earliest;
                    progressed = true;
                }
            }
        }
        if progressed {
            continue;
        }
        if ended == 2 {
            if let Some(status) = session.exit_status() {
                return tx.send(up(session_up::Msg::Exited(status))).await.is_ok();
            }
        }
        tokio::select! {
            _ = &mut out_ready => {}
            _ = &mut err_ready => {}
            _ = exit_rx.changed() => {}
        }
    }
}
