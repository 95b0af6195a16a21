//! Being PID 1 (or a child subreaper when not): signal intake, the single reaper that
//! owns every `waitpid`, and process-tree kills.
//!
//! Call [`prepare`] first thing in `main`, before any thread exists: it blocks the
//! signals we handle so that every thread inherits the mask and only the reaper thread
//! (reading a `signalfd`) ever sees them. Then [`Pid1::start`] spawns that thread.

mod limits;
mod reaper;
mod residency;
pub use residency::drop_clean_code;
mod signals;
mod tree;

pub use limits::{pids_limit, workload_process_cap, OomProtection, SUPERVISOR_PIDS_RESERVE};
pub use reaper::{ExitInfo, PendingSpawn, Reaper};
pub use signals::{ExternalSignal, SignalIntake};
pub use tree::{descendants, kill_workload, Scope};

use nix::sys::signal::{SigSet, Signal};

/// How this process relates to the workload it supervises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of its PID namespace: every other process there is workload.
    Pid1,
    /// Not PID 1 (e.g. `shareProcessNamespace`, or `local` without root): a child
    /// subreaper, so orphans of our descendants are reparented to us.
    Subreaper,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pid1 => "pid1",
            Mode::Subreaper => "subreaper",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    #[error("cannot {what}: {source}")]
    Syscall {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the reaper thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Signals the supervisor consumes through its signalfd. Everything else keeps its
/// default disposition (and, as PID 1, the kernel drops those from inside the namespace).
pub(crate) fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Process-wide set-up that must happen before any thread is created.
pub struct Pid1 {
    mode: Mode,
    oom: OomProtection,
    /// Not PID 1 and the kernel refused PR_SET_CHILD_SUBREAPER.
    subreaper_refused: Option<nix::Error>,
}

/// Blocks the handled signals (inherited by every thread created later), makes the
/// process non-dumpable (no core dumps or ptrace of the process holding tokens), and
/// becomes a child subreaper when not PID 1.
pub fn prepare() -> Result<Pid1, Pid1Error> {
    #[cfg(not(target_os = "linux"))]
    compile_error!("sandbox-supervisor runs on Linux only: it relies on signalfd, prctl and /proc");

    handled_signals()
        .thread_block()
        .map_err(|source| Pid1Error::Syscall {
            what: "block signals",
            source,
        })?;
    nix::sys::prctl::set_dumpable(false).map_err(|source| Pid1Error::Syscall {
        what: "set PR_SET_DUMPABLE=0",
        source,
    })?;
    let (mode, subreaper_refused) = if nix::unistd::getpid().as_raw() == 1 {
        (Mode::Pid1, None)
    } else {
        // Older gVisor allows it to PID 1 only (EINVAL): carry on, and say at start
        // which guarantee is weaker.
        (
            Mode::Subreaper,
            nix::sys::prctl::set_child_subreaper(true).err(),
        )
    };
    // Before any thread or child exists, so everything started later inherits it
    // (session children then raise their own).
    let oom = limits::protect_from_oom();
    Ok(Pid1 {
        mode,
        oom,
        subreaper_refused,
    })
}

impl Pid1 {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Starts the reaper thread. Returns the reaper (spawn and wait go through it) and
    /// the intake of signals that ask the supervisor to release.
    pub fn start(self) -> Result<(Reaper, SignalIntake), Pid1Error> {
        if let Some(e) = self.subreaper_refused {
            tracing::warn!(event = "pid1.subreaper_unavailable", error = %e, guarantee = "weaker: orphans of session processes are reparented to this namespace's init, not to the supervisor: it cannot reap them, and release kills only what it still sees descending from itself", "cannot become a child subreaper");
        }
        if self.oom.fully_protected {
            tracing::info!(
                event = "pid1.oom_protected",
                oom_score_adj = self.oom.score_adj,
                "the OOM killer will not choose the supervisor"
            );
        } else {
            tracing::warn!(event = "pid1.oom_protected", oom_score_adj = self.oom.score_adj, guarantee = "weaker: sessions still rank above the supervisor, but without CAP_SYS_RESOURCE it cannot go below the oom_score_adj it inherited", "cannot set oom_score_adj -1000");
        }
        signals::start(self.mode)
    }
}
