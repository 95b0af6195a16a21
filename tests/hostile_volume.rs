//! A hostile tenant and a faulty volume, end to end (issue 11): the real binary as PID 1,
//! the reference gateway, the tenant acting from sessions as the sandbox user.
//!
//! - a directory of 600,000 long names wiped by a supervisor in a small memory cgroup, and
//!   the same wipe SIGKILLed half way and finished by the restart (same limit);
//! - a volume full by bytes (tmpfs `size=`) and by inodes (tmpfs `nr_inodes=`): the release
//!   still kills, tombstones, wipes and reports;
//! - a SIGTERM while a restarted supervisor re-registers to resume its binding: the
//!   tenant's files are wiped before it says `released`.
//!
//! Scale: `SSV_HUGE_DIR` entries (default 600,000), `SSV_HUGE_MEM_MIB` the supervisor's
//! memory limit (default 64).

mod common;

use common::cgroup::{Cgroup, Limits};
use common::workspace::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A tmpfs mounted for one test; unmounted (lazily if still busy) when dropped.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(at: &Path, opts: &str) -> Result<TmpfsMount, String> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "ssv-test-tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs -o {opts} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount(at.to_owned()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

fn sandbox_ids(env: &Env) -> (u32, u32) {
    let u = nix::unistd::User::from_name(&env.sandbox_user)
        .unwrap()
        .unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `n` empty files with 240-byte names in `workspace/huge`, owned by the sandbox user
/// (created from here: a shell loop would take minutes).
fn plant_huge_dir(env: &Env, n: usize) -> PathBuf {
    let (uid, gid) = sandbox_ids(env);
    let dir = env.volume().join("workspace/huge");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    let pad = "n".repeat(232);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (dir, pad) = (dir.clone(), pad.clone());
            std::thread::spawn(move || {
                for i in (t..n).step_by(2) {
                    let f = std::fs::File::create(dir.join(format!("{i:08}{pad}"))).unwrap();
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    dir
}

/// Peak resident memory (VmHWM) of a process, sampled until it exits.
struct PeakRss {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak_kib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    return;
                };
                if let Some(kib) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss { peak_kib, stop }
    }

    fn mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Releases through the gateway and waits for the supervisor to exit (it may die before
/// it reports): the report, if one came, and the exit code.
async fn release_until_exit(
    sup: &mut Supervisor,
    sandbox: &sandbox_supervisor::gateway::Sandbox,
    timeout: Duration,
) -> (
    Option<sandbox_supervisor::proto::ReleaseReport>,
    Option<i32>,
) {
    let releaser = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            sandbox
                .release("hostile volume", Duration::from_millis(500), timeout)
                .await
        })
    };
    let deadline = std::time::Instant::now() + timeout;
    let code = loop {
        if let Some(code) = sup.wait_exit(Duration::ZERO) {
            break Some(code);
        }
        if sup.child.is_none() || std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let report = match tokio::time::timeout(Duration::from_secs(10), releaser).await {
        Ok(Ok(Ok(r))) => r,
        _ => None,
    };
    (report, code)
}

fn huge_setup(tag: &str) -> Option<(usize, u64, Cgroup)> {
    let n = env_usize("SSV_HUGE_DIR", 600_000);
    let mib = env_usize("SSV_HUGE_MEM_MIB", 64) as u64;
    match Cgroup::new(
        tag,
        Limits {
            memory: Some(mib << 20),
            pids: None,
        },
    ) {
        Ok(cg) => Some((n, mib, cg)),
        Err(why) => {
            eprintln!("skipped: needs a memory cgroup: {why}");
            None
        }
    }
}

/// 600,000 long names in one directory, the supervisor in a 64 MiB cgroup: the release
/// wipes them all (memory bounded: names are deleted as they are read), reports, exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_directory_is_wiped_under_a_small_memory_limit() {
    require!(can_unshare(), NEED);
    let Some((n, mib, cg)) = huge_setup("huge") else {
        return;
    };
    let env = Env::new("hv-huge").await;
    let sup = env.spawn_in(&cg, Launch::Pid1, &[]);
    let (mut sup, sandbox) = env.claim_when_parked(sup).await;
    ok(&sandbox, sh("echo mine > tenant.txt")).await;
    let started = std::time::Instant::now();
    plant_huge_dir(&env, n);
    eprintln!("planted {n} entries in {:?}", started.elapsed());
    let peak = PeakRss::watch(sup.host_pid());
    let (report, code) = release_until_exit(&mut sup, &sandbox, Duration::from_secs(240)).await;
    eprintln!(
        "supervisor peak RSS {:.1} MiB under a {mib} MiB cgroup ({} cgroup {}), oom kills {}",
        peak.mib(),
        n,
        cg.version(),
        cg.oom_kills()
    );
    assert_eq!(cg.oom_kills(), 0, "OOM-killed mid-wipe\n{}", sup.logs());
    let report = report.unwrap_or_else(|| panic!("no release report\n{}", sup.logs()));
    assert!(report.error.is_empty(), "{report:?}");
    assert!(report.files_removed > n as u64, "{report:?}");
    assert_eq!(code, Some(0), "{}", sup.logs());
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
}

/// The same huge directory, the supervisor SIGKILLed while it wipes: the restart (same
/// memory limit) finds the `released` tombstone, finishes the wipe and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_directory_crash_mid_wipe_finishes_on_restart() {
    require!(can_unshare(), NEED);
    let Some((n, _mib, cg)) = huge_setup("hugecrash") else {
        return;
    };
    let env = Env::new("hv-hugecrash").await;
    let sup = env.spawn_in(&cg, Launch::Pid1, &[]);
    let (mut sup, sandbox) = env.claim_when_parked(sup).await;
    ok(&sandbox, sh("mkdir -p a/b; echo x > a/b/c")).await;
    plant_huge_dir(&env, n);
    let releaser = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            sandbox
                .release(
                    "crash mid-wipe",
                    Duration::from_millis(200),
                    Duration::from_secs(240),
                )
                .await
        })
    };
    wait_event(&sup, Duration::from_secs(60), |e| {
        e["event"] == "wipe.started"
    })
    .await;
    // Let it delete a part (and read far enough to have run out of memory before the fix).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crash(&mut sup);
    releaser.abort();
    assert_eq!(cg.oom_kills(), 0, "OOM-killed mid-wipe\n{}", sup.logs());
    assert!(
        !sup.has_event("wipe.completed"),
        "the wipe finished before the kill\n{}",
        sup.logs()
    );
    assert_eq!(tombstone_phase(&env).as_deref(), Some("released"));
    let left = std::fs::read_dir(env.volume().join("workspace/huge"))
        .unwrap()
        .count();
    eprintln!("{left} of {n} entries left after the kill");
    assert!(left > 0);

    let before = env.gateway.stats(&env.pod.pod_name).register_attempts;
    let mut sup2 = env.spawn_in(&cg, Launch::Pid1, &[]);
    let code = sup2.wait_exit(Duration::from_secs(240));
    assert_eq!(cg.oom_kills(), 0, "restart OOM-killed\n{}", sup2.logs());
    assert_eq!(code, Some(65), "{}", sup2.logs());
    assert_eq!(refusal(&sup2).as_deref(), Some("tombstone"));
    assert_eq!(
        env.gateway.stats(&env.pod.pod_name).register_attempts,
        before
    );
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
}

/// A tmpfs volume filled by the tenant (`fill` runs as the sandbox user), a workload still
/// running: the release kills it, writes a durable tombstone, wipes everything, sends the
/// report and exits 0; the restart refuses (65) without registering.
async fn full_volume_still_releases(tag: &str, mount_opts: &str, fill: &str, reserve: bool) {
    let env = Env::new(tag).await;
    let _mount = match TmpfsMount::new(&env.volume(), mount_opts) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    std::fs::set_permissions(env.volume(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    let _sleeper = sandbox.exec(spec(&["sleep", "1000"])).await.unwrap();
    let reserve_file = env.volume().join(".supervisor/tombstone.reserve");
    assert!(reserve_file.exists(), "no tombstone reserve after binding");
    if !reserve {
        // As if the volume had already been full when the claim bound.
        std::fs::remove_file(&reserve_file).unwrap();
    }
    let out = ok(&sandbox, sh(fill)).await;
    let st = nix::sys::statvfs::statvfs(&env.volume()).unwrap();
    eprintln!(
        "filled: {} | blocks free {} files free {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        st.blocks_free(),
        st.files_free()
    );
    assert!(
        st.blocks_free() == 0 || st.files_free() == 0,
        "the volume is not full"
    );
    let (report, code) = release_until_exit(&mut sup, &sandbox, Duration::from_secs(60)).await;
    let report = report.unwrap_or_else(|| panic!("no release report\n{}", sup.logs()));
    assert!(report.error.is_empty(), "{report:?}\n{}", sup.logs());
    assert!(report.files_removed >= 1, "{report:?}");
    assert!(report.processes_killed >= 1, "{report:?}");
    assert_eq!(code, Some(0), "{}", sup.logs());
    assert_eq!(workspace_left(&env), Vec::<String>::new());
    assert_eq!(tombstone_phase(&env).as_deref(), Some("wiped"));
    let wiped = Some(("phase", "wiped"));
    if reserve {
        // The tombstone is durable before the wipe starts, in the space set aside.
        assert_order(
            &sup,
            &[
                ("release.killed", None),
                ("tombstone.reserve_used", None),
                ("tombstone.written", Some(("phase", "released"))),
                ("wipe.started", None),
                ("wipe.completed", None),
                ("tombstone.written", wiped),
                ("release.reported", None),
            ],
        );
    } else {
        // No room at all: the binding record fences the wipe, the tombstone follows it.
        assert_order(
            &sup,
            &[
                ("release.killed", None),
                ("release.tombstone_failed", None),
                ("wipe.started", None),
                ("wipe.completed", None),
                ("tombstone.written", wiped),
                ("release.reported", None),
            ],
        );
    }
    assert_eq!(event(&sup, "release.reported").unwrap()["delivered"], true);
    restart_refuses_without_registering(&env, "tombstone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_full_by_bytes_still_releases() {
    require!(can_unshare(), NEED);
    full_volume_still_releases(
        "hv-fullbytes",
        "size=8m,mode=0755",
        "dd if=/dev/zero of=fill bs=64k 2>/dev/null; ls -l fill",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_full_by_inodes_still_releases() {
    require!(can_unshare(), NEED);
    full_volume_still_releases(
        "hv-fullinodes",
        "size=64m,nr_inodes=400,mode=0755",
        INODE_FILL,
        true,
    )
    .await;
}

/// Full by inodes with no reserve left (the volume was already full at binding time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_full_without_a_reserve_wipes_under_the_binding_fence() {
    require!(can_unshare(), NEED);
    full_volume_still_releases(
        "hv-fullnoreserve",
        "size=64m,nr_inodes=400,mode=0755",
        INODE_FILL,
        false,
    )
    .await;
}

const INODE_FILL: &str = "i=0; while true 2>/dev/null > f$i; do i=$((i+1)); done; echo $i files";

/// Crash while bound, then the restarted supervisor cannot reach the gateway to resume:
/// a SIGTERM while it retries registering retires the tenant's files (tombstone, wipe)
/// before it reports `released` with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_resuming_after_a_crash_wipes_first() {
    require!(can_unshare(), NEED);
    let env = Env::new("hv-resume-term").await;
    let (mut sup, sandbox) = env.bound(Launch::Pid1).await;
    ok(
        &sandbox,
        sh("echo mine > tenant.txt; mkdir -p a/b; echo x > a/b/c"),
    )
    .await;
    crash(&mut sup);
    env.gateway.stop().await;
    let mut sup2 = env.spawn(Launch::Pid1, &[]);
    wait_event(&sup2, Duration::from_secs(30), |e| {
        e["event"] == "identity.register_failed"
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup2.host_pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = sup2.wait_exit(Duration::from_secs(30));
    assert_eq!(
        workspace_left(&env),
        Vec::<String>::new(),
        "{}",
        sup2.logs()
    );
    assert_eq!(
        tombstone_phase(&env).as_deref(),
        Some("wiped"),
        "{}",
        sup2.logs()
    );
    assert_eq!(code, Some(0), "{}", sup2.logs());
    assert!(sup2.has_event("wipe.completed"), "{}", sup2.logs());
    restart_refuses_without_registering(&env, "tombstone");
}
