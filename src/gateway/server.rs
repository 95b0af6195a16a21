//! The `Gateway` gRPC service: register/park/activate, sandbox tokens, and the control
//! stream. Session streams live in `sessions.rs`.

use super::driver::ExecError;
use super::issuer::unix_now;
use super::sessions::{forget, run_session_stream, FIRST_FRAME_TIMEOUT};
use super::state::{PodEntry, ReleaseState, SandboxEntry, Shared, Stop, StopReason, StreamLink};
use super::tokens::{PodIdentity, SandboxClaims, TokenError};
use crate::identity::bearer_from_metadata;
use crate::proto;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::register_event::Event as RegEvent;
use crate::proto::supervisor_message::Msg as SupMsg;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) struct GatewayService {
    pub shared: Arc<Shared>,
}

fn boxed<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> BoxStream<T> {
    Box::pin(ReceiverStream::new(rx))
}

fn fixed<T: Send + 'static>(items: Vec<T>) -> BoxStream<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

fn reg(event: RegEvent) -> proto::RegisterEvent {
    proto::RegisterEvent { event: Some(event) }
}

fn gw(msg: GwMsg) -> proto::GatewayMessage {
    proto::GatewayMessage { msg: Some(msg) }
}

fn rejected(reason: String) -> proto::RegisterEvent {
    reg(RegEvent::Rejected(proto::Rejected {
        reason,
        retryable: false,
    }))
}

impl Shared {
    /// Validates the projected token of a call.
    fn projected_identity(
        &self,
        meta: &tonic::metadata::MetadataMap,
    ) -> Result<PodIdentity, TokenError> {
        let token = bearer_from_metadata(meta).ok_or(TokenError::Missing)?;
        self.projected.validate(&token)
    }

    /// Validates the sandbox token of a call.
    pub(crate) fn sandbox_claims(
        &self,
        meta: &tonic::metadata::MetadataMap,
    ) -> Result<SandboxClaims, Status> {
        let token = bearer_from_metadata(meta)
            .ok_or_else(|| Status::unauthenticated(TokenError::Missing.to_string()))?;
        self.sandbox_tokens.validate(&token).map_err(|e| {
            Status::unauthenticated(format!(
                "sandbox token rejected: {e}; re-issue it with IssueSandboxToken"
            ))
        })
    }

    /// A fresh activation for `sb` (a new sandbox token every time).
    pub(crate) fn activation(&self, sb: &SandboxEntry) -> Result<proto::Activation, Status> {
        let (token, token_expires_at_ms) = self
            .sandbox_tokens
            .mint(&sb.id, &sb.claim_uid, &sb.pod_uid)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(proto::Activation {
            sandbox_id: sb.id.clone(),
            claim_uid: sb.claim_uid.clone(),
            pod_uid: sb.pod_uid.clone(),
            token: token.expose().to_owned(),
            token_expires_at_ms,
            labels: sb.labels.clone(),
        })
    }
}

/// What Register decided, computed under the state lock.
enum RegisterPlan {
    Events(Vec<proto::RegisterEvent>),
    Park,
}

#[tonic::async_trait]
impl proto::gateway_server::Gateway for GatewayService {
    type RegisterStream = BoxStream<proto::RegisterEvent>;
    type ConnectStream = BoxStream<proto::GatewayMessage>;
    type SessionStream = BoxStream<proto::SessionDown>;

    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let shared = &self.shared;
        let ident = shared.projected_identity(request.metadata());
        let req = request.into_inner();
        let claimed_pod = req.pod.clone().unwrap_or_default();
        let ident = match ident {
            Ok(i) => i,
            Err(e) => {
                {
                    let mut st = shared.lock();
                    let s = st.stats_mut(&claimed_pod.name);
                    s.register_attempts += 1;
                    s.rejected += 1;
                }
                shared.bump();
                tracing::warn!(event = "gateway.register.unauthenticated", pod = %claimed_pod.name, error = %e, "register rejected");
                return Err(Status::unauthenticated(format!(
                    "projected token rejected: {e}"
                )));
            }
        };

        let plan = self.plan_register(&ident, &req);
        let stream = match plan {
            Ok(RegisterPlan::Events(events)) => fixed(events),
            Ok(RegisterPlan::Park) => self.park(&ident, &req),
            Err(reason) => {
                tracing::warn!(event = "gateway.register.rejected", pod = %ident.pod_name, reason = %reason, "register rejected");
                fixed(vec![rejected(reason)])
            }
        };
        shared.bump();
        Ok(Response::new(stream))
    }

    async fn issue_sandbox_token(
        &self,
        request: Request<proto::IssueSandboxTokenRequest>,
    ) -> Result<Response<proto::IssueSandboxTokenResponse>, Status> {
        let shared = &self.shared;
        let ident = shared.projected_identity(request.metadata());
        let req = request.into_inner();
        let claimed_pod = req.pod.clone().unwrap_or_default();
        let ident = match ident {
            Ok(i) => i,
            Err(e) => {
                shared.lock().stats_mut(&claimed_pod.name).issue_attempts += 1;
                shared.bump();
                return Err(Status::unauthenticated(format!(
                    "projected token rejected: {e}"
                )));
            }
        };
        let result = {
            let mut st = shared.lock();
            st.stats_mut(&ident.pod_name).issue_attempts += 1;
            issue_locked(shared, &mut st, &ident, &req)
        };
        if result.is_ok() {
            shared.lock().stats_mut(&ident.pod_name).issued += 1;
        }
        shared.bump();
        result.map(|activation| {
            Response::new(proto::IssueSandboxTokenResponse {
                activation: Some(activation),
            })
        })
    }

    async fn refresh_sandbox_token(
        &self,
        request: Request<proto::RefreshSandboxTokenRequest>,
    ) -> Result<Response<proto::RefreshSandboxTokenResponse>, Status> {
        let shared = &self.shared;
        let claims = shared.sandbox_claims(request.metadata())?;
        let pod_name = {
            let mut st = shared.lock();
            let sb = st.sandboxes.get_mut(&claims.sandbox_id).ok_or_else(|| {
                Status::not_found(format!(
                    "sandbox {} is not known to this gateway",
                    claims.sandbox_id
                ))
            })?;
            if sb.claim_uid != claims.claim_uid {
                return Err(Status::permission_denied(format!(
                    "sandbox {} is bound to another claim now",
                    claims.sandbox_id
                )));
            }
            if let Some(why) = sb.gone_reason() {
                return Err(Status::permission_denied(format!(
                    "{why}; release the sandbox"
                )));
            }
            sb.confirmed = true;
            let name = sb.pod_name.clone();
            st.stats_mut(&name).refreshed += 1;
            name
        };
        shared.bump();
        let (token, token_expires_at_ms) = shared
            .sandbox_tokens
            .mint(&claims.sandbox_id, &claims.claim_uid, &claims.pod_uid)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::debug!(event = "gateway.token.refreshed", pod = %pod_name, sandbox_id = %claims.sandbox_id, token = %token, "sandbox token refreshed");
        Ok(Response::new(proto::RefreshSandboxTokenResponse {
            token: token.expose().to_owned(),
            token_expires_at_ms,
        }))
    }

    async fn connect(
        &self,
        request: Request<Streaming<proto::SupervisorMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let claims = self.shared.sandbox_claims(request.metadata())?;
        let inbound = request.into_inner();
        // Sized so Accepted and every re-attach fit without waiting (queued under the lock).
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run_control(Arc::clone(&self.shared), claims, inbound, tx));
        Ok(Response::new(boxed(rx)))
    }

    async fn session(
        &self,
        request: Request<Streaming<proto::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let claims = self.shared.sandbox_claims(request.metadata())?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(run_session_stream(
            Arc::clone(&self.shared),
            claims,
            inbound,
            tx,
        ));
        Ok(Response::new(boxed(rx)))
    }
}

/// IssueSandboxToken under the state lock.
fn issue_locked(
    shared: &Shared,
    st: &mut super::state::State,
    ident: &PodIdentity,
    req: &proto::IssueSandboxTokenRequest,
) -> Result<proto::Activation, Status> {
    if let Some(pod) = &req.pod {
        if !pod.uid.is_empty() && pod.uid != ident.pod_uid {
            return Err(Status::permission_denied(format!(
                "request names pod uid {} but the projected token is for pod {} uid {}",
                pod.uid, ident.pod_name, ident.pod_uid
            )));
        }
    }
    let sandbox_id = st
        .pods
        .get(&ident.pod_name)
        .filter(|p| p.uid == ident.pod_uid)
        .and_then(|p| p.sandbox_id.clone());
    let Some(sb) = sandbox_id.and_then(|id| st.sandboxes.get_mut(&id)) else {
        return Err(Status::failed_precondition(format!(
            "pod {} is not claimed yet; wait for the Register push or the claim annotation",
            ident.pod_name
        )));
    };
    if let Some(resume) = &req.resume {
        if !resume.claim_uid.is_empty() && resume.claim_uid != sb.claim_uid {
            return Err(Status::permission_denied(format!(
                "resume names claim {} but pod {} is bound to claim {}; refuse the binding",
                resume.claim_uid, ident.pod_name, sb.claim_uid
            )));
        }
    }
    if let Some(why) = sb.gone_reason() {
        return Err(Status::permission_denied(format!(
            "{why}; release the sandbox"
        )));
    }
    shared.activation(sb)
}

impl GatewayService {
    /// Decides what a valid Register gets: an immediate answer, or parking.
    fn plan_register(
        &self,
        ident: &PodIdentity,
        req: &proto::RegisterRequest,
    ) -> Result<RegisterPlan, String> {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.stats_mut(&ident.pod_name).register_attempts += 1;
        let result = plan_register_locked(shared, &mut st, ident, req);
        if result.is_err() {
            st.stats_mut(&ident.pod_name).rejected += 1;
        }
        if let Ok(RegisterPlan::Events(ev)) = &result {
            if ev
                .iter()
                .any(|e| matches!(e.event, Some(RegEvent::Activation(_))))
            {
                st.stats_mut(&ident.pod_name).activations_pushed += 1;
            }
        }
        result
    }

    /// Parks the pod: `Parked`, heartbeats, then the activation (pushed by `claim`) or a
    /// clean end when the token nears expiry.
    fn park(
        &self,
        ident: &PodIdentity,
        req: &proto::RegisterRequest,
    ) -> BoxStream<proto::RegisterEvent> {
        let shared = Arc::clone(&self.shared);
        let hb = shared.cfg.heartbeat_interval;
        let (tx, rx) = mpsc::channel(16);
        // A fresh channel: Parked is queued before anyone else can see the link.
        let _ = tx.try_send(Ok(reg(RegEvent::Parked(proto::Parked {
            heartbeat_interval_ms: hb.as_millis() as u32,
        }))));
        let gen = shared.next_gen();
        let stop = Stop::new();
        {
            let mut st = shared.lock();
            let pod = st
                .pods
                .entry(ident.pod_name.clone())
                .or_insert_with(|| PodEntry {
                    namespace: ident.namespace.clone(),
                    name: ident.pod_name.clone(),
                    uid: ident.pod_uid.clone(),
                    instance_id: String::new(),
                    seed: None,
                    parked: None,
                    sandbox_id: None,
                    released: false,
                });
            pod.instance_id = req.instance_id.clone();
            pod.seed = req.seed.clone();
            // The supervisor re-registered: its older parked stream is dead or superseded.
            if let Some(old) = pod.parked.replace(StreamLink {
                gen,
                tx: tx.clone(),
                stop: stop.clone(),
            }) {
                old.end(StopReason::Clean);
            }
            st.stats_mut(&ident.pod_name).parked += 1;
        }
        tracing::info!(event = "gateway.register.parked", pod = %ident.pod_name, instance_id = %req.instance_id, "pod parked");

        // End before the shown token expires, but never sooner than half its remaining life.
        let remaining = (ident.token_exp - unix_now()).max(0) as u64;
        let margin = shared.cfg.park_expiry_margin.as_secs().min(remaining / 2);
        let park_for = Duration::from_secs(remaining.saturating_sub(margin).max(1));
        let pod_name = ident.pod_name.clone();
        tokio::spawn(async move {
            let mut stopped = stop.listener();
            let deadline = tokio::time::sleep(park_for);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
            let expired = loop {
                tokio::select! {
                    reason = stopped.fired() => {
                        if let StopReason::Fail(s) = reason { let _ = tx.send(Err(s)).await; }
                        break false;
                    }
                    _ = &mut deadline => break true,
                    _ = tx.closed() => break false,
                    _ = tick.tick() => { let _ = tx.try_send(Ok(reg(RegEvent::Heartbeat(proto::Heartbeat {})))); }
                }
            };
            {
                let mut st = shared.lock();
                if let Some(pod) = st.pods.get_mut(&pod_name) {
                    if pod.parked.as_ref().map(|l| l.gen) == Some(gen) {
                        pod.parked = None;
                    }
                }
                if expired {
                    st.stats_mut(&pod_name).park_expired += 1;
                }
            }
            if expired {
                tracing::info!(event = "gateway.register.park_expired", pod = %pod_name, "ending parked stream: the projected token it was shown nears expiry");
            }
            shared.bump();
        });
        boxed(rx)
    }
}

fn plan_register_locked(
    shared: &Shared,
    st: &mut super::state::State,
    ident: &PodIdentity,
    req: &proto::RegisterRequest,
) -> Result<RegisterPlan, String> {
    if let Some(pod) = &req.pod {
        if !pod.uid.is_empty() && pod.uid != ident.pod_uid {
            return Err(format!(
                "pod uid mismatch: the supervisor says {} but the projected token is for pod {}/{} uid {}; check the downward-API pod uid",
                pod.uid, ident.namespace, ident.pod_name, ident.pod_uid
            ));
        }
        if !pod.name.is_empty() && pod.name != ident.pod_name {
            return Err(format!(
                "pod name mismatch: the supervisor says {} but the projected token is for pod {}",
                pod.name, ident.pod_name
            ));
        }
    }
    // Same name, new uid: a new pod took the name; forget the old one's binding.
    if let Some(pod) = st.pods.get_mut(&ident.pod_name) {
        if pod.uid != ident.pod_uid {
            if let Some(old) = pod.parked.take() {
                old.end(StopReason::Clean);
            }
            st.pods.remove(&ident.pod_name);
        }
    }
    let pod = st.pods.get(&ident.pod_name);
    if pod.is_some_and(|p| p.released) && req.resume.is_none() {
        return Err(format!(
            "pod {} was released and is never reused; the pod should be deleted",
            ident.pod_name
        ));
    }
    let current = pod.and_then(|p| p.sandbox_id.clone());
    match (current, &req.resume) {
        (None, None) => Ok(RegisterPlan::Park),
        (None, Some(resume)) => Err(format!(
            "resume names claim {} but pod {} has no binding at this gateway; the claim is gone, release",
            resume.claim_uid, ident.pod_name
        )),
        (Some(id), resume) => {
            let sb = st
                .sandboxes
                .get(&id)
                .ok_or_else(|| format!("internal: pod {} names unknown sandbox {id}", ident.pod_name))?;
            if let Some(why) = sb.gone_reason() {
                return Err(format!("{why}; release and do not register again"));
            }
            match resume {
                Some(r) if r.claim_uid == sb.claim_uid => {}
                Some(r) => {
                    return Err(format!(
                        "resume names claim {} but pod {} is bound to claim {}",
                        r.claim_uid, ident.pod_name, sb.claim_uid
                    ))
                }
                // Not yet confirmed: the earlier activation may never have arrived.
                None if !sb.confirmed => {}
                None => {
                    return Err(format!(
                        "pod is already bound to claim {} (sandbox {}); a bound supervisor must register with `resume`",
                        sb.claim_uid, sb.id
                    ))
                }
            }
            let activation = shared.activation(sb).map_err(|s| s.message().to_owned())?;
            Ok(RegisterPlan::Events(vec![reg(RegEvent::Activation(activation))]))
        }
    }
}

/// The control stream after authentication: Hello, Accepted, re-attach/forget, then
/// heartbeats and session events until the stream ends or is replaced.
async fn run_control(
    shared: Arc<Shared>,
    claims: SandboxClaims,
    mut inbound: Streaming<proto::SupervisorMessage>,
    tx: mpsc::Sender<Result<proto::GatewayMessage, Status>>,
) {
    let hello = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(proto::SupervisorMessage {
            msg: Some(SupMsg::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first frame of a Connect stream must be Hello",
                )))
                .await;
            return;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let _ = tx
                .send(Err(Status::invalid_argument(format!(
                    "no Hello within {FIRST_FRAME_TIMEOUT:?} of opening the Connect stream"
                ))))
                .await;
            return;
        }
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
    let lost = match accepted {
        Ok(lost) => lost,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
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
/// installs the stream as the sandbox's control stream. Returns the sessions found lost.
fn accept_hello_locked(
    st: &mut super::state::State,
    claims: &SandboxClaims,
    hello: &proto::Hello,
    gen: u64,
    stop: &Stop,
    tx: &mpsc::Sender<Result<proto::GatewayMessage, Status>>,
    hb: Duration,
) -> Result<Vec<Arc<super::sessions::SessionCore>>, Status> {
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
    if let Some(why) = sb.gone_reason() {
        return Err(Status::permission_denied(format!(
            "{why}; release the sandbox"
        )));
    }
    let mut frames = vec![gw(GwMsg::Accepted(proto::Accepted {
        heartbeat_interval_ms: hb.as_millis() as u32,
    }))];
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
    }
    for f in frames {
        // The channel is fresh and large enough: these are queued before any OpenSession.
        if tx.try_send(Ok(f)).is_err() {
            tracing::warn!(event = "gateway.control.frames_overflow", sandbox_id = %claims.sandbox_id, "too many sessions to re-attach in one Hello");
        }
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
    Ok(lost)
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
            Some(SupMsg::Heartbeat(_)) | Some(SupMsg::Hello(_)) | None => {}
        }
    }
    if let Some(core) = lost {
        core.mark_lost().await;
    }
    shared.bump();
}
