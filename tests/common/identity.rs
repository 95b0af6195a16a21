//! Helpers for the identity tests: environments with a configurable PKI and no
//! background token rotation (the tests write every projected token themselves, so they
//! know each raw string), argument overrides, the readiness probe, log polling.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_supervisor::gateway::issuer::{
    write_annotations, write_projected, LocalIssuer, PodSpec,
};
use sandbox_supervisor::gateway::pki::{ServerTls, TestCa, Validity};
use sandbox_supervisor::gateway::{ClaimOptions, GatewayConfig, ReferenceGateway};
use sandbox_supervisor::identity::SecretToken;

use super::{is_root, Env, Launch, Supervisor, TempDir, AUDIENCE, BIN};

pub const CLAIM_KEY: &str = "agents.x-k8s.io/claim-uid";

/// A claim of the given uid.
pub fn claim_opts(claim_uid: &str) -> ClaimOptions {
    ClaimOptions {
        claim_uid: Some(claim_uid.to_owned()),
        ..Default::default()
    }
}

pub struct Setup {
    pub server_validity: Validity,
    /// Accept (optional) client certificates signed by the test CA.
    pub client_ca: bool,
    pub sandbox_token_ttl: Duration,
    pub heartbeat: Duration,
    pub token_ttl: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            server_validity: Validity::Current,
            client_ca: false,
            sandbox_token_ttl: Duration::from_secs(600),
            heartbeat: Duration::from_millis(500),
            token_ttl: Duration::from_secs(3600),
        }
    }
}

/// An environment over TLS with its CA kept (for client certificates and rotation).
/// The first projected token is written; no rotation task runs.
pub struct IdEnv {
    pub env: Env,
    pub ca: TestCa,
    /// Every projected token written so far (raw), for log-hygiene checks.
    pub written: std::sync::Mutex<Vec<SecretToken>>,
}

impl std::ops::Deref for IdEnv {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

fn base_dirs(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for d in ["token", "podinfo", "seed/src", "pki", "volume"] {
        std::fs::create_dir_all(dir.0.join(d)).unwrap();
    }
    std::fs::write(dir.0.join("seed/README.md"), "seeded\n").unwrap();
    std::fs::write(dir.0.join("seed/src/main.txt"), "hello seed\n").unwrap();
    dir
}

fn sandbox_user() -> String {
    if is_root() {
        "nobody".to_string()
    } else {
        nix::unistd::geteuid().as_raw().to_string()
    }
}

impl IdEnv {
    pub async fn new(tag: &str, setup: Setup) -> IdEnv {
        let dir = base_dirs(tag);
        let issuer = Arc::new(
            LocalIssuer::generate("https://kubernetes.default.svc.cluster.local").unwrap(),
        );
        let pod = PodSpec::new(&format!("{tag}-pod"));
        let ca = TestCa::new(&format!("{tag} CA")).unwrap();
        let server = ca
            .server_cert(&["localhost", "127.0.0.1"], setup.server_validity)
            .unwrap();
        let ca_path = dir.0.join("pki/ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        let mut cfg = GatewayConfig::for_tests(issuer.public_key_pem());
        cfg.sandbox_token_ttl = setup.sandbox_token_ttl;
        cfg.heartbeat_interval = setup.heartbeat;
        cfg.tls = Some(ServerTls {
            server,
            client_ca_pem: setup.client_ca.then(|| ca.cert_pem().to_owned()),
        });
        let gateway = ReferenceGateway::start(cfg).await.unwrap();
        let env = Env {
            dir,
            issuer,
            pod,
            gateway,
            ca: Some(ca_path),
            rotation: None,
            sandbox_user: sandbox_user(),
        };
        let id = IdEnv {
            env,
            ca,
            written: Default::default(),
        };
        let first = id
            .issuer
            .mint_for(&id.pod, AUDIENCE, setup.token_ttl)
            .unwrap();
        id.write_token(&first);
        id
    }

    /// Another pod on the same gateway and issuer (its own dir, token and volume).
    pub fn sibling(&self, tag: &str) -> IdEnv {
        let dir = base_dirs(tag);
        let ca_path = dir.0.join("pki/ca.pem");
        std::fs::copy(self.env.ca.as_ref().unwrap(), &ca_path).unwrap();
        let env = Env {
            dir,
            issuer: Arc::clone(&self.issuer),
            pod: PodSpec::new(&format!("{tag}-pod")),
            gateway: self.gateway.clone(),
            ca: Some(ca_path),
            rotation: None,
            sandbox_user: sandbox_user(),
        };
        let id = IdEnv {
            env,
            ca: TestCa::new("unused").unwrap(),
            written: Default::default(),
        };
        let first = id
            .issuer
            .mint_for(&id.pod, AUDIENCE, Duration::from_secs(3600))
            .unwrap();
        id.write_token(&first);
        id
    }

    /// Writes a projected token like the kubelet (atomic `..data` swap).
    pub fn write_token(&self, token: &SecretToken) {
        write_projected(&self.dir.0.join("token"), token).unwrap();
        self.written.lock().unwrap().push(token.clone());
    }

    /// The downward-API annotations file now names `claim_uid` under the claim key.
    pub fn write_hint(&self, claim_uid: &str) {
        let mut m = BTreeMap::new();
        m.insert("team".to_owned(), "a".to_owned());
        m.insert(CLAIM_KEY.to_owned(), claim_uid.to_owned());
        write_annotations(&self.dir.0.join("podinfo/annotations"), &m).unwrap();
    }

    pub fn ca_path(&self) -> PathBuf {
        self.env.ca.clone().unwrap()
    }

    pub fn binding_record(&self) -> PathBuf {
        self.volume().join(".supervisor/binding.json")
    }
}

/// Replaces a flag's value in `args`, or appends the flag.
pub fn set_arg(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_owned(),
        None => args.extend([flag.to_owned(), value.to_owned()]),
    }
}

/// Spawns the supervisor (as a subreaper) with `env`'s arguments, `overrides` applied.
pub fn spawn_with(env: &Env, overrides: &[(&str, &str)]) -> Supervisor {
    let mut args = env.run_args();
    for (flag, value) in overrides {
        set_arg(&mut args, flag, value);
    }
    let log = env
        .dir
        .0
        .join(format!("supervisor-{:04x}.log", rand::random::<u16>()));
    let child = Command::new(BIN)
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn supervisor");
    Supervisor {
        child: Some(child),
        log,
        launch: Launch::Subreaper,
    }
}

/// A loopback port that was free a moment ago (for `--listen-probes`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The HTTP status of `GET /readyz`, or None if nothing answers.
pub fn readyz(port: u16) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for `/readyz` to answer `want`; the last status seen otherwise.
pub async fn wait_readyz(port: u16, want: u16, timeout: Duration) -> Result<(), Option<u16>> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = tokio::task::spawn_blocking(move || readyz(port))
            .await
            .unwrap();
        if got == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(got);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Log lines with `event == name`.
/// How many `identity.register_failed` lines; the reason of the last one.
pub fn register_failures(sup: &Supervisor) -> (usize, String) {
    let ev = events_named(sup, "identity.register_failed");
    let last = ev
        .last()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (ev.len(), last)
}

pub fn events_named(sup: &Supervisor, name: &str) -> Vec<serde_json::Value> {
    sup.events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// Waits until the log holds an event satisfying `pred`; returns it.
pub async fn wait_event(
    sup: &Supervisor,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = sup.events().into_iter().find(|e| pred(e)) {
            return Some(e);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Replaces `path` atomically (rename), as a ConfigMap update would appear.
pub fn replace_file(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
