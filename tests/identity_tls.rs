//! Identity over TLS end to end (issue 4): wrong CA, wrong server name, expired
//! certificate and garbage bundle fail safely; CA rotation with an old+new bundle; the
//! server-name override with mutual TLS. The real binary against the reference gateway.

// No test here needs root, so the harness's `require!` goes unused.
mod common;

use common::identity::*;
use common::*;
use sandbox_supervisor::gateway::pki::{ServerTls, TestCa, Validity};
use sandbox_supervisor::gateway::ClaimOptions;
use std::time::{Duration, Instant};

/// Wrong CA, wrong server name, expired server certificate: the supervisor never
/// parks, says why in its log, stays not ready, and retries with backoff, not a spin.
/// A garbage CA bundle at boot is a configuration error (exit 64) naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_misconfigurations_fail_safely_with_a_clear_reason() {
    let wrong_ca = IdEnv::new("tls-wrong-ca", Setup::default()).await;
    replace_file(
        &wrong_ca.ca_path(),
        TestCa::new("someone else").unwrap().cert_pem().as_bytes(),
    );
    let wrong_name = IdEnv::new("tls-wrong-name", Setup::default()).await;
    let expired = IdEnv::new(
        "tls-expired",
        Setup {
            server_validity: Validity::Expired,
            ..Setup::default()
        },
    )
    .await;
    let garbage = IdEnv::new("tls-garbage", Setup::default()).await;
    replace_file(&garbage.ca_path(), b"-----BEGIN CERTIFICATE-----\nnope\n");

    let cases = [
        (&wrong_ca, None, "unknownissuer"),
        (
            &wrong_name,
            Some("gateway.example.com"),
            "not valid for name",
        ),
        (&expired, None, "expired"),
    ];
    let mut running = vec![];
    for (env, name, _) in &cases {
        let port = free_port();
        let probes = format!("127.0.0.1:{port}");
        let mut o = vec![("--listen-probes", probes.as_str())];
        if let Some(n) = name {
            o.push(("--gateway-server-name", n));
        }
        running.push((spawn_with(env, &o), port));
    }
    let mut bad = spawn_with(&garbage, &[]);
    let started = Instant::now();
    assert_eq!(
        bad.wait_exit(Duration::from_secs(10)),
        Some(64),
        "{}",
        bad.logs()
    );
    let line = events_named(&bad, "config.invalid")
        .pop()
        .unwrap_or_else(|| panic!("no config.invalid\n{}", bad.logs()));
    let msg = line.to_string();
    assert!(msg.contains("ca.pem") && msg.contains("PEM"), "{msg}");

    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    for ((env, _, cause), (sup, port)) in cases.iter().zip(&running) {
        assert!(
            sup.child.is_some(),
            "must keep retrying, not exit\n{}",
            sup.logs()
        );
        let (failures, reason) = register_failures(sup);
        eprintln!("{}: {reason}", env.pod.pod_name);
        assert!(
            reason.to_lowercase().contains(cause),
            "{}: want the cause {cause} in the reason, got {reason:?}",
            env.pod.pod_name
        );
        // Backoff (100 ms base, doubling, full jitter) allows ~7 attempts in 4 s; a
        // spin would make hundreds.
        assert!(
            (2..=15).contains(&failures),
            "{failures} failures\n{}",
            sup.logs()
        );
        assert_eq!(
            tokio::task::spawn_blocking({
                let p = *port;
                move || readyz(p)
            })
            .await
            .unwrap(),
            Some(503),
            "must not be ready"
        );
        assert_eq!(env.gateway.stats(&env.pod.pod_name).register_attempts, 0);
        assert!(!sup.has_event("identity.parked"));
    }
}

/// CA rotation: the bundle becomes old+new CA, then the gateway restarts with a
/// certificate from the new CA; the warm supervisor re-reads the bundle and parks
/// again. Later a garbage bundle is logged and ignored: the relay reconnects across a
/// gateway restart with the last good bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_with_old_and_new_bundle_keeps_working() {
    let env = IdEnv::new("carot", Setup::default()).await;
    let sup = spawn_with(&env, &[]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));

    let new_ca = TestCa::new("rotated CA").unwrap();
    let bundle = format!("{}{}", env.ca.cert_pem(), new_ca.cert_pem());
    replace_file(&env.ca_path(), bundle.as_bytes());
    env.gateway.set_tls_for_restart(ServerTls {
        server: new_ca
            .server_cert(&["localhost"], Validity::Current)
            .unwrap(),
        client_ca_pem: None,
    });
    env.gateway.restart().await.unwrap();
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("not parked after rotation: {e}\n{}", sup.logs()));
    let reloaded = events_named(&sup, "identity.ca_reloaded");
    assert_eq!(reloaded.len(), 1, "{}", sup.logs());
    assert_eq!(reloaded[0]["certificates"], 2);

    let sandbox = env
        .gateway
        .claim(&env.pod.pod_name, ClaimOptions::default())
        .await
        .unwrap();
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(20))
        .await
        .unwrap();

    replace_file(&env.ca_path(), b"garbage, not PEM");
    env.gateway.restart().await.unwrap();
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("relay did not come back: {e}\n{}", sup.logs()));
    let failed = wait_event(&sup, Duration::from_secs(5), |e| {
        e["event"] == "identity.ca_reload_failed"
    })
    .await
    .unwrap_or_else(|| panic!("bad bundle not logged\n{}", sup.logs()));
    assert!(
        failed["reason"].as_str().unwrap().contains("PEM"),
        "{failed}"
    );
    assert_eq!(failed["kept_certificates"], 2);
    let out = sandbox
        .exec(spec(&["echo", "still here"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
}

/// The endpoint is an IP, the TLS name is overridden to the certificate's name, and a
/// client certificate is presented (mutual TLS): the gateway sees it on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_override_and_client_certificate_work() {
    let env = IdEnv::new(
        "mtls",
        Setup {
            client_ca: true,
            ..Setup::default()
        },
    )
    .await;
    // A certificate for "localhost" only, so the override is what makes it verify.
    let server = env
        .ca
        .server_cert(&["localhost"], Validity::Current)
        .unwrap();
    env.gateway.set_tls_for_restart(ServerTls {
        server,
        client_ca_pem: Some(env.ca.cert_pem().to_owned()),
    });
    env.gateway.restart().await.unwrap();
    let client = env.ca.client_cert("mtls-pod").unwrap();
    let (cert, key) = (
        env.dir.0.join("pki/client.pem"),
        env.dir.0.join("pki/client-key.pem"),
    );
    std::fs::write(&cert, &client.cert_pem).unwrap();
    std::fs::write(&key, &client.key_pem).unwrap();
    let url = format!("https://127.0.0.1:{}", env.gateway.local_addr().port());
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let sup = spawn_with(
        &env,
        &[
            ("--gateway", &url),
            ("--gateway-server-name", "localhost"),
            ("--client-cert", &c),
            ("--client-key", &k),
        ],
    );
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()));
    let sandbox = env
        .gateway
        .claim(&env.pod.pod_name, ClaimOptions::default())
        .await
        .unwrap();
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(20))
        .await
        .unwrap();
    let out = sandbox
        .exec(spec(&["true"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.status, 0);
    let presented = env.gateway.presented_tokens(&env.pod.pod_name);
    assert!(!presented.is_empty());
    assert!(presented.iter().all(|p| p.client_cert), "{presented:?}");

    // Without the override the IP does not match the certificate: refused, with why.
    let other = env.sibling("mtls-noname");
    let sup2 = spawn_with(&other, &[("--gateway", &url)]);
    let failed = wait_event(&sup2, Duration::from_secs(10), |e| {
        e["event"] == "identity.register_failed"
    })
    .await
    .unwrap();
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("not valid for name"),
        "{failed}"
    );
}
