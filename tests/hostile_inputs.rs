//! A hostile tenant and a faulty environment (issue 11, items 7–9): a sandbox user that is
//! root, files from the environment that are FIFOs or devices, a seed URL that never
//! answers, paths the sandbox user may not see, credentials in the gateway URL. Each
//! drives the real binary and is bounded in time.

mod common;

use common::identity::{events_named, wait_event};
use common::workspace::event;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sandbox_supervisor::gateway::ExecError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const EXIT: Duration = Duration::from_secs(15);

/// Spawns with `args` edited: flags in `drop` removed (with their value), `add` appended.
fn spawn_edited(env: &Env, launch: Launch, drop: &[&str], add: &[&str]) -> Supervisor {
    let mut args = env.run_args();
    for flag in drop {
        if let Some(at) = args.iter().position(|a| a == flag) {
            args.drain(at..at + 2);
        }
    }
    args.extend(add.iter().map(|s| s.to_string()));
    env.spawn_args(launch, args)
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// Every log line's text (message and fields) joined, for "never shown" checks.
fn all_text(sup: &Supervisor) -> String {
    sup.logs()
}

/// The error text of the first `config.invalid` line.
fn config_error(sup: &Supervisor) -> String {
    let e =
        event(sup, "config.invalid").unwrap_or_else(|| panic!("no config.invalid\n{}", sup.logs()));
    format!(
        "{} {}",
        e["msg"].as_str().unwrap_or_default(),
        e["error"].as_str().unwrap_or_default()
    )
}

/// Item 7: `--sandbox-user` resolving to uid 0 or gid 0 is refused at boot (exit 64,
/// naming --allow-root-sessions) unless root sessions are allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_sandbox_user_is_refused_at_boot_unless_root_sessions_are_allowed() {
    let env = Env::new("hostile-root").await;
    let passwd = env.dir.0.join("passwd");
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\nwheel0:x:4242:0:gid zero:/home/w:/bin/sh\n",
    )
    .unwrap();
    let p = passwd.display().to_string();
    for user in ["root", "0", "wheel0"] {
        let mut sup = spawn_edited(
            &env,
            Launch::Subreaper,
            &["--sandbox-user"],
            &["--sandbox-user", user, "--passwd", &p],
        );
        let code = sup.wait_exit(EXIT);
        assert_eq!(code, Some(64), "--sandbox-user {user}\n{}", sup.logs());
        let msg = config_error(&sup);
        assert!(
            msg.contains("--allow-root-sessions") && msg.contains(user),
            "--sandbox-user {user}: {msg}"
        );
        assert!(!sup.has_event("identity.parked"), "{}", sup.logs());
    }
    // Allowed explicitly, the same user parks (only when we can switch users at all).
    if is_root() {
        let sup = spawn_edited(
            &env,
            Launch::Subreaper,
            &["--sandbox-user"],
            &[
                "--sandbox-user",
                "root",
                "--passwd",
                &p,
                "--allow-root-sessions",
            ],
        );
        let parked = env
            .gateway
            .wait_parked(&env.pod.pod_name, Duration::from_secs(30))
            .await;
        assert!(parked.is_ok(), "{}", sup.logs());
    }
}

/// Item 8: a FIFO or a device where the environment should hold a regular file (token,
/// gateway CA, client cert/key, seed CA, passwd, seed archive): the supervisor exits at
/// boot (64) within seconds, naming the option, the path and what it found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_and_devices_in_place_of_environment_files_fail_fast_naming_the_file() {
    let env = Env::new("hostile-fifo").await;
    let fifo = env.dir.0.join("a-fifo");
    mkfifo(&fifo);
    let zero = env.dir.0.join("zero-link");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let (f, z) = (fifo.display().to_string(), zero.display().to_string());
    let ca = env.ca.clone().unwrap().display().to_string();
    let cases: Vec<(&str, Vec<&str>, Vec<String>, &str)> = vec![
        (
            "token-path",
            vec!["--token-path"],
            vec!["--token-path".into(), f.clone()],
            "FIFO",
        ),
        (
            "gateway-ca",
            vec!["--gateway-ca"],
            vec!["--gateway-ca".into(), f.clone()],
            "FIFO",
        ),
        (
            "client-cert",
            vec![],
            vec![
                "--client-cert".into(),
                f.clone(),
                "--client-key".into(),
                ca.clone(),
            ],
            "FIFO",
        ),
        ("passwd", vec![], vec!["--passwd".into(), f.clone()], "FIFO"),
        (
            "seed-archive",
            vec!["--seed-dir"],
            vec!["--seed-archive".into(), f.clone()],
            "FIFO",
        ),
        (
            "seed-archive",
            vec!["--seed-dir"],
            vec!["--seed-archive".into(), z.clone()],
            "character device",
        ),
        (
            "seed-ca",
            vec!["--seed-dir"],
            vec![
                "--seed-url".into(),
                "https://127.0.0.1:1/seed.tar".into(),
                "--seed-sha256".into(),
                "0".repeat(64),
                "--seed-ca".into(),
                f.clone(),
            ],
            "FIFO",
        ),
    ];
    for (option, drop, add, kind) in cases {
        let add: Vec<&str> = add.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut sup = spawn_edited(&env, Launch::Subreaper, &drop, &add);
        let code = sup.wait_exit(EXIT);
        assert_eq!(code, Some(64), "--{option} ({kind})\n{}", sup.logs());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "--{option}: too slow"
        );
        let msg = config_error(&sup);
        assert!(
            msg.contains(&format!("--{option}")) && msg.contains(kind),
            "--{option}: {msg}"
        );
        assert!(msg.contains("a-fifo") || msg.contains("zero-link"), "{msg}");
    }
}

/// Item 8: the annotations file is optional (the gateway's push activates without it):
/// a FIFO or `/dev/zero` there is logged as unusable, the supervisor still parks, and a
/// SIGTERM ends it promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotations_fifo_or_dev_zero_is_reported_and_sigterm_still_works() {
    for kind in ["fifo", "zero"] {
        let env = Env::new(&format!("hostile-ann-{kind}")).await;
        let ann = env.dir.0.join("podinfo/annotations");
        match kind {
            "fifo" => mkfifo(&ann),
            _ => std::os::unix::fs::symlink("/dev/zero", &ann).unwrap(),
        }
        let mut sup = env.spawn(launch(), &[]);
        let parked = env
            .gateway
            .wait_parked(&env.pod.pod_name, Duration::from_secs(20))
            .await;
        assert!(parked.is_ok(), "{kind}: not parked\n{}", sup.logs());
        let unusable = wait_event(&sup, Duration::from_secs(10), |e| {
            e["event"] == "identity.hint_unusable"
        })
        .await
        .unwrap_or_else(|| panic!("{kind}: no identity.hint_unusable\n{}", sup.logs()));
        let msg = unusable["error"].as_str().unwrap_or_default();
        assert!(msg.contains("annotations"), "{msg}");
        let sent = Instant::now();
        kill(Pid::from_raw(sup.host_pid() as i32), Signal::SIGTERM).unwrap();
        let code = sup.wait_exit(Duration::from_secs(8));
        assert_eq!(
            code,
            Some(0),
            "{kind}: SIGTERM not honoured\n{}",
            sup.logs()
        );
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "{kind}: {:?}",
            sent.elapsed()
        );
    }
}

/// A TCP server on loopback that accepts and never answers; connections are held
/// until the returned guard is dropped.
struct Stall {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stall {
    fn start() -> Stall {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut held = vec![];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((c, _)) = l.accept() {
                    held.push(c);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Stall { port, stop }
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn seed_url_args(port: u16) -> Vec<String> {
    vec![
        "--seed-url".into(),
        format!("http://seeduser:seedpass@127.0.0.1:{port}/seed.tar?sig=seedquery"),
        "--seed-sha256".into(),
        "ab".repeat(32),
    ]
}

/// Item 8: SIGTERM while a seed download stalls (a server that accepts and never
/// answers) ends the supervisor within the grace: exit 0, no tenant ever ran, the
/// half-finished staging directory is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stalled_seed_download_exits_within_the_grace() {
    require!(can_unshare(), "needs root and unshare (PID namespace)");
    let env = Env::new("hostile-stall").await;
    let stall = Stall::start();
    let add = seed_url_args(stall.port);
    let add: Vec<&str> = add.iter().map(String::as_str).collect();
    let mut sup = spawn_edited(&env, Launch::Pid1, &["--seed-dir"], &add);
    wait_event(&sup, Duration::from_secs(10), |e| {
        e["event"] == "seed.started"
    })
    .await
    .unwrap_or_else(|| panic!("seeding did not start\n{}", sup.logs()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    kill(Pid::from_raw(sup.host_pid() as i32), Signal::SIGTERM).unwrap();
    // --release-grace is 2s in the harness.
    let code = sup.wait_exit(Duration::from_secs(6));
    let took = sent.elapsed();
    assert_eq!(
        code,
        Some(0),
        "SIGTERM during seeding not honoured\n{}",
        sup.logs()
    );
    assert!(took < Duration::from_secs(3), "{took:?}\n{}", sup.logs());
    assert!(!sup.has_event("identity.parked"));
    let staging: Vec<_> = std::fs::read_dir(env.volume().join(".supervisor"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("staging-"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
    assert!(!env.volume().join(".supervisor/seed.json").exists());
    let text = all_text(&sup);
    assert!(
        !text.contains("seedpass") && !text.contains("seedquery"),
        "{text}"
    );
    drop(stall);
}

/// Item 8: a seed server that never answers fails the seed once the idle timeout
/// passes, naming the (redacted) URL and the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_seed_download_times_out_naming_the_url_and_the_timeout() {
    let env = Env::new("hostile-idle").await;
    let stall = Stall::start();
    let mut add = seed_url_args(stall.port);
    add.extend(["--seed-idle-timeout".into(), "1s".into()]);
    let add: Vec<&str> = add.iter().map(String::as_str).collect();
    let mut sup = spawn_edited(&env, Launch::Subreaper, &["--seed-dir"], &add);
    let code = sup.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(70), "{}", sup.logs());
    let failed = event(&sup, "seed.failed").unwrap_or_else(|| panic!("{}", sup.logs()));
    let msg = failed["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("127.0.0.1:{}/seed.tar", stall.port))
            && msg.contains("--seed-idle-timeout")
            && msg.contains("1s"),
        "{msg}"
    );
    let text = all_text(&sup);
    assert!(
        !text.contains("seedpass") && !text.contains("seedquery"),
        "{text}"
    );
}

/// Item 9: credentials in the gateway URL never reach the logs, neither in the
/// plaintext warning nor in a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_gateway_url_are_never_logged() {
    let env = Env::new("hostile-gwcreds").await;
    for gateway in [
        "http://gwuser:gwsecret@127.0.0.1:1",
        "ftp://gwuser:gwsecret@127.0.0.1:1",
        "https://gwuser:gwsecret@127.0.0.1:1",
    ] {
        let mut sup = spawn_edited(
            &env,
            Launch::Subreaper,
            &["--gateway"],
            &["--gateway", gateway, "--allow-plaintext"],
        );
        if sup.wait_exit(Duration::from_secs(3)).is_none() {
            sup.kill();
        }
        let text = all_text(&sup);
        assert!(!text.is_empty(), "{gateway}: no logs");
        assert!(!text.contains("gwsecret"), "{gateway}:\n{text}");
    }
}

/// A directory only root may enter, holding a directory and an executable.
fn private_tree(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let private = env.dir.0.join("private");
    std::fs::create_dir_all(private.join("sub")).unwrap();
    std::fs::write(private.join("tool"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(private.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    private
}

/// Item 9: the errors for a working directory or program the sandbox user cannot see do
/// not tell whether it exists: the existing and the missing path give the same code and
/// the same message (but for the name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_the_sandbox_user_cannot_see_do_not_reveal_whether_they_exist() {
    require!(
        is_root(),
        "without root sessions run as the supervisor's own user"
    );
    let env = Env::new("hostile-paths").await;
    let private = private_tree(&env);
    let (_sup, sandbox) = env.bound(launch()).await;
    let p = private.display().to_string();
    let same = |a: ExecError, b: ExecError, an: &str, bn: &str, what: &str| {
        assert_eq!(a.code, b.code, "{what}: {a} / {b}");
        assert_eq!(
            a.message.replace(an, "X"),
            b.message.replace(bn, "X"),
            "{what}"
        );
    };
    // Working directory.
    let mut s = spec(&["/bin/true"]);
    s.cwd = format!("{p}/sub");
    let exists = sandbox.exec(s.clone()).await.unwrap_err();
    s.cwd = format!("{p}/none");
    let missing = sandbox.exec(s).await.unwrap_err();
    same(exists, missing, "sub", "none", "cwd");
    // Program by path.
    let exists = sandbox
        .exec(spec(&[&format!("{p}/tool")]))
        .await
        .unwrap_err();
    let missing = sandbox
        .exec(spec(&[&format!("{p}/nothere")]))
        .await
        .unwrap_err();
    same(exists, missing, "tool", "nothere", "program path");
    // Program on PATH.
    let mut s = spec(&["tool"]);
    s.env.insert("PATH".into(), p.clone());
    let exists = sandbox.exec(s).await.unwrap_err();
    let mut s = spec(&["nothere"]);
    s.env.insert("PATH".into(), p.clone());
    let missing = sandbox.exec(s).await.unwrap_err();
    same(exists, missing, "tool", "nothere", "program on PATH");
}

/// Protocol contract: the seed record names the pod that wrote it when the pod UID is
/// known, so a record for another pod can be told apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_record_names_the_pod_uid() {
    let env = Env::new("hostile-seedpod").await;
    let sup = env.spawn(Launch::Subreaper, &[]);
    let parked = env
        .gateway
        .wait_parked(&env.pod.pod_name, Duration::from_secs(30))
        .await;
    assert!(parked.is_ok(), "{}", sup.logs());
    let raw = std::fs::read(env.volume().join(".supervisor/seed.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        v["record"]["pod_uid"].as_str(),
        Some(env.pod.pod_uid.as_str()),
        "{v}"
    );
    let _ = events_named(&sup, "seed.completed");
}
