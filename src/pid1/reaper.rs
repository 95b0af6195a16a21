//! The one owner of `waitpid`. Every child and every reparented orphan is reaped here;
//! statuses of processes someone waits for are dispatched to them.
//!
//! `std::process::Command::spawn` itself calls `waitpid` on its child when `exec`
//! fails. A `waitpid(-1)` running at that moment would steal the status and make std
//! panic, so spawns hold the [`SpawnGuard`] and the reaper takes the same lock around
//! its `waitpid` loop. Registering the waiter under that lock also closes the race
//! where a child exits before anybody registered for it.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{oneshot, watch};

use super::Mode;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitInfo {
    /// Shell-style status: the exit code, or 128 + the signal.
    pub fn shell_status(self) -> i32 {
        match self {
            ExitInfo::Exited(code) => code,
            ExitInfo::Signaled { signal, .. } => 128 + signal,
        }
    }
}

struct Table {
    waiters: HashMap<i32, oneshot::Sender<(ExitInfo, Instant)>>,
}

pub(super) struct Shared {
    table: Mutex<Table>,
    reaped_total: AtomicU64,
    /// Bumped after every reap pass; lets waiters notice "no children left".
    children_left: watch::Sender<bool>,
    pub(super) mode: Mode,
}

/// Cloneable handle to the reaper.
#[derive(Clone)]
pub struct Reaper {
    pub(super) shared: Arc<Shared>,
}

/// Held while spawning: the reaper cannot run `waitpid` until it is dropped.
pub struct SpawnGuard<'a> {
    table: MutexGuard<'a, Table>,
}

impl SpawnGuard<'_> {
    /// Registers interest in `pid`'s exit; call before dropping the guard.
    pub fn watch(&mut self, pid: u32) -> oneshot::Receiver<(ExitInfo, Instant)> {
        let (tx, rx) = oneshot::channel();
        self.table.waiters.insert(pid as i32, tx);
        rx
    }
}

impl Reaper {
    pub(super) fn new(mode: Mode) -> Self {
        let (children_left, _) = watch::channel(true);
        Reaper {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    waiters: HashMap::new(),
                }),
                reaped_total: AtomicU64::new(0),
                children_left,
                mode,
            }),
        }
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// Locks out the reaper for the duration of a spawn.
    pub fn spawn_guard(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            table: self.shared.table.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Processes reaped since boot (children and orphans).
    pub fn reaped_total(&self) -> u64 {
        self.shared.reaped_total.load(Ordering::Relaxed)
    }

    /// Reaps everything that has exited. Called by the signal thread on SIGCHLD, and
    /// by [`Reaper::wait_no_children`] to poll. Returns whether children remain.
    pub(super) fn reap_pass(&self) -> bool {
        let mut table = self.shared.table.lock().unwrap_or_else(|e| e.into_inner());
        let has_children = loop {
            match waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                Ok(WaitStatus::StillAlive) => break true,
                Ok(status) => {
                    let (pid, info) = match status {
                        WaitStatus::Exited(pid, code) => (pid, ExitInfo::Exited(code)),
                        WaitStatus::Signaled(pid, sig, core) => (
                            pid,
                            ExitInfo::Signaled {
                                signal: sig as i32,
                                core_dumped: core,
                            },
                        ),
                        // Stops and continues are not exits (no WUNTRACED/WCONTINUED is
                        // asked for, but be explicit).
                        _ => continue,
                    };
                    self.shared.reaped_total.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = table.waiters.remove(&pid.as_raw()) {
                        let _ = tx.send((info, Instant::now()));
                    } else {
                        tracing::debug!(
                            event = "pid1.orphan_reaped",
                            pid = pid.as_raw(),
                            status = info.shell_status(),
                            "reaped an orphan"
                        );
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break false,
                Err(e) => {
                    tracing::error!(event = "pid1.waitpid_failed", error = %e, "waitpid failed");
                    break true;
                }
            }
        };
        drop(table);
        self.shared.children_left.send_replace(has_children);
        has_children
    }

    /// Waits until no child is left (everything reaped), up to `timeout`. Returns
    /// whether that happened.
    pub async fn wait_no_children(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.children_left.subscribe();
        loop {
            // A pass here covers exits whose SIGCHLD was coalesced with an earlier one.
            if !self.reap_pass() {
                return true;
            }
            let tick = tokio::time::sleep(std::time::Duration::from_millis(20));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return !self.reap_pass(),
            }
        }
    }
}
