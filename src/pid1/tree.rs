//! Process trees from `/proc`, and killing the workload.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{Mode, Reaper};

/// Parent pid of every process visible in `/proc`.
fn parent_map() -> HashMap<u32, u32> {
    let mut parents = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return parents;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = read_ppid(pid) {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// `/proc/<pid>/stat` field 4. The command name (field 2) may contain spaces and
/// parentheses, so parse from the last ')'.
fn read_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

pub(super) fn is_descendant_of(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..4096 {
        match read_ppid(current) {
            Some(p) if p == ancestor => return true,
            Some(0) | None => return false,
            Some(p) => current = p,
        }
    }
    false
}

/// Every live descendant of `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let parents = parent_map();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &ppid) in &parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    let mut out = Vec::new();
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// Which processes count as workload.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// As PID 1: every other process of the namespace (`kill(-1, …)`).
    Namespace,
    /// As subreaper: our descendants (orphans are reparented to us, so none escape).
    Descendants,
}

impl From<Mode> for Scope {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Pid1 => Scope::Namespace,
            Mode::Subreaper => Scope::Descendants,
        }
    }
}

fn signal_all(scope: Scope, sig: Signal) -> u64 {
    match scope {
        Scope::Namespace => {
            // kill(-1) reaches every process we may signal except ourselves (and init,
            // which is us). Count them first, for the report.
            let n = descendants(std::process::id()).len() as u64;
            let _ = kill(Pid::from_raw(-1), sig);
            n
        }
        Scope::Descendants => {
            let pids = descendants(std::process::id());
            for &p in &pids {
                let _ = kill(Pid::from_raw(p as i32), sig);
            }
            pids.len() as u64
        }
    }
}

/// SIGTERM every workload process, wait up to `grace` for them to exit, SIGKILL
/// whatever is left, and reap until no child remains. Returns how many processes were
/// signalled (TERM and KILL rounds, at most once each per process) and whether the
/// workload is gone.
pub async fn kill_workload(reaper: &Reaper, grace: Duration) -> (u64, bool) {
    let scope = Scope::from(reaper.mode());
    let termed = signal_all(scope, Signal::SIGTERM);
    // Once waitpid says ECHILD nothing is left: any live descendant would have a live
    // chain of parents up to us, so we would still have a child.
    if reaper.wait_no_children(grace).await {
        return (termed, true);
    }
    let mut killed = 0;
    // A fork bomb can outpace one round; repeat a few bounded times.
    for _ in 0..50 {
        killed = killed.max(signal_all(scope, Signal::SIGKILL));
        if reaper.wait_no_children(Duration::from_millis(200)).await {
            return (termed.max(killed), true);
        }
    }
    (termed.max(killed), false)
}
