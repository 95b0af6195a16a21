//! Proof in a real container runtime: the static release binary in the example image
//! (container/example-image), run by the Docker engine with the security settings of
//! container/k8s/sandboxtemplate.yaml, against the reference gateway over TLS on a
//! Docker network of its own. Skips with a printed reason where there is no Docker
//! engine or no root.
//!
//! Cost: the first test to run builds the static binary (scripts/build-static.sh, unless
//! dist/sandbox-supervisor is newer than the sources or SSV_STATIC_BINARY names one) and
//! the image, once per process; every test then runs in its own network with its own
//! containers and volumes, removed by a Drop guard even on failure.

mod common;

use common::docker::*;
use common::{require, sh};
use sandbox_supervisor::gateway::{ExecEvent, Sandbox};
use sandbox_supervisor::proto;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The test's cluster, or a printed skip where there is no Docker engine or no root.
macro_rules! cluster {
    ($tag:expr) => {{
        let why = unavailable();
        require!(why.is_none(), why.unwrap_or_default());
        ok(Cluster::new($tag).await)
    }};
}

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

async fn run(sandbox: &Sandbox, spec: proto::ExecSpec) -> sandbox_supervisor::gateway::ExecOutput {
    sandbox
        .exec(spec)
        .await
        .unwrap_or_else(|e| panic!("exec: {e}"))
        .collect()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one field of the first `event` line, or panics with the logs.
fn field(pod: &Pod, event: &str, name: &str) -> serde_json::Value {
    let evs = pod.events_named(event);
    let Some(ev) = evs.first() else {
        panic!(
            "no {event} in the logs of {}:\n{}",
            pod.container,
            pod.logs()
        )
    };
    ev[name].clone()
}

/// The `to` states of every lifecycle.transition, in order.
fn transitions(pod: &Pod) -> Vec<String> {
    pod.events_named("lifecycle.transition")
        .iter()
        .map(|e| e["to"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The example image carries only what DESIGN §7 and container/README.md promise, and
/// the FROM scratch runtime image builds from the same prebuilt binary with its labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_hold_the_static_binary_the_user_and_the_seed() {
    let cluster = cluster!("image");
    let out = ok(docker_async(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/bin/sh",
        &cluster.image,
        "-c",
        "id sandbox; stat -c '%u:%g %a' /sandbox-supervisor /sandbox /tmp; \
         find /opt/sandbox/seed -type f | sort; /sandbox-supervisor version",
    ])
    .await);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)",
        "{out}"
    );
    // Root-owned and not writable by the sandbox user; the mount point root 0755.
    assert_eq!(&lines[1..4], ["0:0 755", "0:0 755", "0:0 1777"], "{out}");
    assert_eq!(
        &lines[4..7],
        [
            "/opt/sandbox/seed/README.md",
            "/opt/sandbox/seed/hello.sh",
            "/opt/sandbox/seed/src/notes.txt"
        ],
        "{out}"
    );
    assert!(lines[7].contains(env!("CARGO_PKG_VERSION")), "{out}");

    // The runtime image, built the way CI builds it: --target runtime-prebuilt from the
    // binary built outside, legacy builder, no registry.
    let bin = ok(static_binary());
    let repo = repo();
    let Ok(rel) = bin.strip_prefix(&repo) else {
        eprintln!(
            "skipped the runtime image: {} is outside the build context {}",
            bin.display(),
            repo.display()
        );
        return;
    };
    let tag = format!("{}-runtime", cluster.image);
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = docker(&["rmi", "-f", &self.0]);
        }
    }
    let _rmi = Rmi(tag.clone());
    let repo_s = repo.display().to_string();
    let build = tokio::task::spawn_blocking({
        let (tag, rel) = (tag.clone(), rel.display().to_string());
        move || {
            std::process::Command::new("docker")
                .args(["build", "-q", "--target", "runtime-prebuilt"])
                .args(["--build-arg", &format!("BINARY={rel}")])
                .args(["--build-arg", "REVISION=test", "-t", &tag, &repo_s])
                .env("DOCKER_BUILDKIT", "0")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        build.status.success(),
        "docker build --target runtime-prebuilt: {}",
        text(&build.stderr)
    );
    let labels = ok(docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Labels}} {{json .Config.Entrypoint}}",
        &tag,
    ]));
    assert!(
        labels.contains("\"org.opencontainers.image.revision\":\"test\"")
            && labels.contains("[\"/sandbox-supervisor\",\"run\"]"),
        "{labels}"
    );
    // Image builders copy the binary out of this image; run it the same way.
    let out = ok(docker_async(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/sandbox-supervisor",
        &tag,
        "version",
    ])
    .await);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
}

/// Three containers as a warm pool: each seeds once and parks (ready, from outside);
/// two are claimed, bind and serve sessions as the sandbox user in the seeded
/// workspace, then release through the gateway: wiped, reported, exit 0. The third,
/// never claimed, stops while warm: exit 0 with nothing to wipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_seeds_parks_binds_serves_and_releases() {
    let cluster = cluster!("pool");
    // One pod dials the gateway by name: the static binary resolves it (no NSS modules).
    let pods: Vec<Pod> = [("a", Dial::Ip), ("b", Dial::Name), ("c", Dial::Ip)]
        .iter()
        .map(|&(s, dial)| ok(cluster.start_pod_with(s, dial)))
        .collect();
    for pod in &pods {
        ok(cluster.parked(pod).await);
    }
    for pod in &pods {
        // Ready from outside, like the kubelet's httpGet probe, and the state metric.
        let addr = SocketAddr::new(ok(pod.ip(&cluster.network)), 9090);
        let (code, body) = ok(http_get(addr, "/readyz").await);
        assert_eq!((code, body.trim()), (200, "warm"), "{}", pod.logs());
        let (code, metrics) = ok(http_get(addr, "/metrics").await);
        assert_eq!(code, 200);
        assert!(
            metrics.contains("sandbox_supervisor_state{state=\"warm\"} 1"),
            "{metrics}"
        );
        assert_eq!(field(pod, "seed.completed", "files"), 3, "{}", pod.logs());
        assert_eq!(field(pod, "supervisor.started", "mode"), "pid1");
    }

    let mut sandboxes = vec![];
    for pod in &pods[..2] {
        sandboxes.push(ok(cluster.claim(pod).await));
    }
    for (pod, sandbox) in pods.iter().zip(&sandboxes) {
        let out = run(sandbox, sh("./hello.sh; cat src/notes.txt | wc -l")).await;
        assert_eq!(
            text(&out.stdout),
            "hello from sandbox (uid 1000) in /sandbox/workspace\n1\n",
            "{}",
            text(&out.stderr)
        );
        let out = run(sandbox, sh("echo oops >&2; exit 7")).await;
        assert_eq!((text(&out.stderr).as_str(), out.exit.status), ("oops\n", 7));
        // Several sessions at once, each output byte-exact.
        let script = "i=0; while [ $i -lt 2000 ]; do echo \"$1 $i\"; i=$((i+1)); done";
        let mut running = vec![];
        for n in 0..4 {
            let mut spec = sh(script);
            spec.argv.extend(["sh".to_string(), format!("s{n}")]);
            running.push(sandbox.exec(spec).await.unwrap());
        }
        for (n, exec) in running.into_iter().enumerate() {
            let out = exec.collect().await.unwrap();
            let want: String = (0..2000).map(|i| format!("s{n} {i}\n")).collect();
            assert!(text(&out.stdout) == want, "session {n} output differs");
        }
        let addr = SocketAddr::new(ok(pod.ip(&cluster.network)), 9090);
        let (code, body) = ok(http_get(addr, "/readyz").await);
        assert_eq!((code, body.trim()), (200, "bound"));
    }

    for (pod, sandbox) in pods.iter().zip(&sandboxes) {
        let report = sandbox
            .release("test done", Duration::from_secs(2), Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a release report");
        assert!(report.error.is_empty(), "{report:?}");
        assert!(report.files_removed >= 3, "{report:?}");
        assert_eq!(
            ok(pod.wait_exit(Duration::from_secs(30)).await),
            0,
            "{}",
            pod.logs()
        );
        assert_eq!(field(pod, "wipe.completed", "files"), report.files_removed);
        assert_eq!(
            transitions(pod),
            [
                "seeding",
                "warm",
                "binding",
                "bound",
                "releasing",
                "released"
            ],
            "{}",
            pod.logs()
        );
    }

    let warm = &pods[2];
    ok(docker_async(&["stop", "-t", "30", &warm.container]).await);
    assert_eq!(ok(warm.state()).exit_code, 0, "{}", warm.logs());
    assert_eq!(transitions(warm), ["seeding", "warm", "released"]);
    assert!(warm.events_named("wipe.completed").is_empty());
    assert!(warm.events_named("identity.bound").is_empty());
}

/// `docker stop` of a bound container: SIGTERM from outside, the workload (which ignores
/// TERM) is killed after the release grace, the tombstone written, the workspace wiped
/// and the report delivered; exit 0 well within the stop timeout. `docker start` on the
/// same volume: refused (exit 65, reason tombstone) without contacting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_releases_within_the_grace_and_start_refuses_reuse() {
    let cluster = cluster!("stop");
    let (pod, sandbox) = ok(cluster.bound("s").await);
    let out = run(
        &sandbox,
        sh("head -c 100000 /dev/urandom > tenant.bin; mkdir -p deep/er; echo x > deep/er/f; ls"),
    )
    .await;
    assert_eq!(out.exit.status, 0, "{}", text(&out.stderr));
    let mut stubborn = sandbox
        .exec(sh("trap '' TERM; echo ready; while :; do sleep 1; done"))
        .await
        .unwrap();
    assert_eq!(
        stubborn.next().await,
        Some(ExecEvent::Stdout("ready\n".into()))
    );

    let started = Instant::now();
    ok(docker_async(&["stop", "-t", "30", &pod.container]).await);
    let took = started.elapsed();
    assert_eq!(ok(pod.state()).exit_code, 0, "{}", pod.logs());
    assert!(
        took >= Duration::from_secs(RELEASE_GRACE_S) && took < Duration::from_secs(20),
        "stop took {took:?}: the TERM-ignoring workload must cost the {RELEASE_GRACE_S}s grace, not the 30s timeout\n{}",
        pod.logs()
    );
    assert_eq!(field(&pod, "signal.received", "sender_pid"), 0);
    assert_eq!(
        field(&pod, "release.killed", "all_gone"),
        true,
        "{}",
        pod.logs()
    );
    assert_eq!(
        field(&pod, "release.reported", "delivered"),
        true,
        "{}",
        pod.logs()
    );
    let wiped = field(&pod, "wipe.completed", "files");
    // The three seeded files and the two the session made.
    assert_eq!(wiped, 5, "{}", pod.logs());
    assert_eq!(
        transitions(&pod),
        [
            "seeding",
            "warm",
            "binding",
            "bound",
            "releasing",
            "released"
        ]
    );
    // The gateway holds the report (delivered on a fresh connection after the signal).
    let report = sandbox
        .release("after stop", Duration::ZERO, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the report of the signal release");
    assert_eq!(Some(report.files_removed), wiped.as_u64());

    // The volume: an empty workspace and the tombstone.
    let ls = ok(docker_async(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        &format!("{}:/v:ro", pod.volume),
        "--entrypoint",
        "/bin/sh",
        &cluster.image,
        "-c",
        "ls -A /v/workspace | wc -l; ls /v/.supervisor",
    ])
    .await);
    let mut lines = ls.lines();
    assert_eq!(lines.next(), Some("0"), "{ls}");
    assert!(ls.contains("tombstone.json"), "{ls}");

    let registers = cluster.gateway.stats(&pod.spec.pod_name).register_attempts;
    let lines_before = pod.logs().lines().count();
    ok(docker_async(&["start", &pod.container]).await);
    assert_eq!(
        ok(pod.wait_exit(Duration::from_secs(30)).await),
        65,
        "{}",
        pod.logs()
    );
    let logs = pod.logs();
    let second: Vec<serde_json::Value> = logs
        .lines()
        .skip(lines_before)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refused: Vec<_> = second
        .iter()
        .filter(|e| e["event"] == "reuse.refused")
        .collect();
    assert_eq!(refused.len(), 1, "{logs}");
    assert_eq!(refused[0]["reason"], "tombstone", "{logs}");
    assert!(
        !second.iter().any(|e| e["event"] == "seed.completed"),
        "{logs}"
    );
    assert_eq!(
        cluster.gateway.stats(&pod.spec.pod_name).register_attempts,
        registers,
        "a refusing pod must not register"
    );
}

/// The container is disconnected from its network mid-session and reconnected: the
/// supervisor notices the silence, reconnects, the gateway re-attaches at the offsets
/// it holds, and the session's output arrives complete, in order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_disconnect_mid_session_loses_no_output() {
    let cluster = cluster!("net");
    let (pod, sandbox) = ok(cluster.bound("n").await);
    const LINES: usize = 60;
    let mut exec = sandbox
        .exec(sh(&format!(
            "i=1; while [ $i -le {LINES} ]; do echo \"line $i\"; i=$((i+1)); sleep 0.1; done"
        )))
        .await
        .unwrap();
    let mut stdout = Vec::new();
    // Some output through the first connection, then cut the cable.
    while !text(&stdout).contains("line 5\n") {
        match tokio::time::timeout(Duration::from_secs(20), exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) => stdout.extend_from_slice(&b),
            other => panic!("before the cut: {other:?}\n{}", pod.logs()),
        }
    }
    ok(docker_async(&["network", "disconnect", &cluster.network, &pod.container]).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ok(docker_async(&["network", "connect", &cluster.network, &pod.container]).await);
    // Generous: the relay's backoff may be near its 10 s cap after the failed attempts
    // of the outage, and an attempt that stalls is broken by `Connect`'s 10 s header
    // timeout or HTTP/2 keepalive (30 s + 10 s). Normally the output resumes within a few seconds.
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(60), exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) => stdout.extend_from_slice(&b),
            Ok(Some(ExecEvent::Exited(e))) => break e,
            other => panic!(
                "after the reconnect: {other:?} with {:?}\n{}",
                text(&stdout),
                pod.logs()
            ),
        }
    };
    // The relay's view of the outage, for when this test is slow (shown with --nocapture).
    for e in pod.events() {
        if e["event"].as_str().is_some_and(|n| n.starts_with("relay.")) {
            eprintln!("{} {} {}", e["ts"], e["event"], e["reason"]);
        }
    }
    let want: String = (1..=LINES).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text(&stdout), want, "{}", pod.logs());
    assert_eq!(exit.status, 0);
    // `docker logs` trails a running container a little.
    let reconnected = ok(pod
        .wait_events("relay.reconnected", 1, Duration::from_secs(5))
        .await);
    assert_eq!(reconnected[0]["sessions"], 1, "{reconnected:?}");
    // Same supervisor, same binding, still serving.
    assert_eq!(pod.events_named("identity.bound").len(), 1);
    let out = run(&sandbox, sh("echo after")).await;
    assert_eq!(text(&out.stdout), "after\n");
    sandbox
        .release("done", Duration::from_secs(1), Duration::from_secs(30))
        .await
        .unwrap()
        .expect("report");
    assert_eq!(
        ok(pod.wait_exit(Duration::from_secs(30)).await),
        0,
        "{}",
        pod.logs()
    );
}

/// `kill -TERM 1` from inside the container, as root (docker exec), is ignored: the
/// kernel lets it through, the supervisor sees a sender in its own PID namespace. The
/// sandbox user cannot even send it. `docker kill -s TERM` from outside (sender pid 0)
/// releases: workload killed, wiped, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_sigterm_releases_but_inside_kill_is_ignored() {
    let cluster = cluster!("kill");
    let (pod, sandbox) = ok(cluster.bound("k").await);
    let _sleeper = sandbox.exec(sh("sleep 1000")).await.unwrap();

    ok(docker_async(&["exec", &pod.container, "kill", "-TERM", "1"]).await);
    ok(docker_async(&["exec", &pod.container, "kill", "-INT", "1"]).await);
    let as_sandbox = docker_async(&[
        "exec",
        "-u",
        "1000:1000",
        &pod.container,
        "kill",
        "-TERM",
        "1",
    ])
    .await;
    assert!(
        as_sandbox.is_err(),
        "the sandbox user signalled PID 1: {as_sandbox:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(ok(pod.state()).running, "{}", pod.logs());
    let out = run(&sandbox, sh("echo alive")).await;
    assert_eq!(text(&out.stdout), "alive\n");
    let ignored = ok(pod
        .wait_events("signal.ignored", 2, Duration::from_secs(5))
        .await);
    assert_eq!(ignored.len(), 2, "{}", pod.logs());
    for e in &ignored {
        assert_ne!(e["sender_pid"], 0, "{e}");
    }
    assert!(pod.events_named("signal.received").is_empty());
    assert!(!transitions(&pod).contains(&"releasing".to_string()));

    let started = Instant::now();
    ok(docker_async(&["kill", "-s", "TERM", &pod.container]).await);
    assert_eq!(
        ok(pod.wait_exit(Duration::from_secs(30)).await),
        0,
        "{}",
        pod.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(field(&pod, "signal.received", "sender_pid"), 0);
    assert!(field(&pod, "release.killed", "processes").as_u64().unwrap() >= 1);
    assert!(
        !pod.events_named("wipe.completed").is_empty(),
        "{}",
        pod.logs()
    );
    assert_eq!(
        transitions(&pod),
        [
            "seeding",
            "warm",
            "binding",
            "bound",
            "releasing",
            "released"
        ]
    );
}
