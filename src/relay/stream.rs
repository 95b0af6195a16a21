//! One `Session` stream: replays a session's output from the gateway's offsets and
//! applies what the gateway sends down (stdin, resize, signals, acks).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Stdin held per stream while the process is not reading, so frames behind it (an
/// Ack the process's output is waiting for) are still read. It must exceed what a
/// gateway has in flight ahead of an Ack (the reference gateway: its stream queue of
/// 32 frames plus our 4 MiB receive window).
const STDIN_READAHEAD: usize = 64 << 20;

/// Largest `Output` frame. Small enough to interleave sessions fairly on one
/// connection, large enough that framing costs little per byte.
const MAX_FRAME: usize = 256 * 1024;

fn up(msg: session_up::Msg) -> SessionUp {
    SessionUp { msg: Some(msg) }
}

/// Attaches `session` from the given offsets (which the gateway already holds) and
/// serves the stream until the exit is delivered or the stream breaks. Replaces any
/// stream previously attached to the session. `notice` is sent right after `Attach`
/// (an error the previous stream could no longer carry).
pub fn attach(
    channel: Channel,
    creds: SandboxCredentials,
    session: Arc<Session>,
    stdout_from: u64,
    stderr_from: u64,
    telemetry: Arc<Telemetry>,
    notice: Option<proto::Error>,
) {
    session.ack(stdout_from, stderr_from);
    // Taken here, in attach order, so a later attach always carries a larger one.
    let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
    let task = tokio::spawn(serve(
        channel,
        creds,
        session.clone(),
        (stdout_from, stderr_from),
        generation,
        telemetry,
        notice,
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

/// The next `Attach.generation`: one counter for every stream of this process, so it
/// increases per session too (sessions never outlive the process). Starts at 1; 0
/// means "not sent".
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// How the gateway's side of a session stream ended.
enum DownEnd {
    Closed,
    /// The gateway answered the call itself with an error status: nothing was served.
    Refused,
    /// The gateway attached another stream of this session in place of this one.
    Superseded(String),
    /// A frame past the message limit: the stream cannot be read any further.
    TooLarge(String),
}

async fn serve(
    channel: Channel,
    creds: SandboxCredentials,
    session: Arc<Session>,
    (stdout_from, stderr_from): (u64, u64),
    generation: u64,
    telemetry: Arc<Telemetry>,
    notice: Option<proto::Error>,
) {
    let (tx, rx) = mpsc::channel::<SessionUp>(8);
    let first = proto::Attach {
        session_id: session.id.clone(),
        stdout_offset: stdout_from,
        stderr_offset: stderr_from,
        // Read before the stream opens: a later value would only be higher, and the
        // gateway's resend from a lower one is deduplicated by offset.
        stdin_offset: Some(session.stdin_accepted().offset),
        generation,
    };
    let _ = tx.send(up(session_up::Msg::Attach(first))).await;
    if let Some(e) = notice {
        let _ = tx.send(up(session_up::Msg::Error(e))).await;
    }
    let Ok(req) = authed(ReceiverStream::new(rx), &creds.token()) else {
        return;
    };
    // The call's future resolves only when the gateway's response headers arrive, and
    // grpcio, grpc-go and grpc-java send those lazily, with their first message. A
    // gateway that waits for output before sending anything would never see any if
    // output waited for the call: so output streams from the moment the request is
    // out (hyper drives the request body on its own), and only the down side waits.
    let mut grpc = client(channel.clone());
    let call = grpc.session(req);
    let sender = send_output(&tx, &session, stdout_from, stderr_from, &telemetry);
    let receiver = async {
        let mut down = match call.await {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                tracing::debug!(event = "relay.session_stream_failed", session_id = %session.id, code = ?status.code(), error = status.message(), "session stream could not be opened");
                return DownEnd::Refused;
            }
        };
        // Stdin waits for the process to read it, but an Ack queued behind it may be
        // what the process is waiting for (its output buffer is full): so frames keep
        // being read while stdin waits, stdin is held here in order, and everything
        // else takes effect on arrival. Bounded: past the read-ahead, reading stops.
        let mut pending: VecDeque<HeldStdin> = VecDeque::new();
        let mut pending_bytes = 0usize;
        loop {
            let front = pending.front().cloned();
            tokio::select! {
                biased;
                written = feed_stdin(&session, front.clone()), if front.is_some() => {
                    pending.pop_front();
                    if let Some(HeldStdin::Data(_, d)) = &front {
                        pending_bytes -= d.len();
                    }
                    if let Err(e) = written {
                        // Everything still held was sent after the refused frame.
                        pending.clear();
                        pending_bytes = 0;
                        if !refuse(&tx, &session, e).await {
                            return DownEnd::Closed;
                        }
                    }
                }
                msg = down.message(), if pending_bytes < STDIN_READAHEAD => match msg {
                    Ok(Some(proto::SessionDown { msg: Some(session_down::Msg::Stdin(s)) })) => {
                        pending_bytes += s.data.len();
                        pending.push_back(HeldStdin::Data(s.offset, s.data));
                    }
                    Ok(Some(proto::SessionDown { msg: Some(session_down::Msg::StdinEof(e)) })) => {
                        pending.push_back(HeldStdin::Eof(e.offset));
                    }
                    Ok(Some(msg)) => {
                        if let Err(e) = apply(&session, msg) {
                            if !refuse(&tx, &session, e).await {
                                return DownEnd::Closed;
                            }
                        }
                    }
                    Ok(None) => return DownEnd::Closed,
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        return DownEnd::TooLarge(status.message().to_string());
                    }
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        return DownEnd::Superseded(status.message().to_string());
                    }
                    Err(status) => {
                        tracing::debug!(event = "relay.session_stream_ended", session_id = %session.id, code = ?status.code(), error = status.message(), "session stream ended");
                        return DownEnd::Closed;
                    }
                },
            }
        }
    };
    tokio::pin!(sender, receiver);
    let end = tokio::select! {
        delivered = &mut sender => {
            if !delivered {
                return;
            }
            // Keep applying acks and late input until the gateway ends the stream
            // (it does after it has the exit), bounded so a silent peer cannot pin us.
            match tokio::time::timeout(std::time::Duration::from_secs(30), &mut receiver).await {
                Ok(end) => end,
                Err(_) => return,
            }
        }
        end = &mut receiver => end,
    };
    let notice = match end {
        DownEnd::Closed | DownEnd::Refused => return,
        DownEnd::Superseded(detail) => {
            // The gateway orders a session's streams by when their Attach arrived, not
            // by when they were opened: a stale stream (opened before a reconnect, its
            // task already aborted here) can land after this one and displace it, then
            // end itself, leaving the session with no stream at all. If this is still
            // the session's newest stream, attach again; a stream that was genuinely
            // replaced here is no longer current and just ends.
            tokio::time::sleep(SUPERSEDED_RETRY).await;
            if !is_current_attachment(&session) {
                return;
            }
            tracing::info!(event = "session.stream_superseded", session_id = %session.id, error = %detail, "the gateway displaced the session's newest stream with a stale one; re-attaching");
            None
        }
        DownEnd::TooLarge(detail) => {
            // The oversized frame is discarded, and nothing after it on this stream can
            // be decoded. The session is fine: say so precisely on a fresh stream.
            let message = format!(
                "a SessionDown frame for session '{}' exceeded the {} byte message limit and was discarded ({detail}); send stdin in smaller frames. The session keeps running; its stream was re-opened",
                session.id,
                super::channel::MAX_MESSAGE_BYTES
            );
            tracing::warn!(event = "session.frame_too_large", session_id = %session.id, error = %detail, "discarded an oversized frame; re-attaching the session");
            Some(proto::Error {
                code: proto::ErrorCode::InvalidArgument as i32,
                message,
            })
        }
    };
    // Resume from what the gateway acknowledged (it ignores bytes it already holds).
    let (out, err) = (session.stdout.start(), session.stderr.start());
    attach(
        channel,
        creds,
        session.clone(),
        out,
        err,
        telemetry.clone(),
        notice,
    );
}

/// How long a displaced stream waits before attaching again: long enough for the stale
/// stream that displaced it to end, short enough not to stall the session noticeably.
const SUPERSEDED_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether the running task is the stream `attach` last started for `session`.
fn is_current_attachment(session: &Session) -> bool {
    let current = session
        .attached
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|h| h.id());
    current.is_some() && current == tokio::task::try_id()
}

/// A stdin frame read ahead of the process, with its offset (None: a legacy frame).
#[derive(Clone)]
enum HeldStdin {
    Data(Option<u64>, bytes::Bytes),
    Eof(Option<u64>),
}

/// Hands one held stdin frame to the session's writer.
async fn feed_stdin(session: &Session, frame: Option<HeldStdin>) -> Result<(), SessionInputError> {
    match frame {
        Some(HeldStdin::Data(offset, data)) => session.write_stdin(offset, data).await,
        Some(HeldStdin::Eof(offset)) => session.close_stdin(offset).await,
        None => Ok(()),
    }
}

fn stdin_ack(a: crate::exec::StdinAccepted) -> SessionUp {
    up(session_up::Msg::StdinAck(proto::StdinAck {
        offset: a.offset,
        eof: a.closed,
    }))
}

/// Reports a refused frame on the stream; false when the stream is gone.
async fn refuse(tx: &mpsc::Sender<SessionUp>, session: &Session, e: SessionInputError) -> bool {
    tracing::info!(event = "session.input_refused", session_id = %session.id, error = %e, "refused a frame from the gateway; the session continues");
    tx.send(up(session_up::Msg::Error(e.to_proto())))
        .await
        .is_ok()
}

/// Frames other than stdin, applied on arrival.
fn apply(session: &Session, msg: proto::SessionDown) -> Result<(), SessionInputError> {
    match msg.msg {
        Some(session_down::Msg::Stdin(_)) | Some(session_down::Msg::StdinEof(_)) => Ok(()),
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
    // Stdin acks ride with the output, so the receiver never waits to send one. The
    // Attach carried the offset; a closed stdin is said at once so the gateway frees
    // what it retains.
    let mut stdin_rx = session.subscribe_stdin();
    let mut stdin_said = *stdin_rx.borrow_and_update();
    let mut say_stdin = stdin_said.closed;
    loop {
        // Coalesced: one ack for however much was accepted since the last one.
        let now = *stdin_rx.borrow_and_update();
        if now != stdin_said {
            stdin_said = now;
            say_stdin = true;
        }
        if std::mem::take(&mut say_stdin) && tx.send(stdin_ack(stdin_said)).await.is_err() {
            return false;
        }
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
                        data,
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
            _ = stdin_rx.changed() => {}
        }
    }
}
