use super::*;

#[tokio::test]
async fn register_over_tls_parks_heartbeats_activates_and_refreshes() {
    let env = env_with(true, |c| c.sandbox_token_ttl = Duration::from_secs(3)).await;
    assert!(env.gw.endpoint().starts_with("https://127.0.0.1:"));
    let pod = PodSpec::new("warm-tls");
    let mut client = env.client().await;
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut reg).await {
        RegEvent::Parked(p) => assert_eq!(p.heartbeat_interval_ms, 200),
        other => panic!("expected Parked, got {other:?}"),
    }
    assert!(matches!(next_event(&mut reg).await, RegEvent::Heartbeat(_)));
    let parked = env.gw.wait_parked("warm-tls", T).await.unwrap();
    assert_eq!(parked.pod_uid, pod.pod_uid);
    assert_eq!(parked.instance_id, "inst-1");
    assert_eq!(parked.seed.unwrap().digest, "sha256:00");

    let mut labels = std::collections::HashMap::new();
    labels.insert("team".to_owned(), "a".to_owned());
    let sandbox = env
        .gw
        .claim(
            "warm-tls",
            ClaimOptions {
                claim_uid: Some("claim-tls".into()),
                labels,
            },
        )
        .await
        .unwrap();
    let act = loop {
        match next_event(&mut reg).await {
            RegEvent::Activation(a) => break a,
            RegEvent::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(act.sandbox_id, sandbox.id());
    assert_eq!(act.claim_uid, "claim-tls");
    assert_eq!(act.pod_uid, pod.pod_uid);
    assert_eq!(act.labels.get("team").map(String::as_str), Some("a"));
    let now_ms = super::issuer::unix_now_ms();
    assert!(
        act.token_expires_at_ms > now_ms + 1000 && act.token_expires_at_ms <= now_ms + 3000,
        "{}",
        act.token_expires_at_ms - now_ms
    );
    // Exactly one Activation, then the stream ends cleanly.
    assert!(tokio::time::timeout(T, reg.message())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    let token = SecretToken::new(act.token);
    let r = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.token, token.expose());
    assert_eq!(env.gw.stats("warm-tls").refreshed, 1);
    // The 3 s sandbox token expires: refresh with it is UNAUTHENTICATED.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let e = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("expired"), "{}", e.message());
    assert_no_token_material(e.message(), &token);

    // A client trusting another CA cannot connect.
    let other_ca = TestCa::new("other CA").unwrap();
    let ch = channel(env.gw.endpoint(), Some(other_ca.cert_pem())).await;
    let failed = match ch {
        Err(_) => true,
        Ok(ch) => GatewayClient::new(ch)
            .register(authed(register_req(&pod), &env.token(&pod)))
            .await
            .is_err(),
    };
    assert!(
        failed,
        "a client trusting another CA must not reach the gateway"
    );
}

#[tokio::test]
async fn register_rejections_are_final_and_counted() {
    let env = env().await;
    let pod = PodSpec::new("warm-rej");
    let mut client = env.client().await;

    // Bad token: UNAUTHENTICATED with the reason.
    let other = issuer();
    let e = client
        .register(authed(
            register_req(&pod),
            &other.mint_for(&pod, AUD, Duration::from_secs(600)).unwrap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("signature does not verify"),
        "{}",
        e.message()
    );
    let e = client
        .register(Request::new(register_req(&pod)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The pod uid the supervisor knows differs from the token's: Rejected, not retryable.
    let mut req = register_req(&pod);
    req.pod.as_mut().unwrap().uid = "someone-else".into();
    let mut s = client
        .register(authed(req, &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Rejected(r) => {
            assert!(!r.retryable);
            assert!(r.reason.contains("pod uid mismatch"), "{}", r.reason);
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(s.message().await.unwrap().is_none());
    let st = env.gw.stats("warm-rej");
    assert_eq!((st.register_attempts, st.rejected, st.parked), (3, 3, 0));
}

#[tokio::test]
async fn bound_pod_needs_resume_and_gets_the_same_claim() {
    let env = env().await;
    let (mut sup, sandbox, _tx, _ctl) = bound(&env, "warm-bound").await;
    assert!(
        env.gw
            .wait_parked("warm-bound", Duration::from_millis(1))
            .await
            .is_err(),
        "a claimed pod is no longer parked"
    );
    let e = sup
        .client
        .issue_sandbox_token(authed(
            proto::IssueSandboxTokenRequest::default(),
            &sup.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a sandbox token is not a projected token"
    );

    // Re-register the same pod (same uid) without resume: refused, not retryable.
    let stats_before = env.gw.stats("warm-bound");
    let pod = sup.pod.clone();
    let mut s = sup
        .client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Rejected(r) => {
            assert!(!r.retryable);
            assert!(
                r.reason.starts_with("pod is already bound to claim"),
                "{}",
                r.reason
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // With resume for its claim: an immediate Activation of the same claim.
    let mut req = register_req(&pod);
    req.resume = Some(proto::BindingRecord {
        sandbox_id: sandbox.id().into(),
        claim_uid: sandbox.claim_uid().into(),
        pod_uid: pod.pod_uid.clone(),
        instance_id: "inst-0".into(),
        bound_at_ms: 1,
    });
    let mut s = sup
        .client
        .register(authed(req.clone(), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut s).await {
        RegEvent::Activation(a) => {
            assert_eq!(a.sandbox_id, sandbox.id());
            assert_eq!(a.claim_uid, sandbox.claim_uid());
        }
        other => panic!("expected Activation, got {other:?}"),
    }
    // Resume naming another claim: refused.
    req.resume.as_mut().unwrap().claim_uid = "other-claim".into();
    let mut s = sup
        .client
        .register(authed(req, &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Rejected(r) if !r.retryable));
    let st = env.gw.stats("warm-bound");
    assert_eq!(st.register_attempts, stats_before.register_attempts + 3);
    assert_eq!(st.rejected, stats_before.rejected + 2);
}

#[tokio::test]
async fn parked_stream_ends_cleanly_before_the_token_expires() {
    let env = env().await;
    let pod = PodSpec::new("warm-exp");
    let mut client = env.client().await;
    let token = env.iss.mint_for(&pod, AUD, Duration::from_secs(3)).unwrap();
    let mut s = client
        .register(authed(register_req(&pod), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Parked(_)));
    let ended = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(st) => return Err(st),
            }
        }
    })
    .await
    .expect("parked stream must end before the token expires");
    assert!(ended.is_ok(), "must end cleanly: {ended:?}");
    assert_eq!(env.gw.stats("warm-exp").park_expired, 1);
    // Re-registering with a fresh token parks again: the same pod, not a new one.
    let mut s = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut s).await, RegEvent::Parked(_)));
    assert_eq!(
        env.gw.wait_parked("warm-exp", T).await.unwrap().pod_uid,
        pod.pod_uid
    );
}

#[tokio::test]
async fn claim_while_not_parked_is_delivered_on_the_next_register() {
    let env = env().await;
    let pod = PodSpec::new("warm-gap-claim");
    let mut client = env.client().await;
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    drop(reg);
    // The gateway notices the parked stream is gone.
    env.gw
        .shared_for_tests()
        .wait_for(
            T,
            || "unpark".into(),
            |st| {
                st.pods
                    .get("warm-gap-claim")
                    .filter(|p| p.parked.is_none())
                    .map(|_| ())
            },
        )
        .await
        .unwrap();
    let sandbox = env
        .gw
        .claim("warm-gap-claim", ClaimOptions::default())
        .await
        .unwrap();
    assert_eq!(env.gw.stats("warm-gap-claim").activations_pushed, 0);
    // Not yet confirmed by the supervisor: a plain Register gets the activation.
    let mut reg = client
        .register(authed(register_req(&pod), &env.token(&pod)))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut reg).await {
        RegEvent::Activation(a) => assert_eq!(a.sandbox_id, sandbox.id()),
        other => panic!("expected Activation, got {other:?}"),
    }
    assert!(reg.message().await.unwrap().is_none());
}

#[tokio::test]
async fn pull_path_is_idempotent_and_revocation_denies() {
    let env = env().await;
    let pod = PodSpec::new("warm-pull");
    let mut client = env.client().await;
    let tok = env.token(&pod);
    let mut reg = client
        .register(authed(register_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_event(&mut reg).await, RegEvent::Parked(_)));
    drop(reg);

    let e = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    let sandbox = env
        .gw
        .claim(
            "warm-pull",
            ClaimOptions {
                claim_uid: Some("claim-pull".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let a1 = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    let a2 = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap()
        .into_inner()
        .activation
        .unwrap();
    assert_eq!(
        (a1.sandbox_id.as_str(), a1.claim_uid.as_str()),
        (sandbox.id(), "claim-pull")
    );
    assert_eq!(
        (a2.sandbox_id.as_str(), a2.claim_uid.as_str()),
        (sandbox.id(), "claim-pull")
    );
    assert_eq!(a1.pod_uid, pod.pod_uid);

    let again = env.gw.claim("warm-pull", ClaimOptions::default()).await;
    assert!(again.unwrap_err().to_string().contains("already claimed"));

    let mut req = issue_req(&pod);
    req.resume = Some(proto::BindingRecord {
        claim_uid: "another".into(),
        ..Default::default()
    });
    let e = client
        .issue_sandbox_token(authed(req, &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let token = SecretToken::new(a2.token);
    client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap();
    env.gw.revoke("claim-pull");
    let e = client
        .refresh_sandbox_token(authed(proto::RefreshSandboxTokenRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = client
        .issue_sandbox_token(authed(issue_req(&pod), &tok))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let st = env.gw.stats("warm-pull");
    assert_eq!((st.issue_attempts, st.issued, st.refreshed), (5, 2, 1));
}
