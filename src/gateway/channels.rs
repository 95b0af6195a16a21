//! File and Forward streams as the gateway sees them: a request goes down the control
//! stream (`OpenFile`, `OpenForward`), the supervisor opens a stream of its own for it,
//! and the stream is handed to the caller waiting on that id. A `ChannelFailed` on the
//! control stream resolves the same waiter with the supervisor's error.

use super::driver::ExecError;
use super::sandbox::Sandbox;
use super::state::Shared;
use crate::proto;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::{Status, Streaming};

/// How long a caller waits for the supervisor to open the stream of its request.
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Both directions of one stream the supervisor opened.
pub struct Opened<Up, Down> {
    /// What the supervisor sends (after its first, attach frame).
    pub up: Streaming<Up>,
    /// What the gateway sends; dropping it ends the gateway's side of the stream.
    pub down: mpsc::Sender<Result<Down, Status>>,
}

/// A stream handed to the caller that asked for it.
pub(crate) enum Attached {
    File(Opened<proto::FileUp, proto::FileDown>, proto::FileAttach),
    Forward(Opened<proto::ForwardUp, proto::ForwardDown>),
}

pub(crate) type ChannelWaiter = oneshot::Sender<Result<Attached, ExecError>>;

fn error(code: proto::ErrorCode, message: String) -> ExecError {
    ExecError { code, message }
}

impl Sandbox {
    /// Sends `open` (an `OpenFile` or `OpenForward` for `id`) and waits for the
    /// supervisor's stream, or its `ChannelFailed`.
    pub(crate) async fn open_channel(
        &self,
        id: &str,
        open: proto::gateway_message::Msg,
    ) -> Result<Attached, ExecError> {
        let (tx, rx) = oneshot::channel();
        let control = {
            let mut st = self.shared.lock();
            let sb = st.sandboxes.get_mut(&self.id).ok_or_else(|| {
                error(
                    proto::ErrorCode::NotFound,
                    format!("sandbox {} is not known to this gateway", self.id),
                )
            })?;
            if let Some(why) = sb.gone_reason() {
                return Err(error(proto::ErrorCode::FailedPrecondition, why));
            }
            let Some(control) = sb.control.as_ref().map(|c| c.tx.clone()) else {
                return Err(error(
                    proto::ErrorCode::Unavailable,
                    format!("sandbox {} is not connected; wait_connected first", self.id),
                ));
            };
            if sb.pending_channels.contains_key(id) {
                return Err(error(
                    proto::ErrorCode::AlreadyExists,
                    format!("a request with id '{id}' is already waiting for its stream"),
                ));
            }
            sb.pending_channels.insert(id.to_owned(), tx);
            control
        };
        let forget = || {
            if let Some(sb) = self.shared.lock().sandboxes.get_mut(&self.id) {
                sb.pending_channels.remove(id);
            }
        };
        let msg = proto::GatewayMessage { msg: Some(open) };
        if control.send(Ok(msg)).await.is_err() {
            forget();
            return Err(error(
                proto::ErrorCode::Unavailable,
                format!("the control stream of sandbox {} closed", self.id),
            ));
        }
        let answer = tokio::time::timeout(ATTACH_TIMEOUT, rx).await;
        forget();
        match answer {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(error(
                proto::ErrorCode::Unavailable,
                format!("request {id} was dropped before its stream opened"),
            )),
            Err(_) => Err(error(
                proto::ErrorCode::Unavailable,
                format!(
                    "the supervisor opened no stream for request {id} within {ATTACH_TIMEOUT:?}"
                ),
            )),
        }
    }
}

/// Hands a stream the supervisor opened to the caller waiting on `id`. A stream nobody
/// waits for (an unknown id, or a caller that gave up) is refused.
pub(crate) fn deliver(
    shared: &Shared,
    sandbox_id: &str,
    id: &str,
    attached: Attached,
) -> Result<(), Status> {
    let waiter = shared
        .lock()
        .sandboxes
        .get_mut(sandbox_id)
        .and_then(|sb| sb.pending_channels.remove(id));
    let Some(waiter) = waiter else {
        return Err(Status::not_found(format!(
            "no request with id '{id}' is waiting for a stream in sandbox {sandbox_id}"
        )));
    };
    waiter
        .send(Ok(attached))
        .map_err(|_| Status::cancelled(format!("the caller of request {id} gave up")))
}

/// A `ChannelFailed` from the supervisor: the waiting caller gets its error.
pub(crate) fn failed(shared: &Shared, sandbox_id: &str, f: proto::ChannelFailed) {
    let waiter = shared
        .lock()
        .sandboxes
        .get_mut(sandbox_id)
        .and_then(|sb| sb.pending_channels.remove(&f.id));
    let err = f.error.unwrap_or_default();
    let code = proto::ErrorCode::try_from(err.code).unwrap_or(proto::ErrorCode::Unspecified);
    match waiter {
        Some(w) => {
            let _ = w.send(Err(error(code, err.message)));
        }
        None => {
            tracing::debug!(event = "gateway.channel_failed_unknown", sandbox_id, id = %f.id, "ChannelFailed for a request nobody waits for")
        }
    }
}
