//! The artifacts the container tests run: the static release binary (built by
//! `scripts/build-static.sh` unless fresh) and the example image built from it, once per
//! test process, plus cleanup of what a killed earlier run left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use super::{docker, repo, LABEL};

fn newest_mtime(path: &Path, newest: &mut SystemTime) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            newest_mtime(&e.path(), newest);
        }
    } else if let Ok(m) = meta.modified() {
        *newest = (*newest).max(m);
    }
}

fn build_static_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SSV_STATIC_BINARY") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            eprintln!("docker tests: using SSV_STATIC_BINARY={}", p.display());
            Ok(p)
        } else {
            Err(format!(
                "SSV_STATIC_BINARY={} is not a file; build it with scripts/build-static.sh",
                p.display()
            ))
        };
    }
    let repo = repo();
    let out = repo.join("dist/sandbox-supervisor");
    let mut sources = SystemTime::UNIX_EPOCH;
    for p in ["src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"] {
        newest_mtime(&repo.join(p), &mut sources);
    }
    let fresh = std::fs::metadata(&out)
        .and_then(|m| m.modified())
        .map(|built| built >= sources)
        .unwrap_or(false);
    if fresh {
        eprintln!(
            "docker tests: {} is newer than the sources; not rebuilding",
            out.display()
        );
        return Ok(out);
    }
    eprintln!("docker tests: building the static release binary (scripts/build-static.sh; minutes on a cold target/)");
    let started = Instant::now();
    let status = Command::new(repo.join("scripts/build-static.sh"))
        .arg(&out)
        .current_dir(&repo)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running scripts/build-static.sh: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/build-static.sh failed: {status}"));
    }
    eprintln!(
        "docker tests: static binary built in {:.0?}",
        started.elapsed()
    );
    Ok(out)
}

/// The static binary, built (or found fresh) once per process.
pub fn static_binary() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build_static_binary).clone()
}

static IMAGE_TAG: OnceLock<String> = OnceLock::new();

extern "C" fn remove_image_at_exit() {
    if std::env::var_os("SSV_KEEP").is_some() {
        return;
    }
    if let Some(tag) = IMAGE_TAG.get() {
        let _ = docker(&["rmi", "-f", tag]);
    }
}

/// Removes what an earlier test process left behind when it was killed before its Drop
/// guards and exit hook ran: resources labelled with a pid that no longer runs.
fn remove_stale() {
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .map(|p| !Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(false)
    };
    let filter = format!("label={LABEL}");
    let format = format!("{{{{.Names}}}} {{{{.Label \"{LABEL}\"}}}}");
    for (kind, list, fmt, rm) in [
        (
            "container",
            vec!["ps", "-a"],
            format.clone(),
            vec!["rm", "-f", "-v"],
        ),
        (
            "volume",
            vec!["volume", "ls"],
            format.replace(".Names", ".Name"),
            vec!["volume", "rm", "-f"],
        ),
        (
            "network",
            vec!["network", "ls"],
            format.replace(".Names", ".Name"),
            vec!["network", "rm"],
        ),
    ] {
        let mut args = list.clone();
        args.extend(["--filter", &filter, "--format", &fmt]);
        let Ok(out) = docker(&args) else { continue };
        for line in out.lines() {
            let mut f = line.split_whitespace();
            if let (Some(name), Some(pid)) = (f.next(), f.next()) {
                if dead(pid) {
                    eprintln!("docker tests: removing stale {kind} {name} (pid {pid} is gone)");
                    let mut rm = rm.clone();
                    rm.push(name);
                    let _ = docker(&rm);
                }
            }
        }
    }
    // Images carry the pid in their tag (ssv-test-example:<pid>-<rand>).
    if let Ok(out) = docker(&["images", "ssv-test-example", "--format", "{{.Tag}}"]) {
        for tag in out.lines() {
            if tag.split('-').next().is_some_and(dead) {
                eprintln!("docker tests: removing stale image ssv-test-example:{tag}");
                let _ = docker(&["rmi", "-f", &format!("ssv-test-example:{tag}")]);
            }
        }
    }
}

fn build_image() -> Result<String, String> {
    remove_stale();
    let bin = static_binary()?;
    let tag = format!(
        "ssv-test-example:{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let _ = IMAGE_TAG.set(tag.clone());
    // SAFETY: registers a plain extern "C" function with libc; it only reads a OnceLock.
    unsafe {
        libc::atexit(remove_image_at_exit);
    }
    let started = Instant::now();
    let out = Command::new(repo().join("container/example-image/build.sh"))
        .arg(&bin)
        .arg(&tag)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running container/example-image/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "container/example-image/build.sh failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "docker tests: built image {tag} in {:.1?}",
        started.elapsed()
    );
    Ok(tag)
}

/// The example image (container/example-image/build.sh from the static binary), built
/// once per process and removed when the process exits.
pub fn example_image() -> Result<String, String> {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    IMAGE.get_or_init(build_image).clone()
}
