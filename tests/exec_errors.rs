//! Every error a gateway can provoke, end to end (issue 5): the real binary, the real
//! gRPC relay over TLS, the reference gateway. Refused opens, refused frames, unknown
//! session ids and the session cap each get a precise answer, and everything else keeps
//! running.

mod common;

use common::exec::*;
use common::*;
use sandbox_supervisor::proto::{self, exit_status::How, ErrorCode};
use std::time::{Duration, Instant};

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

/// An `OpenSession` past the 4 MiB message limit could not be decoded by the
/// supervisor: the reference gateway refuses to send one and tells the caller why
/// (the limit, and to pass large data through stdin). The relay never notices; a
/// session that fits, even one carrying its megabytes on stdin, works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_open_session_is_refused_by_the_gateway_naming_the_limit() {
    let env = Env::new("open-too-large").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let limit = sandbox_supervisor::relay::channel::MAX_MESSAGE_BYTES;

    let big = "x".repeat(limit + 1);
    let e = sandbox.exec(spec(&["echo", &big])).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(
        e.message.contains(&limit.to_string()) && e.message.contains("stdin"),
        "{e}"
    );
    // The same through env, split over many variables.
    let mut s = spec(&["true"]);
    for i in 0..5 {
        s.env.insert(format!("BIG_{i}"), "y".repeat(limit / 4));
    }
    let e = sandbox.exec(s).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains(&limit.to_string()), "{e}");

    // What the message points to works: the bytes on stdin.
    let mut s = spec(&["wc", "-c"]);
    s.stdin = true;
    let exec = sandbox.exec(s).await.unwrap();
    for piece in big.as_bytes().chunks(1 << 20) {
        exec.write_stdin(piece.to_vec().into()).await.unwrap();
    }
    exec.close_stdin().await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        big.len().to_string()
    );
    assert!(!sup.has_event("relay.disconnected"), "{}", sup.logs());
}

/// Another gateway sends an `OpenSession` past the message limit: the supervisor
/// cannot decode it, so the control stream is lost. It says so (`relay.frame_too_large`,
/// naming the limit), reconnects, and every session keeps running with nothing lost;
/// the oversized session never starts and the next one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_control_frame_reconnects_and_keeps_every_session() {
    let env = Env::new("control-too-large").await;
    let (mut sup, sandbox) = env.bound(launch()).await;
    let limit = sandbox_supervisor::relay::channel::MAX_MESSAGE_BYTES;
    let mut c = spec(&["cat"]);
    c.stdin = true;
    let mut cat = sandbox.exec(c).await.unwrap();
    cat.write_stdin("before\n".into()).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut cat, &mut seen, "before\n", T).await;

    let open = proto::GatewayMessage {
        msg: Some(proto::gateway_message::Msg::OpenSession(
            proto::OpenSession {
                session_id: "s-oversized".into(),
                spec: Some(spec(&["echo", &"x".repeat(limit + 1)])),
            },
        )),
    };
    sandbox.send_control_raw(open).await.unwrap();
    assert!(
        sup.wait_events("relay.frame_too_large", 1, T).await,
        "{}",
        sup.logs()
    );
    assert!(
        sup.wait_events("relay.reconnected", 1, T).await,
        "{}",
        sup.logs()
    );
    let ev = sup
        .events()
        .into_iter()
        .find(|e| e["event"] == "relay.frame_too_large")
        .unwrap();
    assert_eq!(ev["limit"], limit, "{ev}");
    assert_eq!(ev["level"], "warn", "{ev}");
    env.gateway
        .wait_connected(sandbox.id(), T)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sup.logs()));

    // The session spanning the drop is intact, in both directions.
    cat.write_stdin("after\n".into()).await.unwrap();
    cat.close_stdin().await.unwrap();
    let out = cat.collect().await.unwrap();
    seen.extend_from_slice(&out.stdout);
    assert_eq!(seen, b"before\nafter\n");
    assert_eq!(out.exit.status, 0);
    let out = sandbox
        .exec(spec(&["echo", "next"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"next\n");
    assert!(
        !sup.events()
            .iter()
            .any(|e| e["event"] == "session.started" && e["session_id"] == "s-oversized"),
        "{}",
        sup.logs()
    );
    assert_eq!(
        sup.wait_exit(Duration::from_millis(100)),
        None,
        "{}",
        sup.logs()
    );
}
