//! Signal intake: one thread reads a `signalfd` for the signals blocked in
//! [`super::prepare`]. SIGCHLD drives the reaper; SIGTERM/SIGINT from outside ask for
//! a release; the same signals sent by the workload are logged and ignored.

use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::sync::mpsc;

use super::reaper::Reaper;
use super::{handled_signals, tree, Mode, Pid1Error};

/// A signal from outside the sandbox that asks the supervisor to release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalSignal {
    pub signal: i32,
    /// The sender as seen from our PID namespace (0: outside it, or the kernel).
    pub sender_pid: u32,
}

pub type SignalIntake = mpsc::UnboundedReceiver<ExternalSignal>;

pub(super) fn start(mode: Mode) -> Result<(Reaper, SignalIntake), Pid1Error> {
    let reaper = Reaper::new(mode);
    let fd = SignalFd::with_flags(&handled_signals(), SfdFlags::SFD_CLOEXEC).map_err(|source| {
        Pid1Error::Syscall {
            what: "create a signalfd",
            source,
        }
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let thread_reaper = reaper.clone();
    std::thread::Builder::new()
        .name("pid1-signals".into())
        .spawn(move || loop {
            match fd.read_signal() {
                Ok(Some(info)) => dispatch(&thread_reaper, mode, &tx, info.ssi_signo as i32, info.ssi_pid),
                Ok(None) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(event = "pid1.signalfd_failed", error = %e, "reading the signalfd failed; signals are no longer handled");
                    return;
                }
            }
        })
        .map_err(Pid1Error::Thread)?;
    // Children may have exited before the signalfd existed.
    reaper.reap_pass();
    Ok((reaper, rx))
}

fn dispatch(
    reaper: &Reaper,
    mode: Mode,
    tx: &mpsc::UnboundedSender<ExternalSignal>,
    signo: i32,
    sender_pid: u32,
) {
    let Ok(signal) = Signal::try_from(signo) else {
        return;
    };
    match signal {
        Signal::SIGCHLD => {
            reaper.reap_pass();
        }
        Signal::SIGTERM | Signal::SIGINT => {
            if sent_by_workload(mode, sender_pid) {
                tracing::warn!(
                    event = "signal.ignored",
                    signal = signal.as_str(),
                    sender_pid,
                    "ignoring a signal sent from inside the sandbox"
                );
            } else {
                tracing::info!(
                    event = "signal.received",
                    signal = signal.as_str(),
                    sender_pid,
                    "release requested by signal"
                );
                let _ = tx.send(ExternalSignal {
                    signal: signo,
                    sender_pid,
                });
            }
        }
        other => {
            tracing::info!(
                event = "signal.ignored",
                signal = other.as_str(),
                sender_pid,
                "ignoring signal"
            );
        }
    }
}

/// As PID 1, any sender we can see (`si_pid != 0`) lives in our PID namespace and is
/// workload. As a subreaper we share the namespace with others, so only our own
/// descendants count as workload.
fn sent_by_workload(mode: Mode, sender_pid: u32) -> bool {
    match mode {
        Mode::Pid1 => sender_pid != 0,
        Mode::Subreaper => {
            sender_pid != 0 && tree::is_descendant_of(sender_pid, std::process::id())
        }
    }
}
