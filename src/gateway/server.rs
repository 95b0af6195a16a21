//! The `Gateway` gRPC service: authentication and dispatch. Register/park/issue live in
//! `register.rs`, the control stream in `control.rs`, session streams in `sessions.rs`.

use super::sessions::run_session_stream;
use super::state::{SandboxEntry, Shared};
use super::tokens::{PodIdentity, SandboxClaims, TokenError};
use crate::identity::bearer_from_metadata;
use crate::proto;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::register_event::Event as RegEvent;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) struct GatewayService {
    pub shared: Arc<Shared>,
}

pub(crate) fn boxed<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> BoxStream<T> {
    Box::pin(ReceiverStream::new(rx))
}

/// The response stream for `rx`. With `lazy` the call's future waits for the first
/// message, so the headers go out with it (grpcio's default) rather than at once.
async fn respond<T: Send + 'static>(
    mut rx: mpsc::Receiver<Result<T, Status>>,
    lazy: bool,
) -> Result<Response<BoxStream<T>>, Status> {
    if !lazy {
        return Ok(Response::new(boxed(rx)));
    }
    match rx.recv().await {
        // A status before any message is the call's own answer (trailers only).
        Some(Err(status)) => Err(status),
        Some(Ok(first)) => {
            let rest = ReceiverStream::new(rx);
            Ok(Response::new(Box::pin(
                tokio_stream::once(Ok(first)).chain(rest),
            )))
        }
        None => Ok(Response::new(fixed(Vec::new()))),
    }
}

pub(crate) fn fixed<T: Send + 'static>(items: Vec<T>) -> BoxStream<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

pub(crate) fn reg(event: RegEvent) -> proto::RegisterEvent {
    proto::RegisterEvent { event: Some(event) }
}

pub(crate) fn gw(msg: GwMsg) -> proto::GatewayMessage {
    proto::GatewayMessage { msg: Some(msg) }
}

pub(crate) fn rejected(reason: String) -> proto::RegisterEvent {
    reg(RegEvent::Rejected(proto::Rejected {
        reason,
        retryable: false,
    }))
}

impl Shared {
    /// Validates the projected token of a call.
    fn projected_identity<T>(
        &self,
        call: &'static str,
        request: &Request<T>,
        claimed_pod: &str,
    ) -> Result<PodIdentity, TokenError> {
        let token = bearer_from_metadata(request.metadata()).ok_or(TokenError::Missing)?;
        let result = self.projected.validate(&token);
        let client_cert = request.peer_certs().is_some_and(|c| !c.is_empty());
        self.lock()
            .presented
            .entry(claimed_pod.to_owned())
            .or_default()
            .push(super::state::PresentedToken {
                call,
                fingerprint: token.fingerprint(),
                client_cert,
                valid: result.is_ok(),
            });
        result
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
        self.note_minted(&token);
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

#[tonic::async_trait]
impl proto::gateway_server::Gateway for GatewayService {
    type RegisterStream = BoxStream<proto::RegisterEvent>;
    type ConnectStream = BoxStream<proto::GatewayMessage>;
    type SessionStream = BoxStream<proto::SessionDown>;
    type FileStream = BoxStream<proto::FileDown>;
    type ForwardStream = BoxStream<proto::ForwardDown>;

    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let shared = &self.shared;
        let claimed_pod = request.get_ref().pod.clone().unwrap_or_default();
        let ident = shared.projected_identity("register", &request, &claimed_pod.name);
        let req = request.into_inner();
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
            Ok(super::register::RegisterPlan::Events(events)) => fixed(events),
            Ok(super::register::RegisterPlan::Park) => self.park(&ident, &req),
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
        let claimed_pod = request.get_ref().pod.clone().unwrap_or_default();
        let ident = shared.projected_identity("issue", &request, &claimed_pod.name);
        let req = request.into_inner();
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
            super::register::issue_locked(shared, &mut st, &ident, &req)
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
        shared.note_minted(&token);
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
        tokio::spawn(super::control::run_control(
            Arc::clone(&self.shared),
            claims,
            inbound,
            tx,
        ));
        respond(rx, self.shared.cfg.lazy_headers).await
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
        respond(rx, self.shared.cfg.lazy_headers).await
    }

    async fn file(
        &self,
        request: Request<Streaming<proto::FileUp>>,
    ) -> Result<Response<Self::FileStream>, Status> {
        use proto::file_up::Msg;
        let claims = self.shared.sandbox_claims(request.metadata())?;
        let mut up = request.into_inner();
        let attach = match first_frame(&mut up).await? {
            proto::FileUp {
                msg: Some(Msg::Attach(a)),
            } => a,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first frame of a File stream must be FileAttach, got {other:?}"
                )))
            }
        };
        let (tx, rx) = mpsc::channel(32);
        let id = attach.transfer_id.clone();
        let opened = super::channels::Opened { up, down: tx };
        super::channels::deliver(
            &self.shared,
            &claims.sandbox_id,
            &id,
            super::channels::Attached::File(opened, attach),
        )?;
        respond(rx, self.shared.cfg.lazy_headers).await
    }

    async fn forward(
        &self,
        request: Request<Streaming<proto::ForwardUp>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        use proto::forward_up::Msg;
        let claims = self.shared.sandbox_claims(request.metadata())?;
        let mut up = request.into_inner();
        let attach = match first_frame(&mut up).await? {
            proto::ForwardUp {
                msg: Some(Msg::Attach(a)),
            } => a,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first frame of a Forward stream must be ForwardAttach, got {other:?}"
                )))
            }
        };
        let (tx, rx) = mpsc::channel(32);
        let opened = super::channels::Opened { up, down: tx };
        super::channels::deliver(
            &self.shared,
            &claims.sandbox_id,
            &attach.forward_id,
            super::channels::Attached::Forward(opened),
        )?;
        respond(rx, self.shared.cfg.lazy_headers).await
    }
}

/// The first frame of a supervisor-opened stream, bounded: a stream that never says
/// what it is for must not hold a task.
async fn first_frame<T>(up: &mut Streaming<T>) -> Result<T, Status> {
    match tokio::time::timeout(super::channels::ATTACH_TIMEOUT, up.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(Status::invalid_argument(
            "the stream ended before its attach frame",
        )),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded(
            "no attach frame within the attach timeout",
        )),
    }
}
