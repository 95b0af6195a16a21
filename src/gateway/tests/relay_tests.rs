use super::*;

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
            data: bytes::Bytes::from_static(b"input"),
            offset: Some(0),
        })
    );
    assert_eq!(
        got[1],
        DownMsg::Resize(proto::Resize { cols: 80, rows: 24 })
    );
    assert_eq!(got[2], DownMsg::Signal(proto::Signal { signal: 15 }));
    assert_eq!(
        got[3],
        DownMsg::StdinEof(proto::StdinEof { offset: Some(5) })
    );
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
            stdin_offset: 0,
        },
        proto::SessionState {
            session_id: "zombie".into(),
            stdout_end: 1,
            stderr_end: 0,
            exit: Some(exit0()),
            pid: 7,
            stdin_offset: 0,
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
