//! The control stream (Connect): Hello, Accepted, re-attach or forget each session,
//! heartbeats, session events and the release report.

use super::driver::ExecError;
use super::server::gw;
use super::sessions::{first_frame, forget, SessionCore};
use super::state::{ReleaseState, Shared, State, Stop, StopReason, StreamLink};
use super::tokens::SandboxClaims;
use crate::proto;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::supervisor_message::Msg as SupMsg;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// The control stream after authentication: Hello, Accepted, re-attach/forget, then
/// heartbeats and session events until the stream ends or is replaced.
pub(crate) async fn run_control(
    shared: Arc<Shared>,
    claims: SandboxClaims,
    mut inbound: Streaming<proto::SupervisorMessage>,
    tx: mpsc::Sender<Result<proto::GatewayMessage, Status>>,
) {
    let hello = match first_frame(
        &mut inbound,
        &tx,
        "Connect",
        "Hello",
        |m: proto::SupervisorMessage| match m.msg {
            Some(SupMsg::Hello(h)) => Some(h),
            _ => None,
        },
    )
    .await
    {
        Some(h) => h,
        None => return,
    };
    if hello.sandbox_id != claims.sandbox_id {
        let _ = tx
            .send(Err(Status::permission_denied(format!(
                "Hello names sandbox {:?} but the sandbox token is for {}",
                hello.sandbox_id, claims.sandbox_id
            ))))
            .await;
        return;
    }
    if !hello.claim_uid.is_empty() && hello.claim_uid != claims.claim_uid {
        let _ = tx
            .send(Err(Status::permission_denied(format!(
                "Hello names claim {:?} but the sandbox token is for claim {}",
                hello.claim_uid, claims.claim_uid
            ))))
            .await;
        return;
    }

    let gen = shared.next_gen();
    let stop = Stop::new();
    let hb = shared.cfg.heartbeat_interval;
    let accepted = {
        let mut st = shared.lock();
        accept_hello_locked(&mut st, &claims, &hello, gen, &stop, &tx, hb)
    };
    let (lost, frames) = match accepted {
        Ok(v) => v,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    // Sent after the lock is released, with backpressure: a Hello listing a thousand
    // sessions needs a thousand AttachSession frames, more than the channel holds.
    for f in frames {
        if tx.send(Ok(f)).await.is_err() {
            return;
        }
    }
    for core in lost {
        core.mark_lost().await;
    }
    shared.bump();
    tracing::info!(event = "gateway.control.accepted", sandbox_id = %claims.sandbox_id, instance_id = %hello.instance_id,
        sessions = hello.sessions.len(), "control stream accepted");

    let mut stopped = stop.listener();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
    loop {
        tokio::select! {
            reason = stopped.fired() => {
                if let StopReason::Fail(s) = reason { let _ = tx.send(Err(s)).await; }
                break;
            }
            _ = tick.tick() => { let _ = tx.try_send(Ok(gw(GwMsg::Heartbeat(proto::Heartbeat {})))); }
            _ = tx.closed() => break,
            msg = inbound.message() => match msg {
                Ok(Some(m)) => handle_control_message(&shared, &claims.sandbox_id, m).await,
                Ok(None) | Err(_) => break,
            }
        }
    }
    {
        let mut st = shared.lock();
        if let Some(sb) = st.sandboxes.get_mut(&claims.sandbox_id) {
            if sb.control.as_ref().map(|l| l.gen) == Some(gen) {
                sb.control = None;
            }
        }
    }
    shared.bump();
    tracing::info!(event = "gateway.control.closed", sandbox_id = %claims.sandbox_id, "control stream closed");
}

/// Accepts a Hello under the state lock: queues Accepted, re-attaches and forgets, and
/// installs the stream as the sandbox's control stream. Returns the sessions found lost
/// and the re-attach/forget/release frames to send once the lock is released.
fn accept_hello_locked(
    st: &mut State,
    claims: &SandboxClaims,
    hello: &proto::Hello,
    gen: u64,
    stop: &Stop,
    tx: &mpsc::Sender<Result<proto::GatewayMessage, Status>>,
    hb: Duration,
) -> Result<(Vec<Arc<SessionCore>>, Vec<proto::GatewayMessage>), Status> {
    let mut lost = Vec::new();
    let sb = st.sandboxes.get_mut(&claims.sandbox_id).ok_or_else(|| {
        Status::not_found(format!(
            "sandbox {} is not known to this gateway",
            claims.sandbox_id
        ))
    })?;
    if sb.claim_uid != claims.claim_uid {
        return Err(Status::permission_denied(
            "the sandbox is bound to another claim now",
        ));
    }
    // A revoked claim's supervisor is accepted and told to release: refusing it would
    // lose the release report, which comes on a Connect of its own when the
    // supervisor learned of the end elsewhere (a refresh denial, SIGTERM). A finished
    // release has nothing more to say.
    let revoked = sb.revoked.then(|| sb.gone_reason()).flatten();
    if sb.release == ReleaseState::Done {
        let why = sb.gone_reason().unwrap_or_default();
        return Err(Status::permission_denied(format!(
            "{why}; release the sandbox"
        )));
    }
    // Accepted must be the first frame: queue it under the lock (the channel is fresh,
    // so it has room) before the stream is installed where OpenSession can reach it.
    let accepted = gw(GwMsg::Accepted(proto::Accepted {
        heartbeat_interval_ms: hb.as_millis() as u32,
    }));
    if tx.try_send(Ok(accepted)).is_err() {
        return Err(Status::unavailable("control stream closed before Accepted"));
    }
    let mut frames = Vec::new();
    let listed: std::collections::HashMap<&str, &proto::SessionState> = hello
        .sessions
        .iter()
        .map(|s| (s.session_id.as_str(), s))
        .collect();
    let tracked: Vec<String> = sb.sessions.keys().cloned().collect();
    for sid in tracked {
        match listed.get(sid.as_str()) {
            Some(state) => {
                let core = &sb.sessions[&sid];
                if let Some(open) = sb.pending_opens.remove(&sid) {
                    // The Started event may have died with the old stream.
                    core.inner().pid = Some(state.pid);
                    let _ = open.send(Ok(state.pid));
                }
                // Stdin the supervisor already has is never needed again.
                core.stdin.acked(state.stdin_offset, false);
                let (stdout_offset, stderr_offset) = core.held();
                frames.push(gw(GwMsg::AttachSession(proto::AttachSession {
                    session_id: sid.clone(),
                    stdout_offset,
                    stderr_offset,
                })));
            }
            None => {
                // OpenSession never reached it, or it restarted: the session is lost.
                if let Some(open) = sb.pending_opens.remove(&sid) {
                    let _ = open.send(Err(ExecError {
                        code: proto::ErrorCode::Unavailable,
                        message: format!("session {sid} was not known to the supervisor after it reconnected; open it again"),
                    }));
                }
                if let Some(core) = sb.sessions.remove(&sid) {
                    lost.push(core);
                }
            }
        }
    }
    for s in &hello.sessions {
        if !sb.sessions.contains_key(&s.session_id) {
            frames.push(forget(&s.session_id));
        }
    }
    if let ReleaseState::Requested { reason, grace_ms } = &sb.release {
        frames.push(gw(GwMsg::Release(proto::Release {
            reason: reason.clone(),
            grace_ms: *grace_ms,
        })));
    } else if let Some(why) = revoked {
        frames.push(gw(GwMsg::Release(proto::Release {
            reason: why,
            grace_ms: 0,
        })));
    }
    sb.confirmed = true;
    if let Some(old) = sb.control.replace(StreamLink {
        gen,
        tx: tx.clone(),
        stop: stop.clone(),
    }) {
        old.end(StopReason::Fail(Status::aborted(format!(
            "replaced by a newer Connect for sandbox {}",
            claims.sandbox_id
        ))));
    }
    Ok((lost, frames))
}

async fn handle_control_message(shared: &Shared, sandbox_id: &str, m: proto::SupervisorMessage) {
    use proto::session_event::Event as SessEv;
    let mut lost = None;
    {
        let mut st = shared.lock();
        let Some(sb) = st.sandboxes.get_mut(sandbox_id) else {
            return;
        };
        match m.msg {
            Some(SupMsg::SessionEvent(ev)) => match ev.event {
                Some(SessEv::Started(s)) => {
                    if let Some(core) = sb.sessions.get(&ev.session_id) {
                        core.inner().pid = Some(s.pid);
                    }
                    if let Some(open) = sb.pending_opens.remove(&ev.session_id) {
                        let _ = open.send(Ok(s.pid));
                    }
                }
                Some(SessEv::Failed(err)) => {
                    lost = sb.sessions.remove(&ev.session_id);
                    let code = proto::ErrorCode::try_from(err.code)
                        .unwrap_or(proto::ErrorCode::Unspecified);
                    if let Some(open) = sb.pending_opens.remove(&ev.session_id) {
                        let _ = open.send(Err(ExecError {
                            code,
                            message: err.message,
                        }));
                    }
                }
                Some(SessEv::Exited(status)) => {
                    if let Some(core) = sb.sessions.get(&ev.session_id) {
                        core.inner().exit_from_control = Some(status);
                    }
                }
                None => {}
            },
            Some(SupMsg::ReleaseReport(report)) => {
                tracing::info!(event = "gateway.release.reported", sandbox_id, files_removed = report.files_removed,
                    bytes_removed = report.bytes_removed, error = %report.error, "release report received");
                sb.report = Some(report);
            }
            Some(SupMsg::ChannelFailed(f)) => {
                drop(st);
                super::channels::failed(shared, sandbox_id, f);
                shared.bump();
                return;
            }
            Some(SupMsg::Heartbeat(_)) | Some(SupMsg::Hello(_)) | None => {}
        }
    }
    if let Some(core) = lost {
        core.mark_lost().await;
    }
    shared.bump();
}
