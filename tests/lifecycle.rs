//! The foundation's end-to-end tests: the real binary (as PID 1 of a new PID namespace
//! where possible), the real gRPC relay over TLS, the reference gateway.

mod common;

use common::*;
use std::time::Duration;

/// warm → activation → bound → sessions → release → exit 0, with every basic exec shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_runs_sessions_and_releases() {
    let launch = launch();
    let env = Env::new("lifecycle").await;
    let (mut sup, sandbox) = env.bound(launch).await;

    let out = sandbox
        .exec(spec(&["echo", "hello", "world"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert_eq!(out.exit.status, 0);

    let out = sandbox
        .exec(sh("echo oops >&2; exit 7"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stderr, b"oops\n");
    assert!(out.stdout.is_empty());
    assert_eq!(out.exit.status, 7);
    assert_eq!(
        out.exit.how,
        Some(sandbox_supervisor::proto::exit_status::How::ExitCode(7))
    );

    // 1 MiB of output, byte-exact.
    let out = sandbox
        .exec(sh("head -c 1048576 /dev/zero | tr '\\0' 'x'"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.stdout.iter().all(|&b| b == b'x'));

    // env over a clean base, cwd relative to the workspace, the seed is there.
    let mut s = sh("echo \"$GREETING|$PWD|$SANDBOX_SUPERVISOR_GATEWAY|$(cat main.txt)\"");
    s.env.insert("GREETING".into(), "hi".into());
    s.cwd = "src".into();
    let out = sandbox.exec(s).await.unwrap().collect().await.unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let ws = env.volume().join("workspace/src");
    assert_eq!(text, format!("hi|{}||hello seed\n", ws.display()));

    let report = sandbox
        .release("test done", Duration::from_secs(2), Duration::from_secs(20))
        .await
        .unwrap()
        .expect("a release report");
    assert!(report.error.is_empty(), "{report:?}");
    assert!(report.files_removed >= 2, "{report:?}");
    assert_eq!(
        sup.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        sup.logs()
    );
    for ev in [
        "lifecycle.transition",
        "identity.bound",
        "session.started",
        "session.exited",
        "wipe.completed",
    ] {
        assert!(sup.has_event(ev), "missing {ev}\n{}", sup.logs());
    }
    // Nothing of the tenant remains.
    let left: Vec<_> = std::fs::read_dir(env.volume().join("workspace"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_executable_is_not_found_and_the_next_session_works() {
    let env = Env::new("notfound").await;
    let (_sup, sandbox) = env.bound(launch()).await;
    let Err(err) = sandbox.exec(spec(&["definitely-not-a-program"])).await else {
        panic!("must fail")
    };
    assert_eq!(
        err.code,
        sandbox_supervisor::proto::ErrorCode::NotFound,
        "{err}"
    );
    assert!(
        err.message.contains("definitely-not-a-program") && err.message.contains("PATH="),
        "{err}"
    );
    let Err(err) = sandbox.exec(spec(&[])).await else {
        panic!("empty argv must fail")
    };
    assert_eq!(
        err.code,
        sandbox_supervisor::proto::ErrorCode::InvalidArgument,
        "{err}"
    );
    let out = sandbox
        .exec(spec(&["echo", "still", "serving"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still serving\n");
}

/// As PID 1: 200 double-forked orphans are all reaped; a killed session reports the
/// signal and 128+n; `kill -TERM 1` from inside does nothing; SIGTERM from outside
/// releases and exits 0 within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid1_reaps_orphans_ignores_inside_signals_and_releases_on_outside_sigterm() {
    require!(
        can_unshare(),
        "needs root and unshare --pid (PID namespaces)"
    );
    let env = Env::new("pid1").await;
    let (mut sup, sandbox) = env
        .bound_with(Launch::Pid1, &["--allow-root-sessions"])
        .await;
    let host_pid = sup.host_pid();

    let out = sandbox
        .exec(sh(
            "i=0; while [ $i -lt 200 ]; do ( sleep 0.2 & ) ; i=$((i+1)); done; echo forked",
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"forked\n");
    // The orphans were reparented to PID 1 (us); after they exit none may linger.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let zombies: Vec<_> = descendants(host_pid)
        .into_iter()
        .filter(|&(_, st)| st == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombies left: {zombies:?}");

    // Killed by a signal: reported as the signal with shell status 128+n.
    let exec = sandbox.exec(spec(&["sleep", "100"])).await.unwrap();
    exec.signal(libc::SIGKILL).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(
        out.exit.how,
        Some(sandbox_supervisor::proto::exit_status::How::Signal(
            libc::SIGKILL
        ))
    );
    assert_eq!(out.exit.status, 128 + libc::SIGKILL);

    // A workload signalling PID 1 changes nothing. The sandbox user is refused by the
    // kernel (EPERM); root inside the namespace gets through, and is ignored.
    let out = sandbox
        .exec(sh("kill -TERM 1 || echo refused"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"refused\n");
    let mut as_root = sh("kill -TERM 1 && kill -INT 1 && echo sent");
    as_root.user = "root".into();
    let out = sandbox
        .exec(as_root)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        out.stdout,
        b"sent\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = sandbox
        .exec(spec(&["echo", "alive"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"alive\n", "{}", sup.logs());
    assert!(sup.has_event("signal.ignored"), "{}", sup.logs());

    // SIGTERM from outside the namespace: release within the grace, exit 0.
    let _running = sandbox.exec(spec(&["sleep", "1000"])).await.unwrap();
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        sup.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        sup.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "release took {:?}",
        started.elapsed()
    );
    assert!(
        sup.has_event("release.killed") && sup.has_event("wipe.completed"),
        "{}",
        sup.logs()
    );
}

/// Not PID 1: a child subreaper still reaps the orphans of its workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subreaper_mode_reaps_orphans() {
    let env = Env::new("subreaper").await;
    let (mut sup, sandbox) = env.bound(Launch::Subreaper).await;
    let pid = sup.host_pid();
    let out = sandbox
        .exec(sh(
            "i=0; while [ $i -lt 50 ]; do ( sleep 0.2 & ) ; i=$((i+1)); done; echo ok",
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"ok\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The orphans were reparented to the supervisor, not to init.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let zombies: Vec<_> = descendants(pid)
        .into_iter()
        .filter(|&(_, st)| st == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert!(sup.has_event("pid1.subreaper"), "{}", sup.logs());
    sandbox
        .release("done", Duration::from_secs(1), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        sup.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        sup.logs()
    );
}

#[test]
fn local_runs_a_command_and_exits_with_its_status() {
    let out = std::process::Command::new(BIN)
        .args(["local", "--", "sh", "-c", "echo hi; exit 3"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_flags_fail_at_boot_naming_the_option() {
    let out = std::process::Command::new(BIN)
        .args(["run", "--gateway", "https://g:1", "--release-grace", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--release-grace"));
    let out = std::process::Command::new(BIN)
        .args(["run", "--gateway", "http://g:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-plaintext"));
}

/// DESIGN §3: the binding record is durable before the relay takes any session. Connect
/// goes out while the record is being written (binding costs the longer of the two, not
/// their sum), so this holds only because the relay waits for the write. strace's fault
/// injection holds every fsync of the real binary for 300 ms: a session asked for the
/// moment the gateway has the relay must still find `binding.json` on disk when it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_runs_before_the_binding_record_is_durable() {
    let strace = std::process::Command::new("strace").arg("-V").output();
    require!(
        is_root() && strace.is_ok_and(|o| o.status.success()),
        "needs root and strace (apt-get install strace) to delay the record's fsync"
    );
    let env = Env::new("bind-durable").await;
    let sup = env.spawn(launch(), &[]);
    env.gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(30))
        .await
        .unwrap();
    let pid = sup.host_pid();
    let mut tracer = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync"])
        .args([
            "-e",
            "inject=fsync:delay_exit=300000",
            "-p",
            &pid.to_string(),
        ])
        .spawn()
        .unwrap();
    let traced = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !traced() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(traced(), "strace did not attach to the supervisor");

    let claimed = std::time::Instant::now();
    let sandbox = env
        .gateway
        .claim(
            &env.pod.pod_name,
            sandbox_supervisor::gateway::ClaimOptions::default(),
        )
        .await
        .unwrap();
    env.gateway
        .wait_connected(sandbox.id(), Duration::from_secs(30))
        .await
        .unwrap();
    let exec = sandbox.exec(sh("echo served")).await.unwrap();
    let binding = env.volume().join(".supervisor/binding.json");
    assert!(
        binding.exists(),
        "a session started {:?} after the claim, before binding.json was on disk",
        claimed.elapsed()
    );
    // The delay was in force (else this proves nothing): the record's fsyncs took it.
    assert!(
        claimed.elapsed() >= Duration::from_millis(300),
        "bound in {:?}: the fsync delay did not apply",
        claimed.elapsed()
    );
    let out = exec.collect().await.unwrap();
    assert_eq!(out.stdout, b"served\n");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tracer.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tracer.wait();
    let order: Vec<String> = sup
        .events()
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .filter(|e| ["binding.written", "relay.connected", "session.started"].contains(&e.as_str()))
        .collect();
    assert_eq!(
        order,
        ["binding.written", "relay.connected", "session.started"],
        "{}",
        sup.logs()
    );
}
