//! A claimed sandbox as the driver sees it: exec sessions and release.

use super::driver::ExecError;
use super::exec_handle::Exec;
use super::sessions::SessionCore;
use super::state::{ReleaseState, Shared};
use crate::proto;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::relay::channel::MAX_MESSAGE_BYTES;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A claimed sandbox. Cloning is cheap.
#[derive(Clone)]
pub struct Sandbox {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: String,
    pub(crate) claim_uid: String,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("claim_uid", &self.claim_uid)
            .finish()
    }
}

/// How long `exec` waits for Started/Failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Refuses an `OpenSession` the supervisor could not decode. Past the message limit
/// the frame would break the supervisor's control stream (it reconnects, and the
/// session never starts), so the caller hears here what to do instead.
fn check_open_size(open: &proto::GatewayMessage) -> Result<(), ExecError> {
    let size = prost::Message::encoded_len(open);
    if size <= MAX_MESSAGE_BYTES {
        return Ok(());
    }
    Err(ExecError {
        code: proto::ErrorCode::InvalidArgument,
        message: format!(
            "the exec request is {size} bytes, over the relay's message limit of {MAX_MESSAGE_BYTES} bytes \
             ({} MiB): argv, env, cwd and user travel in one OpenSession frame. Pass large data on stdin \
             instead (ExecSpec.stdin = true: any total size, written in pieces under the limit), or in a \
             file in the workspace",
            MAX_MESSAGE_BYTES >> 20
        ),
    })
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn claim_uid(&self) -> &str {
        &self.claim_uid
    }

    /// Opens a session and waits until the supervisor reports it started or failed.
    pub async fn exec(&self, spec: proto::ExecSpec) -> Result<Exec, ExecError> {
        let session_id = super::driver::short_id("s");
        let open = proto::GatewayMessage {
            msg: Some(GwMsg::OpenSession(proto::OpenSession {
                session_id: session_id.clone(),
                spec: Some(spec),
            })),
        };
        check_open_size(&open)?;
        let (open_tx, open_rx) = oneshot::channel();
        let (core, rx) = SessionCore::new(session_id.clone());
        let control = {
            let mut st = self.shared.lock();
            let sb = st.sandboxes.get_mut(&self.id).ok_or_else(|| ExecError {
                code: proto::ErrorCode::NotFound,
                message: format!("sandbox {} is not known to this gateway", self.id),
            })?;
            if let Some(why) = sb.gone_reason() {
                return Err(ExecError {
                    code: proto::ErrorCode::FailedPrecondition,
                    message: why,
                });
            }
            let Some(control) = sb.control.as_ref().map(|c| c.tx.clone()) else {
                return Err(ExecError {
                    code: proto::ErrorCode::Unavailable,
                    message: format!("sandbox {} is not connected; wait_connected first", self.id),
                });
            };
            sb.sessions.insert(session_id.clone(), Arc::clone(&core));
            sb.pending_opens.insert(session_id.clone(), open_tx);
            control
        };
        let forget_on_error = |this: &Self| {
            let mut st = this.shared.lock();
            if let Some(sb) = st.sandboxes.get_mut(&this.id) {
                sb.sessions.remove(&session_id);
                sb.pending_opens.remove(&session_id);
            }
        };
        if control.send(Ok(open)).await.is_err() {
            forget_on_error(self);
            return Err(ExecError {
                code: proto::ErrorCode::Unavailable,
                message: format!(
                    "the control stream of sandbox {} closed while opening the session",
                    self.id
                ),
            });
        }
        let outcome = match tokio::time::timeout(OPEN_TIMEOUT, open_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ExecError {
                code: proto::ErrorCode::Unavailable,
                message: format!("session {session_id} was dropped before it started"),
            }),
            Err(_) => Err(ExecError {
                code: proto::ErrorCode::Unavailable,
                message: format!(
                    "no Started or Failed for session {session_id} within {OPEN_TIMEOUT:?}"
                ),
            }),
        };
        match outcome {
            Ok(pid) => Ok(Exec {
                core,
                rx,
                pid,
                consumed: (0, 0),
                acked: (0, 0),
            }),
            Err(e) => {
                forget_on_error(self);
                Err(e)
            }
        }
    }

    /// Sends `AttachSession{session_id, offsets}` as given, to probe how the supervisor
    /// answers an id it may not know. Returns the `Failed` error it reports, or None if
    /// none arrives within `wait` (it knew the session). For tests and diagnostics;
    /// sessions opened with `exec` are re-attached automatically.
    pub async fn attach_raw(
        &self,
        session_id: &str,
        stdout_offset: u64,
        stderr_offset: u64,
        wait: Duration,
    ) -> anyhow::Result<Option<super::ExecError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let control = {
            let mut st = self.shared.lock();
            let Some(sb) = st.sandboxes.get_mut(&self.id) else {
                anyhow::bail!("sandbox {} is not known to this gateway", self.id);
            };
            let Some(control) = sb.control.as_ref().map(|c| c.tx.clone()) else {
                anyhow::bail!("sandbox {} is not connected; wait_connected first", self.id);
            };
            // A Failed event for this id resolves the same waiter an open would.
            sb.pending_opens.insert(session_id.to_owned(), tx);
            control
        };
        let msg = proto::GatewayMessage {
            msg: Some(proto::gateway_message::Msg::AttachSession(
                proto::AttachSession {
                    session_id: session_id.to_owned(),
                    stdout_offset,
                    stderr_offset,
                },
            )),
        };
        control
            .send(Ok(msg))
            .await
            .map_err(|_| anyhow::anyhow!("the control stream of sandbox {} closed", self.id))?;
        let answer = tokio::time::timeout(wait, rx).await;
        if let Some(sb) = self.shared.lock().sandboxes.get_mut(&self.id) {
            sb.pending_opens.remove(session_id);
        }
        Ok(match answer {
            Ok(Ok(Err(e))) => Some(e),
            _ => None,
        })
    }

    /// Sends `msg` on the control stream exactly as given, bypassing every check the
    /// other calls make (the message limit included), to see how a supervisor copes
    /// with what another gateway might send. For tests and diagnostics.
    pub async fn send_control_raw(&self, msg: proto::GatewayMessage) -> anyhow::Result<()> {
        let control = {
            let st = self.shared.lock();
            let Some(sb) = st.sandboxes.get(&self.id) else {
                anyhow::bail!("sandbox {} is not known to this gateway", self.id);
            };
            let Some(control) = sb.control.as_ref().map(|c| c.tx.clone()) else {
                anyhow::bail!("sandbox {} is not connected; wait_connected first", self.id);
            };
            control
        };
        control
            .send(Ok(msg))
            .await
            .map_err(|_| anyhow::anyhow!("the control stream of sandbox {} closed", self.id))
    }

    /// Sends `Release` (now, or right after the next Accepted if not connected) and
    /// waits up to `timeout` for the ReleaseReport. Afterwards the claim is released
    /// (refresh → PERMISSION_DENIED) and the pod is never reused.
    pub async fn release(
        &self,
        reason: &str,
        grace: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Option<proto::ReleaseReport>> {
        let grace_ms = grace.as_millis().min(u32::MAX as u128) as u32;
        let control = {
            let mut st = self.shared.lock();
            let Some(sb) = st.sandboxes.get_mut(&self.id) else {
                anyhow::bail!("sandbox {} is not known to this gateway", self.id);
            };
            if sb.release == ReleaseState::Done {
                return Ok(sb.report.clone());
            }
            sb.release = ReleaseState::Requested {
                reason: reason.to_owned(),
                grace_ms,
            };
            sb.control.as_ref().map(|c| c.tx.clone())
        };
        if let Some(tx) = control {
            let _ = tx
                .send(Ok(proto::GatewayMessage {
                    msg: Some(GwMsg::Release(proto::Release {
                        reason: reason.to_owned(),
                        grace_ms,
                    })),
                }))
                .await;
        }
        tracing::info!(event = "gateway.release.sent", sandbox_id = %self.id, reason, grace_ms, "release requested");
        let id = self.id.clone();
        let report = self
            .shared
            .wait_for(
                timeout,
                || format!("the release report of sandbox {id}"),
                |st| st.sandboxes.get(&id).and_then(|s| s.report.clone()),
            )
            .await
            .ok();
        {
            let mut st = self.shared.lock();
            let pod_name = st.sandboxes.get_mut(&self.id).map(|sb| {
                sb.release = ReleaseState::Done;
                sb.pod_name.clone()
            });
            if let Some(pod) = pod_name.and_then(|n| st.pods.get_mut(&n)) {
                pod.released = true;
            }
        }
        self.shared.bump();
        Ok(report)
    }
}
