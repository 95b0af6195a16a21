//! The gateway's in-memory state: pods, claims (sandboxes), live streams, counters.
//! One std mutex guards it; it is never held across an await. Every change bumps a
//! watch counter so driver calls can wait for a condition without polling.

use super::driver::{ExecError, GatewayConfig};
use super::sessions::SessionCore;
use super::tokens::{ProjectedValidator, SandboxTokens};
use crate::proto;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

/// Why a stream is being ended by the gateway.
#[derive(Clone, Debug)]
pub(crate) enum StopReason {
    /// End the stream cleanly (OK status).
    Clean,
    /// End the stream with this status.
    Fail(Status),
}

/// A stop signal for one stream's task. Firing is idempotent; the first reason wins.
#[derive(Clone)]
pub(crate) struct Stop(Arc<watch::Sender<Option<StopReason>>>);

impl Stop {
    pub fn new() -> Self {
        Stop(Arc::new(watch::channel(None).0))
    }

    pub fn fire(&self, reason: StopReason) {
        self.0.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn listener(&self) -> StopListener {
        StopListener(self.0.subscribe())
    }
}

pub(crate) struct StopListener(watch::Receiver<Option<StopReason>>);

impl StopListener {
    /// Resolves once fired, with the reason.
    pub async fn fired(&mut self) -> StopReason {
        match self.0.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or(StopReason::Clean),
            Err(_) => StopReason::Clean,
        }
    }
}

/// The sending side of one live server stream, as the rest of the gateway sees it.
pub(crate) struct StreamLink<T> {
    pub gen: u64,
    pub tx: mpsc::Sender<Result<T, Status>>,
    pub stop: Stop,
}

impl<T> StreamLink<T> {
    pub fn end(&self, reason: StopReason) {
        self.stop.fire(reason);
    }
}

/// Counters per pod name, for tests that assert "does not spin" and for benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Every Register call (accepted or rejected).
    pub register_attempts: u64,
    /// Register calls answered UNAUTHENTICATED or `Rejected`.
    pub rejected: u64,
    /// Register streams that reached `Parked`.
    pub parked: u64,
    /// Activations sent on a Register stream.
    pub activations_pushed: u64,
    /// Every IssueSandboxToken call.
    pub issue_attempts: u64,
    /// IssueSandboxToken calls answered with an activation.
    pub issued: u64,
    /// Successful RefreshSandboxToken calls.
    pub refreshed: u64,
    /// Parked streams ended because the projected token they were shown neared expiry.
    pub park_expired: u64,
}

pub(crate) struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub instance_id: String,
    pub seed: Option<proto::SeedInfo>,
    pub parked: Option<StreamLink<proto::RegisterEvent>>,
    /// The claim that adopted this pod (pending delivery or bound).
    pub sandbox_id: Option<String>,
    /// Released pods are tombstoned: never parked or claimed again.
    pub released: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseState {
    None,
    Requested { reason: String, grace_ms: u32 },
    Done,
}

pub(crate) struct SandboxEntry {
    pub id: String,
    pub claim_uid: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub labels: HashMap<String, String>,
    /// The supervisor proved it holds the activation (used a sandbox token). Before
    /// that, a Register from the pod is answered with the activation again.
    pub confirmed: bool,
    pub revoked: bool,
    pub release: ReleaseState,
    pub report: Option<proto::ReleaseReport>,
    pub control: Option<StreamLink<proto::GatewayMessage>>,
    pub sessions: HashMap<String, Arc<SessionCore>>,
    pub pending_opens: HashMap<String, oneshot::Sender<Result<u32, ExecError>>>,
    /// File and Forward requests waiting for the supervisor's stream, by id.
    pub pending_channels: HashMap<String, super::channels::ChannelWaiter>,
}

impl SandboxEntry {
    /// Why this claim no longer exists, if it does not.
    pub fn gone_reason(&self) -> Option<String> {
        if self.revoked {
            Some(format!("claim {} was revoked", self.claim_uid))
        } else if self.release == ReleaseState::Done {
            Some(format!("claim {} was released", self.claim_uid))
        } else {
            None
        }
    }
}

/// A projected token shown to the gateway, as fingerprint only (for tests asserting which
/// token a supervisor presented, e.g. the rotated one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentedToken {
    /// `register` or `issue`.
    pub call: &'static str,
    pub fingerprint: String,
    /// Whether the TLS connection carried a client certificate (mutual TLS).
    pub client_cert: bool,
    /// Whether the token passed validation.
    pub valid: bool,
}

#[derive(Default)]
pub(crate) struct State {
    pub pods: HashMap<String, PodEntry>,
    pub sandboxes: HashMap<String, SandboxEntry>,
    pub stats: HashMap<String, PodStats>,
    /// Per pod name (as the request claims it): every projected token presented.
    pub presented: HashMap<String, Vec<PresentedToken>>,
}

impl State {
    pub fn stats_mut(&mut self, pod_name: &str) -> &mut PodStats {
        let key = if pod_name.is_empty() {
            "<unknown>"
        } else {
            pod_name
        };
        self.stats.entry(key.to_owned()).or_default()
    }
}

pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub projected: ProjectedValidator,
    pub sandbox_tokens: SandboxTokens,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    next_gen: AtomicU64,
    /// Test-only: every sandbox token minted, kept when enabled so a log-hygiene test
    /// can search the supervisor's logs for the raw strings. Off by default.
    pub minted: Mutex<Option<Vec<crate::identity::SecretToken>>>,
}

impl Shared {
    pub fn new(
        cfg: GatewayConfig,
        projected: ProjectedValidator,
        sandbox_tokens: SandboxTokens,
    ) -> Self {
        Shared {
            cfg,
            projected,
            sandbox_tokens,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            next_gen: AtomicU64::new(1),
            minted: Mutex::new(None),
        }
    }

    /// The state lock. A panic while holding it is a bug elsewhere; keep serving.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes everything waiting for a state change.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Keeps a minted sandbox token if recording is on (tests only).
    pub fn note_minted(&self, token: &crate::identity::SecretToken) {
        if let Some(v) = self
            .minted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            v.push(token.clone());
        }
    }

    pub fn next_gen(&self) -> u64 {
        self.next_gen.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until `check` returns Some, re-checking on every state change.
    pub async fn wait_for<T>(
        &self,
        timeout: std::time::Duration,
        what: impl Fn() -> String,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> anyhow::Result<T> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(v) = check(&self.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("gateway state closed while waiting for {}", what()),
                Err(_) => anyhow::bail!("timed out after {timeout:?} waiting for {}", what()),
            }
        }
    }
}
