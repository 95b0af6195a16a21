//! The gVisor lane (issue 12): the real binary as PID 1 of a gVisor sandbox (`runsc do`,
//! Debian's runsc, ptrace platform) against the reference gateway on this machine, over
//! TLS. Everything is looked at from the host (the volume, the gateway, the supervisor's
//! log) or through sessions (gVisor's own `/proc`): no `/proc/<pid>/task/<tid>/children`,
//! no mount namespace. Skips, naming what is missing, without runsc or root.
//!
//! Sessions run as the unprivileged sandbox user, as in a pod. This gVisor has no
//! `setfsuid`/`setfsgid` (ENOSYS): the supervisor then checks a session's paths as root
//! (`exec.user_view_unavailable`), which `sandbox_user_sessions_without_setfsuid` pins.

mod common;

use common::gvisor::{require_gvisor, Fs, Gvisor};
use common::workspace::{
    assert_unchanged, event, ok, outside_roots, plant_outside, refusal, snapshot, tombstone_phase,
    workspace_left,
};
use common::*;
use sandbox_supervisor::gateway::ExecEvent;
use sandbox_supervisor::proto::exit_status::How;
use std::time::{Duration, Instant};

/// An environment whose sessions run as the sandbox user (see the module comment).
async fn env(tag: &str) -> Env {
    Env::new(tag).await
}

/// For the two tests whose tenant needs root: to plant traps only root can make, and
/// to send `kill 1` as root from inside (which PID 1 must ignore).
async fn root_env(tag: &str) -> Env {
    let mut env = Env::new(tag).await;
    env.sandbox_user = "root".into();
    env
}

const ROOT_SESSIONS: &[&str] = &["--allow-root-sessions"];

/// After a release: a supervisor started again on the same volume, in a new sandbox,
/// refuses (exit 65, reason `tombstone`) without registering.
fn restart_refuses(g: &Gvisor, env: &Env) {
    let before = env.gateway.stats(&env.pod.pod_name).register_attempts;
    let extra = if env.sandbox_user == "root" {
        ROOT_SESSIONS
    } else {
        &[]
    };
    let mut sup = g.spawn(env, Fs::Host, extra);
    let code = sup.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(65), "{}", sup.logs());
    assert_eq!(
        refusal(&sup).as_deref(),
        Some("tombstone"),
        "{}",
        sup.logs()
    );
    assert_eq!(
        env.gateway.stats(&env.pod.pod_name).register_attempts,
        before,
        "a refused supervisor registered\n{}",
        sup.logs()
    );
}

/// park → claim → sessions → release → exit 0 → a restart refuses; the boot names what
/// this kernel lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_full_lifecycle_release_and_refusal_on_restart() {
    require_gvisor!();
    let env = env("gv-life").await;
    let g = Gvisor::new("life");
    let (mut sup, sandbox) = g.bound(&env, Fs::Host, &[]).await;

    let caps = event(&sup, "platform.capabilities").expect("a platform.capabilities event");
    assert_eq!(caps["gvisor"], true, "{caps}");
    let missing = caps["missing"].as_str().unwrap_or_default().to_owned();
    for feature in [
        "openat2",
        "statx_mnt_id",
        "fdinfo_mnt_id",
        "statx_no_automount",
    ] {
        assert!(
            missing.contains(&format!("\"{feature}:")),
            "{feature} not reported missing: {caps}"
        );
    }
    eprintln!("this gVisor lacks: {missing}");

    let out = ok(&sandbox, spec(&["echo", "hello", "world"])).await;
    assert_eq!(out.stdout, b"hello world\n");
    let out = sandbox
        .exec(sh("echo oops >&2; exit 7"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        (out.stderr.as_slice(), out.exit.status),
        (&b"oops\n"[..], 7)
    );
    assert_eq!(out.exit.how, Some(How::ExitCode(7)));
    let out = ok(&sandbox, sh("head -c 1048576 /dev/zero | tr '\\0' 'x'")).await;
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(out.stdout.iter().all(|&b| b == b'x'));
    let mut s = sh("echo \"$GREETING|$PWD|$(cat main.txt)|$(cat /proc/1/comm)\"");
    s.env.insert("GREETING".into(), "hi".into());
    s.cwd = "src".into();
    let out = ok(&sandbox, s).await;
    let ws = env.volume().join("workspace");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("hi|{}/src|hello seed|sandbox-supervi\n", ws.display())
    );

    let report = sandbox
        .release("test done", Duration::from_secs(2), Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a release report");
    assert!(report.error.is_empty(), "{report:?}");
    assert!(report.files_removed >= 2, "{report:?}");
    assert_eq!(
        sup.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        sup.logs()
    );
    assert!(sup.has_event("wipe.completed"), "{}", sup.logs());
    assert!(
        workspace_left(&env).is_empty(),
        "{:?}",
        workspace_left(&env)
    );
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    restart_refuses(&g, &env);
}

/// A pipe session streams stdin through `cat`; a PTY shell gets its size, a new size after
/// a resize, and ^C interrupts its foreground job. (SIGWINCH: `pty_resize_signals_the_shell`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_pipe_and_pty_sessions_with_resize() {
    require_gvisor!();
    let env = env("gv-pty").await;
    let g = Gvisor::new("pty");
    let (_sup, sandbox) = g.bound(&env, Fs::Host, &[]).await;

    let mut s = spec(&["cat"]);
    s.stdin = true;
    let exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(10_000) {
        input.write_stdin(chunk.to_vec().into()).await.unwrap();
    }
    input.close_stdin().await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.status, 0);
    assert!(
        out.stdout == payload,
        "cat echoed {} bytes",
        out.stdout.len()
    );

    let mut s = spec(&["/bin/sh"]);
    s.tty = exec_tty(123, 45);
    s.stdin = true;
    let mut exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let mut seen = Vec::new();
    input
        .write_stdin("stty size; tty; echo first-$((1+1))\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "first-2", common::exec::T).await;
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(
        text.contains("45 123") && text.contains("/dev/pts/"),
        "{text:?}"
    );
    input
        .write_stdin("trap 'echo winch-$((6*7))' WINCH; echo trap-$((2+3))\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "trap-5", common::exec::T).await;
    seen.clear();
    input.resize(100, 30).await.unwrap();
    input
        .write_stdin("stty size; echo second-$((1+2))\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "second-3", common::exec::T).await;
    assert!(
        String::from_utf8_lossy(&seen).contains("30 100"),
        "{seen:?}"
    );
    input.write_stdin("exit 4\n".into()).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.status, 4, "{out:?}");

    // ^C on the terminal interrupts the foreground job, where the runtime's terminal
    // turns VINTR into SIGINT.
    let mut s = spec(&["/bin/sh"]);
    s.tty = exec_tty(80, 24);
    s.stdin = true;
    let mut exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    seen.clear();
    input
        .write_stdin("echo sleeping-$((5+5)); sleep 1000\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "sleeping-10", common::exec::T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    input.write_stdin("\x03".into()).await.unwrap();
    input
        .write_stdin("echo interrupted-$((4+5))\n".into())
        .await
        .unwrap();
    if !read_for(
        &mut exec,
        &mut seen,
        "interrupted-9",
        Duration::from_secs(5),
    )
    .await
    {
        eprintln!(
            "gVisor feature missing: its PTY line discipline does not turn ^C (VINTR) into \
             SIGINT for the foreground group (read {:?})",
            String::from_utf8_lossy(&seen)
        );
    }
}

/// Reads `exec` into `seen` until `needle` shows (true) or `within` passes (false).
async fn read_for(
    exec: &mut sandbox_supervisor::gateway::Exec,
    seen: &mut Vec<u8>,
    needle: &str,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !String::from_utf8_lossy(seen).contains(needle) {
        match tokio::time::timeout_at(deadline, exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) | Ok(Some(ExecEvent::Stderr(b))) => {
                seen.extend_from_slice(&b)
            }
            _ => return false,
        }
    }
    true
}

/// After a resize the shell gets SIGWINCH. gVisor's PTY does not send it, and its PTY
/// master answers no TIOCGPGRP (ENOTTY): the supervisor sends it to the session's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_resize_signals_the_shell() {
    require_gvisor!();
    let env = env("gv-winch").await;
    let g = Gvisor::new("winch");
    let (_sup, sandbox) = g.bound(&env, Fs::Host, &[]).await;
    let mut s = spec(&["/bin/sh"]);
    s.tty = exec_tty(80, 24);
    s.stdin = true;
    let mut exec = sandbox.exec(s).await.unwrap();
    let input = exec.input();
    let mut seen = Vec::new();
    input
        .write_stdin("trap 'echo winch-$((6*7))' WINCH; echo trap-$((2+3))\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "trap-5", common::exec::T).await;
    input.resize(100, 30).await.unwrap();
    input
        .write_stdin("echo resized-$((1+2))\n".into())
        .await
        .unwrap();
    common::exec::read_until(&mut exec, &mut seen, "winch-42", common::exec::T).await;
}

fn exec_tty(cols: u32, rows: u32) -> Option<sandbox_supervisor::proto::Tty> {
    common::exec::tty(cols, rows)
}

/// Counts zombies in the sandbox, from gVisor's own /proc (the session's shell excepted).
const COUNT_ZOMBIES: &str = r#"z=0; for f in /proc/[0-9]*/stat; do read -r l < "$f" 2>/dev/null || continue; s=${l##*) }; case "$s" in Z*) z=$((z+1));; esac; done; echo zombies=$z"#;

/// 200 orphans are reaped by PID 1; a session killed by a signal reports it; signals from
/// inside at PID 1 are ignored; SIGTERM from outside (forwarded by runsc to PID 1)
/// releases and exits 0 within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_orphans_reaped_signals_and_outside_sigterm() {
    require_gvisor!();
    let env = root_env("gv-sig").await;
    let g = Gvisor::new("sig");
    let (mut sup, sandbox) = g.bound(&env, Fs::Host, ROOT_SESSIONS).await;

    let out = ok(
        &sandbox,
        sh("i=0; while [ $i -lt 200 ]; do ( sleep 0.2 & ) ; i=$((i+1)); done; echo forked"),
    )
    .await;
    assert_eq!(out.stdout, b"forked\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(&sandbox, sh(COUNT_ZOMBIES)).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text == "zombies=0\n" {
            break;
        }
        assert!(Instant::now() < deadline, "orphans not reaped: {text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let exec = sandbox.exec(spec(&["sleep", "100"])).await.unwrap();
    exec.signal(libc::SIGKILL).await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(out.exit.how, Some(How::Signal(libc::SIGKILL)));
    assert_eq!(out.exit.status, 128 + libc::SIGKILL);

    let out = ok(&sandbox, sh("kill -TERM 1 && kill -INT 1 && echo sent")).await;
    assert_eq!(out.stdout, b"sent\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = ok(&sandbox, spec(&["echo", "alive"])).await;
    assert_eq!(out.stdout, b"alive\n", "{}", sup.logs());
    assert!(sup.has_event("signal.ignored"), "{}", sup.logs());

    let mut running = sandbox.exec(spec(&["sleep", "1000"])).await.unwrap();
    let started = Instant::now();
    g.signal(&sup, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        sup.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        sup.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "release took {:?}",
        started.elapsed()
    );
    assert!(
        sup.has_event("release.killed") && sup.has_event("wipe.completed"),
        "{}",
        sup.logs()
    );
    // The running session ended with the release.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), running.next()).await {
        if matches!(ev, ExecEvent::Exited(_)) {
            break;
        }
    }
}

/// The hostile workspace on gVisor's view of a host volume (9p, no openat2, no mount ids):
/// symlinks and hardlinks to outside files, FIFOs, a socket, mode-000 directories, odd
/// names, a deep tree, and bind mounts made inside the sandbox — a directory of the same
/// file system (same `st_dev`: only the mount table tells) and a file. All tenant files
/// go, the mounts are skipped and reported, nothing outside changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_hostile_workspace_and_same_filesystem_bind_mount_are_wiped_safely() {
    require_gvisor!();
    let env = root_env("gv-wipe").await;
    plant_outside(&env);
    let g = Gvisor::new("wipe");
    let (mut sup, sandbox) = g.bound(&env, Fs::Host, ROOT_SESSIONS).await;
    let d = env.dir.0.display().to_string();
    let vol = env.volume().display().to_string();
    let out = ok(
        &sandbox,
        sh(&format!(
            r#"set -e
ln -s / to_root
ln -s {d}/outside to_sibling
ln -s {vol}/.supervisor to_records
ln -s ../../.. up_up
mkdir -p dirs/a
ln -s / dirs/a/root
ln {d}/outside/shared.txt hard_shared
ln {d}/outside/secret.txt hard_secret
mkfifo fifo dirs/fifo
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")' || echo no-socket
mkdir -p locked/a/b
echo hidden > locked/a/b/f
chmod 000 locked/a/b locked/a locked
touch "$(printf 'new\nline')" "$(printf 'bad\377\376utf8')"
p=deep; i=0; while [ $i -lt 60 ]; do p=$p/d; i=$((i+1)); done; mkdir -p $p; echo x > $p/f
mkdir mnt; mount --bind {d}/outside/bindsrc mnt
touch fmnt; mount --bind {d}/outside/secret.txt fmnt
grep -c " $PWD/f\?mnt " /proc/self/mountinfo
echo planted
"#
        )),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("2\nplanted\n"), "{text}");
    let outside = snapshot(&outside_roots(&env));
    let report = sup
        .release_via(
            &sandbox,
            "hostile",
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await;
    assert_unchanged(&outside, &snapshot(&outside_roots(&env)), "gVisor wipe");
    assert!(report.error.is_empty(), "{report:?}\n{}", sup.logs());
    let mut skipped = report.skipped_mounts.clone();
    skipped.sort();
    assert_eq!(skipped, ["fmnt", "mnt"], "{report:?}");
    assert!(report.files_removed >= 14, "{report:?}");
    // The mounts lived in the sandbox; on the host only their empty mount points remain.
    let mut left = workspace_left(&env);
    left.sort();
    assert_eq!(left, ["fmnt", "mnt"]);
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    restart_refuses(&g, &env);
}

/// The volume on gVisor's overlay (the default of `runsc do`): directories report the
/// overlay's device, files their layer's. Every planted file is removed and none is
/// taken for a mount point; the report is what the host can check (the overlay's upper
/// layer is the sandbox's memory and goes with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_workspace_on_the_overlay_is_wiped() {
    require_gvisor!();
    let env = env("gv-ovl").await;
    let g = Gvisor::new("ovl");
    let (mut sup, sandbox) = g.bound(&env, Fs::Overlay, &[]).await;
    let out = ok(
        &sandbox,
        sh(r#"set -e
python3 - <<'EOF'
import os
d, f = os.lstat("."), os.lstat("README.md")
print("split" if d.st_dev != f.st_dev else "same")
for i in range(20):
    os.makedirs(f"t/{i % 4}/x", exist_ok=True)
    open(f"t/{i % 4}/x/f{i}", "w").write("x" * i)
os.symlink("/etc/passwd", "link")
EOF
mkfifo fifo
echo planted"#),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("planted\n"), "{text}");
    if !text.starts_with("split") {
        eprintln!("note: this gVisor's overlay gives files the directory's device");
    }
    let report = sup
        .release_via(
            &sandbox,
            "overlay",
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await;
    assert!(report.error.is_empty(), "{report:?}\n{}", sup.logs());
    assert!(report.skipped_mounts.is_empty(), "{report:?}");
    // 20 files, a link, a FIFO, and the 2 seeded files.
    assert_eq!(report.files_removed, 24, "{report:?}");
    assert!(sup.has_event("wipe.completed"), "{}", sup.logs());
}

/// Sessions as the (non-root) sandbox user. The supervisor checks a session's working
/// directory and program as that user by switching the thread's fsuid; this gVisor has
/// no setfsuid/setfsgid (ENOSYS), so it checks them as root and says so (it aborted
/// every session before, restoring credentials it had never changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_user_sessions_without_setfsuid() {
    require_gvisor!();
    let env = Env::new("gv-user").await;
    let g = Gvisor::new("user");
    let (sup, sandbox) = g.bound(&env, Fs::Host, &[]).await;
    let out = sandbox
        .exec(spec(&["id", "-un"]))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.logs()))
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"nobody\n", "{}", sup.logs());
    assert!(
        sup.has_event("exec.user_view_unavailable"),
        "{}",
        sup.logs()
    );
}
