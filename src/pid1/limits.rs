//! The container's limits as PID 1 meets them: the pids limit the workload must not
//! take whole, and the OOM killer, which must choose the workload before PID 1.

use std::path::{Path, PathBuf};

/// Pids (processes and threads) kept for the supervisor when the workload's cap is
/// derived from the container's limit: its own threads (main, signals, spawner,
/// runtime workers and a blocking pool) plus session children in the moment between
/// clone and `setuid`, with a wide margin.
pub const SUPERVISOR_PIDS_RESERVE: u64 = 32;

/// The tightest `pids.max` on this process's cgroup path (v2, or v1's pids
/// hierarchy), or None when nothing limits it or it cannot be read.
pub fn pids_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let mount = match controllers {
            "" => PathBuf::from("/sys/fs/cgroup"),
            c if c.split(',').any(|c| c == "pids") => PathBuf::from("/sys/fs/cgroup/pids"),
            _ => continue,
        };
        // Walk from our cgroup up to the mount's root: any ancestor may be tighter.
        // Inside a container the mount's root often is our own cgroup already.
        let mut dir = mount.join(path.trim_start_matches('/'));
        loop {
            if let Some(n) = read_limit(&dir.join("pids.max")) {
                best = Some(best.map_or(n, |b| b.min(n)));
            }
            if dir == mount || !dir.pop() || !dir.starts_with(&mount) {
                break;
            }
        }
        if let Some(n) = read_limit(&mount.join("pids.max")) {
            best = Some(best.map_or(n, |b| b.min(n)));
        }
    }
    best
}

/// The sandbox user's RLIMIT_NPROC (0: none), logged once with where it came from.
pub fn workload_process_cap(cap: crate::config::ProcessCap) -> u64 {
    use crate::config::ProcessCap;
    let limit = pids_limit();
    let (n, source) = match cap {
        ProcessCap::Limit(n) => (n, "--max-workload-processes"),
        ProcessCap::None => (0, "--max-workload-processes 0"),
        ProcessCap::Auto => match limit {
            Some(l) => (
                l.saturating_sub(SUPERVISOR_PIDS_RESERVE).max(1),
                "the container's pids limit less the supervisor's reserve",
            ),
            None => (0, "no pids limit found"),
        },
    };
    if n == 0 {
        tracing::warn!(event = "exec.process_limit", limit = 0, pids_limit = ?limit, source, guarantee = "weaker: the workload may take every pid the container has; the supervisor needs no new thread to keep serving, but new sessions fail until pids free up", "sessions get no process cap");
    } else {
        tracing::info!(event = "exec.process_limit", limit = n, pids_limit = ?limit, source, "sessions run under RLIMIT_NPROC");
    }
    n
}

fn read_limit(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// What the supervisor's own `oom_score_adj` became at boot.
#[derive(Debug, Clone, Copy)]
pub struct OomProtection {
    pub score_adj: i32,
    /// Whether -1000 (never chosen) was possible; without CAP_SYS_RESOURCE a process
    /// cannot go below the value it inherited.
    pub fully_protected: bool,
}

/// Sets this process's `oom_score_adj` to -1000, or keeps the lowest it may have.
pub fn protect_from_oom() -> OomProtection {
    const FILE: &str = "/proc/self/oom_score_adj";
    if std::fs::write(FILE, "-1000").is_ok() {
        return OomProtection {
            score_adj: -1000,
            fully_protected: true,
        };
    }
    let current = std::fs::read_to_string(FILE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    OomProtection {
        score_adj: current,
        fully_protected: false,
    }
}
