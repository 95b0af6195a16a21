//! Finding and signalling every process of a session, including the ones that left
//! its process group.
//!
//! A process group is not a container: `setsid sleep 1000 &`, a daemonizing server or
//! a double fork leaves it, and once its parent exits it is reparented to us and no
//! longer descends from the session's leader either. So when the supervisor is root,
//! each session's processes carry an unforgeable marker: one supplementary group
//! (`MARKER_BASE + n`, unique per session for the supervisor's life) set before the
//! privilege drop. An unprivileged process cannot shed it (no CAP_SETGID; `setgroups`
//! is denied in the user namespaces it may create; `no_new_privs` stops setuid
//! binaries), and every descendant inherits it. The gid owns no files, so it grants
//! nothing. A session member is then any process whose `/proc/<pid>/status` lists the
//! marker, plus (also without root, or for a root session that could drop it) the
//! leader's process group and the leader's live descendants.
//!
//! Signals go through a pidfd opened *before* re-checking membership, so a pid reused
//! between the scan and the signal is never hit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// First marker gid. Far above any real account or group id (and below 2^31, so no
/// tool mistakes it for a negative or "nobody" id); nothing on a volume owns it.
pub const MARKER_BASE: u32 = 2_000_000_000;

/// How a session's processes are recognised.
#[derive(Debug, Clone, Copy)]
pub struct Membership {
    pub leader: u32,
    /// The leader's start time (clock ticks since boot): once the leader is reaped its
    /// pid, and with it the group id, may be reused by an unrelated process, which
    /// then has another start time.
    pub leader_start: u64,
    pub marker: Option<u32>,
}

struct Proc {
    ppid: u32,
    pgrp: u32,
    start: u64,
    zombie: bool,
}

/// `/proc/<pid>/stat`: state (3), ppid (4), pgrp (5), starttime (22). The command name
/// may contain spaces and parentheses, so parse from the last ')'.
fn read_stat(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    Some(Proc {
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
        zombie: matches!(f.first(), Some(&"Z") | Some(&"X")),
    })
}

/// A process's start time, to tell it from a later process with the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|p| p.start)
}

fn has_group(pid: u32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

impl Membership {
    /// Every live (not zombie) process of the session: (pid, parent, start time).
    pub fn members(&self) -> Vec<(u32, u32, u64)> {
        let own = std::process::id();
        let mut procs: HashMap<u32, Proc> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if pid == own {
                    continue;
                }
                if let Some(p) = read_stat(pid) {
                    procs.insert(pid, p);
                }
            }
        }
        // A different process holding the leader's pid means the number was reused:
        // then the pid, the group and the tree say nothing about this session.
        let by_leader = procs
            .get(&self.leader)
            .is_none_or(|p| p.start == self.leader_start);
        let mut found: HashSet<u32> = HashSet::new();
        if by_leader {
            let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
            for (&pid, p) in &procs {
                children.entry(p.ppid).or_default().push(pid);
            }
            let mut stack = vec![self.leader];
            while let Some(p) = stack.pop() {
                for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                    if found.insert(c) {
                        stack.push(c);
                    }
                }
            }
        }
        for (&pid, p) in &procs {
            if by_leader && (pid == self.leader || p.pgrp == self.leader) {
                found.insert(pid);
            } else if let Some(gid) = self.marker {
                if !found.contains(&pid) && has_group(pid, gid) {
                    found.insert(pid);
                }
            }
        }
        let mut out: Vec<(u32, u32, u64)> = found
            .into_iter()
            .filter_map(|pid| {
                let p = procs.get(&pid).filter(|p| !p.zombie)?;
                Some((pid, p.ppid, p.start))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether `pid` is still the process seen in the scan (same start time), so still
    /// a member: pids are reused, start times of one pid are not.
    fn still_same(pid: u32, start: u64) -> bool {
        read_stat(pid).is_some_and(|p| !p.zombie && p.start == start)
    }

    /// Sends `sig` to every process of the session once. Returns how many were signalled.
    pub fn signal_all(&self, sig: i32) -> usize {
        let members = self.members();
        // The group first, in one atomic kernel operation: the common case needs
        // nothing more, and it reaches processes forked while we scan. Only while the
        // group id is still this session's (see `members`).
        if members.iter().any(|&(pid, _, _)| pid == self.leader)
            || start_time(self.leader).is_none()
        {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory.
            unsafe { libc::kill(-(self.leader as i32), sig) };
        }
        let mut n = 0;
        for (pid, _, start) in members {
            if signal_checked(pid, sig, || Self::still_same(pid, start)) {
                n += 1;
            }
        }
        n
    }

    /// SIGKILLs every process of the session, repeating while anything is left (a
    /// process may fork between a scan and its kill), bounded. Async, on the runtime:
    /// a blocking thread may be impossible to get when the tenant fills the pids limit.
    pub async fn kill_all(&self) -> bool {
        for _ in 0..50 {
            if self.signal_all(libc::SIGKILL) == 0 && self.members().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.members().is_empty()
    }
}

/// Signals `pid` only if `check` still holds once the pid is pinned by a pidfd.
fn signal_checked(pid: u32, sig: i32, check: impl Fn() -> bool) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // Kernels before 5.3: fall back to kill(2) right after the check.
        // SAFETY: kill(2) on a single pid; no memory involved.
        return check() && unsafe { libc::kill(pid as i32, sig) } == 0;
    }
    let fd = fd as libc::c_int;
    let sent = check()
        // SAFETY: pidfd_send_signal on the fd we own; a null siginfo means "as kill(2)".
        && unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
    // SAFETY: closing the fd opened above, exactly once.
    unsafe { libc::close(fd) };
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// A helper tree: sh (its own session) → a backgrounded sleep that calls setsid and
    /// so leaves the group, plus an ordinary sleep. Without a marker, the setsid'd one
    /// is still found as a descendant while its parent lives.
    #[test]
    fn finds_and_kills_group_and_descendants_without_a_marker() {
        // Not a group leader, so setsid(1) calls setsid() and execs sh in place.
        let mut child = Command::new("setsid")
            .args(["sh", "-c", "setsid sleep 1000 & sleep 1000 & wait"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let shell = child.id();
        let m = Membership {
            leader: shell,
            leader_start: start_time(shell).unwrap(),
            marker: None,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while m.members().len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "members: {:?}",
                m.members()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(rt.block_on(m.kill_all()), "left: {:?}", m.members());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
