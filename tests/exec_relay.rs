//! The exec relay across trouble, end to end (issue 5): the real binary, the real gRPC
//! relay over TLS, the reference gateway. Many sessions on one connection, replay of
//! output and resend of stdin across drops, gateway restarts and half-open connections.
//! What a single session does is in `exec_sessions.rs`, refused requests in
//! `exec_errors.rs`.

mod common;

use common::exec::*;
use common::*;
use rand::{Rng, SeedableRng};
use sandbox_supervisor::gateway::link::FaultyLink;
use sandbox_supervisor::gateway::ExecEvent;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

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
        let log = sup.log.clone();
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
            let id = exec.session_id().to_owned();
            let out = tokio::time::timeout(Duration::from_secs(120), exec.collect())
                .await
                .unwrap_or_else(|_| {
                    // The supervisor's account of this one session, to tell a lost
                    // stream from lost stdin or a stuck process.
                    let logs = std::fs::read_to_string(&log).unwrap_or_default();
                    let mine: Vec<&str> = logs.lines().filter(|l| l.contains(&id)).collect();
                    panic!(
                        "session {i} ({id}) did not finish; its log lines:\n{}",
                        mine.join("\n")
                    )
                })
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

/// A stale Session stream (an `Attach` from before a reconnect that reaches the gateway
/// after the supervisor's newer one) displaces the newest stream and then ends itself,
/// leaving the session with no stream: the supervisor sees its newest stream aborted,
/// attaches again, and the session's stdin and output still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_stream_that_displaces_the_newest_one_is_recovered() {
    use sandbox_supervisor::proto::{self, session_up};
    use sandbox_supervisor::relay::{authed, GatewayEndpoint};
    let env = Env::new("stale").await;
    env.gateway.record_minted_tokens();
    let (sup, sandbox) = env.bound_with(launch(), &[]).await;
    let mut s = sh("read line; echo \"got $line\"");
    s.stdin = true;
    let exec = sandbox.exec(s).await.unwrap();
    // Let the supervisor's own stream attach first, as it does before a drop.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The stale stream: the sandbox's credentials, an Attach, then the end of the
    // request, as when the task that opened it was aborted.
    let token = env
        .gateway
        .minted_tokens()
        .pop()
        .expect("the gateway minted the sandbox's token");
    let endpoint = GatewayEndpoint::new(env.endpoint(), env.ca.clone(), None, None, None);
    let attach = proto::SessionUp {
        msg: Some(session_up::Msg::Attach(proto::Attach {
            session_id: exec.session_id().to_owned(),
            stdout_offset: 0,
            stderr_offset: 0,
            stdin_offset: Some(0),
            // A stream from a supervisor that sends no generation: ordered by arrival.
            generation: 0,
        })),
    };
    let req = authed(tokio_stream::iter(vec![attach]), &token).unwrap();
    let mut stale = endpoint
        .client()
        .unwrap()
        .session(req)
        .await
        .expect("the gateway takes the stale Attach")
        .into_inner();
    while let Ok(Some(_)) = stale.message().await {}

    exec.write_stdin("late\n".into()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), exec.collect())
        .await
        .unwrap_or_else(|_| panic!("the session was left without a stream\n{}", sup.logs()))
        .unwrap();
    assert_eq!(out.stdout, b"got late\n", "{out:?}");
    assert_eq!(out.exit.status, 0);
    assert!(sup.has_event("session.stream_superseded"), "{}", sup.logs());
}

/// With the attach generation the gateway tells a stale stream from the newest one
/// itself: a late `Attach` with an older generation is refused (`ABORTED`) and never
/// displaces the session's stream, so the supervisor has nothing to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_stream_with_an_older_generation_is_refused_by_the_gateway() {
    use sandbox_supervisor::proto::{self, session_up};
    use sandbox_supervisor::relay::{authed, GatewayEndpoint};
    let env = Env::new("stale-gen").await;
    env.gateway.record_minted_tokens();
    let (sup, sandbox) = env.bound_with(launch(), &[]).await;
    let mut s = sh("read line; echo \"got $line\"");
    s.stdin = true;
    let exec = sandbox.exec(s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let token = env.gateway.minted_tokens().pop().unwrap();
    let endpoint = GatewayEndpoint::new(env.endpoint(), env.ca.clone(), None, None, None);
    let attach = proto::SessionUp {
        msg: Some(session_up::Msg::Attach(proto::Attach {
            session_id: exec.session_id().to_owned(),
            stdout_offset: 0,
            stderr_offset: 0,
            stdin_offset: Some(0),
            // The generation of the supervisor's first stream, long replaced.
            generation: 1,
        })),
    };
    // The re-attach after this drop gets a larger generation than the first stream.
    env.gateway.drop_relay(sandbox.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let req = authed(tokio_stream::iter(vec![attach]), &token).unwrap();
    let mut stale = endpoint
        .client()
        .unwrap()
        .session(req)
        .await
        .unwrap()
        .into_inner();
    let refused = loop {
        match stale.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = refused.expect("the stale stream was taken");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("generation"), "{status:?}");

    exec.write_stdin("late\n".into()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), exec.collect())
        .await
        .unwrap_or_else(|_| panic!("the session was left without a stream\n{}", sup.logs()))
        .unwrap();
    assert_eq!(out.stdout, b"got late\n", "{out:?}");
    assert!(
        !sup.has_event("session.stream_superseded"),
        "{}",
        sup.logs()
    );
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

/// Between `Release` and the report the control stream is still served: an
/// `OpenSession` or `AttachSession` sent meanwhile is answered `failed{UNAVAILABLE}`
/// at once, and the release still ends with its report and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_asked_for_during_the_release_is_refused() {
    use sandbox_supervisor::proto::{self, gateway_message::Msg};
    let env = Env::new("release-open").await;
    let (mut sup, sandbox) = env.bound(launch()).await;
    // Ignores SIGTERM, so the release waits out its grace and is under way meanwhile.
    let mut slow = sandbox
        .exec(sh("trap '' TERM; echo armed; sleep 30"))
        .await
        .unwrap();
    read_until(&mut slow, &mut Vec::new(), "armed", T).await;
    let release = proto::GatewayMessage {
        msg: Some(Msg::Release(proto::Release {
            reason: "test".into(),
            grace_ms: 3000,
        })),
    };
    sandbox.send_control_raw(release).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let opened = tokio::time::timeout(Duration::from_secs(5), sandbox.exec(spec(&["true"])))
        .await
        .expect("no answer to an OpenSession sent during the release");
    let Err(err) = opened else {
        panic!("a session opened during the release");
    };
    assert_eq!(err.code, proto::ErrorCode::Unavailable, "{err}");
    assert!(err.message.contains("releasing"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let err = sandbox
        .attach_raw(slow.session_id(), 0, 0, Duration::from_secs(2))
        .await
        .unwrap()
        .expect("no answer to an AttachSession sent during the release");
    assert_eq!(err.code, proto::ErrorCode::Unavailable, "{err}");

    assert_eq!(
        sup.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        sup.logs()
    );
    let st = sandbox
        .release("test", Duration::ZERO, Duration::from_secs(1))
        .await;
    assert!(st.unwrap().is_some(), "no release report");
}

/// `PERMISSION_DENIED` on a `Session` stream refuses that stream only: the session
/// runs on and the supervisor stays bound. The claim's end is Connect's answer (or
/// RefreshSandboxToken's), never a session stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_on_a_session_stream_is_not_a_release() {
    let env = Env::new("deny-session").await;
    let (mut sup, sandbox) = env.bound(launch()).await;
    let exec = sandbox.exec(sh("sleep 30")).await.unwrap();
    // From now on the gateway refuses new streams with PERMISSION_DENIED.
    env.gateway.revoke(sandbox.claim_uid());
    let _ = sandbox
        .attach_raw(exec.session_id(), 0, 0, Duration::from_millis(200))
        .await;
    let refused = async {
        loop {
            let hit = sup.events().into_iter().any(|e| {
                let ev = e["event"].as_str().unwrap_or_default();
                ev.starts_with("relay.session_stream_") && e["code"] == "PermissionDenied"
            });
            if hit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, refused)
        .await
        .unwrap_or_else(|_| panic!("the session stream was not refused\n{}", sup.logs()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sup.wait_exit(Duration::ZERO), None, "{}", sup.logs());
    assert!(
        !sup.events().iter().any(|e| e["to"] == "releasing"),
        "{}",
        sup.logs()
    );
    assert!(
        !live_named(sup.host_pid(), "sleep").is_empty(),
        "the session died"
    );

    // The claim's end is said on the control stream: the reconnect is accepted and
    // told to release (release, wipe, report, exit 0).
    env.gateway.drop_relay(sandbox.id());
    assert_eq!(
        sup.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        sup.logs()
    );
}
