//! Every error a gateway can provoke, end to end (issue 5): the real binary, the real
//! gRPC relay over TLS, the reference gateway. Refused opens, refused frames, unknown
//! session ids and the session cap each get a precise answer, and everything else keeps
//! running.

mod common;

use common::exec::*;
use common::workspace::ok;
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

/// Open fds of `pid`, or `None` when /proc does not let us look (not root: the
/// supervisor is non-dumpable).
fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Waits until no zombie is left under `root`: the reaper collected every exit.
async fn wait_no_zombies(root: u32, timeout: Duration) -> Vec<(u32, char)> {
    let deadline = Instant::now() + timeout;
    loop {
        let zombies: Vec<_> = descendants(root)
            .into_iter()
            .filter(|&(_, st)| st == 'Z')
            .collect();
        if zombies.is_empty() || Instant::now() > deadline {
            return zombies;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A file with the exec bit but neither `#!` nor an ELF header: spec resolution lets it
/// through (it checks the mode only), `execve` in the child fails with ENOEXEC and the
/// gateway gets FAILED_PRECONDITION naming the program. (std's `Command`, used before
/// the clone-based start, went through glibc's `execvp`, which hands such a file to
/// /bin/sh: this open "succeeded" with a shell's exit status.) The failed child leaves
/// no zombie, repeated failures leave no fd behind in the supervisor, and the next
/// session works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_format_error_is_failed_precondition_naming_the_program() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("enoexec").await;
    let (sup, sandbox) = env.bound(launch()).await;
    let root = sup.host_pid();
    let prog = env.volume().join("workspace/not-a-program");
    std::fs::write(&prog, b"neither a script nor ELF\n\x00\x01\x02\x03\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();

    let e = sandbox.exec(spec(&["./not-a-program"])).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e}");
    assert!(
        e.message.contains("'./not-a-program'")
            && e.message.contains("Exec format error")
            && e.message.contains("no '#!' line"),
        "{e}"
    );
    ok(&sandbox, spec(&["/bin/true"])).await;

    // The same failure again and again: each one closes every fd it opened (the
    // child's three, the parent's two) and its child is reaped.
    let before = fd_count(root);
    for _ in 0..20 {
        let e = sandbox.exec(spec(&["./not-a-program"])).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e}");
    }
    let after = fd_count(root);
    match (before, after) {
        (Some(before), Some(after)) => assert!(
            after < before + 10,
            "the supervisor's fds grew from {before} to {after} over 20 failed spawns"
        ),
        _ => eprintln!("fd count not checked: /proc/{root}/fd is not readable"),
    }
    let zombies = wait_no_zombies(root, T).await;
    assert!(
        zombies.is_empty(),
        "zombies left: {zombies:?}\n{}",
        sup.logs()
    );
    let out = sandbox
        .exec(spec(&["echo", "next"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"next\n");
}

/// A working directory the sandbox user cannot enter: spec resolution checks it as
/// root and passes it, and the child's `chdir`, made after the switch to the sandbox
/// user, fails. PERMISSION_DENIED, the message naming the step and the directory; the
/// same directory works once the user may enter it, and so does the next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwd_the_sandbox_user_cannot_enter_fails_in_the_child_as_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    require!(
        is_root(),
        "without root sessions run as the supervisor's user, who can enter its own dirs"
    );
    let env = Env::new("cwd-denied").await;
    let (_sup, sandbox) = env.bound(launch()).await;
    let user = nix::unistd::User::from_name(&env.sandbox_user)
        .unwrap()
        .expect("the sandbox user exists");
    assert_ne!(user.uid.as_raw(), 0);
    let dir = env.volume().join("workspace/private");
    std::fs::create_dir(&dir).unwrap();
    let mode = |m| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
    let mut s = sh("pwd; id -u");
    s.cwd = "private".into();

    // Root's directory, open to others: the session runs there as the sandbox user.
    mode(0o755);
    let out = sandbox
        .exec(s.clone())
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n{}\n", dir.display(), user.uid),
        "{out:?}"
    );

    // 0700: only root may enter.
    mode(0o700);
    let e = sandbox.exec(s.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    assert!(
        e.message
            .contains("starting '/bin/sh' failed: entering the working directory")
            && e.message.contains(&format!("'{}'", dir.display()))
            && e.message.contains("Permission denied"),
        "{e}"
    );
    ok(&sandbox, spec(&["/bin/true"])).await;
    mode(0o755);
    let out = sandbox.exec(s).await.unwrap().collect().await.unwrap();
    assert_eq!(out.exit.status, 0, "{out:?}");
}

/// `/proc/<pid>/status` of a process as (name, value) lines.
fn proc_status(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn field<'a>(status: &'a [(String, String)], name: &str) -> &'a str {
    status
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {status:?}"))
}

fn hex_field(status: &[(String, String)], name: &str) -> u64 {
    u64::from_str_radix(field(status, name), 16).unwrap()
}

fn numbers(s: &str) -> Vec<u32> {
    s.split_whitespace().map(|x| x.parse().unwrap()).collect()
}

/// The supervisor's direct child whose command line is exactly `argv`.
async fn leader(root: u32, argv: &[&str]) -> u32 {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let deadline = Instant::now() + T;
    loop {
        let found = processes().into_iter().find(|&(pid, ppid, _)| {
            ppid == root && std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(want.clone())
        });
        if let Some((pid, _, _)) = found {
            return pid;
        }
        assert!(Instant::now() < deadline, "no child {argv:?} of {root}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An fd the supervisor inherits without close-on-exec, as from a runtime that leaks one.
const INHERITED_FD: i32 = 9;

/// `env.spawn(launch(), &[])`, but the supervisor starts holding /dev/null as
/// [`INHERITED_FD`] without close-on-exec: only the child's `close_range` keeps it from
/// the sessions (every fd the supervisor opens itself is close-on-exec anyway).
fn spawn_with_open_fd(env: &Env) -> Supervisor {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let launch = launch();
    let log = env.dir.0.join("supervisor-inherited-fd.log");
    let mut cmd = match launch {
        Launch::Pid1 => {
            let mut c = std::process::Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child", BIN]);
            c
        }
        Launch::Subreaper => std::process::Command::new(BIN),
    };
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_raw_fd();
    cmd.args(env.run_args())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: dup2/fcntl only, between fork and exec. When the test's own /dev/null
    // already sits on INHERITED_FD (other tests run in parallel threads and move fd
    // numbers), dup2 onto itself would leave its FD_CLOEXEC set and exec would close it,
    // so the flag is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let done = if fd == INHERITED_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, INHERITED_FD)
            };
            match done {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        });
    }
    let child = cmd.spawn().expect("spawn supervisor");
    drop(null);
    Supervisor {
        child: Some(child),
        log,
        launch,
    }
}

/// The state the child sets up before `execve`, seen on session leaders that are the
/// exec'd program itself (no shell in between to change it), for each kind of stdio:
/// stdin from /dev/null, stdin on a pipe, a terminal. Only fds 0-2 (the supervisor holds
/// sockets, a signalfd, its log..., and one fd without close-on-exec), no blocked or ignored signal (the supervisor blocks
/// the signals it reads from its signalfd, ignores SIGPIPE, and blocks everything while
/// it clones; started through glibc's posix_spawn, as here, it also ignores signal 32,
/// which glibc's `signal()` cannot reset), no_new_privs, a session and process group of its own (and on a terminal,
/// that terminal as its controlling tty with the leader in the foreground), the sandbox
/// uid and gid with exactly one supplementary group, the session's marker, and the
/// clean environment only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_leaders_start_with_stdio_only_clean_signals_and_the_sandbox_identity() {
    require!(
        is_root(),
        "the identity switch and the marker group need root"
    );
    let env = Env::new("child-state").await;
    let (sup, sandbox) = env.claim_when_parked(spawn_with_open_fd(&env)).await;
    let root = sup.host_pid();
    let user = nix::unistd::User::from_name(&env.sandbox_user)
        .unwrap()
        .expect("the sandbox user exists");
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    assert_ne!(uid, 0);

    // What a child must not keep is there to be kept: otherwise the checks below
    // would pass whatever the child did.
    let own = proc_status(root);
    assert_ne!(hex_field(&own, "SigBlk"), 0, "{own:?}");
    assert_ne!(
        hex_field(&own, "SigIgn") & (1 << (libc::SIGPIPE - 1)),
        0,
        "{own:?}"
    );
    assert_eq!(field(&own, "NoNewPrivs"), "0", "{own:?}");
    assert_eq!(numbers(field(&own, "Uid")), [0; 4], "{own:?}");
    assert!(fd_count(root).unwrap() > 5, "the supervisor's fds");
    let inherited = std::fs::read_to_string(format!("/proc/{root}/fdinfo/{INHERITED_FD}"))
        .expect("the supervisor holds the fd it inherited");
    let flags = inherited
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_eq!(flags & libc::O_CLOEXEC as u32, 0, "{inherited}");

    let mut null_stdin = spec(&["sleep", "1001"]);
    null_stdin.stdin = false;
    let mut pipe_stdin = spec(&["sleep", "1002"]);
    pipe_stdin.stdin = true;
    let mut terminal = spec(&["sleep", "1003"]);
    terminal.tty = tty(80, 24);
    let mut execs = Vec::new();
    for (s, kind) in [
        (null_stdin, "null"),
        (pipe_stdin, "pipe"),
        (terminal, "tty"),
    ] {
        let argv = s.argv.clone();
        execs.push(sandbox.exec(s).await.unwrap());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let pid = leader(root, &argv).await;
        let what = format!("{kind} leader {pid} {argv:?}");

        let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let target = std::fs::read_link(e.path()).unwrap();
                (
                    e.file_name().to_str().unwrap().parse().unwrap(),
                    target.display().to_string(),
                )
            })
            .collect();
        fds.sort();
        let numbers_open: Vec<u32> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers_open, [0, 1, 2], "{what}: {fds:?}");
        let t: Vec<&str> = fds.iter().map(|(_, t)| t.as_str()).collect();
        match kind {
            "null" => {
                assert_eq!(t[0], "/dev/null", "{what}: {fds:?}");
                assert!(
                    t[1].starts_with("pipe:") && t[2].starts_with("pipe:"),
                    "{what}: {fds:?}"
                );
                assert_ne!(t[1], t[2], "{what}: {fds:?}");
            }
            "pipe" => {
                assert!(t.iter().all(|t| t.starts_with("pipe:")), "{what}: {fds:?}");
                assert!(
                    t[0] != t[1] && t[1] != t[2] && t[0] != t[2],
                    "{what}: {fds:?}"
                );
            }
            _ => {
                assert!(t[0].starts_with("/dev/pts/"), "{what}: {fds:?}");
                assert!(t[0] == t[1] && t[1] == t[2], "{what}: {fds:?}");
            }
        }

        let st = proc_status(pid);
        assert_eq!(hex_field(&st, "SigBlk"), 0, "{what}: {st:?}");
        assert_eq!(hex_field(&st, "SigIgn"), 0, "{what}: {st:?}");
        assert_eq!(field(&st, "NoNewPrivs"), "1", "{what}: {st:?}");
        assert_eq!(numbers(field(&st, "Uid")), [uid; 4], "{what}: {st:?}");
        assert_eq!(numbers(field(&st, "Gid")), [gid; 4], "{what}: {st:?}");
        let groups = numbers(field(&st, "Groups"));
        assert!(
            groups.len() == 1 && groups[0] >= 2_000_000_000,
            "{what}: exactly the marker group: {st:?}"
        );

        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<i64> = stat[stat.rfind(')').unwrap() + 4..]
            .split(' ')
            .take(5)
            .map(|x| x.parse().unwrap())
            .collect();
        // ppid pgrp session tty_nr tpgid
        let (pgrp, session, tty_nr, tpgid) = (f[1], f[2], f[3], f[4]);
        assert_eq!((pgrp, session), (pid as i64, pid as i64), "{what}: {stat}");
        if kind == "tty" {
            assert!(tty_nr != 0 && tpgid == pid as i64, "{what}: {stat}");
        } else {
            assert_eq!(tty_nr, 0, "{what}: no controlling tty: {stat}");
        }

        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let mut names: Vec<String> = environ
            .split(|&b| b == 0)
            .filter(|kv| !kv.is_empty())
            .map(|kv| String::from_utf8_lossy(kv).into_owned())
            .collect();
        let path = names
            .iter()
            .find_map(|kv| kv.strip_prefix("PATH="))
            .map(str::to_string);
        assert_eq!(
            path.as_deref(),
            Some(sandbox_supervisor::exec::spec::DEFAULT_PATH),
            "{what}: {names:?}"
        );
        for kv in &mut names {
            kv.truncate(kv.find('=').unwrap());
        }
        names.sort();
        let mut want = vec!["HOME", "LOGNAME", "PATH", "PWD", "SHELL", "USER"];
        if kind == "tty" {
            want.push("TERM");
        }
        want.sort();
        assert_eq!(names, want, "{what}");
    }
    for exec in execs {
        exec.signal(libc::SIGKILL).await.unwrap();
        let out = exec.collect().await.unwrap();
        assert_eq!(out.exit.how, Some(How::Signal(libc::SIGKILL)), "{out:?}");
    }
}
