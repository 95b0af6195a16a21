//! Real gRPC over loopback against the reference gateway, with a hand-written client
//! playing the supervisor (the real one is built separately).

use super::issuer::{tamper_signature, write_annotations, write_projected, LocalIssuer, PodSpec};
use super::link::FaultyLink;
use super::pki::{ServerTls, TestCa, Validity};
use super::tokens::{ProjectedValidator, SandboxTokens, TokenError};
use super::*;
use crate::identity::SecretToken;
use crate::proto;
use crate::proto::gateway_client::GatewayClient;
use crate::proto::gateway_message::Msg as GwMsg;
use crate::proto::register_event::Event as RegEvent;
use crate::proto::session_down::Msg as DownMsg;
use crate::proto::session_up::Msg as UpMsg;
use crate::proto::supervisor_message::Msg as SupMsg;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Streaming};

const AUD: &str = "sandbox-gateway";
const T: Duration = Duration::from_secs(5);

fn issuer() -> Arc<LocalIssuer> {
    Arc::new(LocalIssuer::generate("https://kubernetes.default.svc").unwrap())
}

fn validator(iss: &LocalIssuer) -> ProjectedValidator {
    ProjectedValidator::new(
        &[iss.public_key_pem().to_owned()],
        AUD,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn assert_no_token_material(msg: &str, token: &SecretToken) {
    for part in token.expose().split('.') {
        if part.len() >= 8 {
            assert!(!msg.contains(part), "error leaks token material: {msg}");
        }
    }
}

// ----------------------------------------------------------------------------- issuer

#[test]
fn written_token_validates_and_has_the_kubelet_layout() {
    let iss = issuer();
    let pod = PodSpec::new("warm-0");
    let dir = tempfile::tempdir().unwrap();
    let token = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    write_projected(dir.path(), &token).unwrap();

    let read = SecretToken::new(std::fs::read_to_string(dir.path().join("token")).unwrap());
    let id = validator(&iss).validate(&read).unwrap();
    assert_eq!(id.pod_name, "warm-0");
    assert_eq!(id.pod_uid, pod.pod_uid);
    assert_eq!(id.namespace, "sandboxes");
    assert_eq!(id.service_account, "sandbox");

    use std::os::unix::fs::PermissionsExt;
    let leaf = std::fs::symlink_metadata(dir.path().join("token")).unwrap();
    assert!(leaf.file_type().is_symlink(), "token must be a symlink");
    assert_eq!(
        std::fs::read_link(dir.path().join("token")).unwrap(),
        std::path::Path::new("..data/token")
    );
    let data = std::fs::read_link(dir.path().join("..data")).unwrap();
    assert!(data.to_string_lossy().starts_with("..20"), "{data:?}");
    let mode = std::fs::metadata(dir.path().join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Each write swaps ..data; the generation before the previous one is removed.
    for _ in 0..2 {
        let t = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
        write_projected(dir.path(), &t).unwrap();
    }
    let data3 = std::fs::read_link(dir.path().join("..data")).unwrap();
    assert_ne!(data, data3);
    assert!(!dir.path().join(&data).exists(), "old {data:?} left behind");
}

#[test]
fn token_stays_readable_throughout_rotation() {
    let iss = issuer();
    let pod = PodSpec::new("warm-1");
    let dir = tempfile::tempdir().unwrap();
    write_projected(
        dir.path(),
        &iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
    )
    .unwrap();
    let path = dir.path().join("token");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut reads, mut errors) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(s) if s.split('.').count() == 3 => reads += 1,
                    Ok(s) => errors.push(format!("partial token of {} bytes", s.len())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (reads, errors)
        })
    };
    for _ in 0..300 {
        write_projected(
            dir.path(),
            &iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, errors) = reader.join().unwrap();
    assert!(
        errors.is_empty(),
        "reader saw errors during rotation: {errors:?}"
    );
    assert!(reads > 0);
    let dirs = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(
        dirs, 4,
        "expected ..data, token, the current and the previous generation"
    );
}

#[tokio::test]
async fn spawn_rotation_rewrites_until_stopped() {
    let iss = issuer();
    let dir = tempfile::tempdir().unwrap();
    let handle = iss
        .spawn_rotation(
            dir.path().to_path_buf(),
            PodSpec::new("rot"),
            AUD.into(),
            Duration::from_secs(600),
            Duration::from_millis(30),
        )
        .unwrap();
    let first = std::fs::read_link(dir.path().join("..data")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        handle.rotations() >= 3,
        "only {} rotations",
        handle.rotations()
    );
    assert_ne!(
        first,
        std::fs::read_link(dir.path().join("..data")).unwrap()
    );
    assert!(!std::fs::read_to_string(dir.path().join("token"))
        .unwrap()
        .is_empty());
    handle.stop();
    let target = std::fs::read_link(dir.path().join("..data")).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        target,
        std::fs::read_link(dir.path().join("..data")).unwrap(),
        "rotation continued after stop"
    );
}

#[test]
fn bad_projected_tokens_are_rejected_precisely_without_leaking() {
    let iss = issuer();
    let other = issuer();
    let v = validator(&iss);
    let pod = PodSpec::new("warm-2");

    let mut c = iss.claims_for(&pod, AUD, Duration::from_secs(600));
    c.exp = c.iat - 60;
    let expired = iss.mint(&c).unwrap();
    let e = v.validate(&expired).unwrap_err();
    assert!(
        matches!(e, TokenError::Expired(s) if (59..=62).contains(&s)),
        "{e}"
    );
    assert!(
        e.to_string().contains("expired 60 s ago") || e.to_string().contains("expired 6"),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &expired);

    let wrong_aud = iss
        .mint_for(&pod, "kubernetes", Duration::from_secs(600))
        .unwrap();
    let e = v.validate(&wrong_aud).unwrap_err();
    assert_eq!(
        e.to_string().split(';').next().unwrap(),
        "audience is [\"kubernetes\"], want \"sandbox-gateway\""
    );
    assert_no_token_material(&e.to_string(), &wrong_aud);

    let foreign = other.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    let e = v.validate(&foreign).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("signature does not verify against the issuer key"),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &foreign);

    let good = iss.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap();
    let tampered = tamper_signature(&good);
    assert_ne!(tampered, good);
    let e = v.validate(&tampered).unwrap_err();
    assert!(
        matches!(e, TokenError::Signature { .. } | TokenError::Malformed(_)),
        "{e}"
    );
    assert_no_token_material(&e.to_string(), &tampered);

    let mut c = iss.claims_for(&pod, AUD, Duration::from_secs(600));
    c.kubernetes_io.as_mut().unwrap().pod = None;
    let e = v.validate(&iss.mint(&c).unwrap()).unwrap_err();
    assert_eq!(e, TokenError::NoPodClaim);

    let e = v.validate(&SecretToken::new("not-a-jwt")).unwrap_err();
    assert!(matches!(e, TokenError::Malformed(_)), "{e}");
    assert!(!e.to_string().contains("not-a-jwt"));

    // Issuer key rotation: a validator with both keys accepts both issuers.
    let both = ProjectedValidator::new(
        &[
            other.public_key_pem().to_owned(),
            iss.public_key_pem().to_owned(),
        ],
        AUD,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(both.validate(&foreign).is_ok());
    assert!(both.validate(&good).is_ok());
}

#[test]
fn sandbox_tokens_round_trip_and_expire() {
    let st = SandboxTokens::generate(Duration::from_secs(600)).unwrap();
    let (tok, exp_ms) = st.mint("sbx-1", "claim-1", "pod-1").unwrap();
    let c = st.validate(&tok).unwrap();
    assert_eq!(
        (
            c.sandbox_id.as_str(),
            c.claim_uid.as_str(),
            c.pod_uid.as_str()
        ),
        ("sbx-1", "claim-1", "pod-1")
    );
    assert_eq!(c.exp * 1000, exp_ms);
    let short = SandboxTokens::generate(Duration::from_secs(0)).unwrap();
    let (old, _) = short.mint("sbx-1", "claim-1", "pod-1").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let e = short.validate(&old).unwrap_err();
    assert!(e.to_string().starts_with("expired "), "{e}");
    // Another gateway's key does not verify.
    assert!(matches!(
        st.validate(&old),
        Err(TokenError::Signature { .. })
    ));
}

#[test]
fn annotations_are_written_like_the_downward_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("annotations");
    let mut m = BTreeMap::new();
    m.insert("b/claim".to_owned(), "claim-\"1\"\n\\x\té".to_owned());
    m.insert("a".to_owned(), "plain".to_owned());
    write_annotations(&path, &m).unwrap();
    let body = std::fs::read_to_string(&path).unwrap();
    assert_eq!(body, "a=\"plain\"\nb/claim=\"claim-\\\"1\\\"\\n\\\\x\\té\"");
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
}

// ----------------------------------------------------------------------------- helpers

struct Env {
    iss: Arc<LocalIssuer>,
    gw: ReferenceGateway,
    ca: Option<TestCa>,
}

async fn env_with(tls: bool, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
    let iss = issuer();
    let mut cfg = GatewayConfig::for_tests(iss.public_key_pem());
    cfg.heartbeat_interval = Duration::from_millis(200);
    let ca = if tls {
        let ca = TestCa::new("test CA").unwrap();
        let server = ca
            .server_cert(&["localhost", "127.0.0.1"], Validity::Current)
            .unwrap();
        cfg.tls = Some(ServerTls {
            server,
            client_ca_pem: None,
        });
        Some(ca)
    } else {
        None
    };
    tweak(&mut cfg);
    let gw = ReferenceGateway::start(cfg).await.unwrap();
    Env { iss, gw, ca }
}

async fn env() -> Env {
    env_with(false, |_| {}).await
}

async fn channel(
    endpoint: String,
    ca_pem: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(endpoint).unwrap().connect_timeout(T);
    if let Some(ca) = ca_pem {
        ep = ep.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )?;
    }
    ep.connect().await
}

impl Env {
    async fn client(&self) -> GatewayClient<Channel> {
        let ch = channel(self.gw.endpoint(), self.ca.as_ref().map(|c| c.cert_pem()))
            .await
            .unwrap();
        GatewayClient::new(ch)
    }

    fn token(&self, pod: &PodSpec) -> SecretToken {
        self.iss
            .mint_for(pod, AUD, Duration::from_secs(600))
            .unwrap()
    }
}

fn authed<M>(msg: M, token: &SecretToken) -> Request<M> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", token.bearer().unwrap());
    r
}

fn register_req(pod: &PodSpec) -> proto::RegisterRequest {
    proto::RegisterRequest {
        pod: Some(proto::PodRef {
            namespace: pod.namespace.clone(),
            name: pod.pod_name.clone(),
            uid: pod.pod_uid.clone(),
        }),
        instance_id: "inst-1".into(),
        supervisor_version: "test".into(),
        seed: Some(proto::SeedInfo {
            digest: "sha256:00".into(),
            files: 1,
            bytes: 2,
        }),
        capabilities: vec!["exec".into(), "replay".into()],
        resume: None,
    }
}

fn issue_req(pod: &PodSpec) -> proto::IssueSandboxTokenRequest {
    proto::IssueSandboxTokenRequest {
        pod: Some(proto::PodRef {
            namespace: pod.namespace.clone(),
            name: pod.pod_name.clone(),
            uid: pod.pod_uid.clone(),
        }),
        instance_id: "inst-1".into(),
        claim_hint: String::new(),
        resume: None,
    }
}

async fn next_event(s: &mut Streaming<proto::RegisterEvent>) -> RegEvent {
    tokio::time::timeout(T, s.message())
        .await
        .expect("register event in time")
        .expect("no status")
        .expect("stream open")
        .event
        .unwrap()
}

/// Skips heartbeats.
async fn next_control(s: &mut Streaming<proto::GatewayMessage>) -> GwMsg {
    loop {
        let m = tokio::time::timeout(T, s.message())
            .await
            .expect("control frame in time")
            .expect("no status")
            .expect("open");
        match m.msg.unwrap() {
            GwMsg::Heartbeat(_) => continue,
            other => return other,
        }
    }
}

async fn control_status(s: &mut Streaming<proto::GatewayMessage>) -> tonic::Status {
    loop {
        match tokio::time::timeout(T, s.message())
            .await
            .expect("status in time")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("control stream ended cleanly, expected a status"),
            Err(st) => return st,
        }
    }
}

/// A bound test supervisor: its sandbox token and a control stream.
struct Sup {
    pod: PodSpec,
    client: GatewayClient<Channel>,
    token: SecretToken,
    sandbox_id: String,
    claim_uid: String,
}

impl Sup {
    async fn connect(
        &mut self,
        sessions: Vec<proto::SessionState>,
    ) -> (
        mpsc::Sender<proto::SupervisorMessage>,
        Streaming<proto::GatewayMessage>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        tx.send(proto::SupervisorMessage {
            msg: Some(SupMsg::Hello(proto::Hello {
                sandbox_id: self.sandbox_id.clone(),
                claim_uid: self.claim_uid.clone(),
                instance_id: "inst-1".into(),
                sessions,
            })),
        })
        .await
        .unwrap();
        let resp = self
            .client
            .connect(authed(ReceiverStream::new(rx), &self.token))
            .await
            .unwrap();
        (tx, resp.into_inner())
    }

    async fn session(
        &mut self,
        session_id: &str,
        stdout: u64,
        stderr: u64,
    ) -> (
        mpsc::Sender<proto::SessionUp>,
        Streaming<proto::SessionDown>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        tx.send(up(UpMsg::Attach(proto::Attach {
            session_id: session_id.into(),
            stdout_offset: stdout,
            stderr_offset: stderr,
        })))
        .await
        .unwrap();
        let resp = self
            .client
            .session(authed(ReceiverStream::new(rx), &self.token))
            .await
            .unwrap();
        (tx, resp.into_inner())
    }
}

fn up(m: UpMsg) -> proto::SessionUp {
    proto::SessionUp { msg: Some(m) }
}

fn out(stream: proto::StreamKind, offset: u64, data: &[u8]) -> proto::SessionUp {
    up(UpMsg::Output(proto::Output {
        stream: stream as i32,
        offset,
        data: data.to_vec(),
    }))
}

fn exit0() -> proto::ExitStatus {
    proto::ExitStatus {
        how: Some(proto::exit_status::How::ExitCode(0)),
        status: 0,
        ..Default::default()
    }
}

fn started(session_id: &str, pid: u32) -> proto::SupervisorMessage {
    proto::SupervisorMessage {
        msg: Some(SupMsg::SessionEvent(proto::SessionEvent {
            session_id: session_id.into(),
            event: Some(proto::session_event::Event::Started(proto::Started { pid })),
        })),
    }
}

/// Registers, parks, gets claimed, and returns a connected test supervisor.
async fn bound(
    env: &Env,
    name: &str,
) -> (
    Sup,
    Sandbox,
    mpsc::Sender<proto::SupervisorMessage>,
    Streaming<proto::GatewayMessage>,
) {
    let pod = PodSpec::new(name);
    let mut client = env.client().await;
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    let sandbox = env.gw.claim(name, ClaimOptions::default()).await.unwrap();
    let act = loop {
        match next_event(&mut reg).await {
            RegEvent::Activation(a) => break a,
            RegEvent::Heartbeat(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let mut sup = Sup {
        pod,
        client,
        token: SecretToken::new(act.token),
        sandbox_id: act.sandbox_id,
        claim_uid: act.claim_uid,
    };
    let (tx, mut ctl) = sup.connect(vec![]).await;
    assert!(matches!(next_control(&mut ctl).await, GwMsg::Accepted(_)));
    env.gw.wait_connected(sandbox.id(), T).await.unwrap();
    (sup, sandbox, tx, ctl)
}

/// Starts an exec through the driver and answers OpenSession with Started.
async fn open(
    sandbox: &Sandbox,
    ctl: &mut Streaming<proto::GatewayMessage>,
    tx: &mpsc::Sender<proto::SupervisorMessage>,
) -> Exec {
    let sb = sandbox.clone();
    let pending = tokio::spawn(async move {
        sb.exec(proto::ExecSpec {
            argv: vec!["echo".into(), "hi".into()],
            ..Default::default()
        })
        .await
    });
    let GwMsg::OpenSession(o) = next_control(ctl).await else {
        panic!("expected OpenSession")
    };
    assert_eq!(o.spec.unwrap().argv, vec!["echo", "hi"]);
    tx.send(started(&o.session_id, 4242)).await.unwrap();
    let exec = pending.await.unwrap().unwrap();
    assert_eq!(exec.session_id(), o.session_id);
    assert_eq!(exec.pid(), 4242);
    exec
}

// ----------------------------------------------------------------------------- register

#[tokio::test]
async fn register_over_tls_parks_heartbeats_activates_and_refreshes() {
    let env = env_with(true, |c| c.sandbox_token_ttl = Duration::from_secs(3)).await;
    assert!(env.gw.endpoint().starts_with("https://127.0.0.1:"));
    let pod = PodSpec::new("warm-tls");
    let mut client = env.client().await;
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut reg).await {
        RegEvent::Parked(p) => assert_eq!(p.heartbeat_interval_ms, 200),
        other => panic!("expected Parked, got {other:?}"),
    }
    assert!(matches!(next_event(&mut reg).await, RegEvent::Heartbeat(_)));
    let parked = env.gw.wait_parked("warm-tls", T).await.unwrap();
    assert_eq!(parked.pod_uid, pod.pod_uid);
    assert_eq!(parked.instance_id, "inst-1");
    assert_eq!(parked.seed.unwrap().digest, "sha256:00");

    let mut labels = std::collections::HashMap::new();
    labels.insert("team".to_owned(), "a".to_owned());
    let sandbox = env
        .gw
        .claim(
            "warm-tls",
            ClaimOptions {
                claim_uid: Some("claim-tls".into()),
                labels,
            },
        )
        .await
        .unwrap();
    let act = loop {
        match next_event(&mut reg).await {
            RegEvent::Activation(a) => break a,
            RegEvent::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(act.sandbox_id, sandbox.id());
    assert_eq!(act.claim_uid, "claim-tls");
    assert_eq!(act.pod_uid, pod.pod_uid);
    assert_eq!(act.labels.get("team").map(String::as_str), Some("a"));
    let now_ms = super::issuer::unix_now_ms();
    assert!(
        act.token_expires_at_ms > now_ms + 1000 && act.token_expires_at_ms <= now_ms + 3000,
        "{}",
        act.token_expires_at_ms - now_ms
    );
    // Exactly one Activation, then the stream ends cleanly.
    assert!(tokio::time::timeout(T, reg.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    let token = SecretToken::new(act.token);
    let r = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.token, token.expose());
    assert_eq!(env.gw.stats("warm-tls").refreshed, 1);
    // The 3 s sandbox token expires: refresh with it is UNAUTHENTICATED.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_no_token_material(e.message(), &token);

    // A client trusting another CA cannot connect.
    let other_ca = TestCa::new("other CA").unwrap();
    let ch = channel(env.gw.endpoint(), Some(other_ca.cert_pem())).await;
    let failed = match ch {
        Err(_) => true,
        Ok(ch) => GatewayClient::new(ch)
            .register(authed(register_req(&pod), &env.token(&pod)))
            .await
            .is_err(),
    };
    assert!(
        failed,
        "a client trusting another CA must not reach the gateway"
    );
}

#[tokio::test]
async fn register_rejections_are_final_and_counted() {
    let env = env().await;
    let pod = PodSpec::new("warm-rej");
    let mut client = env.client().await;

    // Bad token: UNAUTHENTICATED with the reason.
    let other = issuer();
    let e = client
        .register(authed(
            register_req(&pod),
            &other.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("signature does not verify"),
        "{}",
        e.message()
    );
    let e = client
        .register(Request::new(register_req(&pod)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The pod uid the supervisor knows differs from the token's: Rejected, not retryable.
    let mut req = register_req(&pod);
    req.pod.as_mut().unwrap().uid = "someone-else".into();
    let mut s = client
        .register(authed(req, &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Rejected(r) => {
            assert!(!r.retryable);
            assert!(r.reason.contains("pod uid mismatch"), "{}", r.reason);
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(s.message().await.unwrap().is_none());
    let st = env.gw.stats("warm-rej");
    assert_eq!((st.register_attempts, st.rejected, st.parked), (3, 3, 0));
}

#[tokio::test]
async fn bound_pod_needs_resume_and_gets_the_same_claim() {
    let env = env().await;
    let (mut sup, sandbox, _tx, _ctl) = bound(&env, "warm-bound").await;
    assert!(
        env.gw
            .wait_parked("warm-bound", Duration::from_millis(1))
            .await
            .is_err(),
        "a claimed pod is no longer parked"
    );
    let e = sup
        .client
        .issue_sandbox_token(authed(
            proto::IssueSandboxTokenRequest::default(),
            &sup.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a sandbox token is not a projected token"
    );

    // Re-register the same pod (same uid) without resume: refused, not retryable.
    let stats_before = env.gw.stats("warm-bound");
    let pod = sup.pod.clone();
    let mut s = sup
        .client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Rejected(r) => {
            assert!(!r.retryable);
            assert!(
                r.reason.starts_with("pod is already bound to claim"),
                "{}",
                r.reason
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // With resume for its claim: an immediate Activation of the same claim.
    let mut req = register_req(&pod);
    req.resume = Some(proto::BindingRecord {
        sandbox_id: sandbox.id().into(),
        claim_uid: sandbox.claim_uid().into(),
        pod_uid: pod.pod_uid.clone(),
        instance_id: "inst-0".into(),
        bound_at_ms: 1,
    });
    let mut s = sup
        .client
        .register(authed(req.clone(), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Activation(a) => {
            assert_eq!(a.sandbox_id, sandbox.id());
            assert_eq!(a.claim_uid, sandbox.claim_uid());
        }
        other => panic!("expected Activation, got {other:?}"),
    }
    // Resume naming another claim: refused.
    req.resume.as_mut().unwrap().claim_uid = "other-claim".into();
    let mut s = sup
        .client
        .register(authed(req, &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Rejected(r) if !r.retryable));
    let st = env.gw.stats("warm-bound");
    assert_eq!(st.register_attempts, stats_before.register_attempts + 3);
    assert_eq!(st.rejected, stats_before.rejected + 2);
}

#[tokio::test]
async fn parked_stream_ends_cleanly_before_the_token_expires() {
    let env = env().await;
    let pod = PodSpec::new("warm-exp");
    let mut client = env.client().await;
    let token = env.iss.mint_for(&pod, AUD, Duration::from_secs(3)).unwrap();
    let mut s = client
        .register(authed(register_req(&pod), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Parked(_)));
    let ended = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(st) => return Err(st),
            }
        }
    })
    .await
    .expect("parked stream must end before the token expires");
    assert!(ended.is_ok(), "must end cleanly: {ended:?}");
    assert_eq!(env.gw.stats("warm-exp").park_expired, 1);
    // Re-registering with a fresh token parks again: the same pod, not a new one.
    let mut s = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Parked(_)));
    assert_eq!(
        env.gw.wait_parked("warm-exp", T).await.unwrap().pod_uid,
        pod.pod_uid
    );
}

#[tokio::test]
async fn claim_while_not_parked_is_delivered_on_the_next_register() {
    let env = env().await;
    let pod = PodSpec::new("warm-gap-claim");
    let mut client = env.client().await;
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    drop(reg);
    // The gateway notices the parked stream is gone.
    env.gw
        .shared_for_tests()
        .wait_for(
            T,
            || "unpark".into(),
            |st| {
                st.pods
                    .get("warm-gap-claim")
                    .filter(|p| p.parked.is_none())
                    .map(|_| ())
            },
        )
        .await
        .unwrap();
    let sandbox = env
        .gw
        .claim("warm-gap-claim", ClaimOptions::default())
        .await
        .unwrap();
    assert_eq!(env.gw.stats("warm-gap-claim").activations_pushed, 0);
    // Not yet confirmed by the supervisor: a plain Register gets the activation.
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut reg).await {
        RegEvent::Activation(a) => assert_eq!(a.sandbox_id, sandbox.id()),
        other => panic!("expected Activation, got {other:?}"),
    }
    assert!(reg.message().await.unwrap().is_none());
}

#[tokio::test]
async fn pull_path_is_idempotent_and_revocation_denies() {
    let env = env().await;
    let pod = PodSpec::new("warm-pull");
    let mut client = env.client().await;
    let tok = env.token(&pod);
    let mut reg = client
        .register(authed(register_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    drop(reg);

    let e = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    let sandbox = env
        .gw
        .claim(
            "warm-pull",
            ClaimOptions {
                claim_uid: Some("claim-pull".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let a1 = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    let a2 = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    assert_eq!(
        (a1.sandbox_id.as_str(), a1.claim_uid.as_str()),
        (sandbox.id(), "claim-pull")
    );
    assert_eq!(
        (a2.sandbox_id.as_str(), a2.claim_uid.as_str()),
        (sandbox.id(), "claim-pull")
    );
    assert_eq!(a1.pod_uid, pod.pod_uid);

    let again = env.gw.claim("warm-pull", ClaimOptions::default()).await;
    assert!(again.unwrap_err().to_string().contains("already claimed"));

    let mut req = issue_req(&pod);
    req.resume = Some(proto::BindingRecord {
        claim_uid: "another".into(),
        ..Default::default()
    });
    let e = client
        .issue_sandbox_token(authed(req, &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let token = SecretToken::new(a2.token);
    client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap();
    env.gw.revoke("claim-pull");
    let e = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let st = env.gw.stats("warm-pull");
    assert_eq!((st.issue_attempts, st.issued, st.refreshed), (5, 2, 1));
}

// ----------------------------------------------------------------------------- relay

#[tokio::test]
async fn exec_collects_exactly_the_bytes_and_forgets_the_session() {
    let env = env().await;
    let (mut sup, sandbox, tx, mut ctl) = bound(&env, "warm-exec").await;
    let exec = open(&sandbox, &mut ctl, &tx).await;
    let sid = exec.session_id().to_owned();
    let (stx, mut down) = sup.session(&sid, 0, 0).await;
    use proto::StreamKind::{Stderr, Stdout};
    stx.send(out(Stdout, 0, b"hello ")).await.unwrap();
    stx.send(out(Stdout, 0, b"hello ")).await.unwrap(); // a replayed duplicate
    stx.send(out(Stdout, 3, b"lo wor")).await.unwrap(); // overlaps: only "wor" is new
    stx.send(out(Stdout, 9, b"ld")).await.unwrap();
    stx.send(out(Stderr, 0, b"err")).await.unwrap();
    stx.send(up(UpMsg::Exited(exit0()))).await.unwrap();
    let collected = tokio::time::timeout(T, exec.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(collected.stdout, b"hello world");
    assert_eq!(collected.stderr, b"err");
    assert_eq!(collected.exit, exit0());

    // The session stream carries acks and then ends cleanly.
    let mut last_ack = None;
    while let Some(m) = tokio::time::timeout(T, down.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(DownMsg::Ack(a)) = m.msg {
            last_ack = Some((a.stdout_offset, a.stderr_offset));
        }
    }
    assert_eq!(last_ack, Some((11, 3)));
    match next_control(&mut ctl).await {
        GwMsg::ForgetSession(f) => assert_eq!(f.session_id, sid),
        other => panic!("expected ForgetSession, got {other:?}"),
    }
    // Attaching a completed session again: NOT_FOUND.
    let (_stx, mut down) = sup.session(&sid, 0, 0).await;
    let e = tokio::time::timeout(T, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

#[tokio::test]
async fn output_gap_is_an_error_and_acks_follow_consumption() {
    let env = env().await;
    let (mut sup, sandbox, tx, mut ctl) = bound(&env, "warm-gap").await;
    let mut exec = open(&sandbox, &mut ctl, &tx).await;
    let (stx, mut down) = sup.session(exec.session_id(), 0, 0).await;
    stx.send(out(proto::StreamKind::Stdout, 0, b"abc"))
        .await
        .unwrap();
    // Not consumed yet: no ack.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), down.message())
            .await
            .is_err(),
        "ack before consumption"
    );
    assert_eq!(
        exec.next().await,
        Some(ExecEvent::Stdout(bytes::Bytes::from_static(b"abc")))
    );
    match tokio::time::timeout(T, down.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .msg
    {
        Some(DownMsg::Ack(a)) => assert_eq!((a.stdout_offset, a.stderr_offset), (3, 0)),
        other => panic!("expected Ack, got {other:?}"),
    }
    stx.send(out(proto::StreamKind::Stdout, 10, b"zzz"))
        .await
        .unwrap();
    let e = tokio::time::timeout(T, down.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("gateway holds only up to 3"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn a_consumer_that_never_reads_stalls_only_its_own_session() {
    let env = env().await;
    let (mut sup, sandbox, tx, mut ctl) = bound(&env, "warm-bp").await;
    let stuck = open(&sandbox, &mut ctl, &tx).await;
    let fine = open(&sandbox, &mut ctl, &tx).await;
    let (stx, mut sdown) = sup.session(stuck.session_id(), 0, 0).await;
    // Far more than the consumer channel holds; the sender blocks once flow control
    // and the gateway's buffer are full.
    let chunk = vec![b'x'; 16 * 1024];
    let feeder = tokio::spawn(async move {
        let mut off = 0u64;
        for _ in 0..512 {
            if stx
                .send(out(proto::StreamKind::Stdout, off, &chunk))
                .await
                .is_err()
            {
                break;
            }
            off += chunk.len() as u64;
        }
        stx
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !feeder.is_finished(),
        "8 MiB went through with nobody reading: no backpressure"
    );

    // The other session is unaffected.
    let (ftx, _fdown) = sup.session(fine.session_id(), 0, 0).await;
    ftx.send(out(proto::StreamKind::Stdout, 0, b"ok"))
        .await
        .unwrap();
    ftx.send(up(UpMsg::Exited(exit0()))).await.unwrap();
    let got = tokio::time::timeout(T, fine.collect())
        .await
        .expect("second session must not stall")
        .unwrap();
    assert_eq!(got.stdout, b"ok");
    // And the stuck one got no ack: nothing was consumed.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sdown.message())
            .await
            .is_err()
    );
    drop(stuck);
    feeder.abort();
}

#[tokio::test]
async fn stdin_queued_while_detached_is_sent_after_attach() {
    let env = env().await;
    let (mut sup, sandbox, tx, mut ctl) = bound(&env, "warm-stdin").await;
    let exec = open(&sandbox, &mut ctl, &tx).await;
    exec.write_stdin(bytes::Bytes::from_static(b"input"))
        .await
        .unwrap();
    exec.resize(80, 24).await.unwrap();
    exec.signal(15).await.unwrap();
    exec.close_stdin().await.unwrap();
    let (_stx, mut down) = sup.session(exec.session_id(), 0, 0).await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = tokio::time::timeout(T, down.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(m.msg.unwrap());
    }
    assert_eq!(
        got[0],
        DownMsg::Stdin(proto::Stdin {
            data: b"input".to_vec()
        })
    );
    assert_eq!(
        got[1],
        DownMsg::Resize(proto::Resize { cols: 80, rows: 24 })
    );
    assert_eq!(got[2], DownMsg::Signal(proto::Signal { signal: 15 }));
    assert_eq!(got[3], DownMsg::StdinEof(proto::StdinEof {}));
}

#[tokio::test]
async fn drop_relay_then_hello_reattaches_from_held_offsets() {
    let env = env().await;
    let (mut sup, sandbox, tx, mut ctl) = bound(&env, "warm-drop").await;
    let mut exec = open(&sandbox, &mut ctl, &tx).await;
    let sid = exec.session_id().to_owned();
    let (stx, mut down) = sup.session(&sid, 0, 0).await;
    stx.send(out(proto::StreamKind::Stdout, 0, b"12345"))
        .await
        .unwrap();
    assert_eq!(
        exec.next().await,
        Some(ExecEvent::Stdout(bytes::Bytes::from_static(b"12345")))
    );

    env.gw.drop_relay(sandbox.id());
    assert_eq!(control_status(&mut ctl).await.code(), Code::Unavailable);
    let e = loop {
        match tokio::time::timeout(T, down.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("session stream ended cleanly, expected UNAVAILABLE"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable);

    // Reconnect: the session (10 bytes produced so far) plus one the gateway never knew.
    let listed = vec![
        proto::SessionState {
            session_id: sid.clone(),
            stdout_end: 10,
            stderr_end: 0,
            exit: None,
            pid: 4242,
        },
        proto::SessionState {
            session_id: "zombie".into(),
            stdout_end: 1,
            stderr_end: 0,
            exit: Some(exit0()),
            pid: 7,
        },
    ];
    let (_tx2, mut ctl2) = sup.connect(listed).await;
    assert!(matches!(next_control(&mut ctl2).await, GwMsg::Accepted(_)));
    let mut attach = None;
    let mut forgot = None;
    for _ in 0..2 {
        match next_control(&mut ctl2).await {
            GwMsg::AttachSession(a) => attach = Some(a),
            GwMsg::ForgetSession(f) => forgot = Some(f.session_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    let a = attach.expect("AttachSession");
    assert_eq!(
        (a.session_id.as_str(), a.stdout_offset, a.stderr_offset),
        (sid.as_str(), 5, 0)
    );
    assert_eq!(forgot.as_deref(), Some("zombie"));
    env.gw.wait_connected(sandbox.id(), T).await.unwrap();

    // Replay from a little earlier than asked: duplicates are dropped.
    let (stx2, _down2) = sup.session(&sid, 3, 0).await;
    stx2.send(out(proto::StreamKind::Stdout, 3, b"4567890"))
        .await
        .unwrap();
    stx2.send(up(UpMsg::Exited(exit0()))).await.unwrap();
    let rest = tokio::time::timeout(T, exec.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.stdout, b"67890");
}

#[tokio::test]
async fn control_and_session_streams_check_their_first_frame() {
    let env = env().await;
    let (mut sup, sandbox, _tx, _ctl) = bound(&env, "warm-first").await;

    // Hello for another sandbox: PERMISSION_DENIED.
    let real = sup.sandbox_id.clone();
    sup.sandbox_id = "sbx-other".into();
    let (_t, mut c) = sup.connect(vec![]).await;
    assert_eq!(control_status(&mut c).await.code(), Code::PermissionDenied);
    sup.sandbox_id = real;

    // First frame not Hello: INVALID_ARGUMENT.
    let (t, rx) = mpsc::channel(2);
    t.send(proto::SupervisorMessage {
        msg: Some(SupMsg::Heartbeat(proto::Heartbeat {})),
    })
    .await
    .unwrap();
    let mut c = sup
        .client
        .connect(authed(ReceiverStream::new(rx), &sup.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(control_status(&mut c).await.code(), Code::InvalidArgument);

    // Unknown session: NOT_FOUND.
    let (_s, mut d) = sup.session("nope", 0, 0).await;
    assert_eq!(
        tokio::time::timeout(T, d.message())
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // No token: UNAUTHENTICATED before any stream.
    let (_t, rx) = mpsc::channel::<proto::SupervisorMessage>(1);
    let e = sup
        .client
        .connect(Request::new(ReceiverStream::new(rx)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(env.gw.wait_connected(sandbox.id(), T).await.is_ok());
}

#[tokio::test]
async fn newer_connect_replaces_the_older_one() {
    let env = env().await;
    let (mut sup, _sandbox, _tx, mut ctl) = bound(&env, "warm-replace").await;
    let (_tx2, mut ctl2) = sup.connect(vec![]).await;
    assert!(matches!(next_control(&mut ctl2).await, GwMsg::Accepted(_)));
    assert_eq!(control_status(&mut ctl).await.code(), Code::Aborted);
    // The new one keeps getting heartbeats.
    let m = tokio::time::timeout(T, ctl2.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(m.msg, Some(GwMsg::Heartbeat(_))));
}

#[tokio::test]
async fn exec_failure_carries_the_supervisors_error() {
    let env = env().await;
    let (_sup, sandbox, tx, mut ctl) = bound(&env, "warm-fail").await;
    let sb = sandbox.clone();
    let pending = tokio::spawn(async move {
        sb.exec(proto::ExecSpec {
            argv: vec!["nope".into()],
            ..Default::default()
        })
        .await
    });
    let GwMsg::OpenSession(o) = next_control(&mut ctl).await else {
        panic!("expected OpenSession")
    };
    tx.send(proto::SupervisorMessage {
        msg: Some(SupMsg::SessionEvent(proto::SessionEvent {
            session_id: o.session_id,
            event: Some(proto::session_event::Event::Failed(proto::Error {
                code: proto::ErrorCode::NotFound as i32,
                message: "nope: not found in PATH=/usr/bin".into(),
            })),
        })),
    })
    .await
    .unwrap();
    let e = pending.await.unwrap().unwrap_err();
    assert_eq!(e.code, proto::ErrorCode::NotFound);
    assert!(e.message.contains("PATH=/usr/bin"));
}

#[tokio::test]
async fn release_waits_for_the_report_and_ends_the_claim() {
    let env = env().await;
    let (sup, sandbox, tx, mut ctl) = bound(&env, "warm-rel").await;
    let sb = sandbox.clone();
    let releasing = tokio::spawn(async move {
        sb.release("claim deleted", Duration::from_millis(500), T)
            .await
    });
    match next_control(&mut ctl).await {
        GwMsg::Release(r) => assert_eq!((r.reason.as_str(), r.grace_ms), ("claim deleted", 500)),
        other => panic!("expected Release, got {other:?}"),
    }
    let report = proto::ReleaseReport {
        files_removed: 3,
        bytes_removed: 10,
        duration_ms: 5,
        ..Default::default()
    };
    tx.send(proto::SupervisorMessage {
        msg: Some(SupMsg::ReleaseReport(report.clone())),
    })
    .await
    .unwrap();
    assert_eq!(releasing.await.unwrap().unwrap(), Some(report));
    let mut client = sup.client.clone();
    let e = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &sup.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(env
        .gw
        .claim("warm-rel", ClaimOptions::default())
        .await
        .is_err());
}

#[tokio::test]
async fn restart_closes_connections_and_keeps_state() {
    let env = env().await;
    let pod = PodSpec::new("warm-restart");
    let mut client = env.client().await;
    let tok = env.token(&pod);
    let mut reg = client
        .register(authed(register_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    let sandbox = env
        .gw
        .claim("warm-restart", ClaimOptions::default())
        .await
        .unwrap();
    let _ = reg;
    let mut reg2_client = env.client().await;
    let act = reg2_client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    let mut sup = Sup {
        pod: pod.clone(),
        client: reg2_client,
        token: SecretToken::new(act.token),
        sandbox_id: act.sandbox_id,
        claim_uid: act.claim_uid,
    };
    let (_tx, mut ctl) = sup.connect(vec![]).await;
    assert!(matches!(next_control(&mut ctl).await, GwMsg::Accepted(_)));

    env.gw.stop().await;
    // The live control stream dies with the connection.
    let r = tokio::time::timeout(T, async {
        loop {
            match ctl.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("control stream must end when the gateway stops");
    let _ = r;
    assert!(env
        .gw
        .wait_connected(sandbox.id(), Duration::from_millis(50))
        .await
        .is_err());
    assert!(
        tokio::net::TcpStream::connect(env.gw.local_addr())
            .await
            .is_err(),
        "listener must be closed"
    );

    env.gw.restart().await.unwrap();
    let mut fresh = env.client().await;
    let again = fresh
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    assert_eq!(again.sandbox_id, sandbox.id(), "state survives a restart");
}

// ----------------------------------------------------------------------------- link

async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn link_cut_all_closes_live_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let link = FaultyLink::start(echo_server().await).await.unwrap();
    let mut a = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut b = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    for s in [&mut a, &mut b] {
        s.write_all(b"ping").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
    assert_eq!(link.live_connections(), 2);
    link.cut_all();
    for s in [&mut a, &mut b] {
        let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection must be closed, read {n:?}"
        );
    }
    // New connections still work after a cut.
    let mut c = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn link_pause_blackholes_without_closing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let link = FaultyLink::start(echo_server().await).await.unwrap();
    let mut a = tokio::net::TcpStream::connect(link.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    a.write_all(b"ping").await.unwrap();
    a.read_exact(&mut buf).await.unwrap();
    link.pause();
    a.write_all(b"lost").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.read(&mut buf))
            .await
            .is_err(),
        "paused link forwarded data"
    );
    link.resume();
    tokio::time::timeout(T, a.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"lost");
}

#[tokio::test]
async fn gateway_behind_a_cut_link_sees_the_relay_drop() {
    let env = env().await;
    let link = FaultyLink::start(env.gw.local_addr()).await.unwrap();
    let (_sup, sandbox, _tx, _ctl) = bound(&env, "warm-link").await;
    let mut sup2 = {
        let ch = channel(link.endpoint(false), None).await.unwrap();
        let mut s = Sup {
            pod: _sup.pod.clone(),
            client: GatewayClient::new(ch),
            token: _sup.token.clone(),
            sandbox_id: _sup.sandbox_id.clone(),
            claim_uid: _sup.claim_uid.clone(),
        };
        let (_t, mut c) = s.connect(vec![]).await;
        assert!(matches!(next_control(&mut c).await, GwMsg::Accepted(_)));
        (s, _t, c)
    };
    link.cut_all();
    let e = control_status(&mut sup2.2).await;
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Internal),
        "{e}"
    );
    // The gateway notices the dead control stream.
    env.gw
        .shared_for_tests()
        .wait_for(
            T,
            || "disconnect".into(),
            |st| {
                st.sandboxes
                    .get(sandbox.id())
                    .filter(|s| s.control.is_none())
                    .map(|_| ())
            },
        )
        .await
        .unwrap();
}
