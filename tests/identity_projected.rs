//! The projected token end to end (issue 4): the real binary against the reference
//! gateway over TLS, while warm. Rotation between calls (re-read on every use), re-
//! registering as each parked token nears expiry, and bad tokens (expired, wrong
//! audience, tampered, another pod's) rejected without spinning. Binding a claim and
//! the sandbox token are in `identity_binding.rs`; TLS failures, CA rotation and mutual
//! TLS in `identity_tls.rs`.

// No test here needs root, so the harness's `require!` goes unused.
mod common;

use common::identity::*;
use common::*;
use sandbox_supervisor::gateway::issuer::{random_uid, tamper_signature, PodSpec};
use sandbox_supervisor::gateway::{ClaimDelivery, Push};
use std::time::{Duration, Instant};

/// The kubelet rotates the projected token between Register and IssueSandboxToken: the
/// supervisor presents the new one (re-read on every use, never cached). Readiness
/// follows: 200 parked, 200 bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_projected_token_is_presented_on_issue() {
    let env = IdEnv::new("rotate", Setup::default()).await;
    let first = env.written.lock().unwrap()[0].clone();
    let port = free_port();
    let probes = format!("127.0.0.1:{port}");
    let sup = spawn_with(&env, &[("--listen-probes", &probes)]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
    wait_readyz(port, 200, Duration::from_secs(5))
        .await
        .expect("ready once parked");

    let second = env
        .issuer
        .mint_for(&env.pod, AUDIENCE, Duration::from_secs(3600))
        .unwrap();
    env.write_token(&second);
    let claim = random_uid();
    let sandbox = env
        .gateway
        .claim_delivered(
            &env.pod.pod_name,
            claim_opts(&claim),
            ClaimDelivery {
                push: Push::Never,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    env.write_hint(&claim);
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));

    let presented = env.gateway.presented_tokens(&env.pod.pod_name);
    let registers: Vec<_> = presented.iter().filter(|p| p.call == "register").collect();
    let issues: Vec<_> = presented.iter().filter(|p| p.call == "issue").collect();
    assert!(!registers.is_empty() && !issues.is_empty(), "{presented:?}");
    assert!(
        registers
            .iter()
            .all(|p| p.fingerprint == first.fingerprint()),
        "{presented:?}"
    );
    assert!(
        issues
            .iter()
            .all(|p| p.fingerprint == second.fingerprint() && p.valid),
        "the issue call must present the rotated token: {presented:?}"
    );
    let act = events_named(&sup, "identity.activation");
    assert_eq!(act.len(), 1, "{}", sup.logs());
    assert_eq!(act[0]["path"], "pull");
    wait_readyz(port, 200, Duration::from_secs(5))
        .await
        .expect("ready once bound");
    let out = sandbox
        .exec(spec(&["true"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.status, 0);
}

/// A warm pod outlives its projected token: the gateway ends the parked stream before
/// the token it was shown expires, and the supervisor registers again with the
/// kubelet's next token, staying parked throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_supervisor_re_registers_with_each_rotated_token() {
    let env = Env::with(
        "warm-rotate",
        Options {
            token_ttl: Duration::from_secs(4),
            ..Options::default()
        },
    )
    .await;
    let sup = env.spawn(Launch::Subreaper, &[]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.gateway.stats(&env.pod.pod_name).park_expired < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = env.gateway.stats(&env.pod.pod_name);
    assert!(stats.park_expired >= 2, "{stats:?}\n{}", sup.logs());
    let mut fps: Vec<_> = env
        .gateway
        .presented_tokens(&env.pod.pod_name)
        .into_iter()
        .filter(|p| p.call == "register")
        .map(|p| {
            assert!(p.valid, "an expired token was presented: {p:?}");
            p.fingerprint
        })
        .collect();
    fps.dedup();
    assert!(fps.len() >= 2, "re-registered with the same token: {fps:?}");
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(stats.rejected, 0, "{stats:?}");
}

/// Expired, wrong audience, tampered signature: UNAUTHENTICATED, retried with backoff
/// (the kubelet may yet write a good token), never ready. Wrong pod uid and another
/// pod's token: the gateway rejects for good, the supervisor refuses (exit 65) after one
/// attempt. Five supervisors run at once against one gateway for ~5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_projected_tokens_are_rejected_without_spinning() {
    let base = IdEnv::new("badtok", Setup::default()).await;
    let hour = Duration::from_secs(3600);
    let mk = |tag: &str, f: &dyn Fn(&IdEnv) -> sandbox_supervisor::identity::SecretToken| {
        let env = base.sibling(tag);
        let t = f(&env);
        env.write_token(&t);
        env
    };
    let expired = mk("bt-expired", &|e| {
        let mut c = e.issuer.claims_for(&e.pod, AUDIENCE, hour);
        c.exp -= 3 * 3600;
        c.iat -= 4 * 3600;
        c.nbf = c.iat;
        e.issuer.mint(&c).unwrap()
    });
    let audience = mk("bt-audience", &|e| {
        e.issuer
            .mint_for(&e.pod, "kubernetes.default.svc", hour)
            .unwrap()
    });
    let tampered = mk("bt-tampered", &|e| {
        tamper_signature(&e.issuer.mint_for(&e.pod, AUDIENCE, hour).unwrap())
    });
    let wrong_uid = mk("bt-wronguid", &|e| {
        let mut other = e.pod.clone();
        other.pod_uid = random_uid();
        e.issuer.mint_for(&other, AUDIENCE, hour).unwrap()
    });
    let other_pod = mk("bt-otherpod", &|e| {
        e.issuer
            .mint_for(&PodSpec::new("someone-elses-pod"), AUDIENCE, hour)
            .unwrap()
    });

    let retried = [(&expired, "expired"), (&tampered, "signature")];
    let refused = [
        (&wrong_uid, "pod uid mismatch"),
        (&other_pod, "pod uid mismatch"),
    ];
    let mut sups = vec![];
    for (env, _) in retried
        .iter()
        .chain(refused.iter())
        .chain([(&audience, "")].iter())
    {
        let port = free_port();
        let probes = format!("127.0.0.1:{port}");
        sups.push((spawn_with(env, &[("--listen-probes", &probes)]), port));
    }
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;

    // The wrong audience is caught by the supervisor's own --audience check before it
    // is ever presented: retried with backoff, never reaching the gateway.
    let (aud_sup, aud_port) = &sups[retried.len() + refused.len()];
    assert!(
        aud_sup.child.is_some(),
        "must keep retrying\n{}",
        aud_sup.logs()
    );
    assert_eq!(
        audience
            .gateway
            .presented_tokens(&audience.pod.pod_name)
            .len(),
        0
    );
    let (failures, reason) = register_failures(aud_sup);
    assert!(
        (2..=16).contains(&failures),
        "{failures}\n{}",
        aud_sup.logs()
    );
    assert!(
        reason.contains("has audience [\"kubernetes.default.svc\"]")
            && reason.contains("expects 'sandbox-gateway'"),
        "{reason}"
    );
    let p = *aud_port;
    assert_eq!(
        tokio::task::spawn_blocking(move || readyz(p))
            .await
            .unwrap(),
        Some(503)
    );

    for ((env, why), (sup, port)) in retried.iter().zip(&sups) {
        let name = &env.pod.pod_name;
        assert!(
            sup.child.is_some(),
            "{name} must keep retrying\n{}",
            sup.logs()
        );
        let attempts = env
            .gateway
            .presented_tokens(name)
            .iter()
            .filter(|p| p.call == "register")
            .inspect(|p| assert!(!p.valid))
            .count();
        // Full-jitter backoff from 100 ms doubling to 10 s: ~7 attempts in 5 s, more
        // than 16 is vanishingly unlikely; a hot loop would make thousands.
        assert!((3..=16).contains(&attempts), "{name}: {attempts} attempts");
        assert_eq!(env.gateway.stats(name).parked, 0);
        let (failures, reason) = register_failures(sup);
        assert!(failures >= 2, "{name}\n{}", sup.logs());
        assert!(
            reason.contains("Unauthenticated") && reason.contains(why),
            "{name}: {reason}"
        );
        let p = *port;
        let status = tokio::task::spawn_blocking(move || readyz(p))
            .await
            .unwrap();
        assert_eq!(status, Some(503), "{name} must not be ready");
    }
    for ((env, why), (sup, _)) in refused.iter().zip(&mut sups[retried.len()..]) {
        let name = env.pod.pod_name.clone();
        assert_eq!(
            sup.wait_exit(Duration::from_secs(5)),
            Some(65),
            "{name}\n{}",
            sup.logs()
        );
        let attempts = env.gateway.presented_tokens(&name).len();
        assert_eq!(attempts, 1, "{name}: a terminal rejection is not retried");
        let refusal = events_named(sup, "reuse.refused").pop().unwrap();
        assert_eq!(refusal["reason"], "gateway_refused", "{refusal}");
        assert!(
            refusal["detail"].as_str().unwrap().contains(why),
            "{refusal}"
        );
        assert!(!sup.has_event("identity.parked"));
    }
}
