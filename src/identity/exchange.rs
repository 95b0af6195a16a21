//! Talking identity with the gateway: park warm with `Register`, race the pushed
//! activation against the claim hint (`IssueSandboxToken`), and keep the sandbox token
//! fresh (`RefreshSandboxToken`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

use super::{read_hint, Backoff, HintWatch, ProjectedToken, SandboxCredentials, WatchMode};
use crate::proto::{self, register_event};
use crate::relay::channel::{authed, client, describe_status, GatewayChannel};
use crate::telemetry::Telemetry;

/// Facts about this pod from the downward API.
#[derive(Debug, Clone, Default)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodFacts {
    pub fn to_proto(&self) -> proto::PodRef {
        proto::PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }
}

/// How waiting for a claim ended.
#[derive(Debug)]
pub enum ClaimOutcome {
    Activated(proto::Activation),
    /// The gateway will never bind us (`Rejected{retryable=false}`,
    /// `PERMISSION_DENIED`): refuse, without retrying.
    GatewayRefused(String),
    /// The answer cannot be ours: it names another pod, or two different claims
    /// answered. Refuse rather than pick one.
    Conflict(String),
}

pub struct Exchange {
    /// Rebuilt after every failed call (half-open connections, rotated CA bundles).
    pub channel: GatewayChannel,
    pub projected: ProjectedToken,
    pub pod: PodFacts,
    pub instance_id: String,
    pub seed: Option<proto::SeedInfo>,
    pub hint_path: PathBuf,
    pub hint_key: String,
    pub telemetry: Arc<Telemetry>,
}

/// Checks an activation against what we know; the reason when it must be refused.
pub fn check_activation(
    a: &proto::Activation,
    pod: &PodFacts,
    expected_claim: Option<&str>,
) -> Result<(), String> {
    if a.claim_uid.is_empty() || a.sandbox_id.is_empty() || a.token.is_empty() {
        return Err("activation lacks claim_uid, sandbox_id or token".into());
    }
    if !pod.uid.is_empty() && a.pod_uid != pod.uid {
        return Err(format!(
            "activation names pod uid '{}' but this pod is '{}'",
            a.pod_uid, pod.uid
        ));
    }
    if let Some(claim) = expected_claim {
        if a.claim_uid != claim {
            return Err(format!(
                "activation is for claim '{}' but this pod belongs to claim '{claim}'",
                a.claim_uid
            ));
        }
    }
    Ok(())
}

/// The least wait between `IssueSandboxToken` attempts while the gateway is behind the
/// annotation.
const ISSUE_RETRY_MIN: Duration = Duration::from_millis(200);

impl Exchange {
    /// Parks at the gateway and waits for a claim. `resume` is the binding record of a
    /// supervisor that restarted while bound: only that claim may come back.
    pub async fn await_claim(&self, resume: Option<proto::BindingRecord>) -> ClaimOutcome {
        let expected = resume.as_ref().map(|r| r.claim_uid.clone());
        let push = self.register_until_activated(resume.clone());
        let pull = self.pull_on_hint(resume);
        tokio::pin!(push, pull);
        let first = tokio::select! {
            out = &mut push => out,
            out = &mut pull => out,
        };
        let ClaimOutcome::Activated(a) = first else {
            return first;
        };
        if let Err(why) = check_activation(&a, &self.pod, expected.as_deref()) {
            return ClaimOutcome::Conflict(why);
        }
        // The hint is the claim's own record of who adopted us. If it already names a
        // different claim, two claims answered: fail closed rather than pick one.
        // An unusable annotations file was logged by the poll; it is no hint, as when absent.
        if let Ok(Some(hint)) = read_hint(&self.hint_path, &self.hint_key) {
            if hint != a.claim_uid {
                return ClaimOutcome::Conflict(format!(
                    "conflicting claims: activation for '{}', annotation names '{hint}'",
                    a.claim_uid
                ));
            }
        }
        ClaimOutcome::Activated(a)
    }

    fn register_request(&self, resume: Option<proto::BindingRecord>) -> proto::RegisterRequest {
        proto::RegisterRequest {
            pod: Some(self.pod.to_proto()),
            instance_id: self.instance_id.clone(),
            supervisor_version: crate::config::VERSION.into(),
            seed: self.seed.clone(),
            capabilities: vec!["exec".into(), "pty".into(), "replay".into()],
            resume,
        }
    }

    async fn register_until_activated(&self, resume: Option<proto::BindingRecord>) -> ClaimOutcome {
        let mut backoff = Backoff::default();
        loop {
            match self.register_once(resume.clone(), &mut backoff).await {
                Ok(Some(outcome)) => return outcome,
                Ok(None) => {} // the gateway ended a parked stream: register again now
                Err(why) => {
                    self.telemetry.set_ready(false);
                    self.channel.rebuild();
                    let delay = backoff.next_delay();
                    tracing::warn!(event = "identity.register_failed", reason = %why, retry_in_ms = delay.as_millis() as u64, "registration failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One Register call. `Ok(None)`: parked stream ended cleanly.
    async fn register_once(
        &self,
        resume: Option<proto::BindingRecord>,
        backoff: &mut Backoff,
    ) -> Result<Option<ClaimOutcome>, String> {
        let token = self.projected.read().map_err(|e| e.to_string())?;
        let req = authed(self.register_request(resume), &token).map_err(|e| e.to_string())?;
        self.telemetry.metrics.register_attempts_total.inc();
        tracing::debug!(event = "identity.registering", token = %token, "registering with the projected token");
        let mut events = match client(self.channel.get()).register(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::PermissionDenied => {
                return Ok(Some(ClaimOutcome::GatewayRefused(format!(
                    "gateway denied registration: {}",
                    s.message()
                ))))
            }
            Err(s) => return Err(describe_status(&s)),
        };
        let mut heartbeat = Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout(heartbeat * 3, events.message()).await;
            let msg = match next {
                Err(_) => {
                    return Err(format!(
                        "no heartbeat from the gateway for {:?}",
                        heartbeat * 3
                    ))
                }
                Ok(Err(s)) if s.code() == Code::PermissionDenied => {
                    return Ok(Some(ClaimOutcome::GatewayRefused(format!(
                        "gateway denied registration: {}",
                        s.message()
                    ))))
                }
                Ok(Err(s)) => return Err(describe_status(&s)),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(m))) => m,
            };
            match msg.event {
                Some(register_event::Event::Parked(p)) => {
                    heartbeat = Duration::from_millis(u64::from(p.heartbeat_interval_ms.max(100)));
                    backoff.reset();
                    self.telemetry.set_ready(true);
                    tracing::info!(event = "identity.parked", token = %token, heartbeat_ms = p.heartbeat_interval_ms, "parked warm at the gateway");
                    // Boot is over and the pod may idle for hours: give back the pages of
                    // code it ran once (see pid1::residency).
                    let released = crate::pid1::drop_clean_code();
                    tracing::debug!(
                        event = "pid1.code_released",
                        bytes = released,
                        "unmapped clean pages of the binary until they are needed again"
                    );
                }
                Some(register_event::Event::Heartbeat(_)) => {}
                Some(register_event::Event::Activation(a)) => {
                    tracing::info!(event = "identity.activation", path = "push", claim_uid = %a.claim_uid, sandbox_id = %a.sandbox_id, "activation pushed by the gateway");
                    return Ok(Some(ClaimOutcome::Activated(a)));
                }
                Some(register_event::Event::Rejected(r)) if !r.retryable => {
                    tracing::error!(event = "identity.register_rejected", reason = %r.reason, "the gateway rejected registration for good");
                    return Ok(Some(ClaimOutcome::GatewayRefused(format!(
                        "gateway rejected registration: {}",
                        r.reason
                    ))));
                }
                Some(register_event::Event::Rejected(r)) => {
                    return Err(format!("rejected (retryable): {}", r.reason))
                }
                None => {}
            }
        }
    }

    /// Watches the annotations file (see `hint_watch`); once the claim key appears, asks
    /// for the token.
    async fn pull_on_hint(&self, resume: Option<proto::BindingRecord>) -> ClaimOutcome {
        // The annotation may run ahead of the gateway for a while: poll at most every 2 s.
        let mut backoff = Backoff::with_cap(Duration::from_secs(2));
        // The last problem logged, so a broken file is reported once per change.
        let mut logged: Option<String> = None;
        // Armed before the first read, so a change right after it is still an event.
        let mut watch = HintWatch::new(&self.hint_path);
        let mut mode_logged: Option<WatchMode> = None;
        loop {
            if mode_logged != Some(watch.mode()) {
                log_watch_mode(&watch, &self.hint_path);
                mode_logged = Some(watch.mode());
            }
            let hint = match read_hint(&self.hint_path, &self.hint_key) {
                Ok(hint) => {
                    logged = None;
                    hint
                }
                Err(e) => {
                    let why = e.to_string();
                    if logged.as_deref() != Some(why.as_str()) {
                        // The hint is optional: the gateway's push still activates us.
                        tracing::error!(event = "identity.hint_unusable", path = %self.hint_path.display(), error = %why, "the claim hint cannot be read; waiting for the gateway's push only: {why}");
                        logged = Some(why);
                    }
                    None
                }
            };
            let Some(hint) = hint else {
                watch.changed().await;
                continue;
            };
            match self.issue(&hint, resume.clone()).await {
                Ok(a) => {
                    tracing::info!(event = "identity.activation", path = "pull", claim_uid = %a.claim_uid, sandbox_id = %a.sandbox_id, "activation pulled after the claim hint");
                    if a.claim_uid != hint {
                        return ClaimOutcome::Conflict(format!(
                            "conflicting claims: annotation names '{hint}', gateway answered '{}'",
                            a.claim_uid
                        ));
                    }
                    return ClaimOutcome::Activated(a);
                }
                Err(s) if s.code() == Code::PermissionDenied => {
                    return ClaimOutcome::GatewayRefused(format!(
                        "gateway denied the token for claim '{hint}': {}",
                        s.message()
                    ))
                }
                Err(s) => {
                    // FAILED_PRECONDITION: the annotation is ahead of the gateway.
                    if s.code() != Code::FailedPrecondition {
                        self.channel.rebuild();
                    }
                    let delay = backoff.next_delay().max(ISSUE_RETRY_MIN);
                    tracing::debug!(event = "identity.issue_pending", code = ?s.code(), error = %describe_status(&s), "claim hint seen; gateway not ready yet");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// `IssueSandboxToken` with a freshly read projected token.
    pub async fn issue(
        &self,
        hint: &str,
        resume: Option<proto::BindingRecord>,
    ) -> Result<proto::Activation, tonic::Status> {
        let token = self
            .projected
            .read()
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let msg = proto::IssueSandboxTokenRequest {
            pod: Some(self.pod.to_proto()),
            instance_id: self.instance_id.clone(),
            claim_hint: hint.into(),
            resume,
        };
        let req =
            authed(msg, &token).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        tracing::debug!(event = "identity.issuing", token = %token, claim_hint = hint, "asking for the sandbox token");
        let resp = client(self.channel.get())
            .issue_sandbox_token(req)
            .await?
            .into_inner();
        resp.activation.ok_or_else(|| {
            tonic::Status::internal("gateway answered IssueSandboxToken without an activation")
        })
    }

    /// Keeps the sandbox token fresh until the claim is gone; returns why it is gone.
    pub async fn refresh_until_gone(
        &self,
        creds: SandboxCredentials,
        binding: proto::BindingRecord,
    ) -> String {
        let mut backoff = Backoff::default();
        let mut due = creds.refresh_due();
        loop {
            tokio::time::sleep_until(due.into()).await;
            let req = match authed(proto::RefreshSandboxTokenRequest {}, &creds.token()) {
                Ok(r) => r,
                Err(e) => return e.to_string(),
            };
            let started = Instant::now();
            match client(self.channel.get()).refresh_sandbox_token(req).await {
                Ok(resp) => {
                    let r = resp.into_inner();
                    let token = super::SecretToken::new(r.token);
                    tracing::info!(event = "identity.refreshed", token = %token, expires_in_ms = super::lifetime_from(r.token_expires_at_ms).as_millis() as u64, took_ms = started.elapsed().as_millis() as u64, "sandbox token refreshed");
                    creds.replace(token, r.token_expires_at_ms);
                    self.telemetry.metrics.token_refresh("ok");
                    backoff.reset();
                    due = creds.refresh_due();
                }
                Err(s) if matches!(s.code(), Code::PermissionDenied | Code::NotFound) => {
                    self.telemetry.metrics.token_refresh("claim_gone");
                    return format!("claim gone ({:?}: {})", s.code(), s.message());
                }
                Err(s) if s.code() == Code::Unauthenticated => {
                    // Our sandbox token is no longer accepted (e.g. the gateway rotated
                    // its key): re-issue from a freshly read projected token.
                    self.telemetry.metrics.token_refresh("reissue");
                    match self.issue(&binding.claim_uid, Some(binding.clone())).await {
                        Ok(a) if a.claim_uid == binding.claim_uid => {
                            tracing::info!(event = "identity.reissued", token = %super::SecretToken::new(a.token.clone()), "sandbox token re-issued");
                            creds.replace(super::SecretToken::new(a.token), a.token_expires_at_ms);
                            due = creds.refresh_due();
                        }
                        Ok(a) => {
                            return format!("re-issue answered a different claim '{}'", a.claim_uid)
                        }
                        Err(s) if matches!(s.code(), Code::PermissionDenied | Code::NotFound) => {
                            return format!(
                                "claim gone on re-issue ({:?}: {})",
                                s.code(),
                                s.message()
                            )
                        }
                        Err(s) => {
                            self.channel.rebuild();
                            tracing::warn!(event = "identity.refresh_failed", code = ?s.code(), error = %describe_status(&s), "re-issue failed; retrying");
                            due = Instant::now() + backoff.next_delay();
                        }
                    }
                }
                Err(s) => {
                    self.telemetry.metrics.token_refresh("retry");
                    self.channel.rebuild();
                    let delay = backoff.next_delay();
                    tracing::warn!(event = "identity.refresh_failed", code = ?s.code(), error = %describe_status(&s), retry_in_ms = delay.as_millis() as u64, "token refresh failed; retrying");
                    due = Instant::now() + delay;
                }
            }
        }
    }
}

/// Says how a claim hint will be noticed, and how late at worst.
fn log_watch_mode(watch: &HintWatch, path: &std::path::Path) {
    let path = path.display();
    let within_ms = watch.guarantee().map_or(0, |d| d.as_millis() as u64);
    match watch.mode() {
        WatchMode::Inotify => {
            tracing::info!(event = "identity.hint_watch", mode = "inotify", path = %path, fallback_poll_ms = within_ms, "watching the claim hint's directory with inotify; a change inotify cannot see (e.g. a host-side update under gVisor) is still noticed within the fallback poll")
        }
        WatchMode::FastPoll => {
            tracing::warn!(event = "identity.hint_watch", mode = "poll", path = %path, poll_ms = within_ms, reason = watch.why().unwrap_or("unknown"), "inotify is unavailable for the claim hint's directory; polling it instead (more idle CPU)")
        }
        WatchMode::Rearming => {
            tracing::warn!(event = "identity.hint_watch", mode = "rearming", path = %path, poll_ms = within_ms, "the claim hint's directory was removed or replaced; polling until it is back, then watching it again")
        }
        WatchMode::Absent => {
            tracing::info!(event = "identity.hint_watch", mode = "absent", path = %path, "no downward-API directory for the claim hint; only the gateway's push can activate this supervisor")
        }
    }
}
