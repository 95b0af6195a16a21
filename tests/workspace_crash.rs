//! Crash points of the workspace lifecycle, end to end (issue 3): the real binary as
//! PID 1 of a new PID + mount namespace is killed with its whole namespace and restarted
//! on the same volume, after binding, after the `released` tombstone and mid-wipe; and
//! tampered records make every restart refuse with the right reason.
//!
//! Scale: `SSV_WIPE_FILES` small files (default 10,000) in the mid-wipe test.

mod common;

use common::workspace::*;
use common::*;
use sandbox_supervisor::gateway::ClaimOptions;
use sandbox_supervisor::workspace::{Owner, TombstonePhase, Volume, VolumeConfig};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

/// Crash after `binding`: the restarted supervisor resumes exactly that claim (same
/// claim_uid, binding record untouched, not re-seeded, the tenant's files still there) and
/// the pod cannot be claimed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_binding_resumes_only_that_claim() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-crash-bound").await;
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    ok(&sandbox, sh("echo mine > tenant.txt")).await;
    let binding = records(&env)["binding.json"].clone();
    crash(&mut sup);

    let mut sup2 = env.spawn(Launch::Pid1, &[]);
    wait_event(&sup2, Duration::from_secs(30), |e| {
        e["event"] == "identity.relay_accepted"
    })
    .await;
    let activation = event(&sup2, "identity.activation").unwrap();
    assert_eq!(activation["claim_uid"], sandbox.claim_uid(), "{activation}");
    assert_eq!(event(&sup2, "identity.bound").unwrap()["resumed"], true);
    assert!(sup2.has_event("seed.skipped"), "{}", sup2.logs());
    assert_eq!(records(&env)["binding.json"], binding, "binding rewritten");
    assert!(env
        .gateway
        .claim(&env.pod.pod_name, ClaimOptions::default())
        .await
        .is_err());

    // Sessions work again on the resumed relay, on the same files.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        match sandbox.exec(spec(&["cat", "tenant.txt"])).await {
            Ok(e) => break e.collect().await.unwrap(),
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying exec: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}\n{}", sup2.logs()),
        }
    };
    assert_eq!(out.stdout, b"mine\n");
    let report = sandbox
        .release(
            "after resume",
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
        .expect("report");
    assert!(report.error.is_empty(), "{report:?}");
    assert_eq!(
        sup2.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        sup2.logs()
    );
    assert_eq!(workspace_left(&env), Vec::<String>::new());
}

/// Crash after `binding`, then the claim is deleted while the supervisor is down: the
/// restart is refused by the gateway, binds nothing, and retires the tenant's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_binding_with_the_claim_gone_wipes_and_refuses() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-claim-gone").await;
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    ok(
        &sandbox,
        sh("echo mine > tenant.txt; mkdir -p a/b; echo x > a/b/c"),
    )
    .await;
    crash(&mut sup);
    env.gateway.revoke(sandbox.claim_uid());
    let (sup2, code) = restart_to_exit(&env, &[], Duration::from_secs(30));
    assert_eq!(code, Some(65), "{}", sup2.logs());
    assert_eq!(refusal(&sup2).as_deref(), Some("gateway_refused"));
    assert!(!sup2.has_event("identity.bound"), "{}", sup2.logs());
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    restart_refuses_without_registering(&env, "tombstone");
}

fn open_volume(env: &Env) -> Volume {
    let nobody = nix::unistd::User::from_name(&env.sandbox_user)
        .unwrap()
        .unwrap();
    let (vol, _) = Volume::open(&VolumeConfig {
        root: env.volume(),
        owner: Owner {
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
        },
        privileged: true,
    })
    .unwrap();
    vol
}

/// Crash right after the durable `released` tombstone (the state is written the way the
/// supervisor writes it, with the workload already dead): the restart finishes the wipe,
/// marks it, refuses (65) and never registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_released_tombstone_finishes_the_wipe_and_refuses() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-crash-released").await;
    plant_outside(&env);
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    let d = env.dir.0.display().to_string();
    ok(
        &sandbox,
        sh(&format!(
            "set -e; echo mine > tenant.txt; ln -s {d}/outside out; mkdir -p a/b; chmod 000 a"
        )),
    )
    .await;
    crash(&mut sup);
    open_volume(&env)
        .write_tombstone(TombstonePhase::Released, Some(&env.pod.pod_uid))
        .unwrap();
    let outside = snapshot(&outside_roots(&env));
    let sup2 = restart_refuses_without_registering(&env, "tombstone");
    assert!(
        sup2.logs().contains("finishing an interrupted wipe"),
        "{}",
        sup2.logs()
    );
    let wiped = event(&sup2, "wipe.completed").unwrap();
    assert!(wiped["files"].as_u64().unwrap() >= 3, "{wiped}");
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    assert_unchanged(
        &outside,
        &snapshot(&outside_roots(&env)),
        "crash after released",
    );
}

/// SIGKILL of the whole PID namespace while the wipe runs (seen in the log): the restart
/// finds the `released` tombstone, finishes the wipe and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_wipe_finishes_on_restart_and_refuses() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-crash-wipe").await;
    plant_outside(&env);
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    let files = wipe_files().max(10_000);
    ok(&sandbox, sh(&many_files_script(files))).await;
    let outside = snapshot(&outside_roots(&env));
    let releaser = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            sandbox
                .release(
                    "crash mid-wipe",
                    Duration::from_millis(200),
                    Duration::from_secs(60),
                )
                .await
        })
    };
    wait_event(&sup, Duration::from_secs(30), |e| {
        e["event"] == "wipe.started"
    })
    .await;
    crash(&mut sup);
    releaser.abort();
    let first = sup.events();
    assert!(
        !first.iter().any(|e| e["event"] == "wipe.completed"),
        "the wipe finished before the kill; raise SSV_WIPE_FILES\n{}",
        sup.logs()
    );
    assert_eq!(tombstone_phase(&env).as_deref(), Some("released"));
    let left_after_kill = std::fs::read_dir(env.volume().join("workspace"))
        .unwrap()
        .count();
    assert!(left_after_kill > 0);

    let sup2 = restart_refuses_without_registering(&env, "tombstone");
    let wiped = event(&sup2, "wipe.completed").unwrap();
    assert!(wiped["files"].as_u64().unwrap() > 0, "{wiped}");
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    assert_unchanged(&outside, &snapshot(&outside_roots(&env)), "crash mid-wipe");
}

struct Saved(Vec<(String, Vec<u8>)>);

fn save_records(env: &Env) -> Saved {
    Saved(records(env).into_iter().collect())
}

/// Puts the records back exactly: root-owned 0600 regular files, nothing else.
fn restore_records(env: &Env, saved: &Saved) {
    let vol = env.volume();
    let sup = vol.join(".supervisor");
    if std::fs::symlink_metadata(&sup).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&sup).unwrap();
        std::fs::rename(vol.join(".supervisor-real"), &sup).unwrap();
    }
    for e in std::fs::read_dir(&sup).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    for (name, bytes) in &saved.0 {
        let p = sup.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&p, Some(0), Some(0)).unwrap();
    }
}

/// Records deleted, corrupted, replaced by a symlink, owned by the tenant, and a
/// symlinked records directory: every restart refuses with the right reason, never
/// registers, and leaves the workspace as it found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_records_refuse_with_the_right_reason() {
    require!(can_unshare(), NEED);
    let env = Env::new("wsx-tamper").await;
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    ok(&sandbox, sh("echo mine > tenant.txt")).await;
    crash(&mut sup);
    let saved = save_records(&env);
    assert!(saved.0.iter().any(|(n, _)| n == "binding.json"));
    let sup_dir = env.volume().join(".supervisor");
    let nobody = nix::unistd::User::from_name(&env.sandbox_user)
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    type Tamper = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "binding deleted",
            Box::new(|s| std::fs::remove_file(s.join("binding.json")).unwrap()),
            "tampered_record",
        ),
        (
            "seed deleted",
            Box::new(|s| std::fs::remove_file(s.join("seed.json")).unwrap()),
            "tampered_record",
        ),
        (
            "all records deleted",
            Box::new(|s| {
                std::fs::remove_file(s.join("seed.json")).unwrap();
                std::fs::remove_file(s.join("binding.json")).unwrap();
            }),
            "unexpected_content",
        ),
        (
            "binding corrupted (one byte of the claim)",
            Box::new(|s| {
                let p = s.join("binding.json");
                let text = std::fs::read_to_string(&p).unwrap();
                let at = text.find("\"claim_uid\": \"").unwrap() + 14;
                let mut bytes = text.into_bytes();
                bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
                std::fs::write(&p, bytes).unwrap();
            }),
            "corrupt_record",
        ),
        (
            "binding truncated",
            Box::new(|s| {
                let p = s.join("binding.json");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "corrupt_record",
        ),
        (
            "binding replaced by a symlink",
            Box::new(|s| {
                std::fs::rename(s.join("binding.json"), s.join("binding.real")).unwrap();
                std::os::unix::fs::symlink("binding.real", s.join("binding.json")).unwrap();
            }),
            "tampered_record",
        ),
        (
            "binding owned by the tenant",
            Box::new(move |s| {
                std::os::unix::fs::chown(s.join("binding.json"), Some(nobody), None).unwrap()
            }),
            "tampered_record",
        ),
        (
            "seed owned by the tenant",
            Box::new(move |s| {
                std::os::unix::fs::chown(s.join("seed.json"), Some(nobody), None).unwrap()
            }),
            "tampered_record",
        ),
        (
            ".supervisor replaced by a symlink",
            Box::new(|s| {
                let real = s.with_file_name(".supervisor-real");
                std::fs::rename(s, &real).unwrap();
                std::os::unix::fs::symlink(".supervisor-real", s).unwrap();
            }),
            "tampered_record",
        ),
    ];
    for (what, tamper, want) in cases {
        restore_records(&env, &saved);
        tamper(&sup_dir);
        let before = env.gateway.stats(&env.pod.pod_name).register_attempts;
        let (s, code) = restart_to_exit(&env, &[], Duration::from_secs(30));
        assert_eq!(code, Some(65), "{what}\n{}", s.logs());
        assert_eq!(refusal(&s).as_deref(), Some(want), "{what}\n{}", s.logs());
        assert_eq!(
            env.gateway.stats(&env.pod.pod_name).register_attempts,
            before,
            "{what}: registered"
        );
        // Refusing never hands out, and never destroys what an operator must inspect.
        assert_eq!(
            std::fs::read(env.volume().join("workspace/tenant.txt")).unwrap(),
            b"mine\n",
            "{what}"
        );
    }
    // Restored, it resumes the same claim again (the records were the only problem).
    restore_records(&env, &saved);
    let sup2 = env.spawn(Launch::Pid1, &[]);
    wait_event(&sup2, Duration::from_secs(30), |e| {
        e["event"] == "identity.bound" && e["resumed"] == true
    })
    .await;
}
