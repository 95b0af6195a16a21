//! Exec relay end to end (issue 5): the real binary, the real gRPC relay over TLS, the
//! reference gateway. PTYs, stdin, signals (also to processes that left the group),
//! drain, many sessions on one connection, replay across drops, gateway restarts,
//! liveness, and every error a gateway can provoke.

mod common;

use common::exec::*;
use common::*;
use rand::{Rng, SeedableRng};
use sandbox_supervisor::gateway::link::FaultyLink;
use sandbox_supervisor::gateway::ExecEvent;
use sandbox_supervisor::proto::{self, exit_status::How, ErrorCode};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tty(cols: u32, rows: u32) -> Option<proto::Tty> {
    Some(proto::Tty {
        cols,
        rows,
        term: "xterm".into(),
    })
}

/// A shell on a terminal: the size is right from the start and after a resize, the
/// shell sees SIGWINCH, `tty` names a terminal, and ^C interrupts a foreground job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_shell_sizes_resize_tty_and_ctrl_c() {
    let env = Env::new("pty").await;
    let (_sup, sandbox) = env.bound(launch()).await;
    let mut s = spec(&["/bin/sh"]);
    s.tty = tty(123, 45);
    s.stdin = true;
    let mut exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let mut seen = Vec::new();

    // `$((…))` makes the marker differ from the terminal's echo of the command line.
    input
        .write_stdin("stty size; tty; echo first-$((1+1))\n".into())
        .await
        .unwrap();
    read_until(&mut exec, &mut seen, "first-2", T).await;
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.contains("45 123"), "{text:?}");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(!text.contains("not a tty"), "{text:?}");

    input
        .write_stdin("trap 'echo winch-$((6*7))' WINCH; echo trap-$((2+3))\n".into())
        .await
        .unwrap();
    read_until(&mut exec, &mut seen, "trap-5", T).await;
    seen.clear();
    input.resize(100, 30).await.unwrap();
    input
        .write_stdin("stty size; echo second-$((1+2))\n".into())
        .await
        .unwrap();
    read_until(&mut exec, &mut seen, "second-3", T).await;
    read_until(&mut exec, &mut seen, "winch-42", T).await;
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.contains("30 100"), "{text:?}");

    seen.clear();
    input
        .write_stdin("echo sleeping-$((5+5)); sleep 1000\n".into())
        .await
        .unwrap();
    read_until(&mut exec, &mut seen, "sleeping-10", T).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    input.write_stdin("\x03".into()).await.unwrap();
    input
        .write_stdin("echo interrupted-$((4+5))\n".into())
        .await
        .unwrap();
    read_until(&mut exec, &mut seen, "interrupted-9", T).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    input.write_stdin("exit 4\n".into()).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.status, 4, "{out:?}");
}

/// `cat` echoes 64 MiB of random stdin, sent in random-sized chunks then EOF, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_echoes_streamed_stdin_exactly() {
    let mib = env_usize("SSV_CAT_MIB", 64);
    let env = Env::new("cat").await;
    let (_sup, sandbox) = env.bound(launch()).await;
    let mut s = spec(&["cat"]);
    s.stdin = true;
    let mut exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let total = mib << 20;
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut hash = Sha256::new();
        let mut sent = 0;
        while sent < total {
            let n = rng.random_range(1..=1 << 20).min(total - sent);
            let mut chunk = vec![0u8; n];
            rng.fill(&mut chunk[..]);
            hash.update(&chunk);
            input.write_stdin(chunk.into()).await.unwrap();
            sent += n;
        }
        input.close_stdin().await.unwrap();
        hash.finalize()
    });
    let mut hash = Sha256::new();
    let mut got = 0usize;
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(60), exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) => {
                got += b.len();
                hash.update(&b);
            }
            Ok(Some(ExecEvent::Stderr(b))) => panic!("stderr: {:?}", String::from_utf8_lossy(&b)),
            Ok(Some(ExecEvent::Exited(e))) => break e,
            Ok(None) => panic!("session lost after {got} bytes"),
            Err(_) => panic!("stalled after {got} bytes"),
        }
    };
    let sent = writer.await.unwrap();
    eprintln!(
        "cat: {mib} MiB echoed in {:?} ({:.0} MiB/s)",
        t0.elapsed(),
        mib as f64 / t0.elapsed().as_secs_f64()
    );
    assert_eq!(got, total);
    assert_eq!(hash.finalize(), sent);
    assert_eq!(exit.status, 0);
}

/// SIGTERM reaches every process of the session's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_the_whole_group() {
    let env = Env::new("sigterm").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let root = sup.host_pid();
    let mut exec = sandbox
        .exec(sh("sleep 1000 & sleep 1000 & echo ready; wait"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec, &mut seen, "ready", T).await;
    let sleeps = wait_named(root, "sleep", 2, T).await;
    assert_eq!(sleeps.len(), 2, "{sleeps:?}");
    exec.signal(libc::SIGTERM).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.how, Some(How::Signal(libc::SIGTERM)), "{out:?}");
    assert_eq!(out.exit.status, 128 + libc::SIGTERM);
    let left = wait_none_named(root, "sleep", Duration::from_secs(3)).await;
    assert!(left.is_empty(), "{left:?}");
}

/// A `setsid sleep` whose parent exited has left the session's group, session and
/// process tree; the session's marker group still finds it for the kill, the timeout
/// and a kill that arrives while only the escapee remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setsid_escapees_die_with_the_session() {
    require!(
        is_root(),
        "marker groups need root (sessions run as another user)"
    );
    let env = Env::new("setsid").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let root = sup.host_pid();
    // The inner shell starts the escapee and exits: it is reparented to the supervisor.
    let script = "sh -c 'setsid sleep 1000 >/dev/null 2>&1 &'; echo ready; sleep 1000";

    // 1. SIGKILL from the gateway.
    let mut exec = sandbox.exec(sh(script)).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut exec, &mut seen, "ready", T).await;
    let sleeps = wait_named(root, "sleep", 2, T).await;
    assert_eq!(sleeps.len(), 2, "{sleeps:?}");
    let escaped: Vec<_> = sleeps.iter().filter(|p| p.ppid == root).collect();
    assert_eq!(
        escaped.len(),
        1,
        "one sleep reparented to the supervisor: {sleeps:?}"
    );
    assert!(
        escaped[0].groups.iter().any(|&g| g >= 2_000_000_000),
        "the escapee carries the session's marker group: {:?}",
        escaped[0]
    );
    exec.signal(libc::SIGKILL).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.how, Some(How::Signal(libc::SIGKILL)), "{out:?}");
    let left = wait_none_named(root, "sleep", Duration::from_secs(3)).await;
    assert!(left.is_empty(), "after SIGKILL: {left:?}\n{}", sup.logs());

    // 2. The timeout: TERM, then KILL after the grace.
    let mut s = sh(script);
    s.timeout_ms = 1000;
    s.kill_grace_ms = 300;
    let t0 = Instant::now();
    let out = sandbox.exec(s).await.unwrap().collect().await.unwrap();
    assert!(out.exit.timed_out, "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let left = wait_none_named(root, "sleep", Duration::from_secs(3)).await;
    assert!(left.is_empty(), "after the timeout: {left:?}");

    // 3. An escapee that ignores TERM survives the signal but not the timeout's KILL.
    let mut s = sh("setsid sh -c 'trap \"\" TERM; echo ready; exec sleep 1000' & wait");
    s.timeout_ms = 800;
    s.kill_grace_ms = 300;
    let out = sandbox.exec(s).await.unwrap().collect().await.unwrap();
    assert!(out.exit.timed_out, "{out:?}");
    let left = wait_none_named(root, "sleep", Duration::from_secs(3)).await;
    assert!(left.is_empty(), "TERM-ignoring escapee: {left:?}");
    assert!(sup.has_event("session.timed_out"));
}

/// The leader exits while a background grandchild holds stdout: the session still ends
/// within the drain bound, with the leader's status and all output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_exit_with_grandchild_holding_stdout_ends_within_drain_bound() {
    let env = Env::new("drain").await;
    let (sup, sandbox) = env.bound_with(launch(), &["--drain-timeout", "1s"]).await;
    let t0 = Instant::now();
    let out = sandbox
        .exec(sh("echo leader-out; sleep 1000 & exit 3"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(out.stdout, b"leader-out\n");
    assert_eq!(out.exit.status, 3, "{out:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(4), "drain not bounded: {took:?}");
    assert!(sup.has_event("session.drain_timeout"), "{}", sup.logs());
    // The same for a leader that exits 0 with the classic `sh -c 'sleep 1000 &'`.
    let t0 = Instant::now();
    let out = sandbox
        .exec(sh("sleep 1000 &"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.status, 0);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

/// 1,000 sessions live at once on one connection, each verified, while one consumer
/// never reads its (endless) output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions_and_a_stalled_consumer() {
    let n = env_usize("SSV_SESSIONS", 1000);
    let env = Env::new("many").await;
    let (sup, sandbox) = env.bound_with(launch(), &["--max-sessions", "1100"]).await;

    // Never read: `yes` fills its buffers and is paused by backpressure.
    let stalled = sandbox.exec(spec(&["yes", "stalled"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let echo_rtt = |sandbox: sandbox_supervisor::gateway::Sandbox| async move {
        let t0 = Instant::now();
        let out = sandbox
            .exec(spec(&["echo", "ping"]))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.stdout, b"ping\n");
        t0.elapsed()
    };
    let rtt_stalled = echo_rtt(sandbox.clone()).await;

    let t0 = Instant::now();
    // n sessions plus this task: once all are live, the relay is dropped, so the
    // reconnect must re-attach every one of them (more than a channel's worth).
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let sandbox = sandbox.clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let mut s = sh("read line; echo \"got $line\"; seq 1 200");
            s.stdin = true;
            let exec = sandbox
                .exec(s)
                .await
                .unwrap_or_else(|e| panic!("session {i}: {e}"));
            // Every session is running (blocked on read) before any gets input.
            barrier.wait().await;
            exec.write_stdin(format!("hello-{i}\n").into())
                .await
                .unwrap();
            let out = tokio::time::timeout(Duration::from_secs(120), exec.collect())
                .await
                .unwrap_or_else(|_| panic!("session {i} did not finish"))
                .unwrap();
            let mut want = format!("got hello-{i}\n");
            for k in 1..=200 {
                want.push_str(&format!("{k}\n"));
            }
            assert_eq!(String::from_utf8(out.stdout).unwrap(), want, "session {i}");
            assert_eq!(out.exit.status, 0);
        });
    }
    barrier.wait().await;
    env.gateway.drop_relay(sandbox.id());
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let took = t0.elapsed();
    assert!(
        sup.has_event("relay.reconnected"),
        "the relay was dropped with every session live"
    );
    let rtt_after = echo_rtt(sandbox.clone()).await;
    eprintln!("{n} concurrent sessions verified in {took:?}; echo round trip with a stalled consumer: {rtt_stalled:?} before, {rtt_after:?} after");
    assert!(rtt_stalled < Duration::from_secs(2), "{rtt_stalled:?}");
    assert!(rtt_after < Duration::from_secs(2), "{rtt_after:?}");
    // The stalled session is alive and intact: its output starts where it should.
    let mut stalled = stalled;
    match stalled.next().await {
        Some(ExecEvent::Stdout(b)) => assert!(b.starts_with(b"stalled\nstalled\n")),
        other => panic!("{other:?}"),
    }
    stalled.signal(libc::SIGKILL).await.unwrap();
    assert!(!sup.has_event("session.failed"), "{}", sup.logs());
}

/// 256 MiB (SSV_REPLAY_MIB) of verifiable output while the relay is dropped 20 times at
/// random points, by TCP cuts and by the gateway ending the streams: the output arrives
/// complete and byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_across_twenty_drops_is_byte_identical() {
    let mib = env_usize("SSV_REPLAY_MIB", 256);
    let drops = 20;
    let env = Env::new("replay").await;
    let link = FaultyLink::start(env.gateway.local_addr()).await.unwrap();
    let (sup, sandbox) = env
        .bound_via(&env.endpoint_at(link.local_addr().port()), launch(), &[])
        .await;
    // 10-byte lines "100000000\n"…: every line says where it belongs.
    let lines = ((mib as u64) << 20) / 10;
    let first = 100_000_000u64;
    let mut exec = sandbox
        .exec(spec(&[
            "seq",
            &first.to_string(),
            &(first + lines - 1).to_string(),
        ]))
        .await
        .unwrap();
    let total = lines * 10;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let mut points: Vec<u64> = (0..drops).map(|_| rng.random_range(0..total)).collect();
    points.sort_unstable();
    let mut next_drop = 0;
    let mut got = 0u64;
    let mut carry = Vec::new();
    let mut line_no = first;
    let mut want = *b"100000000\n";
    let t0 = Instant::now();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(60), exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) => {
                got += b.len() as u64;
                carry.extend_from_slice(&b);
                let whole = carry.len() / 10 * 10;
                for line in carry[..whole].chunks(10) {
                    assert_eq!(
                        line,
                        &want[..],
                        "at line {line_no} (byte {})",
                        (line_no - first) * 10
                    );
                    line_no += 1;
                    // Increment the ASCII counter in place (cheap even unoptimized).
                    for d in want[..9].iter_mut().rev() {
                        if *d == b'9' {
                            *d = b'0';
                        } else {
                            *d += 1;
                            break;
                        }
                    }
                }
                carry.drain(..whole);
                while next_drop < points.len() && got >= points[next_drop] {
                    if next_drop % 2 == 0 {
                        link.cut_all();
                    } else {
                        env.gateway.drop_relay(sandbox.id());
                    }
                    next_drop += 1;
                }
            }
            Ok(Some(ExecEvent::Stderr(b))) => panic!("stderr {:?}", String::from_utf8_lossy(&b)),
            Ok(Some(ExecEvent::Exited(e))) => break e,
            Ok(None) => panic!("session lost after {got} bytes\n{}", sup.logs()),
            Err(_) => panic!("stalled after {got} bytes\n{}", sup.logs()),
        }
    };
    let took = t0.elapsed();
    eprintln!(
        "replay: {mib} MiB through {next_drop} drops in {took:?} ({:.0} MiB/s)",
        mib as f64 / took.as_secs_f64()
    );
    assert!(carry.is_empty());
    assert_eq!(got, total);
    assert_eq!(line_no, first + lines);
    assert_eq!(exit.status, 0);
    assert_eq!(next_drop, drops);
    assert!(
        sup.events()
            .iter()
            .filter(|e| e["event"] == "relay.reconnected")
            .count()
            >= drops / 2,
        "{}",
        sup.logs()
    );
}

/// 16 MiB (SSV_STDIN_DROP_MIB) of random stdin streamed to `sha256sum` while the relay
/// is dropped 10 times mid-stream, by TCP cuts and by the gateway ending the streams:
/// stdin in flight is resent from the supervisor's accepted offset, so the digest
/// matches byte for byte (nothing lost, nothing doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_across_ten_drops_is_byte_identical() {
    let mib = env_usize("SSV_STDIN_DROP_MIB", 16);
    let drops = 10;
    let env = Env::new("stdin-drops").await;
    // Shared: the link must outlive the writer, or the supervisor cannot reconnect.
    let link = std::sync::Arc::new(FaultyLink::start(env.gateway.local_addr()).await.unwrap());
    let (sup, sandbox) = env
        .bound_via(&env.endpoint_at(link.local_addr().port()), launch(), &[])
        .await;
    let mut s = spec(&["sha256sum"]);
    s.stdin = true;
    let exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let total = mib << 20;
    let every = total / (drops + 1);
    let gateway = env.gateway.clone();
    let id = sandbox.id().to_owned();
    let cutter = link.clone();
    let writer = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let mut hash = Sha256::new();
        let (mut sent, mut dropped) = (0, 0);
        while sent < total {
            let n = rng.random_range(1..=256 << 10).min(total - sent);
            let mut chunk = vec![0u8; n];
            rng.fill(&mut chunk[..]);
            hash.update(&chunk);
            input.write_stdin(chunk.into()).await.unwrap();
            sent += n;
            // Right after a write: that frame (and those queued before it) is in flight.
            if dropped < drops && sent >= every * (dropped + 1) {
                if dropped % 2 == 0 {
                    cutter.cut_all();
                } else {
                    gateway.drop_relay(&id);
                }
                dropped += 1;
            }
        }
        input.close_stdin().await.unwrap();
        (hex::encode(hash.finalize()), dropped)
    });
    let out = tokio::time::timeout(Duration::from_secs(60), exec.collect())
        .await
        .unwrap_or_else(|_| panic!("sha256sum did not finish\n{}", sup.logs()))
        .unwrap();
    let (want, dropped) = writer.await.unwrap();
    assert_eq!(dropped, drops);
    assert_eq!(out.exit.status, 0, "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{want}  -\n"),
        "stdin arrived altered across the drops"
    );
    assert!(
        sup.events()
            .iter()
            .filter(|e| e["event"] == "relay.reconnected")
            .count()
            >= drops / 2,
        "{}",
        sup.logs()
    );
}

/// The gateway process goes away and comes back: sessions keep running, the
/// supervisor reconnects, re-attaches from the gateway's offsets, and they finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_gateway_restart() {
    let env = Env::new("restart").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let mut producer = sandbox
        .exec(sh(
            "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done; exit 5",
        ))
        .await
        .unwrap();
    let mut c = spec(&["cat"]);
    c.stdin = true;
    let mut cat = sandbox.exec(c).await.unwrap();
    cat.write_stdin("before\n".into()).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut cat, &mut seen, "before\n", T).await;
    let mut head = Vec::new();
    read_until(&mut producer, &mut head, "line-3\n", T).await;

    env.gateway.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.gateway.restart().await.unwrap();
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sup.logs()));

    cat.write_stdin("after\n".into()).await.unwrap();
    cat.close_stdin().await.unwrap();
    let out = cat.collect().await.unwrap();
    seen.extend_from_slice(&out.stdout);
    assert_eq!(seen, b"before\nafter\n");
    assert_eq!(out.exit.status, 0);

    let out = producer.collect().await.unwrap();
    head.extend_from_slice(&out.stdout);
    let want: String = (1..=40).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8(head).unwrap(), want);
    assert_eq!(out.exit.status, 5);
    assert!(sup.has_event("relay.reconnected"), "{}", sup.logs());
}

/// A blackholed connection (nothing forwarded, nothing closed) is noticed by the
/// heartbeat check and replaced once the path works again; a session spanning it is
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_detected_and_replaced() {
    let env = Env::new("halfopen").await;
    let link = FaultyLink::start(env.gateway.local_addr()).await.unwrap();
    let (sup, sandbox) = env
        .bound_via(&env.endpoint_at(link.local_addr().port()), launch(), &[])
        .await;
    let exec = sandbox.exec(sh("sleep 2; echo across")).await.unwrap();
    let before = sup
        .events()
        .iter()
        .filter(|e| e["event"] == "relay.disconnected")
        .count();
    let t0 = Instant::now();
    link.pause();
    // Heartbeats every 500 ms; three missed intervals mean dead.
    assert!(
        sup.wait_events("relay.disconnected", before + 1, Duration::from_secs(5))
            .await,
        "half-open connection not detected\n{}",
        sup.logs()
    );
    let detected = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    link.resume();
    let t1 = Instant::now();
    assert!(
        sup.wait_events("relay.reconnected", 1, Duration::from_secs(15))
            .await,
        "not reconnected after the path came back\n{}",
        sup.logs()
    );
    eprintln!(
        "half-open detected after {detected:?}; reconnected {:?} after resume",
        t1.elapsed()
    );
    let out = exec.collect().await.unwrap();
    assert_eq!(out.stdout, b"across\n");
    let out = sandbox
        .exec(spec(&["echo", "fine"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"fine\n");
}

fn assert_error(err: &proto::Error, code: ErrorCode, needles: &[&str]) {
    assert_eq!(err.code, code as i32, "{err:?}");
    for n in needles {
        assert!(err.message.contains(n), "{n:?} not in {err:?}");
    }
}

/// Every bad request gets its own status and message, and everything else goes on:
/// a session opened first keeps working throughout, and the next session works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_precise_and_the_next_session_works() {
    let env = Env::new("errors").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let mut c = sh("cat; echo got-eof; sleep 1000");
    c.stdin = true;
    let mut bystander = sandbox.exec(c).await.unwrap();
    let by = bystander.input();
    let mut seen = Vec::new();
    let echo = |n: usize| format!("alive-{n}\n");

    // Refused opens.
    let e = sandbox.exec(spec(&[])).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("argv is empty"), "{e}");
    let e = sandbox
        .exec(spec(&["no-such-program-x"]))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert!(
        e.message.contains("no-such-program-x") && e.message.contains("PATH="),
        "{e}"
    );
    let mut s = spec(&["true"]);
    s.cwd = "no/such/dir".into();
    let e = sandbox.exec(s).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("no/such/dir"), "{e}");
    let mut s = spec(&["true"]);
    s.user = "no-such-user-x".into();
    let e = sandbox.exec(s).await.unwrap_err();
    let want = if is_root() {
        ErrorCode::NotFound
    } else {
        ErrorCode::PermissionDenied
    };
    assert_eq!(e.code, want, "{e}");
    assert!(e.message.contains("no-such-user-x"), "{e}");
    let mut s = spec(&["true"]);
    s.tty = tty(0, 0);
    let e = sandbox.exec(s).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("0x0"), "{e}");

    by.write_stdin(echo(1).into()).await.unwrap();
    read_until(&mut bystander, &mut seen, "alive-1", T).await;

    // An unknown session id.
    let e = sandbox
        .attach_raw("no-such-session", 0, 0, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("an error for an unknown session");
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert!(
        e.message.contains("unknown session id 'no-such-session'"),
        "{e}"
    );

    // Refused frames on a live session: resize without a terminal, a bad size, a bad
    // signal, an oversized frame. The session and its stream go on.
    by.resize(80, 24).await.unwrap();
    let err = by.next_error(T).await.expect("resize error");
    assert_error(
        &err,
        ErrorCode::FailedPrecondition,
        &["no terminal", "Resize"],
    );
    by.signal(999).await.unwrap();
    let err = by.next_error(T).await.expect("signal error");
    assert_error(&err, ErrorCode::InvalidArgument, &["999"]);
    by.write_stdin(vec![b'x'; 5 << 20].into()).await.unwrap();
    let err = by.next_error(T).await.expect("frame too large error");
    assert_error(
        &err,
        ErrorCode::InvalidArgument,
        &["exceeded", "smaller frames"],
    );
    by.write_stdin(echo(2).into()).await.unwrap();
    read_until(&mut bystander, &mut seen, "alive-2", T).await;
    assert!(
        !String::from_utf8_lossy(&seen).contains("xxxx"),
        "the oversized frame was discarded"
    );

    // Stdin after EOF.
    by.close_stdin().await.unwrap();
    read_until(&mut bystander, &mut seen, "got-eof", T).await;
    by.write_stdin("late\n".into()).await.unwrap();
    let err = by.next_error(T).await.expect("stdin after EOF error");
    assert_error(&err, ErrorCode::FailedPrecondition, &["stdin", "closed"]);
    // And on a session opened without stdin.
    let quiet = sandbox.exec(sh("sleep 1000")).await.unwrap();
    quiet.write_stdin("x".into()).await.unwrap();
    let err = quiet.next_error(T).await.expect("stdin=false error");
    assert_error(&err, ErrorCode::FailedPrecondition, &["stdin=false"]);

    // Both still run and can be ended; the next session works.
    quiet.signal(libc::SIGKILL).await.unwrap();
    assert_eq!(
        quiet.collect().await.unwrap().exit.how,
        Some(How::Signal(libc::SIGKILL))
    );
    by.signal(libc::SIGKILL).await.unwrap();
    let out = bystander.collect().await.unwrap();
    assert_eq!(out.exit.how, Some(How::Signal(libc::SIGKILL)), "{out:?}");
    let out = sandbox
        .exec(spec(&["echo", "next"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"next\n");
    assert!(sup.has_event("session.frame_too_large"), "{}", sup.logs());
}

/// Past --max-sessions: RESOURCE_EXHAUSTED naming the flag; once one ends, opens work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_is_resource_exhausted_and_frees_up() {
    let env = Env::new("cap").await;
    let (_sup, sandbox) = env.bound_with(launch(), &["--max-sessions", "2"]).await;
    let a = sandbox.exec(sh("sleep 1000")).await.unwrap();
    let _b = sandbox.exec(sh("sleep 1000")).await.unwrap();
    let e = sandbox.exec(spec(&["true"])).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e}");
    assert!(
        e.message.contains("--max-sessions") && e.message.contains('2'),
        "{e}"
    );
    a.signal(libc::SIGKILL).await.unwrap();
    a.collect().await.unwrap();
    // The gateway forgets a finished session right after its exit; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sandbox.exec(spec(&["echo", "room"])).await {
            Ok(exec) => {
                assert_eq!(exec.collect().await.unwrap().stdout, b"room\n");
                break;
            }
            Err(e) if e.code == ErrorCode::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
