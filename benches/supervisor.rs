//! The supervisor's DESIGN §8 figures, each beside a baseline measured in the same run
//! on the same machine (medians and p99 over repeated runs, ratios).
//!
//! ```text
//! scripts/bench.sh            # or: cargo bench --bench supervisor [-- --quick]
//! ```
//!
//! Drives the release build of the real binary (as PID 1 of a PID namespace when root)
//! through the real relay against the reference gateway, like the integration tests:
//! this file reuses their harness. Seed and wipe figures come from
//! `examples/workspace_bench.rs` (scripts/bench.sh runs both).

#[path = "../tests/common/mod.rs"]
mod common;

mod channels;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

struct Row {
    what: String,
    baseline: String,
    ours: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: f64) -> String {
    format!("{:.3} ms", d * 1e3)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // The supervisor logs at its shipped level: debug events (h2's among them) per
    // frame would be measured otherwise. Set before any thread exists.
    if std::env::var_os("SSV_LOG_LEVEL").is_none() {
        std::env::set_var("SSV_LOG_LEVEL", "info");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only NAME`: just the rows whose name contains NAME (bind, idle, exec, tls,
    // concurrent, orphans, gvisor, plaintext, files, forward), for iterating on one figure.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(quick, only));
    println!("\n| figure | baseline (same run) | sandbox-supervisor | ratio | target | |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.what, r.baseline, r.ours, r.ratio, r.target, r.verdict
        );
    }
}

async fn run(quick: bool, only: Option<String>) -> Vec<Row> {
    let launch = launch();
    eprintln!("bench: launch={launch:?} quick={quick} only={only:?} binary={BIN}");
    let want = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let mut rows = vec![];
    if want("bind") {
        rows.push(bind(launch, if quick { 5 } else { 20 }).await);
    }
    if want("idle") {
        rows.push(idle_rss(launch).await);
    }
    let gib = if quick { 256 } else { 1024 };
    if ["exec", "tls", "concurrent", "orphans"]
        .iter()
        .any(|r| want(r))
    {
        let env = Env::new("bench").await;
        let (sup, sandbox) = env.bound_with(launch, &["--max-sessions", "2000"]).await;
        if want("exec") {
            rows.push(exec_rtt(&sandbox, if quick { 50 } else { 300 }).await);
        }
        if want("tls") {
            rows.push(throughput(&sandbox, gib, "TLS").await);
        }
        if want("concurrent") {
            rows.push(concurrent(&sandbox, sup.host_pid(), if quick { 200 } else { 1000 }).await);
        }
        if want("orphans") {
            rows.push(orphans(&sandbox, sup.host_pid(), if quick { 1000 } else { 10_000 }).await);
        }
    }
    if want("gvisor") {
        match common::gvisor::missing() {
            Some(why) => eprintln!("bench: gVisor rows skipped: {why}"),
            None => rows.extend(gvisor(quick).await),
        }
    }
    if want("plaintext") {
        let plain = Env::with(
            "benchplain",
            Options {
                tls: false,
                ..Options::default()
            },
        )
        .await;
        let (_sup2, sandbox2) = plain.bound(launch).await;
        rows.push(throughput(&sandbox2, gib, "plaintext").await);
    }
    if want("files") {
        rows.extend(channels::files(launch, if quick { 128 } else { 1024 }).await);
    }
    if want("forward") {
        let (mib, n) = if quick { (128, 50) } else { (512, 200) };
        rows.extend(channels::forward(launch, mib, n).await);
    }
    rows
}

/// Activation received → relay accepted, from the supervisor's own measurement.
async fn bind(launch: Launch, n: usize) -> Row {
    let mut samples = vec![];
    for _ in 0..n {
        let env = Env::new("benchbind").await;
        let (sup, _sandbox) = env.bound(launch).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(us) = sup
            .events()
            .iter()
            .find(|e| e["event"] == "identity.relay_accepted")
            .and_then(|e| e["bind_us"].as_f64())
        {
            samples.push(us / 1e6);
        }
    }
    let (p50, p99) = (pct(&mut samples, 0.5), pct(&mut samples, 0.99));
    Row {
        what: format!("activation → bound (n={})", samples.len()),
        baseline: "—".into(),
        ours: format!("p50 {} / p99 {}", ms(p50), ms(p99)),
        ratio: "—".into(),
        target: "p50 ≤ 2 ms".into(),
        verdict: if p50 <= 0.002 { "met" } else { "not met" },
    }
}

/// A warm supervisor's RSS at rest, beside tini's. Measures the static production
/// binary when `SSV_IDLE_BINARY` names it (scripts/bench.sh builds it), else this
/// build (which also carries the reference gateway).
async fn idle_rss(launch: Launch) -> Row {
    let env = Env::new("benchidle").await;
    let program = std::env::var("SSV_IDLE_BINARY").unwrap_or_else(|_| BIN.to_string());
    let mut sup = env.spawn_program(&program, launch, env.run_args());
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(30))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ours = rss_kib(sup.host_pid(), "VmRSS:");
    // Where it is: the binary's touched pages (file) vs heap, stacks, relocations (anon).
    let (anon, file) = (
        rss_kib(sup.host_pid(), "RssAnon:"),
        rss_kib(sup.host_pid(), "RssFile:"),
    );
    sup.kill();
    let mut tini = Command::new("tini")
        .args(["-s", "--", "sleep", "30"])
        .spawn();
    let base = match &mut tini {
        Ok(child) => {
            std::thread::sleep(Duration::from_millis(500));
            let v = rss_kib(child.id(), "VmRSS:");
            let _ = child.kill();
            let _ = child.wait();
            Some(v)
        }
        Err(_) => None,
    };
    let size = std::fs::metadata(&program).map(|m| m.len()).unwrap_or(0);
    let which = if program == BIN {
        "this build"
    } else {
        "static production build"
    };
    Row {
        what: format!(
            "idle warm RSS ({which}, binary {:.2} MiB)",
            size as f64 / 1048576.0
        ),
        baseline: base
            .map(|b| format!("tini {b} KiB"))
            .unwrap_or_else(|| "tini not installed".into()),
        ours: format!("{ours} KiB (anon {anon}, file {file})"),
        ratio: base
            .map(|b| format!("{:.1}×", ours as f64 / b as f64))
            .unwrap_or_else(|| "—".into()),
        target: "RSS ≤ 4 MiB; binary ≤ 8 MiB".into(),
        verdict: if ours <= 4096 && size <= 8 << 20 {
            "met"
        } else {
            "not met"
        },
    }
}

/// `/bin/true` through the relay vs a local spawn+wait, sequentially.
async fn exec_rtt(sandbox: &sandbox_supervisor::gateway::Sandbox, n: usize) -> Row {
    let (mut relay, mut started) = (vec![], vec![]);
    for _ in 0..n {
        let t = Instant::now();
        let exec = sandbox.exec(spec(&["/bin/true"])).await.unwrap();
        started.push(t.elapsed().as_secs_f64());
        let out = exec.collect().await.unwrap();
        assert_eq!(out.exit.status, 0);
        relay.push(t.elapsed().as_secs_f64());
    }
    let mut local = vec![];
    for _ in 0..n {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        local.push(t.elapsed().as_secs_f64());
    }
    let (r50, l50) = (pct(&mut relay, 0.5), pct(&mut local, 0.5));
    let (r99, l99) = (pct(&mut relay, 0.99), pct(&mut local, 0.99));
    let overhead = r50 - l50;
    Row {
        what: format!("exec round trip of /bin/true (n={n})"),
        baseline: format!("local spawn+wait p50 {} / p99 {}", ms(l50), ms(l99)),
        ours: format!(
            "p50 {} / p99 {} (started after p50 {})",
            ms(r50),
            ms(r99),
            ms(pct(&mut started, 0.5))
        ),
        ratio: format!("overhead p50 {}", ms(overhead)),
        target: "overhead p50 ≤ 0.5 ms".into(),
        verdict: if overhead <= 0.0005 { "met" } else { "not met" },
    }
}

/// Seconds for one session to stream `bytes` zeros of stdout to the gateway, checked.
async fn stream_zeros(sandbox: &sandbox_supervisor::gateway::Sandbox, bytes: u64) -> f64 {
    let t = Instant::now();
    let mut exec = sandbox
        .exec(spec(&["head", "-c", &bytes.to_string(), "/dev/zero"]))
        .await
        .unwrap();
    let mut got = 0u64;
    while let Some(ev) = exec.next().await {
        match ev {
            sandbox_supervisor::gateway::ExecEvent::Stdout(b) => got += b.len() as u64,
            sandbox_supervisor::gateway::ExecEvent::Stderr(_) => {}
            sandbox_supervisor::gateway::ExecEvent::Exited(_) => break,
        }
    }
    assert_eq!(got, bytes);
    t.elapsed().as_secs_f64()
}

/// One session streaming `mib` MiB of stdout vs a local pipe of the same bytes:
/// alternated rounds, medians of each. (One round each swung 3× here: whether the two
/// ends of a pipe share a vCPU decides much of it, for the baseline as for us.)
async fn throughput(sandbox: &sandbox_supervisor::gateway::Sandbox, mib: u64, label: &str) -> Row {
    let bytes = mib << 20;
    let rounds = if mib >= 512 { 5 } else { 1 };
    let (mut ours, mut base) = (vec![], vec![]);
    for _ in 0..rounds {
        ours.push(bytes as f64 / stream_zeros(sandbox, bytes).await);
        let t = Instant::now();
        let st = Command::new("sh")
            .args([
                "-c",
                &format!("head -c {bytes} /dev/zero | cat > /dev/null"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
        base.push(bytes as f64 / t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| {
        format!(
            "{:.2}–{:.2}",
            v[0] / (1u64 << 30) as f64,
            v[v.len() - 1] / (1u64 << 30) as f64
        )
    };
    let (ours_m, base_m) = (median(&mut ours), median(&mut base));
    eprintln!(
        "bench: {label} stdout, {rounds} rounds: ours {} GiB/s, pipe {} GiB/s",
        spread(&ours),
        spread(&base)
    );
    let (ours, base) = (ours_m, base_m);
    let gibs = |v: f64| format!("{:.2} GiB/s", v / (1u64 << 30) as f64);
    Row {
        what: format!("stdout through one session, {label} ({mib} MiB, median of {rounds})"),
        baseline: format!("local pipe {}", gibs(base)),
        ours: gibs(ours),
        ratio: format!("{:.0}% of the pipe", 100.0 * ours / base),
        target: "≥ 1 GiB/s plaintext, ≥ 50 % of the pipe".into(),
        verdict: if ours / base >= 0.5 && (label != "plaintext" || ours >= (1u64 << 30) as f64) {
            "met"
        } else {
            "not met"
        },
    }
}

/// `n` sessions live at once on one connection, each output verified.
async fn concurrent(sandbox: &sandbox_supervisor::gateway::Sandbox, pid: u32, n: usize) -> Row {
    let t = Instant::now();
    let mut execs = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = sh(&format!("read _ ; echo session-{i}"));
        s.stdin = true;
        execs.push(
            sandbox
                .exec(s)
                .await
                .unwrap_or_else(|e| panic!("session {i}: {e}")),
        );
    }
    let started = t.elapsed();
    let rss = rss_kib(pid, "VmRSS:");
    for e in &execs {
        e.write_stdin(bytes::Bytes::from_static(b"go\n"))
            .await
            .unwrap();
    }
    let mut handles = vec![];
    for (i, e) in execs.into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let out = e.collect().await.unwrap();
            assert_eq!(out.stdout, format!("session-{i}\n").into_bytes());
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let hwm = rss_kib(pid, "VmHWM:");
    Row {
        what: format!("{n} concurrent sessions on one connection"),
        baseline: "—".into(),
        ours: format!(
            "all live after {:.2} s, all verified after {:.2} s; RSS {} KiB (peak {} KiB)",
            started.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            rss,
            hwm
        ),
        ratio: "—".into(),
        target: "1,000 live, RSS ≤ 64 MiB".into(),
        verdict: if n >= 1000 && hwm <= 64 * 1024 {
            "met"
        } else if n < 1000 {
            "quick run"
        } else {
            "not met"
        },
    }
}

/// `n` orphans blocked on a FIFO, released at once: time until every one is reaped.
async fn orphans(sandbox: &sandbox_supervisor::gateway::Sandbox, pid: u32, n: usize) -> Row {
    let script = format!("rm -f f; mkfifo f; i=0; while [ $i -lt {n} ]; do (cat f >/dev/null &); i=$((i+1)); done; echo forked");
    let out = sandbox
        .exec(sh(&script))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"forked\n");
    // Wait until all n readers are parked on the FIFO (reparented to the supervisor).
    let deadline = Instant::now() + Duration::from_secs(120);
    while descendants(pid).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = descendants(pid).len();
    let t = Instant::now();
    // One writer opens and closes the FIFO: every reader gets EOF and exits at once.
    let _ = sandbox
        .exec(sh("echo > f"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    while !descendants(pid).is_empty() && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t.elapsed().as_secs_f64();
    Row {
        what: format!("reaping {before} orphans released at once"),
        baseline: "—".into(),
        ours: format!("all reaped in {:.3} s", took),
        ratio: "—".into(),
        target: "10k reaped within 1 s".into(),
        verdict: if before >= 10_000 && took <= 1.0 {
            "met"
        } else if before < 10_000 {
            "quick run"
        } else {
            "not met"
        },
    }
}

/// Times, inside the sandbox, `n` fork+exec+wait of /bin/true (p50 and p99, seconds),
/// then `head -c BYTES /dev/zero | cat > /dev/null` (seconds): the baselines measured in
/// the same gVisor as the sessions they are compared with.
const IN_SANDBOX_BASELINE: &str = r#"use Time::HiRes qw(time); my ($n, $bytes) = @ARGV; my @t;
for (1..$n) { my $s = time; my $p = fork; if (!$p) { exec "/bin/true"; exit 127 } waitpid($p, 0); push @t, time - $s }
@t = sort { $a <=> $b } @t; printf "%.9f %.9f\n", $t[int($#t * 0.5 + 0.5)], $t[int($#t * 0.99 + 0.5)];
my $s = time; system("head -c $bytes /dev/zero | cat > /dev/null") == 0 or die; printf "%.9f\n", time - $s;"#;

/// The supervisor as PID 1 of a gVisor sandbox (`runsc do`, tests/common/gvisor.rs):
/// exec round trip and session stdout, each beside its baseline measured inside the same
/// sandbox in the same run, and `local -- true` inside gVisor beside the same natively.
async fn gvisor(quick: bool) -> Vec<Row> {
    use common::gvisor::{Fs, Gvisor};
    let (n, mib) = if quick { (30u64, 64u64) } else { (200, 256) };
    let env = Env::new("benchgv").await;
    let g = Gvisor::new("bench");
    let (_sup, sandbox) = g.bound(&env, Fs::Host, &["--max-sessions", "2000"]).await;
    let bytes = mib << 20;
    let out = sandbox
        .exec(spec(&[
            "perl",
            "-e",
            IN_SANDBOX_BASELINE,
            &n.to_string(),
            &bytes.to_string(),
        ]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        out.exit.status,
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nums: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (l50, l99, pipe_s) = (nums[0], nums[1], nums[2]);

    let mut relay = vec![];
    for _ in 0..n {
        let t = Instant::now();
        let out = sandbox
            .exec(spec(&["/bin/true"]))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.exit.status, 0);
        relay.push(t.elapsed().as_secs_f64());
    }
    let (r50, r99) = (pct(&mut relay, 0.5), pct(&mut relay, 0.99));
    let exec_row = Row {
        what: format!("gVisor: exec round trip of /bin/true (n={n})"),
        baseline: format!(
            "spawn+wait inside the sandbox p50 {} / p99 {}",
            ms(l50),
            ms(l99)
        ),
        ours: format!("p50 {} / p99 {}", ms(r50), ms(r99)),
        ratio: format!("overhead p50 {}", ms(r50 - l50)),
        target: "reported (gVisor's own spawn dominates)".into(),
        verdict: "-",
    };

    let ours = bytes as f64 / stream_zeros(&sandbox, bytes).await;
    let base = bytes as f64 / pipe_s;
    let gibs = |v: f64| format!("{:.2} GiB/s", v / (1u64 << 30) as f64);
    let stdout_row = Row {
        what: format!("gVisor: stdout through one session, TLS ({mib} MiB)"),
        baseline: format!("pipe inside the sandbox {}", gibs(base)),
        ours: gibs(ours),
        ratio: format!("{:.0}% of the pipe", 100.0 * ours / base),
        target: "≥ 50 % of the pipe".into(),
        verdict: if ours / base >= 0.5 { "met" } else { "not met" },
    };
    vec![
        exec_row,
        stdout_row,
        local_rows(&g, if quick { 3 } else { 7 }),
    ]
}

/// `local -- true` (gateway, supervisor as PID 1 or subreaper, one session, release,
/// wipe) inside gVisor beside the same on this machine: medians of `runs` each.
fn local_rows(g: &common::gvisor::Gvisor, runs: usize) -> Row {
    let time = |mut c: Command| {
        let mut v: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let st = c.stdin(std::process::Stdio::null()).status().unwrap();
                assert!(st.success(), "local -- true: {st}");
                t.elapsed().as_secs_f64()
            })
            .collect();
        pct(&mut v, 0.5)
    };
    let mut native = Command::new(BIN);
    native.args(["local", "--", "true"]);
    let native = time(native);
    let mut inside = g.command(common::gvisor::Fs::Host);
    inside.args([BIN, "local", "--", "true"]);
    let inside = time(inside);
    Row {
        what: format!("gVisor: `local -- true` (n={runs})"),
        baseline: format!("native p50 {}", ms(native)),
        ours: format!("inside gVisor p50 {}", ms(inside)),
        ratio: format!("{:.1}×", inside / native),
        target: "reported".into(),
        verdict: "-",
    }
}
