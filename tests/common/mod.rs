//! Shared harness for integration tests: the real `sandbox-supervisor` binary (as PID 1
//! of a new PID namespace when root, via `unshare`), the reference gateway over TLS,
//! a kubelet-like projected token, and the supervisor's logs captured to a file.
#![allow(dead_code, unused_macros, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_supervisor::gateway::issuer::{LocalIssuer, PodSpec, RotationHandle};
use sandbox_supervisor::gateway::pki::{write_pki, ServerTls, Validity};
use sandbox_supervisor::gateway::{ClaimOptions, GatewayConfig, ReferenceGateway, Sandbox};
use sandbox_supervisor::proto;

pub const AUDIENCE: &str = "sandbox-gateway";
pub const BIN: &str = env!("CARGO_BIN_EXE_sandbox-supervisor");

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `unshare --pid --fork --mount-proc` works here (root and a kernel that allows it).
pub fn can_unshare() -> bool {
    is_root()
        && Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// PID 1 of a new namespace where possible, else a subreaper child.
pub fn launch() -> Launch {
    if can_unshare() {
        Launch::Pid1
    } else {
        Launch::Subreaper
    }
}

macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            eprintln!("skipped: {}", $why);
            return;
        }
    };
}
pub(crate) use require;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ssv-test-{tag}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&p).unwrap();
        // The sandbox user must be able to traverse to the workspace.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SSV_KEEP").is_none() {
            let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
        }
    }
}

/// How the supervisor process is started.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Launch {
    /// PID 1 of a new PID namespace (needs root).
    Pid1,
    /// A plain child: the supervisor becomes a subreaper.
    Subreaper,
}

pub struct Env {
    pub dir: TempDir,
    pub issuer: Arc<LocalIssuer>,
    pub pod: PodSpec,
    pub gateway: ReferenceGateway,
    pub ca: Option<PathBuf>,
    pub rotation: Option<RotationHandle>,
    pub sandbox_user: String,
}

pub struct Options {
    pub tls: bool,
    pub token_ttl: Duration,
    pub sandbox_token_ttl: Duration,
    pub heartbeat: Duration,
    /// The gateway sends response headers only with a stream's first message (grpcio's
    /// way), not at once (tonic's).
    pub lazy_headers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: true,
            token_ttl: Duration::from_secs(3600),
            sandbox_token_ttl: Duration::from_secs(600),
            heartbeat: Duration::from_millis(500),
            lazy_headers: false,
        }
    }
}

impl Env {
    pub async fn new(tag: &str) -> Env {
        Self::with(tag, Options::default()).await
    }

    pub async fn with(tag: &str, opts: Options) -> Env {
        let dir = TempDir::new(tag);
        for d in ["token", "podinfo", "seed/src", "pki", "volume"] {
            std::fs::create_dir_all(dir.0.join(d)).unwrap();
        }
        std::fs::write(dir.0.join("seed/README.md"), "seeded\n").unwrap();
        std::fs::write(dir.0.join("seed/src/main.txt"), "hello seed\n").unwrap();
        let issuer = Arc::new(
            LocalIssuer::generate("https://kubernetes.default.svc.cluster.local").unwrap(),
        );
        let pod = PodSpec::new(&format!("{tag}-pod"));
        let rotation = issuer
            .spawn_rotation(
                dir.0.join("token"),
                pod.clone(),
                AUDIENCE.into(),
                opts.token_ttl,
                opts.token_ttl / 2,
            )
            .unwrap();
        let mut cfg = GatewayConfig::for_tests(issuer.public_key_pem());
        cfg.sandbox_token_ttl = opts.sandbox_token_ttl;
        cfg.heartbeat_interval = opts.heartbeat;
        cfg.lazy_headers = opts.lazy_headers;
        let mut ca = None;
        if opts.tls {
            let (_ca, server, files) =
                write_pki(&dir.0.join("pki"), &["localhost"], Validity::Current).unwrap();
            cfg.tls = Some(ServerTls {
                server,
                client_ca_pem: None,
            });
            ca = Some(files.ca_cert);
        }
        let gateway = ReferenceGateway::start(cfg).await.unwrap();
        let sandbox_user = if is_root() {
            "nobody".to_string()
        } else {
            nix::unistd::geteuid().as_raw().to_string()
        };
        Env {
            dir,
            issuer,
            pod,
            gateway,
            ca,
            rotation: Some(rotation),
            sandbox_user,
        }
    }

    pub fn volume(&self) -> PathBuf {
        self.dir.0.join("volume")
    }

    pub fn endpoint(&self) -> String {
        match &self.ca {
            Some(_) => format!("https://localhost:{}", self.gateway.local_addr().port()),
            None => self.gateway.endpoint(),
        }
    }

    /// The `run` arguments for this environment.
    pub fn run_args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let mut a = vec![
            "run".into(),
            "--volume".into(),
            p(&self.volume()),
            "--seed-dir".into(),
            p(&self.dir.0.join("seed")),
            "--gateway".into(),
            self.endpoint(),
            "--token-path".into(),
            p(&self.dir.0.join("token/token")),
            "--audience".into(),
            AUDIENCE.into(),
            "--pod-name".into(),
            self.pod.pod_name.clone(),
            "--pod-namespace".into(),
            self.pod.namespace.clone(),
            "--pod-uid".into(),
            self.pod.pod_uid.clone(),
            "--annotations-path".into(),
            p(&self.dir.0.join("podinfo/annotations")),
            "--sandbox-user".into(),
            self.sandbox_user.clone(),
            "--listen-probes".into(),
            "off".into(),
            "--release-grace".into(),
            "2s".into(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            // Tests read debug events; the bench runs at the shipped level (info).
            std::env::var("SSV_LOG_LEVEL").unwrap_or_else(|_| "debug".into()),
        ];
        match &self.ca {
            Some(ca) => a.extend(["--gateway-ca".into(), p(ca)]),
            None => a.push("--allow-plaintext".into()),
        }
        a
    }

    pub fn spawn(&self, launch: Launch, extra: &[&str]) -> Supervisor {
        let mut args = self.run_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_args(launch, args)
    }

    /// Starts the supervisor with exactly these `run` arguments, its log in the env dir.
    pub fn spawn_args(&self, launch: Launch, args: Vec<String>) -> Supervisor {
        self.spawn_program(BIN, launch, args)
    }

    /// As [`Env::spawn_args`], with another build of the supervisor (e.g. the static
    /// production binary the bench measures at rest).
    pub fn spawn_program(&self, program: &str, launch: Launch, args: Vec<String>) -> Supervisor {
        self.spawn_with(program, launch, args, None)
    }

    /// As [`Env::spawn`], inside `cgroup` (its limits cover the supervisor and every
    /// process of its workload).
    pub fn spawn_in(&self, cgroup: &cgroup::Cgroup, launch: Launch, extra: &[&str]) -> Supervisor {
        let mut args = self.run_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_with(BIN, launch, args, Some(cgroup))
    }

    fn spawn_with(
        &self,
        program: &str,
        launch: Launch,
        args: Vec<String>,
        cgroup: Option<&cgroup::Cgroup>,
    ) -> Supervisor {
        let log = self
            .dir
            .0
            .join(format!("supervisor-{:04x}.log", rand::random::<u16>()));
        let mut cmd = match launch {
            Launch::Pid1 => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "--mount-proc", "--kill-child", program]);
                c
            }
            Launch::Subreaper => Command::new(program),
        };
        cmd.args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(cg) = cgroup {
            cg.command(&mut cmd);
        }
        let child = cmd.spawn().expect("spawn supervisor");
        Supervisor {
            child: Some(child),
            log,
            launch,
        }
    }

    /// Starts a supervisor, waits for it to park, claims it and waits for the relay.
    pub async fn bound(&self, launch: Launch) -> (Supervisor, Sandbox) {
        self.bound_with(launch, &[]).await
    }

    pub async fn bound_with(&self, launch: Launch, extra: &[&str]) -> (Supervisor, Sandbox) {
        self.claim_when_parked(self.spawn(launch, extra)).await
    }

    /// Waits for `sup` to park, claims the pod and waits for the relay.
    pub async fn claim_when_parked(&self, sup: Supervisor) -> (Supervisor, Sandbox) {
        let parked = self
            .gateway
            .wait_parked(&self.pod.pod_name, Duration::from_secs(30))
            .await;
        if let Err(e) = parked {
            panic!("not parked: {e:#}\n{}", sup.logs());
        }
        let sandbox = self
            .gateway
            .claim(&self.pod.pod_name, ClaimOptions::default())
            .await
            .unwrap();
        if let Err(e) = self
            .gateway
            .wait_connected(sandbox.id(), Duration::from_secs(30))
            .await
        {
            panic!("not connected: {e:#}\n{}", sup.logs());
        }
        (sup, sandbox)
    }
}

pub struct Supervisor {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub launch: Launch,
}

impl Supervisor {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Parsed JSON log lines.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn has_event(&self, name: &str) -> bool {
        self.events().iter().any(|e| e["event"] == name)
    }

    /// The supervisor's own pid as seen from here (the child of `unshare` in PID-1 mode).
    pub fn host_pid(&self) -> u32 {
        let pid = self.child.as_ref().unwrap().id();
        match self.launch {
            Launch::Subreaper => pid,
            Launch::Pid1 => {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let children =
                        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                            .unwrap_or_default();
                    if let Some(c) = children.split_whitespace().next() {
                        return c.parse().unwrap();
                    }
                    assert!(
                        Instant::now() < deadline,
                        "supervisor child of unshare not found"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Waits for exit; returns the supervisor's exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Releases `sandbox` through the gateway with `grace`: the report arrives and the
    /// supervisor exits 0, each within `timeout`. Returns the report.
    pub async fn release_via(
        &mut self,
        sandbox: &Sandbox,
        reason: &str,
        grace: Duration,
        timeout: Duration,
    ) -> proto::ReleaseReport {
        let report = sandbox.release(reason, grace, timeout).await.unwrap();
        let report = report.unwrap_or_else(|| panic!("no release report\n{}", self.logs()));
        assert_eq!(self.wait_exit(timeout), Some(0), "{}", self.logs());
        report
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn spec(argv: &[&str]) -> proto::ExecSpec {
    proto::ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> proto::ExecSpec {
    spec(&["/bin/sh", "-c", script])
}

/// A test's scale knob: the variable `name` as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (pid, ppid, state) of every process in /proc.
pub fn processes() -> Vec<(u32, u32, char)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut f = stat[close + 2..].split(' ');
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state));
    }
    out
}

/// Every descendant of `root` with its state.
pub fn descendants(root: u32) -> Vec<(u32, char)> {
    let procs = processes();
    let mut found = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, st) in &procs {
            if ppid == p {
                found.push((pid, st));
                frontier.push(pid);
            }
        }
    }
    found
}
pub mod cgroup;
pub mod docker;
pub mod exec;
pub mod gvisor;
pub mod identity;
pub mod workspace;
