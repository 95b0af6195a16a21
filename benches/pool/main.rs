//! Pool scale (issue 15): what N parked supervisors cost at one gateway, and how claim
//! latency grows with N and the claim rate K.
//!
//! ```text
//! cargo bench --locked --profile profiling --bench pool        # N=50,100,200 × K=10,50,100
//! cargo bench --locked --profile profiling --bench pool -- --pools 500 --rates 100,200
//! ```
//!
//! Per pool size N: N real supervisors (PID 1 of their own PID namespace when root), each
//! with its own volume, token and annotations file, park at ONE reference gateway (TLS,
//! the gateway's default heartbeat interval). Idle figures are measured over a quiet
//! window: RSS split private / shared (smaps_rollup) and CPU per minute, beside tini.
//! Then, per rate K, an open-loop storm claims half the pool at K claims/s; each claim
//! binds and runs one `/bin/true` session. The claimed pods are killed and replaced
//! before the next storm, so every storm starts from N parked. Once per run: the exec
//! round trip beside a local spawn and `docker exec` of `/bin/true`.
//!
//! Flags: `--pools`, `--rates`, `--claims` (per storm; default N/2), `--idle-secs` (20),
//! `--heartbeat-ms` (default: the gateway's), `--no-docker`, `--quick`, `--out`.
//! Modules: `measure` (/proc readings), `report` (the tables), `docker` (the docker exec
//! baseline). Writes `bench-out/pool.json` (`--out`), which `scripts/pool_plot.py`
//! plots. Every supervisor is killed on the way out (Drop guards; a parent-death signal
//! covers a bench that is killed itself).

#[path = "../../tests/common/mod.rs"]
mod common;
mod docker;
mod measure;
mod report;

use common::{launch, spec, Launch, Supervisor, TempDir, AUDIENCE, BIN};
use sandbox_supervisor::gateway::issuer::{
    write_annotations, write_projected, LocalIssuer, PodSpec,
};
use sandbox_supervisor::gateway::pki::{write_pki, ServerTls, Validity};
use sandbox_supervisor::gateway::{ClaimOptions, ExecEvent, GatewayConfig, ReferenceGateway};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Opts {
    pools: Vec<usize>,
    rates: Vec<f64>,
    claims: Option<usize>,
    idle_secs: u64,
    heartbeat: Option<Duration>,
    out: PathBuf,
    docker: bool,
}

fn list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let quick = args.iter().any(|a| a == "--quick");
    Opts {
        pools: get("--pools").map(|v| list(&v)).unwrap_or_else(|| {
            if quick {
                vec![20]
            } else {
                vec![50, 100, 200]
            }
        }),
        rates: get("--rates").map(|v| list(&v)).unwrap_or_else(|| {
            if quick {
                vec![10.0, 50.0]
            } else {
                vec![10.0, 50.0, 100.0]
            }
        }),
        claims: get("--claims").and_then(|v| v.parse().ok()),
        idle_secs: get("--idle-secs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 5 } else { 20 }),
        heartbeat: get("--heartbeat-ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        out: get("--out")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("bench-out/pool.json")),
        docker: !args.iter().any(|a| a == "--no-docker"),
    }
}

/// Linear-interpolated percentile (PerfKitBenchmarker's definition), 0 when empty.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = (s.len() - 1) as f64 * p / 100.0;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

fn ms(s: f64) -> String {
    format!("{:.2}", s * 1e3)
}

/// One supervisor of the pool and the files only it uses.
struct Pod {
    name: String,
    dir: PathBuf,
    sup: Supervisor,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.sup.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One gateway and the supervisors parked at it. Dropping it kills every supervisor.
struct Pool {
    pods: Vec<Pod>,
    gateway: ReferenceGateway,
    issuer: LocalIssuer,
    root: TempDir,
    ca: PathBuf,
    program: String,
    launch: Launch,
    user: String,
    seq: usize,
}

impl Pool {
    async fn new(program: String, heartbeat: Option<Duration>) -> Pool {
        let root = TempDir::new("pool");
        for d in ["pki", "seed"] {
            std::fs::create_dir_all(root.0.join(d)).unwrap();
        }
        std::fs::write(root.0.join("seed/README.md"), "seeded\n").unwrap();
        let issuer = LocalIssuer::generate("https://kubernetes.default.svc.cluster.local").unwrap();
        let mut cfg = GatewayConfig::for_tests(issuer.public_key_pem());
        if let Some(hb) = heartbeat {
            cfg.heartbeat_interval = hb;
        }
        let (_ca, server, files) =
            write_pki(&root.0.join("pki"), &["localhost"], Validity::Current).unwrap();
        cfg.tls = Some(ServerTls {
            server,
            client_ca_pem: None,
        });
        let gateway = ReferenceGateway::start(cfg).await.unwrap();
        let user = if common::is_root() {
            "nobody".to_string()
        } else {
            nix::unistd::geteuid().as_raw().to_string()
        };
        Pool {
            pods: vec![],
            gateway,
            issuer,
            ca: files.ca_cert,
            root,
            program,
            launch: launch(),
            user,
            seq: 0,
        }
    }

    /// Starts one supervisor for a new pod: its own token, annotations and volume.
    fn spawn(&mut self) -> Pod {
        self.seq += 1;
        let name = format!("pool-{}", self.seq);
        let pod = PodSpec::new(&name);
        let dir = self.root.0.join(&name);
        for d in ["token", "podinfo", "volume"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let token = self
            .issuer
            .mint_for(&pod, AUDIENCE, Duration::from_secs(7200))
            .unwrap();
        write_projected(&dir.join("token"), &token).unwrap();
        // A downward-API file as a pod has one (the claim key absent until claimed).
        let mut ann = BTreeMap::new();
        ann.insert("kubernetes.io/config.source".to_string(), "api".to_string());
        write_annotations(&dir.join("podinfo/annotations"), &ann).unwrap();
        let p = |p: PathBuf| p.display().to_string();
        let port = self.gateway.local_addr().port();
        let args = vec![
            "run".to_string(),
            "--volume".into(),
            p(dir.join("volume")),
            "--seed-dir".into(),
            p(self.root.0.join("seed")),
            "--gateway".into(),
            format!("https://localhost:{port}"),
            "--gateway-ca".into(),
            p(self.ca.clone()),
            "--token-path".into(),
            p(dir.join("token/token")),
            "--audience".into(),
            AUDIENCE.into(),
            "--pod-name".into(),
            name.clone(),
            "--pod-namespace".into(),
            pod.namespace.clone(),
            "--pod-uid".into(),
            pod.pod_uid.clone(),
            "--annotations-path".into(),
            p(dir.join("podinfo/annotations")),
            "--sandbox-user".into(),
            self.user.clone(),
            "--listen-probes".into(),
            "off".into(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            "info".into(),
        ];
        let mut cmd = match self.launch {
            Launch::Pid1 => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                    .arg(&self.program);
                c
            }
            Launch::Subreaper => Command::new(&self.program),
        };
        let log = dir.join("supervisor.log");
        cmd.args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory: a
        // bench killed before its Drop guards run still takes its pool down with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn supervisor");
        Pod {
            name,
            dir,
            sup: Supervisor {
                child: Some(child),
                log,
                launch: self.launch,
            },
        }
    }

    /// Grows the pool to `n` parked pods, in waves so boot does not starve the gateway.
    async fn fill(&mut self, n: usize) {
        let t = Instant::now();
        while self.pods.len() < n {
            let wave: Vec<Pod> = (0..(n - self.pods.len()).min(25))
                .map(|_| self.spawn())
                .collect();
            for pod in &wave {
                if let Err(e) = self
                    .gateway
                    .wait_parked(&pod.name, Duration::from_secs(60))
                    .await
                {
                    panic!("{} did not park: {e:#}\n{}", pod.name, pod.sup.logs());
                }
            }
            self.pods.extend(wave);
        }
        eprintln!("pool: {n} parked after {:.1?}", t.elapsed());
    }
}

#[derive(Default, Clone)]
struct Record {
    requested: f64,
    bound: Option<f64>,
    first: Option<f64>,
    done: Option<f64>,
    warm: bool,
    error: Option<&'static str>,
}

/// Claim `name`, wait for its relay, run `/bin/true`. Times are seconds after `base`.
async fn one_claim(gw: ReferenceGateway, name: String, base: Instant) -> Record {
    let warm = gw.wait_parked(&name, Duration::ZERO).await.is_ok();
    let t0 = Instant::now();
    let mut r = Record {
        requested: (t0 - base).as_secs_f64(),
        warm,
        ..Default::default()
    };
    let at = |t: Instant| Some((t - base).as_secs_f64());
    let Ok(sb) = gw.claim(&name, ClaimOptions::default()).await else {
        r.error = Some("ClaimFailed");
        return r;
    };
    if gw
        .wait_connected(sb.id(), Duration::from_secs(30))
        .await
        .is_err()
    {
        r.error = Some("BindTimeout");
        return r;
    }
    r.bound = at(Instant::now());
    let Ok(mut exec) = sb.exec(spec(&["/bin/true"])).await else {
        r.error = Some("ExecFailed");
        return r;
    };
    loop {
        match exec.next().await {
            Some(ev) => {
                if r.first.is_none() {
                    r.first = at(Instant::now());
                }
                if let ExecEvent::Exited(s) = ev {
                    if s.status != 0 {
                        r.error = Some("ExitNonZero");
                    }
                    break;
                }
            }
            None => {
                r.error = Some("SessionLost");
                break;
            }
        }
    }
    r.done = at(Instant::now());
    r
}

/// An open-loop storm: `claims` parked pods claimed at `rate` per second.
async fn storm(pool: &mut Pool, n: usize, rate: f64, claims: usize) -> Value {
    let base = Instant::now();
    let inflight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for (i, pod) in pool.pods.iter().take(claims).enumerate() {
        tokio::time::sleep_until((base + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let (gw, name) = (pool.gateway.clone(), pod.name.clone());
        let (inflight, peak) = (Arc::clone(&inflight), Arc::clone(&peak));
        tasks.push(tokio::spawn(async move {
            let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let r = one_claim(gw, name, base).await;
            inflight.fetch_sub(1, Ordering::SeqCst);
            r
        }));
    }
    let mut recs = vec![];
    for t in tasks {
        recs.push(t.await.unwrap_or_else(|_| Record {
            error: Some("Panicked"),
            ..Default::default()
        }));
    }
    // The supervisor's own activation → relay accepted, from its log.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bind_sup: Vec<f64> = pool.pods[..claims]
        .iter()
        .filter_map(|p| {
            p.sup
                .events()
                .iter()
                .find(|e| e["event"] == "identity.relay_accepted")
                .and_then(|e| e["bind_us"].as_f64())
                .map(|us| us / 1e6)
        })
        .collect();
    let ok: Vec<&Record> = recs.iter().filter(|r| r.error.is_none()).collect();
    let bound: Vec<f64> = ok.iter().map(|r| r.bound.unwrap() - r.requested).collect();
    let first: Vec<f64> = ok.iter().map(|r| r.first.unwrap() - r.requested).collect();
    let exec: Vec<f64> = ok
        .iter()
        .map(|r| r.done.unwrap() - r.bound.unwrap())
        .collect();
    let req: Vec<f64> = recs.iter().map(|r| r.requested).collect();
    let first_req = req.iter().cloned().fold(f64::INFINITY, f64::min);
    let submit_span = max(&req) - first_req;
    let done_span = ok.iter().map(|r| r.done.unwrap()).fold(0.0, f64::max) - first_req;
    let ready_span = ok.iter().map(|r| r.bound.unwrap()).fold(0.0, f64::max) - first_req;
    let rate_of = |count: usize, span: f64| if span > 0.0 { count as f64 / span } else { 0.0 };
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for e in recs.iter().filter_map(|r| r.error) {
        *errors.entry(e.to_string()).or_default() += 1;
    }
    let summary = |v: &[f64]| json!({"p50": pct(v, 50.0), "p99": pct(v, 99.0), "max": max(v)});
    let mut pkb = serde_json::Map::new();
    for p in [50.0, 90.0, 95.0, 99.0] {
        pkb.insert(format!("startup_time_p{p}"), json!(pct(&bound, p)));
    }
    pkb.insert("startup_time_max".into(), json!(max(&bound)));
    for p in [50.0, 90.0, 95.0, 99.0] {
        pkb.insert(format!("exec_duration_s_p{p}"), json!(pct(&exec, p)));
    }
    pkb.insert("exec_duration_s_max".into(), json!(max(&exec)));
    pkb.insert("submit_qps".into(), json!(rate_of(recs.len(), submit_span)));
    // PKB's completion window ends at the last Ready; ours also reports the last exit.
    pkb.insert(
        "completion_qps".into(),
        json!(rate_of(ok.len(), ready_span)),
    );
    pkb.insert(
        "peak_concurrency".into(),
        json!(peak.load(Ordering::SeqCst)),
    );
    let warm = ok.iter().filter(|r| r.warm).count();
    pkb.insert(
        "warm_served_fraction".into(),
        json!(if ok.is_empty() {
            0.0
        } else {
            warm as f64 / ok.len() as f64
        }),
    );
    pkb.insert("success_count".into(), json!(ok.len()));
    pkb.insert("error_count".into(), json!(recs.len() - ok.len()));
    for (k, c) in &errors {
        pkb.insert(format!("error_count_{k}"), json!(c));
    }
    json!({
        "n": n, "rate": rate, "claims": recs.len(),
        "bound_s": summary(&bound), "first_event_s": summary(&first),
        "supervisor_bind_s": summary(&bind_sup),
        "sustained_claims_per_s": rate_of(ok.len(), done_span),
        "failures": recs.len() - ok.len(),
        "pkb": Value::Object(pkb),
    })
}

/// Sequential `/bin/true` through one bound pod, beside a local spawn and docker exec.
async fn exec_baselines(pool: &mut Pool, n: usize, docker: bool) -> Value {
    let pod = pool.spawn();
    pool.gateway
        .wait_parked(&pod.name, Duration::from_secs(60))
        .await
        .unwrap();
    let sb = pool
        .gateway
        .claim(&pod.name, ClaimOptions::default())
        .await
        .unwrap();
    pool.gateway
        .wait_connected(sb.id(), Duration::from_secs(30))
        .await
        .unwrap();
    let (mut relay, mut local) = (vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        let out = sb
            .exec(spec(&["/bin/true"]))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.exit.status, 0);
        relay.push(t.elapsed().as_secs_f64());
    }
    drop(pod);
    for _ in 0..n {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        local.push(t.elapsed().as_secs_f64());
    }
    let s = |v: &[f64]| json!({"n": v.len(), "p50": pct(v, 50.0), "p99": pct(v, 99.0)});
    let docker = if docker {
        match docker::docker_exec(30) {
            Ok(v) => s(&v),
            Err(why) => json!({"skipped": why}),
        }
    } else {
        json!({"skipped": "--no-docker"})
    };
    json!({"local": s(&local), "relay": s(&relay), "docker": docker})
}

fn main() {
    let o = opts();
    let program = std::env::var("SSV_POOL_BINARY")
        .or_else(|_| std::env::var("SSV_IDLE_BINARY"))
        .unwrap_or_else(|_| BIN.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = rt.block_on(async {
        // The baseline pods would otherwise run: tini as PID 1 of a sleeping workload.
        let mut tini = Command::new("tini");
        tini.args(["--", "sleep", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: as in Pool::spawn, prctl only; tini must not outlive a killed bench.
        unsafe {
            tini.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut tini = tini.spawn().ok();
        let mut idles = vec![];
        let mut storms = vec![];
        let mut exec = None;
        let mut hb = 0;
        for &n in &o.pools {
            let mut pool = Pool::new(program.clone(), o.heartbeat).await;
            hb = pool.gateway.config().heartbeat_interval.as_millis();
            eprintln!("pool: N={n} launch={:?} binary={program}", pool.launch);
            pool.fill(n).await;
            idles.push(measure::idle(&pool, o.idle_secs, tini.as_ref().map(|c| c.id())).await);
            for &k in &o.rates {
                let claims = o.claims.unwrap_or(n / 2).clamp(1, n);
                let s = storm(&mut pool, n, k, claims).await;
                eprintln!("pool: N={n} K={k}: {s}");
                storms.push(s);
                // The claimed pods are done: kill them and park replacements.
                pool.pods.drain(..claims);
                pool.fill(n).await;
            }
            if exec.is_none() {
                exec = Some(exec_baselines(&mut pool, 200, o.docker).await);
            }
        }
        if let Some(t) = tini.as_mut() {
            // TERM, not KILL: tini passes it to its sleep and exits after it, leaving
            // no orphan behind.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(t.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = t.wait();
        }
        json!({
            "cpu": measure::cpu_model(), "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "binary": program, "launch": format!("{:?}", launch()), "heartbeat_ms": hb as u64,
            "idle": idles, "storms": storms, "exec": exec,
        })
    });
    report::print_report(&report);
    if let Some(dir) = o.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!(
        "\n(pool bench: {:.0} s; data in {})",
        started.elapsed().as_secs_f64(),
        o.out.display()
    );
}
