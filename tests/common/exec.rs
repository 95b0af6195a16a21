//! Helpers for the exec relay tests: a supervisor dialing through another endpoint (a
//! faulty link), reading a session until a marker, and looking at its processes.

use super::*;
use sandbox_supervisor::gateway::{Exec, ExecEvent};

/// How long a test waits for output it expects.
pub const T: Duration = Duration::from_secs(15);

/// A terminal of `cols` x `rows` for `ExecSpec.tty`.
pub fn tty(cols: u32, rows: u32) -> Option<proto::Tty> {
    Some(proto::Tty {
        cols,
        rows,
        term: "xterm".into(),
    })
}

impl Env {
    /// Like `spawn`, but the supervisor dials `gateway` (e.g. a `FaultyLink` in front of
    /// the reference gateway) instead of the gateway itself.
    pub fn spawn_via(&self, gateway: &str, launch: Launch, extra: &[&str]) -> Supervisor {
        let mut args = self.run_args();
        let i = args.iter().position(|a| a == "--gateway").unwrap();
        args[i + 1] = gateway.to_string();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_args(launch, args)
    }

    /// `bound_with` through another endpoint.
    pub async fn bound_via(
        &self,
        gateway: &str,
        launch: Launch,
        extra: &[&str],
    ) -> (Supervisor, Sandbox) {
        self.claim_when_parked(self.spawn_via(gateway, launch, extra))
            .await
    }

    /// The `https://localhost:PORT` (or http) endpoint of a link on this machine.
    pub fn endpoint_at(&self, port: u16) -> String {
        match &self.ca {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Supervisor {
    /// Waits until the log has `n` events named `name`.
    pub async fn wait_events(&self, name: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.events().iter().filter(|e| e["event"] == name).count() >= n {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Reads stdout (and stderr) of `exec` into `seen` until `needle` appears in it.
/// Panics with what was read on timeout, exit or loss.
pub async fn read_until(exec: &mut Exec, seen: &mut Vec<u8>, needle: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !String::from_utf8_lossy(seen).contains(needle) {
        match tokio::time::timeout_at(deadline, exec.next()).await {
            Ok(Some(ExecEvent::Stdout(b))) | Ok(Some(ExecEvent::Stderr(b))) => {
                seen.extend_from_slice(&b)
            }
            Ok(other) => panic!(
                "waiting for {needle:?}: session ended ({other:?}); read {:?}",
                String::from_utf8_lossy(seen)
            ),
            Err(_) => panic!(
                "no {needle:?} within {timeout:?}; read {:?}",
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

/// A process seen under the supervisor.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    pub comm: String,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Live (not zombie) descendants of `root` named `comm`.
pub fn live_named(root: u32, comm: &str) -> Vec<ProcInfo> {
    let parents: std::collections::HashMap<u32, u32> =
        processes().into_iter().map(|(p, pp, _)| (p, pp)).collect();
    descendants(root)
        .into_iter()
        .filter(|&(_, st)| st != 'Z' && st != 'X')
        .filter_map(|(pid, state)| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if name.trim_end() != comm {
                return None;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let groups = status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            Some(ProcInfo {
                pid,
                ppid: parents.get(&pid).copied().unwrap_or(0),
                state,
                comm: comm.to_string(),
                groups,
            })
        })
        .collect()
}

/// Waits until no live process named `comm` is left under `root`.
pub async fn wait_none_named(root: u32, comm: &str, timeout: Duration) -> Vec<ProcInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = live_named(root, comm);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until exactly `n` live processes named `comm` are under `root` (a forked
/// child shows its parent's name until it has exec'd).
pub async fn wait_named(root: u32, comm: &str, n: usize, timeout: Duration) -> Vec<ProcInfo> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = live_named(root, comm);
        if found.len() == n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
