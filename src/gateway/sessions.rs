//! Exec sessions on the gateway side: the `Session` stream handler (dedupe by offset,
//! delivery to the consumer through a bounded channel, acks as the consumer takes
//! data). The driver's `Exec` handle on the consumer end is in `exec_handle.rs`.
//!
//! Backpressure: each session has its own bounded consumer channel. A consumer that
//! stops reading fills it, the stream handler stops reading that HTTP/2 stream, and no
//! acks are sent, so only that session's producer is paused on the supervisor.

use super::state::{Shared, StopListener, StopReason, StreamLink};
use super::stdin::StdinRetention;
use super::tokens::SandboxClaims;
use crate::proto;
use crate::proto::session_down::Msg as DownMsg;
use crate::proto::session_up::Msg as UpMsg;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::exec_handle::ExecEvent;

/// Output frames buffered per session between the stream and the consumer.
const CONSUMER_FRAMES: usize = 64;
/// Driver-to-process frames (stdin, resize, signal) queued per session.
const DOWN_FRAMES: usize = 64;
/// The first frame of a stream must arrive within this.
pub(crate) const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the first frame of a stream and takes the one message it must be (`Hello` on
/// Connect, `Attach` on Session). Anything else, or nothing within
/// [`FIRST_FRAME_TIMEOUT`], is answered with `INVALID_ARGUMENT` naming what was expected;
/// `None` means the stream is over.
pub(crate) async fn first_frame<Up, Down, T>(
    inbound: &mut Streaming<Up>,
    tx: &mpsc::Sender<Result<Down, Status>>,
    rpc: &str,
    expected: &str,
    take: impl FnOnce(Up) -> Option<T>,
) -> Option<T> {
    let refuse = |why: String| async {
        let _ = tx.send(Err(Status::invalid_argument(why))).await;
    };
    match tokio::time::timeout(FIRST_FRAME_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(msg))) => match take(msg) {
            Some(v) => Some(v),
            None => {
                refuse(format!(
                    "the first frame of a {rpc} stream must be {expected}"
                ))
                .await;
                None
            }
        },
        Ok(Ok(None)) | Ok(Err(_)) => None,
        Err(_) => {
            refuse(format!(
                "no {expected} frame within {FIRST_FRAME_TIMEOUT:?} of opening the {rpc} stream"
            ))
            .await;
            None
        }
    }
}

pub(crate) struct SessionInner {
    pub stream: Option<StreamLink<proto::SessionDown>>,
    pub pid: Option<u32>,
    pub exit_from_control: Option<proto::ExitStatus>,
    /// A down frame taken from the queue by a stream that died before sending it.
    pub requeued: Option<proto::SessionDown>,
}

pub(crate) struct Delivery {
    pub consumer: Option<mpsc::Sender<ExecEvent>>,
}

/// One exec session as the gateway tracks it, across any number of Session streams.
pub(crate) struct SessionCore {
    pub id: String,
    pub inner: Mutex<SessionInner>,
    /// Serializes delivery so two streams of the same session never interleave.
    pub delivery: tokio::sync::Mutex<Delivery>,
    /// Bytes delivered to the consumer channel (the gateway holds everything below).
    pub held_stdout: AtomicU64,
    pub held_stderr: AtomicU64,
    /// The stream generation allowed to deliver (the latest Attach).
    pub current_gen: AtomicU64,
    /// The largest `Attach.generation` the supervisor sent for this session: a stream
    /// with a smaller one is stale and refused. 0 while the supervisor sends none.
    pub newest_attach: AtomicU64,
    pub complete: AtomicBool,
    pub down_tx: mpsc::Sender<proto::SessionDown>,
    pub down_rx: tokio::sync::Mutex<mpsc::Receiver<proto::SessionDown>>,
    /// Offsets consumed by the driver; every change becomes an `Ack` down the stream.
    pub ack: watch::Sender<(u64, u64)>,
    /// Errors the supervisor reported on the session stream (a refused frame: stdin
    /// after EOF, resize without a terminal, an oversized frame). The session goes on.
    pub errors_tx: mpsc::UnboundedSender<proto::Error>,
    pub errors_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<proto::Error>>,
    /// Stdin written but not yet acknowledged by the supervisor, resent on re-attach.
    pub stdin: StdinRetention,
}

impl SessionCore {
    pub fn new(id: String) -> (Arc<SessionCore>, mpsc::Receiver<ExecEvent>) {
        let (consumer_tx, consumer_rx) = mpsc::channel(CONSUMER_FRAMES);
        let (down_tx, down_rx) = mpsc::channel(DOWN_FRAMES);
        let (errors_tx, errors_rx) = mpsc::unbounded_channel();
        let core = SessionCore {
            id,
            inner: Mutex::new(SessionInner {
                stream: None,
                pid: None,
                exit_from_control: None,
                requeued: None,
            }),
            delivery: tokio::sync::Mutex::new(Delivery {
                consumer: Some(consumer_tx),
            }),
            held_stdout: AtomicU64::new(0),
            held_stderr: AtomicU64::new(0),
            current_gen: AtomicU64::new(0),
            newest_attach: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            down_tx,
            down_rx: tokio::sync::Mutex::new(down_rx),
            ack: watch::channel((0, 0)).0,
            errors_tx,
            errors_rx: tokio::sync::Mutex::new(errors_rx),
            stdin: StdinRetention::default(),
        };
        (Arc::new(core), consumer_rx)
    }

    pub fn inner(&self) -> std::sync::MutexGuard<'_, SessionInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn held(&self) -> (u64, u64) {
        (
            self.held_stdout.load(Ordering::Acquire),
            self.held_stderr.load(Ordering::Acquire),
        )
    }

    /// Ends the current stream (if any) with `reason`.
    pub fn end_stream(&self, reason: StopReason) {
        if let Some(link) = self.inner().stream.take() {
            link.end(reason);
        }
    }

    /// The session is gone on the supervisor: the consumer sees its channel close
    /// without an exit.
    pub async fn mark_lost(&self) {
        self.end_stream(StopReason::Clean);
        self.stdin.finish();
        self.delivery.lock().await.consumer = None;
    }
}

/// The Session rpc after authentication: reads `Attach`, routes to the session, and
/// pumps frames until `Exited`, an error, or the gateway stops the stream.
pub(crate) async fn run_session_stream(
    shared: Arc<Shared>,
    claims: SandboxClaims,
    mut inbound: Streaming<proto::SessionUp>,
    tx: mpsc::Sender<Result<proto::SessionDown, Status>>,
) {
    let attach = match first_frame(
        &mut inbound,
        &tx,
        "Session",
        "Attach",
        |m: proto::SessionUp| match m.msg {
            Some(UpMsg::Attach(a)) => Some(a),
            _ => None,
        },
    )
    .await
    {
        Some(a) => a,
        None => return,
    };

    let gen = shared.next_gen();
    let stop = super::state::Stop::new();
    let attached = {
        let mut st = shared.lock();
        attach_locked(&mut st, &claims, &attach.session_id).and_then(|core| {
            // Streams of a session may arrive out of order (one opened before a
            // reconnect lands after the newer one): the supervisor's generation,
            // not arrival, says which is newest. Checked under the lock, so two
            // Attach frames cannot both pass.
            let newest = core.newest_attach.load(Ordering::Acquire);
            if attach.generation != 0 && attach.generation < newest {
                return Err(Status::aborted(format!(
                    "stale Session stream for session {}: attach generation {} is older than {newest}, the newest attached",
                    core.id, attach.generation
                )));
            }
            core.newest_attach
                .fetch_max(attach.generation, Ordering::AcqRel);
            let old = core.inner().stream.replace(StreamLink {
                gen,
                tx: tx.clone(),
                stop: stop.clone(),
            });
            core.current_gen.store(gen, Ordering::Release);
            if let Some(old) = old {
                old.end(StopReason::Fail(Status::aborted(format!(
                    "session {} was re-attached on a newer Session stream",
                    core.id
                ))));
            }
            Ok(core)
        })
    };
    let core = match attached {
        Ok(core) => core,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    tracing::debug!(event = "gateway.session.attached", session_id = %core.id, gen,
        stdout_offset = attach.stdout_offset, stderr_offset = attach.stderr_offset, "session stream attached");

    tokio::spawn(forward_down(
        Arc::clone(&core),
        tx.clone(),
        stop.listener(),
        attach.stdin_offset,
    ));

    let mut stopped = stop.listener();
    let outcome: Result<bool, Status> = loop {
        tokio::select! {
            reason = stopped.fired() => {
                if let StopReason::Fail(status) = reason {
                    let _ = tx.send(Err(status)).await;
                }
                break Ok(false);
            }
            msg = inbound.message() => match msg {
                Ok(Some(up)) => match up.msg {
                    Some(UpMsg::Output(out)) => {
                        match deliver_output(&core, gen, out, &mut stopped).await {
                            Ok(true) => {}
                            Ok(false) => break Ok(false),
                            Err(status) => break Err(status),
                        }
                    }
                    Some(UpMsg::Exited(status)) => {
                        break Ok(deliver_exit(&shared, &claims, &core, gen, status, &mut stopped).await);
                    }
                    Some(UpMsg::Error(err)) => {
                        if err.code == proto::ErrorCode::NotFound as i32 {
                            tracing::warn!(event = "gateway.session.stream_error", session_id = %core.id,
                                code = err.code, message = %err.message, "supervisor does not know the session");
                            forget_lost(&shared, &claims.sandbox_id, &core).await;
                            break Ok(false);
                        }
                        // A refused frame (stdin after EOF, resize without a terminal, an
                        // oversized frame): the session and this stream go on.
                        tracing::info!(event = "gateway.session.error", session_id = %core.id,
                            code = err.code, message = %err.message, "supervisor refused a frame");
                        let _ = core.errors_tx.send(err);
                    }
                    Some(UpMsg::StdinAck(a)) => core.stdin.acked(a.offset, a.eof),
                    Some(UpMsg::Attach(_)) => {
                        break Err(Status::invalid_argument("Attach is only valid as the first frame of a Session stream"));
                    }
                    None => {}
                },
                Ok(None) | Err(_) => break Ok(false),
            }
        }
    };
    match outcome {
        Err(status) => {
            let _ = tx.send(Err(status)).await;
        }
        Ok(true) => {
            // Everything is held now: a final ack lets the supervisor free its buffer.
            let _ = tx.send(Ok(ack_frame(core.held()))).await;
        }
        Ok(false) => {}
    }
    // Release this stream's slot so the forwarder stops and the response ends.
    {
        let mut inner = core.inner();
        if inner.stream.as_ref().map(|l| l.gen) == Some(gen) {
            inner.stream = None;
        }
    }
    stop.fire(StopReason::Clean);
}

fn attach_locked(
    st: &mut super::state::State,
    claims: &SandboxClaims,
    session_id: &str,
) -> Result<Arc<SessionCore>, Status> {
    let sb = st.sandboxes.get_mut(&claims.sandbox_id).ok_or_else(|| {
        Status::not_found(format!(
            "sandbox {} is not known to this gateway",
            claims.sandbox_id
        ))
    })?;
    if let Some(why) = sb.gone_reason() {
        return Err(Status::permission_denied(why));
    }
    sb.sessions.get(session_id).cloned().ok_or_else(|| {
        Status::not_found(format!(
            "session {session_id:?} is not known to the gateway (already complete, or never opened); drop it"
        ))
    })
}

/// Delivers one Output frame. Ok(false): this stream was superseded or stopped.
async fn deliver_output(
    core: &SessionCore,
    gen: u64,
    out: proto::Output,
    stopped: &mut StopListener,
) -> Result<bool, Status> {
    let mut d = tokio::select! {
        d = core.delivery.lock() => d,
        _ = stopped.fired() => return Ok(false),
    };
    if core.current_gen.load(Ordering::Acquire) != gen {
        return Ok(false);
    }
    let (held, is_stdout) = match proto::StreamKind::try_from(out.stream) {
        Ok(proto::StreamKind::Stdout) => (&core.held_stdout, true),
        Ok(proto::StreamKind::Stderr) => (&core.held_stderr, false),
        _ => {
            return Err(Status::invalid_argument(format!(
                "Output frame of session {} has stream kind {}; want STDOUT or STDERR",
                core.id, out.stream
            )))
        }
    };
    let have = held.load(Ordering::Acquire);
    let end = out.offset + out.data.len() as u64;
    if out.offset > have {
        return Err(Status::failed_precondition(format!(
            "output gap in session {}: {} frame starts at offset {} but the gateway holds only up to {}; replay from {}",
            core.id,
            if is_stdout { "stdout" } else { "stderr" },
            out.offset,
            have,
            have
        )));
    }
    if end <= have {
        return Ok(true); // a replayed duplicate
    }
    let fresh = out.data.slice((have - out.offset) as usize..);
    let event = if is_stdout {
        ExecEvent::Stdout(fresh)
    } else {
        ExecEvent::Stderr(fresh)
    };
    if let Some(consumer) = &d.consumer {
        tokio::select! {
            sent = consumer.send(event) => {
                if sent.is_err() {
                    // Nobody consumes any more: hold (discard) and ack so the process is not stalled.
                    d.consumer = None;
                }
            }
            _ = stopped.fired() => return Ok(false),
        }
    }
    held.store(end, Ordering::Release);
    if d.consumer.is_none() {
        core.ack.send_replace(core.held());
    }
    Ok(true)
}

/// Delivers the exit (the last frame), completes the session and tells the supervisor
/// to forget it. Returns true when the session completed.
async fn deliver_exit(
    shared: &Shared,
    claims: &SandboxClaims,
    core: &SessionCore,
    gen: u64,
    status: proto::ExitStatus,
    stopped: &mut StopListener,
) -> bool {
    let mut d = tokio::select! {
        d = core.delivery.lock() => d,
        _ = stopped.fired() => return false,
    };
    if core.current_gen.load(Ordering::Acquire) != gen {
        return false;
    }
    if let Some(consumer) = d.consumer.take() {
        tokio::select! {
            _ = consumer.send(ExecEvent::Exited(status)) => {}
            _ = stopped.fired() => {
                d.consumer = Some(consumer);
                return false;
            }
        }
    }
    core.complete.store(true, Ordering::Release);
    core.stdin.finish();
    drop(d);
    let control = {
        let mut st = shared.lock();
        st.sandboxes.get_mut(&claims.sandbox_id).and_then(|sb| {
            sb.sessions.remove(&core.id);
            sb.control.as_ref().map(|c| c.tx.clone())
        })
    };
    shared.bump();
    tracing::debug!(event = "gateway.session.completed", session_id = %core.id, "session complete; forgetting");
    if let Some(tx) = control {
        let _ = tx.send(Ok(forget(&core.id))).await;
    }
    true
}

pub(crate) fn forget(session_id: &str) -> proto::GatewayMessage {
    proto::GatewayMessage {
        msg: Some(proto::gateway_message::Msg::ForgetSession(
            proto::ForgetSession {
                session_id: session_id.to_owned(),
            },
        )),
    }
}

/// The supervisor says it does not know the session: it is lost.
async fn forget_lost(shared: &Shared, sandbox_id: &str, core: &SessionCore) {
    {
        let mut st = shared.lock();
        if let Some(sb) = st.sandboxes.get_mut(sandbox_id) {
            sb.sessions.remove(&core.id);
            sb.pending_opens.remove(&core.id);
        }
    }
    core.delivery.lock().await.consumer = None;
    shared.bump();
}

/// Moves driver frames (stdin, resize, signal) and acks down the current stream.
async fn forward_down(
    core: Arc<SessionCore>,
    tx: mpsc::Sender<Result<proto::SessionDown, Status>>,
    mut stopped: StopListener,
    stdin_offset: Option<u64>,
) {
    let mut rx = tokio::select! {
        rx = core.down_rx.lock() => rx,
        _ = stopped.fired() => return,
    };
    // Holding the queue, no older stream can send any more: resend what the
    // supervisor had not accepted, before anything newer. Not requeued if this stream
    // dies too: it stays retained and the next stream resends it.
    for frame in core.stdin.resend_from(stdin_offset) {
        let sent = tokio::select! {
            biased;
            _ = stopped.fired() => false,
            sent = tx.send(Ok(frame)) => sent.is_ok(),
        };
        if !sent {
            return;
        }
    }
    let mut ack_rx = core.ack.subscribe();
    let initial = *ack_rx.borrow_and_update();
    let requeued = core.inner().requeued.take();
    let mut first: Vec<proto::SessionDown> = Vec::new();
    if initial != (0, 0) {
        first.push(ack_frame(initial));
    }
    first.extend(requeued);
    for frame in first {
        if !send_or_requeue(&core, &tx, frame, &mut stopped).await {
            return;
        }
    }
    loop {
        let frame = tokio::select! {
            biased;
            _ = stopped.fired() => return,
            changed = ack_rx.changed() => {
                if changed.is_err() { return; }
                let a = *ack_rx.borrow_and_update();
                ack_frame(a)
            }
            f = rx.recv() => match f {
                Some(f) => f,
                None => return,
            },
        };
        if !send_or_requeue(&core, &tx, frame, &mut stopped).await {
            return;
        }
    }
}

async fn send_or_requeue(
    core: &SessionCore,
    tx: &mpsc::Sender<Result<proto::SessionDown, Status>>,
    frame: proto::SessionDown,
    stopped: &mut StopListener,
) -> bool {
    // A stopped stream must not take a driver frame: when both are ready, the stop
    // wins and the frame is requeued for the next stream (it would be lost otherwise).
    let permit = tokio::select! {
        biased;
        _ = stopped.fired() => None,
        p = tx.reserve() => p.ok(),
    };
    match permit {
        Some(p) => {
            core.stdin.sent(&frame);
            p.send(Ok(frame));
            true
        }
        None => {
            // Acks are regenerated from the watch; only driver frames must survive.
            if !matches!(frame.msg, Some(DownMsg::Ack(_))) {
                core.inner().requeued = Some(frame);
            }
            false
        }
    }
}

fn ack_frame((stdout_offset, stderr_offset): (u64, u64)) -> proto::SessionDown {
    proto::SessionDown {
        msg: Some(DownMsg::Ack(proto::Ack {
            stdout_offset,
            stderr_offset,
        })),
    }
}
