//! A hostile tenant against PID 1 (issue 11, items 1–3): from inside a session, as the
//! sandbox user, it stops new session children before they exec, fills the pids limit,
//! and grows memory until the OOM killer must choose. PID 1 must keep serving, stay
//! alive, and release must still kill everything and wipe.

mod common;

use common::cgroup::{Cgroup, Limits};
use common::exec::*;
use common::*;
use std::time::{Duration, Instant};

/// A cgroup with `limits`, or None (the reason printed as the test's skip).
fn limited(tag: &str, limits: Limits) -> Option<Cgroup> {
    Cgroup::new(tag, limits)
        .map_err(|why| eprintln!("skipped: no limited cgroup can be made here: {why}"))
        .ok()
}

/// Sends SIGSTOP, as fast as it can, to the newest pids of the namespace: it catches
/// a session's child in the short window after it took the sandbox uid and before
/// `execve` (and every session it can signal after that).
const STOPPER: &str = r#"
import os, signal, time
me = os.getpid()
end = time.time() + float(os.environ.get("FOR", "20"))
f = open("/proc/sys/kernel/ns_last_pid")
while time.time() < end:
    f.seek(0)
    last = int(f.read())
    for p in (last, last + 1, last + 2):
        if p != me:
            try:
                os.kill(p, signal.SIGSTOP)
            except OSError:
                pass
"#;

/// Heartbeats, other sessions, release and SIGTERM all keep working while a tenant
/// stops every new session child it can; a spawn stopped before exec fails within the
/// spawn timeout with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_during_spawn_never_freezes_pid1() {
    require!(
        can_unshare(),
        "needs root and unshare(CLONE_NEWPID) to run the supervisor as PID 1"
    );
    require!(
        std::path::Path::new("/usr/bin/python3").exists(),
        "needs /usr/bin/python3 for the tenant's stop loop"
    );
    let env = Env::new("sigstop").await;
    // A shorter bound than the default 1 s keeps the test short: every start the
    // tenant catches costs it.
    let (mut sup, sandbox) = env
        .bound_with(Launch::Pid1, &["--spawn-timeout", "300ms"])
        .await;
    let mut attacker = spec(&["/usr/bin/python3", "-c", STOPPER]);
    attacker.env.insert("FOR".into(), "60".into());
    let attacker = sandbox.exec(attacker).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut started, mut failed) = (0, vec![]);
    let t0 = Instant::now();
    for i in 0..300 {
        let one = tokio::time::timeout(Duration::from_secs(10), sandbox.exec(spec(&["/bin/true"])));
        match one.await {
            Ok(Ok(_)) => started += 1,
            Ok(Err(e)) => failed.push(e.message),
            Err(_) => panic!(
                "session {i} got neither Started nor Failed within 10 s: PID 1 is frozen\n{}",
                sup.logs()
            ),
        }
        // Enough evidence either way, bounded in time on a loaded machine (each caught
        // start costs the spawn timeout).
        if (failed.len() >= 3 && i > 50) || t0.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    eprintln!(
        "{started} started, {} failed in {:?}: {:?}",
        failed.len(),
        t0.elapsed(),
        failed.first()
    );
    assert!(
        failed.iter().all(|m| m.contains("did not reach execve")),
        "a failed spawn names the cause: {failed:?}"
    );
    assert!(
        !failed.is_empty(),
        "the tenant never caught a child before exec (the test did not attack)"
    );

    // Once the attack stops, sessions run to the end again (the stopped ones stay the
    // tenant's business until release).
    // (It may have ended by itself already on a slow run.)
    let _ = attacker.input().signal(libc::SIGKILL).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        sandbox
            .exec(spec(&["/bin/echo", "still-serving"]))
            .await?
            .collect()
            .await
    });
    let out = ok
        .await
        .expect("a session within 10 s")
        .expect("session output");
    assert_eq!(out.stdout, b"still-serving\n");
    sup.release_via(
        &sandbox,
        "test",
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
}

/// Forks sleepers until the kernel refuses (the pids limit, or the user's cap), and
/// keeps the limit full: whatever frees up is taken again. Prints how many it holds.
const FILLER: &str = r#"
import os, time
n = 0
said = False
while True:
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        n += 1
    except OSError:
        if not said:
            print("full", n, flush=True)
            said = True
        time.sleep(0.01)
"#;

/// The routine events that used to need a new thread, with the tenant holding every
/// pid it can get: a session timeout, SIGKILL and forget of running sessions, and a
/// relay reconnect to a gateway given by host name. All work; release kills all.
async fn routine_events_with_pids_exhausted(tag: &str, cap: &str, pids_max: u64) {
    require!(
        can_unshare(),
        "needs root and unshare(CLONE_NEWPID) to run the supervisor as PID 1"
    );
    let Some(cg) = limited(
        tag,
        Limits {
            memory: None,
            pids: Some(pids_max),
        },
    ) else {
        return;
    };
    let mut env = Env::new(tag).await;
    // RLIMIT_NPROC counts every process of the uid on the machine: a uid of this test's
    // own keeps other tests' sessions (and this one's) out of each other's count.
    env.sandbox_user = (42_000 + u32::from(rand::random::<u16>() % 10_000)).to_string();
    let sup = env.spawn_in(&cg, Launch::Pid1, &["--max-workload-processes", cap]);
    let (mut sup, sandbox) = env.claim_when_parked(sup).await;
    let mut timed = sh("exec sleep 1000");
    timed.timeout_ms = 12_000;
    timed.kill_grace_ms = 200;
    let timed = sandbox.exec(timed).await.unwrap();
    let killed = sandbox.exec(sh("exec sleep 1000")).await.unwrap();
    let forgotten = sandbox.exec(sh("exec sleep 1000")).await.unwrap();
    // Blocking-pool threads that served boot (DNS for "localhost") retire after 10 s
    // idle in tokio's default: let that happen before the limit fills.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut filler = sandbox
        .exec(spec(&["/usr/bin/python3", "-c", FILLER]))
        .await
        .unwrap();
    let mut seen = vec![];
    read_until(&mut filler, &mut seen, "full", Duration::from_secs(30)).await;
    eprintln!(
        "{tag}: tenant holds the limit ({}), cgroup {} pids {:?}/{pids_max}",
        String::from_utf8_lossy(&seen).trim(),
        cg.version(),
        cg.pids_current()
    );

    // New sessions fail with a precise error, not a crash. (With a cap, the kernel
    // checks it at `setuid` without counting the new process itself, so one more
    // long-lived session fits before the next is refused.)
    let mut refused = None;
    let mut extra = vec![];
    for _ in 0..2 {
        match sandbox.exec(sh("exec sleep 1000")).await {
            Ok(e) => extra.push(e),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    eprintln!(
        "{tag}: a new session while full: {:?}",
        refused.as_ref().map(|e| &e.message)
    );
    if cap != "0" {
        let e = refused.expect("the capped user cannot start two more sessions");
        assert!(
            e.message.contains("--max-workload-processes"),
            "{}",
            e.message
        );
        let current = cg.pids_current().unwrap_or(0);
        assert!(
            current + 16 <= pids_max,
            "the cap leaves the supervisor headroom: {current}/{pids_max}"
        );
    }

    killed.input().signal(libc::SIGKILL).await.unwrap();
    sandbox
        .send_control_raw(sandbox_supervisor::proto::GatewayMessage {
            msg: Some(
                sandbox_supervisor::proto::gateway_message::Msg::ForgetSession(
                    sandbox_supervisor::proto::ForgetSession {
                        session_id: forgotten.session_id().into(),
                    },
                ),
            ),
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), timed.collect()).await;
    let out = out
        .expect("the timeout fired")
        .expect("the timed-out session's exit");
    assert!(out.exit.timed_out, "{:?}", out.exit);
    let out = tokio::time::timeout(Duration::from_secs(10), killed.collect()).await;
    assert_eq!(
        out.expect("SIGKILL ended the session").unwrap().exit.status,
        137
    );

    let before = sup
        .events()
        .iter()
        .filter(|e| e["event"] == "relay.reconnected")
        .count();
    env.gateway.drop_relay(sandbox.id());
    assert!(
        sup.wait_events("relay.reconnected", before + 1, Duration::from_secs(20))
            .await,
        "the relay came back with every pid taken\n{}",
        sup.logs()
    );
    assert!(
        sup.wait_exit(Duration::from_millis(10)).is_none(),
        "PID 1 died\n{}",
        sup.logs()
    );
    assert!(!sup.logs().contains("panicked"), "{}", sup.logs());

    sup.release_via(
        &sandbox,
        "test",
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        cg.pids().is_empty(),
        "release left processes: {:?}",
        cg.pids()
    );
}

/// The default cap (from the pids limit, less the supervisor's reserve) stops the
/// tenant short of the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_cap_keeps_pids_for_pid1() {
    routine_events_with_pids_exhausted("pidscap", "auto", 128).await;
}

/// Without a cap the tenant takes every pid: PID 1 still needs no new thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pid_taken_still_never_crashes_pid1() {
    routine_events_with_pids_exhausted("pidsfull", "0", 96).await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Starts hogs, each holding a little less memory than the supervisor, until the
/// memory limit makes the OOM killer choose. It must choose a hog, never PID 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oom_killer_takes_the_workload_not_pid1() {
    require!(
        can_unshare(),
        "needs root and unshare(CLONE_NEWPID) to run the supervisor as PID 1"
    );
    let limit = 192 << 20;
    let Some(cg) = limited(
        "oom",
        Limits {
            memory: Some(limit),
            pids: None,
        },
    ) else {
        return;
    };
    let env = Env::new("oom").await;
    let sup = env.spawn_in(&cg, Launch::Pid1, &[]);
    let (mut sup, sandbox) = env.claim_when_parked(sup).await;
    // Grow the supervisor a little first (a few sessions' worth of state), as in use.
    for _ in 0..20 {
        sandbox
            .exec(spec(&["/bin/true"]))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
    }
    let pid = sup.host_pid();
    let sup_kib = rss_kib(pid);
    // Each hog is a process with about 90 % of the supervisor's RSS (Python's own
    // ~10 MiB plus a touched buffer): by size alone the kernel would pick PID 1.
    let hog_bytes = (sup_kib * 1024 * 9 / 10)
        .saturating_sub(10 << 20)
        .max(2 << 20);
    let hog = format!("import time; b = b'x' * {hog_bytes}; time.sleep(1000)");
    let script = format!(
        "i=0; while [ $i -lt 200 ]; do /usr/bin/python3 -c \"{hog}\" & i=$((i+1)); sleep 0.05; done; wait"
    );
    eprintln!(
        "supervisor RSS {sup_kib} KiB; hogs of {} KiB each",
        hog_bytes / 1024
    );
    let _hogs = sandbox.exec(sh(&script)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while cg.oom_kills() < 3 && Instant::now() < deadline {
        if sup.wait_exit(Duration::from_millis(10)).is_some() {
            panic!(
                "the OOM killer took PID 1 (cgroup {})\n{}",
                cg.version(),
                sup.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kills = cg.oom_kills();
    eprintln!("OOM kills in the cgroup: {kills}");
    assert!(kills >= 1, "the hogs never made the OOM killer run");
    assert!(
        sup.wait_exit(Duration::from_millis(10)).is_none(),
        "PID 1 died\n{}",
        sup.logs()
    );
    // -1000 with CAP_SYS_RESOURCE; without it, what it inherited (0 here).
    let adj: i32 = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(adj <= 0, "the supervisor's oom_score_adj is {adj}");
    let out = sandbox
        .exec(spec(&["/bin/cat", "/proc/self/oom_score_adj"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"1000\n", "a session's oom_score_adj");
    sup.release_via(
        &sandbox,
        "test",
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
}

/// 100 sessions write as fast as they can and the gateway acknowledges nothing: the
/// global output budget, not 100 per-session buffers, bounds the supervisor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_output_of_many_sessions_stays_within_the_budget() {
    require!(
        can_unshare(),
        "needs root and unshare(CLONE_NEWPID) to run the supervisor as PID 1"
    );
    let Some(cg) = limited(
        "budget",
        Limits {
            memory: Some(320 << 20),
            pids: None,
        },
    ) else {
        return;
    };
    let budget_mib = 32;
    let env = Env::new("budget").await;
    let sup = env.spawn_in(
        &cg,
        Launch::Pid1,
        &["--output-budget", &format!("{budget_mib}M")],
    );
    let (mut sup, sandbox) = env.claim_when_parked(sup).await;
    let pid = sup.host_pid();
    let base_kib = rss_kib(pid);
    let mut held = vec![];
    for _ in 0..100 {
        held.push(
            sandbox
                .exec(spec(&["/bin/cat", "/dev/zero"]))
                .await
                .unwrap(),
        );
    }
    // Let every pump run into the budget, then watch the peak for a while.
    let mut peak = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    eprintln!("supervisor RSS: {base_kib} KiB at rest, peak {peak} KiB with 100 unacknowledged sessions, budget {budget_mib} MiB");
    assert!(
        sup.wait_exit(Duration::from_millis(10)).is_none(),
        "PID 1 died\n{}",
        sup.logs()
    );
    // The budget plus what 100 streams hold in flight to the gateway (HTTP/2 and gRPC
    // framing) and the baseline.
    let allowed = base_kib + (budget_mib + 48) * 1024;
    assert!(peak <= allowed, "peak RSS {peak} KiB > {allowed} KiB");
    // Reading one session drains it again: nothing was lost, the session is live.
    let mut first = held.remove(0);
    let mut got = 0usize;
    while got < 8 << 20 {
        match tokio::time::timeout(Duration::from_secs(10), first.next()).await {
            Ok(Some(sandbox_supervisor::gateway::ExecEvent::Stdout(b))) => {
                assert!(b.iter().all(|&x| x == 0));
                got += b.len();
            }
            other => panic!("session stalled after {got} bytes: {other:?}"),
        }
    }
    sup.release_via(
        &sandbox,
        "test",
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
}
