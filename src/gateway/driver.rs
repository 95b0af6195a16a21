//! The in-process API that tests, benchmarks and the `local` command drive the
//! reference gateway with: start/stop/restart the server, claim pods, exec, release,
//! inject relay faults, read counters.

use super::net::ConnRegistry;
use super::pki::ServerTls;
use super::server::GatewayService;

use super::sandbox::Sandbox;
use super::state::{PodStats, PresentedToken, ReleaseState, SandboxEntry, Shared, StopReason};
use super::tokens::{ProjectedValidator, SandboxTokens};
use crate::proto;
use crate::proto::register_event::Event as RegEvent;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Status;

/// How the reference gateway serves.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Port 0 picks a free port; `restart` reuses the port actually bound.
    pub listen: SocketAddr,
    /// None: plaintext HTTP/2 (tests only; the supervisor must opt in explicitly).
    pub tls: Option<ServerTls>,
    /// The audience projected tokens must carry.
    pub audience: String,
    /// Issuer public keys (SPKI PEM); several during an issuer key rotation.
    pub issuer_keys: Vec<String>,
    /// Lifetime of minted sandbox tokens.
    pub sandbox_token_ttl: Duration,
    /// Interval of `Heartbeat` on Register and Connect streams.
    pub heartbeat_interval: Duration,
    /// Clock-skew leeway for projected token `exp`/`nbf`.
    pub token_leeway: Duration,
    /// A parked Register stream ends this long before the shown projected token expires
    /// (capped at half the token's remaining life).
    pub park_expiry_margin: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Receive window per HTTP/2 stream (what one session may have in flight).
    pub http2_stream_window: u32,
    /// Receive window per connection. Unread data of a stalled stream holds connection
    /// window too, so this must be many stream windows, or one consumer that stops
    /// reading stalls every session on the connection.
    pub http2_connection_window: u32,
    /// Largest HTTP/2 frame a supervisor may send. Output frames are up to 256 KiB; at
    /// h2's default of 16 KiB each is cut in 16 pieces, and that per-frame work was
    /// what bounded one session's throughput (BENCHMARKS.md).
    pub http2_max_frame_size: u32,
    /// Send a stream's response headers only with its first message, as grpcio,
    /// grpc-go and grpc-java do by default (tonic sends them at once). Tests turn it
    /// on to prove the supervisor never waits for headers before it sends.
    pub lazy_headers: bool,
}

impl GatewayConfig {
    /// Loopback, plaintext, audience `sandbox-gateway`, 600 s sandbox tokens, 1 s
    /// heartbeats: a sensible base for tests to adjust.
    pub fn for_tests(issuer_public_pem: &str) -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            audience: "sandbox-gateway".into(),
            issuer_keys: vec![issuer_public_pem.to_owned()],
            sandbox_token_ttl: Duration::from_secs(600),
            heartbeat_interval: Duration::from_secs(1),
            token_leeway: Duration::from_secs(5),
            park_expiry_margin: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(5),
            http2_stream_window: 1024 * 1024,
            http2_connection_window: 32 * 1024 * 1024,
            http2_max_frame_size: 256 * 1024,
            lazy_headers: false,
        }
    }
}

/// Why an exec could not start: the supervisor's error (or the gateway's) with its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ExecError {
    pub code: proto::ErrorCode,
    pub message: String,
}

/// A parked (warm, registered) pod.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedPod {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub instance_id: String,
    pub seed: Option<proto::SeedInfo>,
}

#[derive(Debug, Clone, Default)]
pub struct ClaimOptions {
    /// The SandboxClaim's uid; random when None.
    pub claim_uid: Option<String>,
    pub labels: HashMap<String, String>,
}

/// How `claim_delivered` hands the activation over. The defaults are what a real
/// gateway does; the rest exist for adversarial and race tests of the supervisor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Push {
    /// Push on the parked Register stream at once (and answer the pull path).
    #[default]
    Now,
    /// Push after this delay (the pull path answers meanwhile): for push-vs-hint races.
    After(Duration),
    /// Never push; leave the pod parked. Only the pull path (the claim hint) delivers.
    Never,
}

/// Test knobs for `claim_delivered`.
#[derive(Debug, Clone, Default)]
pub struct ClaimDelivery {
    pub push: Push,
    /// ADVERSARIAL TESTS ONLY: the activation (push and pull) names this pod UID instead
    /// of the claimed pod's, as a confused or malicious gateway would. A correct
    /// supervisor refuses it.
    pub forged_pod_uid: Option<String>,
}

struct Serving {
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<ConnRegistry>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
    /// Replaces `cfg.tls` from the next `restart` (certificate rotation tests).
    tls_override: Mutex<Option<ServerTls>>,
}

impl Drop for Inner {
    // The last handle gone: close the listener and every connection, so a test's
    // gateway does not outlive it.
    fn drop(&mut self) {
        if let Some(serving) = self
            .serving
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = serving.shutdown.send(());
            serving.conns.shutdown_all();
        }
    }
}

/// The reference gateway. Cloning shares the same server.
#[derive(Clone)]
pub struct ReferenceGateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReferenceGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceGateway")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<&ServerTls>,
) -> anyhow::Result<Serving> {
    let cfg = &shared.cfg;
    let conns = Arc::new(ConnRegistry::default());
    let incoming = conns.incoming(listener);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.http2_keepalive_timeout))
        .initial_stream_window_size(Some(cfg.http2_stream_window))
        .initial_connection_window_size(Some(cfg.http2_connection_window))
        .max_frame_size(Some(cfg.http2_max_frame_size))
        .tcp_nodelay(true);
    if let Some(tls) = tls.or(cfg.tls.as_ref()) {
        builder = builder.tls_config(tls.to_tonic())?;
    }
    let router = builder.add_service(proto::gateway_server::GatewayServer::new(GatewayService {
        shared: Arc::clone(&shared),
    }));
    let (shutdown, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let signal = async {
            let _ = rx.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal).await {
            tracing::warn!(event = "gateway.serve_failed", error = %e, "reference gateway stopped serving");
        }
    });
    Ok(Serving {
        shutdown,
        task,
        conns,
    })
}

static SEQ: AtomicU64 = AtomicU64::new(1);

pub(crate) fn short_id(prefix: &str) -> String {
    let r: [u8; 4] = rand::random();
    format!(
        "{prefix}-{}-{}",
        SEQ.fetch_add(1, Ordering::Relaxed),
        hex::encode(r)
    )
}

impl ReferenceGateway {
    /// Binds (port 0 is fine) and serves in a background task.
    pub async fn start(cfg: GatewayConfig) -> anyhow::Result<ReferenceGateway> {
        let projected = ProjectedValidator::new(&cfg.issuer_keys, &cfg.audience, cfg.token_leeway)?;
        let sandbox_tokens = SandboxTokens::generate(cfg.sandbox_token_ttl)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding the reference gateway to {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(cfg, projected, sandbox_tokens));
        let serving = serve(Arc::clone(&shared), listener, None).await?;
        tracing::info!(event = "gateway.started", %addr, tls = shared.cfg.tls.is_some(), "reference gateway serving");
        Ok(ReferenceGateway {
            inner: Arc::new(Inner {
                shared,
                addr,
                serving: Mutex::new(Some(serving)),
                tls_override: Mutex::new(None),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    #[cfg(test)]
    pub(crate) fn shared_for_tests(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// `https://127.0.0.1:PORT` (TLS) or `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.shared().cfg.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.inner.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.shared().cfg
    }

    /// Waits until `pod_name` has a live parked Register stream.
    pub async fn wait_parked(
        &self,
        pod_name: &str,
        timeout: Duration,
    ) -> anyhow::Result<ParkedPod> {
        self.shared()
            .wait_for(
                timeout,
                || format!("pod {pod_name} to park"),
                |st| {
                    st.pods
                        .get(pod_name)
                        .filter(|p| p.parked.is_some())
                        .map(|p| ParkedPod {
                            namespace: p.namespace.clone(),
                            pod_name: p.name.clone(),
                            pod_uid: p.uid.clone(),
                            instance_id: p.instance_id.clone(),
                            seed: p.seed.clone(),
                        })
                },
            )
            .await
    }

    /// A claim adopts the pod: the activation is pushed on its parked stream if there is
    /// one, and is answered on the pull path (IssueSandboxToken) either way.
    pub async fn claim(&self, pod_name: &str, opts: ClaimOptions) -> anyhow::Result<Sandbox> {
        self.claim_delivered(pod_name, opts, ClaimDelivery::default())
            .await
    }

    /// `claim` with test control over how the activation is delivered.
    pub async fn claim_delivered(
        &self,
        pod_name: &str,
        opts: ClaimOptions,
        delivery: ClaimDelivery,
    ) -> anyhow::Result<Sandbox> {
        let shared = self.shared();
        let (sandbox_id, claim_uid, push) = {
            let mut st = shared.lock();
            let claim_uid = opts
                .claim_uid
                .clone()
                .unwrap_or_else(super::issuer::random_uid);
            if st.sandboxes.values().any(|s| s.claim_uid == claim_uid) {
                anyhow::bail!("claim {claim_uid} already adopted a pod; claims are one-shot");
            }
            let Some(pod) = st.pods.get_mut(pod_name) else {
                anyhow::bail!(
                    "pod {pod_name} never registered with this gateway; wait_parked first"
                );
            };
            if pod.released {
                anyhow::bail!("pod {pod_name} was released and is never reused");
            }
            if let Some(existing) = &pod.sandbox_id {
                anyhow::bail!(
                    "pod {pod_name} is already claimed (sandbox {existing}); a pod is claimed once"
                );
            }
            let sandbox_id = short_id("sbx");
            pod.sandbox_id = Some(sandbox_id.clone());
            let push = match delivery.push {
                Push::Never => None,
                Push::Now | Push::After(_) => pod.parked.take(),
            };
            let entry = SandboxEntry {
                id: sandbox_id.clone(),
                claim_uid: claim_uid.clone(),
                pod_name: pod.name.clone(),
                pod_uid: delivery
                    .forged_pod_uid
                    .clone()
                    .unwrap_or_else(|| pod.uid.clone()),
                labels: opts.labels.clone(),
                confirmed: false,
                revoked: false,
                release: ReleaseState::None,
                report: None,
                control: None,
                sessions: HashMap::new(),
                pending_opens: HashMap::new(),
                pending_channels: HashMap::new(),
            };
            let push = push.map(|link| (link, shared.activation(&entry)));
            st.sandboxes.insert(sandbox_id.clone(), entry);
            (sandbox_id, claim_uid, push)
        };
        if let Some((link, activation)) = push {
            let activation = activation
                .map_err(|s| anyhow::anyhow!("minting the activation: {}", s.message()))?;
            let shared = Arc::clone(shared);
            let pod_name = pod_name.to_owned();
            let deliver = async move {
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    link.tx.send(Ok(proto::RegisterEvent {
                        event: Some(RegEvent::Activation(activation)),
                    })),
                )
                .await;
                if matches!(sent, Ok(Ok(()))) {
                    shared.lock().stats_mut(&pod_name).activations_pushed += 1;
                }
                // Ends the Register stream right after the activation.
                link.end(StopReason::Clean);
                shared.bump();
            };
            match delivery.push {
                Push::After(delay) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        deliver.await
                    });
                }
                _ => deliver.await,
            }
        }
        shared.bump();
        tracing::info!(event = "gateway.claimed", pod = pod_name, %sandbox_id, %claim_uid, "pod claimed");
        Ok(Sandbox {
            shared: Arc::clone(shared),
            id: sandbox_id,
            claim_uid,
        })
    }

    /// Waits until the sandbox has an accepted control stream.
    pub async fn wait_connected(
        &self,
        sandbox_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Sandbox> {
        let shared = Arc::clone(self.shared());
        let found = shared
            .wait_for(
                timeout,
                || format!("sandbox {sandbox_id} to connect"),
                |st| {
                    st.sandboxes
                        .get(sandbox_id)
                        .filter(|s| s.control.is_some())
                        .map(|s| s.claim_uid.clone())
                },
            )
            .await?;
        Ok(Sandbox {
            shared,
            id: sandbox_id.to_owned(),
            claim_uid: found,
        })
    }

    /// The sandbox handle for an existing claim.
    pub fn sandbox(&self, sandbox_id: &str) -> Option<Sandbox> {
        let st = self.shared().lock();
        st.sandboxes.get(sandbox_id).map(|s| Sandbox {
            shared: Arc::clone(self.shared()),
            id: s.id.clone(),
            claim_uid: s.claim_uid.clone(),
        })
    }

    /// The claim is gone: refresh, issue, register-resume and connect are refused
    /// with PERMISSION_DENIED from now on.
    pub fn revoke(&self, claim_uid: &str) {
        {
            let mut st = self.shared().lock();
            for sb in st
                .sandboxes
                .values_mut()
                .filter(|s| s.claim_uid == claim_uid)
            {
                sb.revoked = true;
            }
        }
        self.shared().bump();
    }

    /// Ends the sandbox's control stream and every session stream with UNAVAILABLE (the
    /// connection stays up): the supervisor must reconnect and replay.
    pub fn drop_relay(&self, sandbox_id: &str) {
        let unavailable = || {
            StopReason::Fail(Status::unavailable(format!(
                "relay of sandbox {sandbox_id} dropped by the gateway; reconnect"
            )))
        };
        {
            let mut st = self.shared().lock();
            if let Some(sb) = st.sandboxes.get_mut(sandbox_id) {
                if let Some(c) = sb.control.take() {
                    c.end(unavailable());
                }
                for core in sb.sessions.values() {
                    core.end_stream(unavailable());
                }
            }
        }
        self.shared().bump();
    }

    /// Stops serving: closes the listener and every connection (a real TCP close), and
    /// ends every stream. State is kept for `restart`.
    pub async fn stop(&self) {
        let serving = self
            .inner
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(serving) = serving else { return };
        let _ = serving.shutdown.send(());
        serving.conns.shutdown_all();
        {
            let mut st = self.shared().lock();
            for pod in st.pods.values_mut() {
                if let Some(l) = pod.parked.take() {
                    l.end(StopReason::Clean);
                }
            }
            for sb in st.sandboxes.values_mut() {
                if let Some(c) = sb.control.take() {
                    c.end(StopReason::Clean);
                }
                for core in sb.sessions.values() {
                    core.end_stream(StopReason::Clean);
                }
            }
        }
        self.shared().bump();
        let mut task = serving.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        tracing::info!(event = "gateway.stopped", addr = %self.inner.addr, "reference gateway stopped");
    }

    /// Stops (if serving) and serves again on the same address with the same state.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let addr = self.inner.addr;
        let mut last = None;
        // The port was just released; a bind may briefly race the old socket's teardown.
        for _ in 0..50 {
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let tls = self
                        .inner
                        .tls_override
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let serving = serve(Arc::clone(self.shared()), listener, tls.as_ref()).await?;
                    *self.inner.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(serving);
                    tracing::info!(event = "gateway.restarted", %addr, "reference gateway serving again");
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "re-binding {addr} for restart failed: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    }

    /// The server certificate (and client CA) to serve from the next `restart`, as after
    /// a certificate rotation.
    pub fn set_tls_for_restart(&self, tls: ServerTls) {
        *self
            .inner
            .tls_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tls);
    }

    /// Every projected token presented by a caller claiming to be `pod_name`
    /// (fingerprints only), in order.
    pub fn presented_tokens(&self, pod_name: &str) -> Vec<PresentedToken> {
        self.shared()
            .lock()
            .presented
            .get(pod_name)
            .cloned()
            .unwrap_or_default()
    }

    /// TESTS ONLY: from now on keep every sandbox token minted, so a log-hygiene test can
    /// search logs for the raw strings. A real gateway never keeps them.
    pub fn record_minted_tokens(&self) {
        let mut m = self
            .shared()
            .minted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.get_or_insert_with(Vec::new);
    }

    /// The sandbox tokens minted since `record_minted_tokens`.
    pub fn minted_tokens(&self) -> Vec<crate::identity::SecretToken> {
        self.shared()
            .minted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Counters for `pod_name` (zeros if it never called).
    pub fn stats(&self, pod_name: &str) -> PodStats {
        self.shared()
            .lock()
            .stats
            .get(pod_name)
            .cloned()
            .unwrap_or_default()
    }
}
