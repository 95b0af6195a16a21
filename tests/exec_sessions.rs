//! Exec sessions end to end (issue 5): the real binary, the real gRPC relay over TLS, the
//! reference gateway. PTYs, streamed stdin, signals (also to processes that left the
//! group) and the drain bound when a grandchild holds the output. Many sessions and
//! drops of the relay are in `exec_relay.rs`, refused requests in `exec_errors.rs`.

mod common;

use common::exec::*;
use common::*;
use rand::{Rng, SeedableRng};
use sandbox_supervisor::gateway::ExecEvent;
use sandbox_supervisor::proto::exit_status::How;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

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

/// grpcio, grpc-go and grpc-java send a stream's response headers only with its first
/// message. A gateway that has nothing to send until output arrives (the usual case)
/// must still get the output and the exit, on the first stream and after a drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_flows_to_a_gateway_that_sends_headers_lazily() {
    let env = Env::with(
        "lazy",
        Options {
            lazy_headers: true,
            ..Options::default()
        },
    )
    .await;
    let (_sup, sandbox) = env.bound(launch()).await;
    let run = sandbox.exec(sh("echo out; echo err >&2; exit 3"));
    let out = tokio::time::timeout(T, async { run.await.unwrap().collect().await.unwrap() })
        .await
        .expect("no output or exit within 15 s: the supervisor waits for response headers");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit.status, 3);
}
