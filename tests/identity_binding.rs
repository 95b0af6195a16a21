//! Binding a claim and living with it, end to end (issue 4): the real binary against the
//! reference gateway over TLS. Push-vs-hint races, conflicting and foreign activations,
//! refresh with short-lived sandbox tokens and revocation, and log hygiene over a whole
//! lifecycle. The projected token while warm is in `identity_projected.rs`; TLS
//! failures, CA rotation and mutual TLS in `identity_tls.rs`.

// No test here needs root, so the harness's `require!` goes unused.
mod common;

use common::identity::*;
use common::*;
use sandbox_supervisor::gateway::issuer::random_uid;
use sandbox_supervisor::gateway::{ClaimDelivery, Push};
use std::time::{Duration, Instant};

/// Issue 15: the annotations file is no longer polled every 200 ms but its directory is
/// watched with inotify, behind a 10 s fallback poll. A hint written the kubelet's way
/// (new timestamped dir, `..data` symlink renamed over) while no push comes must still
/// bind within a second: the watch, not the fallback poll, noticed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_swapped_in_through_data_is_noticed_at_once_though_the_fallback_poll_is_slow() {
    let env = IdEnv::new("hint-inotify", Setup::default()).await;
    let sup = spawn_with(&env, &[]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
    let mode = wait_event(&sup, Duration::from_secs(5), |e| {
        e["event"] == "identity.hint_watch"
    })
    .await
    .unwrap_or_else(|| panic!("no identity.hint_watch\n{}", sup.logs()));
    assert_eq!(mode["mode"], "inotify", "{}", sup.logs());
    let fallback = mode["fallback_poll_ms"].as_u64().unwrap_or_default();
    assert!(
        fallback >= 10_000,
        "fallback poll {fallback} ms is not slow"
    );
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
    // Well past the first read, so only a change notification can find it in time.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let written = Instant::now();
    env.write_hint(&claim);
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(1))
        .await
        .unwrap_or_else(|e| panic!("not bound within 1 s of the hint: {e}\n{}", sup.logs()));
    let took = written.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    eprintln!("hint written -> bound: {took:?}");
    let pulled = wait_event(&sup, Duration::from_secs(2), |e| {
        e["event"] == "identity.activation" && e["path"] == "pull"
    })
    .await;
    assert!(
        pulled.is_some(),
        "bound, but not through the pull path\n{}",
        sup.logs()
    );
}

/// Push and claim hint race, in both orders and with the push late or absent: every
/// time exactly one activation is taken, one binding record written, one relay
/// connected, and sessions run. `SSV_RACE_ITERATIONS` scales it (default 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_hint_race_binds_exactly_once() {
    let base = IdEnv::new("race", Setup::default()).await;
    let n = env_usize("SSV_RACE_ITERATIONS", 12);
    let mut paths = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..n {
        let env = base.sibling(&format!("race{i}"));
        let sup = spawn_with(&env, &[]);
        env.gateway
            .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
        let claim = random_uid();
        let jitter = Duration::from_millis(rand::random::<u64>() % 40);
        let claim_with = |push| {
            env.gateway.claim_delivered(
                &env.pod.pod_name,
                claim_opts(&claim),
                ClaimDelivery {
                    push,
                    ..Default::default()
                },
            )
        };
        let sandbox = match i % 4 {
            // Push first, the hint right behind it.
            0 => {
                let s = claim_with(Push::Now).await.unwrap();
                tokio::time::sleep(jitter).await;
                env.write_hint(&claim);
                s
            }
            // Hint first, the push right behind it.
            1 => {
                env.write_hint(&claim);
                tokio::time::sleep(jitter).await;
                claim_with(Push::Now).await.unwrap()
            }
            // Hint first, the push late: the pull path usually wins.
            2 => {
                env.write_hint(&claim);
                let late = Duration::from_millis(150 + rand::random::<u64>() % 350);
                claim_with(Push::After(late)).await.unwrap()
            }
            // No push at all: only the hint can bind.
            _ => {
                let s = claim_with(Push::Never).await.unwrap();
                tokio::time::sleep(jitter).await;
                env.write_hint(&claim);
                s
            }
        };
        env.gateway
            .wait_connected(sandbox.id(), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: {e}\n{}", sup.logs()));
        let out = sandbox
            .exec(spec(&["true"]))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.exit.status, 0);
        // Give a losing path time to (wrongly) bind a second time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let act = events_named(&sup, "identity.activation");
        assert_eq!(act.len(), 1, "iteration {i}\n{}", sup.logs());
        assert_eq!(act[0]["claim_uid"], claim.as_str());
        *paths
            .entry(act[0]["path"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_eq!(events_named(&sup, "identity.bound").len(), 1);
        assert_eq!(events_named(&sup, "relay.connected").len(), 1);
        assert!(!sup.has_event("reuse.refused"), "{}", sup.logs());
        let record = std::fs::read_to_string(env.binding_record()).unwrap();
        assert!(record.contains(&claim), "{record}");
    }
    eprintln!("activation paths over {n} iterations: {paths:?}");
    if n >= 4 {
        assert!(
            paths.contains_key("push") && paths.contains_key("pull"),
            "{paths:?}"
        );
    }
}

/// Two claims answer (the annotation names one, the gateway activates another), and an
/// activation naming another pod: both refused with exit 65, nothing bound, no relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_claims_and_foreign_activations_are_refused() {
    let base = IdEnv::new("conflict", Setup::default()).await;
    let two_claims = base.sibling("conflict-claims");
    let foreign = base.sibling("conflict-foreign");
    let mut a = spawn_with(&two_claims, &[]);
    let mut b = spawn_with(&foreign, &[]);
    for env in [&two_claims, &foreign] {
        env.gateway
            .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
            .await
            .unwrap();
    }

    // The annotation names claim A first; then the gateway activates claim B.
    two_claims.write_hint("claim-a");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sb_a = two_claims
        .gateway
        .claim(&two_claims.pod.pod_name, claim_opts("claim-b"))
        .await
        .unwrap();
    // The gateway's activation names a pod UID that is not this pod's.
    let sb_b = foreign
        .gateway
        .claim_delivered(
            &foreign.pod.pod_name,
            claim_opts(&random_uid()),
            ClaimDelivery {
                forged_pod_uid: Some(random_uid()),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    for (env, sup, sandbox, want) in [
        (&two_claims, &mut a, &sb_a, "conflicting claims"),
        (&foreign, &mut b, &sb_b, "names pod uid"),
    ] {
        assert_eq!(
            sup.wait_exit(Duration::from_secs(10)),
            Some(65),
            "{}",
            sup.logs()
        );
        let refusal = events_named(sup, "reuse.refused").pop().unwrap();
        assert_eq!(refusal["reason"], "claim_conflict", "{refusal}");
        assert!(
            refusal["detail"].as_str().unwrap().contains(want),
            "{refusal}"
        );
        assert!(!sup.has_event("identity.bound"), "{}", sup.logs());
        assert!(!env.binding_record().exists());
        assert!(env
            .gateway
            .wait_connected(sandbox.id(), Duration::from_millis(300))
            .await
            .is_err());
    }
}

/// 3 s sandbox tokens over a long run: many refreshes, sessions opened throughout (each
/// with the token current at the time) and one session spanning the whole run, all on
/// the one relay connection. Then the claim is revoked at the gateway: the supervisor
/// releases within one refresh interval, wipes and exits 0. `SSV_SOAK_SECS` scales it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_many_refreshes_and_revocation_releases() {
    let ttl = Duration::from_secs(3);
    let env = IdEnv::new(
        "refresh",
        Setup {
            sandbox_token_ttl: ttl,
            ..Setup::default()
        },
    )
    .await;
    let soak = Duration::from_secs(env_usize("SSV_SOAK_SECS", 12) as u64);
    let (mut sup, sandbox) = env.bound_with(Launch::Subreaper, &[]).await;
    let ticks = soak.as_secs() + 1;
    let long = sandbox
        .exec(sh(&format!(
            "i=0; while [ $i -lt {ticks} ]; do echo tick $i; i=$((i+1)); sleep 1; done"
        )))
        .await
        .unwrap();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < soak {
        let out = sandbox
            .exec(sh(&format!("echo run {n}")))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "session {n} after {:?}: {e}\n{}",
                    started.elapsed(),
                    sup.logs()
                )
            })
            .collect()
            .await
            .unwrap();
        assert_eq!(out.stdout, format!("run {n}\n").as_bytes());
        n += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let out = long.collect().await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count() as u64, ticks, "{text}");

    // ~80 % of 2–3 s: a refresh every ≤ 2.4 s.
    let refreshed = env.gateway.stats(&env.pod.pod_name).refreshed;
    let want = soak.as_secs() / 3;
    assert!(
        refreshed >= want,
        "{refreshed} refreshes in {soak:?}\n{}",
        sup.logs()
    );
    assert!(events_named(&sup, "identity.refreshed").len() as u64 >= want);
    for ev in [
        "relay.disconnected",
        "relay.reconnected",
        "identity.refresh_failed",
    ] {
        assert!(!sup.has_event(ev), "unexpected {ev}\n{}", sup.logs());
    }

    let revoked = Instant::now();
    env.gateway.revoke(sandbox.claim_uid());
    let releasing = wait_event(&sup, Duration::from_secs(10), |e| {
        e["event"] == "lifecycle.transition" && e["to"] == "releasing"
    })
    .await
    .unwrap_or_else(|| panic!("no release after revocation\n{}", sup.logs()));
    let took = revoked.elapsed();
    assert!(
        took <= ttl + Duration::from_millis(500),
        "released after {took:?}"
    );
    assert!(
        releasing["reason"].as_str().unwrap().contains("claim gone"),
        "{releasing}"
    );
    assert_eq!(
        sup.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        sup.logs()
    );
    assert!(sup.has_event("wipe.completed"));
    assert!(std::fs::read_dir(env.volume().join("workspace"))
        .unwrap()
        .next()
        .is_none());
    // The report went on a Connect of its own, which the gateway accepted although
    // the claim is gone (refusing it would lose the report).
    let report = sandbox
        .release("after revocation", Duration::ZERO, Duration::from_secs(1))
        .await
        .unwrap();
    let report = report.unwrap_or_else(|| panic!("the release report was lost\n{}", sup.logs()));
    assert!(report.error.is_empty(), "{report:?}");
    assert!(
        sup.events()
            .iter()
            .any(|e| e["event"] == "release.reported" && e["delivered"] == true),
        "{}",
        sup.logs()
    );
}

/// A full lifecycle at the most verbose level (every crate at trace: our events, tonic,
/// h2, rustls): register, a rotated projected token, the pull path, refreshes,
/// sessions, release. No line holds token material: no `eyJ`, none of the raw tokens
/// written or minted, not even one of their segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_logs_hold_no_token_material() {
    let env = IdEnv::new(
        "hygiene",
        Setup {
            sandbox_token_ttl: Duration::from_secs(3),
            ..Setup::default()
        },
    )
    .await;
    env.gateway.record_minted_tokens();
    let mut sup = spawn_with(&env, &[("--log-level", "trace")]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
    let rotated = env
        .issuer
        .mint_for(&env.pod, AUDIENCE, Duration::from_secs(3600))
        .unwrap();
    env.write_token(&rotated);
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.gateway.stats(&env.pod.pod_name).refreshed < 2 && Instant::now() < deadline {
        let out = sandbox
            .exec(sh("echo $HOME; env | wc -l"))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.exit.status, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(env.gateway.stats(&env.pod.pod_name).refreshed >= 2);
    let report = sandbox
        .release("done", Duration::from_secs(1), Duration::from_secs(20))
        .await
        .unwrap();
    assert!(report.is_some());
    assert_eq!(
        sup.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        sup.logs()
    );

    let logs = sup.logs();
    let mut secrets = env.written.lock().unwrap().clone();
    let minted = env.gateway.minted_tokens();
    assert!(
        minted.len() >= 3,
        "activation + refreshes: {}",
        minted.len()
    );
    secrets.extend(minted.iter().cloned());
    // Positive control: the sandbox token in use is logged by fingerprint.
    assert!(
        logs.contains(&minted[0].fingerprint()),
        "no fingerprint logged"
    );
    assert!(logs.lines().count() > 100, "trace logging is not on");
    assert!(!logs.contains("eyJ"), "a JWT segment is in the logs");
    for t in &secrets {
        assert!(!logs.contains(t.expose()), "a raw token is in the logs");
        for (i, seg) in t.expose().split('.').enumerate().skip(1) {
            assert!(!logs.contains(seg), "segment {i} of a token is in the logs");
        }
    }
}
