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

mod issuer_tests;
mod link_tests;
mod register_tests;
mod relay_tests;

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
            // A supervisor that does not track stdin offsets (the legacy protocol).
            stdin_offset: None,
            generation: 0,
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
        data: bytes::Bytes::copy_from_slice(data),
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
