//! The one owner of `waitpid`. Every child and every reparented orphan is reaped here;
//! statuses of processes someone waits for are dispatched to them.
//!
//! A spawn never holds the reaper's lock while its child runs: a child the tenant
//! stops before it execs would then stop the reaper, and with it signal intake (the
//! signal thread reaps on SIGCHLD). Instead a spawn registers a [`PendingSpawn`] first;
//! the child writes its own pid there before anything else, so an exit reaped before
//! the spawner learnt the pid is kept for it rather than taken for an orphan's.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
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

type Exit = (ExitInfo, Instant);

struct Table {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Spawns whose child may exist before its pid reached the spawner.
    pending: Vec<Arc<PendingSpawn>>,
    /// Exits of pending spawns' children, reaped before [`Reaper::end_spawn`].
    early: HashMap<i32, Exit>,
}

/// A spawn in flight: see the module comment.
#[derive(Debug, Default)]
pub struct PendingSpawn {
    /// Written by the child itself, first thing; 0 until then.
    pub child_pid: AtomicI32,
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

impl Reaper {
    pub(super) fn new(mode: Mode) -> Self {
        let (children_left, _) = watch::channel(true);
        Reaper {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    waiters: HashMap::new(),
                    pending: Vec::new(),
                    early: HashMap::new(),
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

    fn table(&self) -> MutexGuard<'_, Table> {
        self.shared.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a spawn about to start (before the clone).
    pub fn begin_spawn(&self) -> Arc<PendingSpawn> {
        let pending = Arc::new(PendingSpawn::default());
        self.table().pending.push(pending.clone());
        pending
    }

    /// Ends a spawn whose clone returned `pid` (None: no child was made). Returns the
    /// receiver of the child's exit, already filled if it was reaped meanwhile, and
    /// what `while_unreaped` returned: it runs with the reaper locked out while the
    /// process, or its zombie, still exists (e.g. to read its /proc entry).
    pub fn end_spawn<T>(
        &self,
        pending: &Arc<PendingSpawn>,
        pid: Option<u32>,
        while_unreaped: impl FnOnce(u32) -> T,
    ) -> Option<(oneshot::Receiver<Exit>, Option<T>)> {
        let mut table = self.table();
        table.pending.retain(|p| !Arc::ptr_eq(p, pending));
        let pid = pid?;
        let (tx, rx) = oneshot::channel();
        match table.early.remove(&(pid as i32)) {
            Some(exit) => {
                let _ = tx.send(exit);
                Some((rx, None))
            }
            None => {
                table.waiters.insert(pid as i32, tx);
                Some((rx, Some(while_unreaped(pid))))
            }
        }
    }

    /// Processes reaped since boot (children and orphans).
    pub fn reaped_total(&self) -> u64 {
        self.shared.reaped_total.load(Ordering::Relaxed)
    }

    /// Reaps everything that has exited. Called by the signal thread on SIGCHLD, and
    /// by [`Reaper::wait_no_children`] to poll. Returns whether children remain.
    pub(super) fn reap_pass(&self) -> bool {
        let mut table = self.table();
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
                    let raw = pid.as_raw();
                    if let Some(tx) = table.waiters.remove(&raw) {
                        let _ = tx.send((info, Instant::now()));
                    } else if table
                        .pending
                        .iter()
                        .any(|p| p.child_pid.load(Ordering::SeqCst) == raw)
                    {
                        table.early.insert(raw, (info, Instant::now()));
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
