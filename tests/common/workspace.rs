//! Helpers for the workspace end-to-end tests: snapshots of everything outside the
//! workspace (byte for byte, with type, mode and owner), sessions that must succeed,
//! log-order assertions and crash/restart plumbing.

use super::{Env, Launch, Supervisor};
use sandbox_supervisor::gateway::{ExecOutput, Sandbox};
use sandbox_supervisor::proto;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a path was: enough to tell any change to content, type, mode, owner or links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
    /// sha256 of the content (files), the link target (symlinks), empty otherwise.
    pub content: String,
}

pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Every path below each root (and the roots), without following symlinks.
pub fn snapshot(roots: &[PathBuf]) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = m.file_type();
        let (kind, content) = if ft.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            (
                "symlink",
                hex::encode(Sha256::digest(t.as_os_str().as_encoded_bytes())),
            )
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
            ("dir", String::new())
        } else if ft.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            ("file", hex::encode(Sha256::digest(&bytes)))
        } else {
            ("other", String::new())
        };
        out.insert(
            p,
            Entry {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                ino: m.ino(),
                content,
            },
        );
    }
    out
}

/// Fails with every difference between two snapshots.
pub fn assert_unchanged(before: &Snapshot, after: &Snapshot, what: &str) {
    let mut diffs = vec![];
    for (p, e) in before {
        match after.get(p) {
            None => diffs.push(format!("removed: {}", p.display())),
            Some(a) if a != e => diffs.push(format!("changed: {}: {e:?} -> {a:?}", p.display())),
            _ => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("added: {}", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{what}: outside files changed:\n{}",
        diffs.join("\n")
    );
}

/// Files outside the workspace the traps aim at: a sibling directory with a private file,
/// a world-writable file (the only kind the tenant may hard-link under
/// `fs.protected_hardlinks=1`), a nested tree and a bind-mount source.
pub fn plant_outside(env: &Env) -> PathBuf {
    let out = env.dir.0.join("outside");
    std::fs::create_dir_all(out.join("nested/deeper")).unwrap();
    std::fs::create_dir_all(out.join("bindsrc/sub")).unwrap();
    std::fs::write(out.join("secret.txt"), "outside secret\n").unwrap();
    std::fs::write(out.join("shared.txt"), "hardlink me\n").unwrap();
    std::fs::write(out.join("nested/deeper/file"), vec![7u8; 10_000]).unwrap();
    std::fs::write(out.join("bindsrc/keep.txt"), "bind source\n").unwrap();
    std::fs::write(out.join("bindsrc/sub/keep2.txt"), "bind source 2\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let perm = |p: &str, m: u32| {
        std::fs::set_permissions(out.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    perm("shared.txt", 0o666);
    perm("bindsrc", 0o777);
    perm("bindsrc/sub", 0o777);
    perm("bindsrc/keep.txt", 0o666);
    out
}

/// The outside roots every test snapshots: the sibling dir, the token, the seed, the PKI,
/// the downward-API dir, plus a few system files the `/` symlink points at.
pub fn outside_roots(env: &Env) -> Vec<PathBuf> {
    let d = &env.dir.0;
    let mut v: Vec<PathBuf> = ["outside", "token", "seed", "pki", "podinfo"]
        .iter()
        .map(|s| d.join(s))
        .collect();
    v.extend(["/etc/passwd", "/etc/group", "/etc/hostname"].map(PathBuf::from));
    v
}

/// Names left in the workspace.
pub fn workspace_left(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.volume().join("workspace"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs a session that must exit 0; returns its output.
pub async fn ok(sandbox: &Sandbox, spec: proto::ExecSpec) -> ExecOutput {
    let what = spec.argv.join(" ");
    let out = sandbox
        .exec(spec)
        .await
        .unwrap_or_else(|e| panic!("exec {what}: {e}"))
        .collect()
        .await
        .unwrap();
    assert_eq!(
        out.exit.status,
        0,
        "{what}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn as_root(mut spec: proto::ExecSpec) -> proto::ExecSpec {
    spec.user = "root".into();
    spec
}

/// The indices of the first event matching each `(event, field, value)` in the log, which
/// must be strictly increasing.
pub fn assert_order(sup: &Supervisor, steps: &[(&str, Option<(&str, &str)>)]) {
    let events = sup.events();
    let mut last = None;
    for (name, field) in steps {
        let found = events.iter().enumerate().position(|(i, e)| {
            last.is_none_or(|l| i > l)
                && e["event"] == *name
                && field.is_none_or(|(k, v)| e[k].as_str() == Some(v))
        });
        let Some(i) = found else {
            panic!(
                "event {name} {field:?} not found after index {last:?}\n{}",
                sup.logs()
            );
        };
        last = Some(i);
    }
}

/// The first event named `name`.
pub fn event(sup: &Supervisor, name: &str) -> Option<serde_json::Value> {
    sup.events().into_iter().find(|e| e["event"] == name)
}

/// `lifecycle.transition` events' `to` values in order.
pub fn transitions(sup: &Supervisor) -> Vec<String> {
    sup.events()
        .iter()
        .filter(|e| e["event"] == "lifecycle.transition")
        .map(|e| e["to"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls the log until `pred` holds for some event; panics after `timeout`.
pub async fn wait_event(
    sup: &Supervisor,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let logs = sup.logs();
        if logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| pred(&e))
        {
            return;
        }
        assert!(Instant::now() < deadline, "event not seen\n{logs}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// SIGKILLs the supervisor's namespace (via `unshare --kill-child`) and waits until the
/// supervisor process itself is dead, so nothing of it still runs on the volume.
pub fn crash(sup: &mut Supervisor) {
    let pid = sup.host_pid();
    sup.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = state
            .rfind(')')
            .map(|i| state[i + 2..].starts_with('Z') || state[i + 2..].starts_with('X'))
            .unwrap_or(true);
        if dead {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "supervisor {pid} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the supervisor once more on the same volume and waits for it to exit.
pub fn restart_to_exit(env: &Env, extra: &[&str], timeout: Duration) -> (Supervisor, Option<i32>) {
    let mut sup = env.spawn(Launch::Pid1, extra);
    let code = sup.wait_exit(timeout);
    (sup, code)
}

/// Like `Env::spawn(Launch::Pid1, …)` but seeding from `archive` (`--seed-dir` and
/// `--seed-archive` exclude each other).
pub fn spawn_with_archive(env: &Env, archive: &Path) -> Supervisor {
    let log = env
        .dir
        .0
        .join(format!("supervisor-{:04x}.log", rand::random::<u16>()));
    let mut args = env.run_args();
    let at = args.iter().position(|a| a == "--seed-dir").unwrap();
    args.drain(at..at + 2);
    args.extend(["--seed-archive".into(), archive.display().to_string()]);
    let child = std::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            super::BIN,
        ])
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn supervisor");
    Supervisor {
        child: Some(child),
        log,
        launch: Launch::Pid1,
    }
}

/// The `reuse.refused` reason in the log.
pub fn refusal(sup: &Supervisor) -> Option<String> {
    event(sup, "reuse.refused").and_then(|e| e["reason"].as_str().map(str::to_owned))
}

/// The record files' contents, to check they are exactly what the supervisor wrote.
pub fn records(env: &Env) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(env.volume().join(".supervisor"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

/// The tombstone's phase, if one exists.
pub fn tombstone_phase(env: &Env) -> Option<String> {
    let bytes = std::fs::read(env.volume().join(".supervisor/tombstone.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["record"]["phase"].as_str().map(str::to_owned)
}

pub fn path_exists_nofollow(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Why the workspace end-to-end tests skip.
pub const NEED: &str = "needs root and unshare --pid --mount-proc (PID + mount namespaces)";

/// After a release, a restart refuses (exit 65, `tombstone`) without ever registering.
pub fn restart_refuses_without_registering(env: &Env, want: &str) -> Supervisor {
    let before = env.gateway.stats(&env.pod.pod_name).register_attempts;
    let (sup, code) = restart_to_exit(env, &[], Duration::from_secs(30));
    assert_eq!(code, Some(65), "{}", sup.logs());
    assert_eq!(refusal(&sup).as_deref(), Some(want), "{}", sup.logs());
    assert_eq!(
        env.gateway.stats(&env.pod.pod_name).register_attempts,
        before,
        "a refused supervisor registered with the gateway\n{}",
        sup.logs()
    );
    assert!(!sup.has_event("identity.parked"), "{}", sup.logs());
    sup
}

/// `SSV_WIPE_FILES`: how many small files the scale and mid-wipe tests plant.
pub fn wipe_files() -> usize {
    std::env::var("SSV_WIPE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Creates `n` one-byte files in directories of 1,000 (perl: one process, fast).
pub fn many_files_script(n: usize) -> String {
    format!(
        "perl -e 'my $n = {n}; mkdir \"many\" or die; for my $i (0 .. $n - 1) {{ my $d = int($i / 1000); \
         mkdir \"many/$d\" if $i % 1000 == 0; open(my $f, \">\", \"many/$d/f$i\") or die \"$!\"; print $f \"x\"; close $f }}'"
    )
}

/// A ustar header block for a raw entry (the `tar` crate refuses to write hostile ones).
pub fn tar_header(name: &str, typeflag: u8, size: usize, link: &str, mode: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = typeflag;
    put(&mut h, 157, link.as_bytes());
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    if typeflag == b'3' {
        put(&mut h, 329, b"0000001\0");
        put(&mut h, 337, b"0000003\0");
    }
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A tar of raw entries `(name, typeflag, data, link)`, hostile ones included.
pub fn tar(entries: &[(&str, u8, &[u8], &str)]) -> Vec<u8> {
    let mut out = vec![];
    for (name, ty, data, link) in entries {
        let mode = if *ty == b'5' { 0o755 } else { 0o644 };
        out.extend_from_slice(&tar_header(name, *ty, data.len(), link, mode));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}
