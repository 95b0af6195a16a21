//! A running (or exited, not yet forgotten) exec session: its input (stdin by offset,
//! resize, signals), its replay buffers and its exit, and the tasks that time it out
//! and publish the exit. The table that opens, finds and forgets sessions is in
//! `sessions.rs`.
//!
//! A session outlives any stream attached to it: its pumps fill the replay buffers
//! whether or not the gateway is connected, and its exit is kept until the gateway
//! forgets it.

use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use super::kill::Membership;
use super::output::OutputBuffer;
use super::pumps::StdinCmd;
use super::spawn;
use crate::pid1::ExitInfo;
use crate::proto;

pub struct Session {
    pub id: String,
    pub pid: u32,
    pub is_tty: bool,
    pub stdout: OutputBuffer,
    pub stderr: OutputBuffer,
    /// Held across the hand-off to the writer, so offsets are checked and advanced
    /// atomically even while an old stream's task is still being torn down.
    stdin: tokio::sync::Mutex<StdinIn>,
    /// What `stdin` has accepted, readable without waiting (for Hello, Attach, acks).
    stdin_ack: watch::Sender<StdinAccepted>,
    pty_master: Option<OwnedFd>,
    /// Finds every process of the session, including those that left its group.
    members: Membership,
    exit: watch::Sender<Option<proto::ExitStatus>>,
    timed_out: AtomicBool,
    /// The task serving the currently attached stream, replaced on re-attach.
    pub(crate) attached: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The session's side of its stdin stream.
struct StdinIn {
    /// None once closed (EOF accepted, stdin=false, or the process closed its stdin).
    tx: Option<mpsc::Sender<StdinCmd>>,
    /// Bytes handed to the writer so far: the offset the next new byte must have.
    accepted: u64,
    /// A `StdinEof` was accepted (so a resent one at the same offset is a duplicate).
    eof: bool,
}

/// Stdin accepted so far, as reported in `Attach`, `SessionState` and `StdinAck`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StdinAccepted {
    pub offset: u64,
    /// Closed for good: nothing more will be accepted.
    pub closed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionInputError {
    #[error(
        "stdin of session '{0}' is already closed (after StdinEof, or opened with stdin=false)"
    )]
    StdinClosed(String),
    #[error("stdin gap in session '{id}': the frame starts at offset {offset} but only {accepted} bytes were accepted; resend from offset {accepted}")]
    StdinGap {
        id: String,
        offset: u64,
        accepted: u64,
    },
    #[error("StdinEof for session '{id}' says {offset} bytes were sent, but {accepted} were already accepted; send the EOF at offset {accepted}")]
    EofBehind {
        id: String,
        offset: u64,
        accepted: u64,
    },
    #[error("session '{0}' has no terminal: Resize applies only to sessions opened with tty")]
    NotATty(String),
    #[error("signal {0} is not a valid signal number (1..64)")]
    BadSignal(i32),
    #[error("terminal size {0}x{1} is invalid: both must be between 1 and 65535")]
    BadSize(u32, u32),
    #[error("signalling session '{id}' failed: {source}")]
    Signal {
        id: String,
        #[source]
        source: nix::Error,
    },
}

impl SessionInputError {
    pub fn to_proto(&self) -> proto::Error {
        let code = match self {
            SessionInputError::StdinClosed(_)
            | SessionInputError::NotATty(_)
            | SessionInputError::StdinGap { .. } => proto::ErrorCode::FailedPrecondition,
            SessionInputError::BadSignal(_)
            | SessionInputError::BadSize(..)
            | SessionInputError::EofBehind { .. } => proto::ErrorCode::InvalidArgument,
            SessionInputError::Signal { .. } => proto::ErrorCode::Internal,
        };
        proto::Error {
            code: code as i32,
            message: self.to_string(),
        }
    }
}

impl Session {
    /// The session of a process just spawned: its two (empty) replay buffers, stdin
    /// open when `stdin` is given, no exit yet.
    pub(super) fn new(
        id: &str,
        pid: u32,
        is_tty: bool,
        [stdout, stderr]: [OutputBuffer; 2],
        stdin: Option<mpsc::Sender<StdinCmd>>,
        pty_master: Option<OwnedFd>,
        members: Membership,
    ) -> Session {
        let has_stdin = stdin.is_some();
        Session {
            id: id.to_string(),
            pid,
            is_tty,
            stdout,
            stderr,
            stdin: tokio::sync::Mutex::new(StdinIn {
                tx: stdin,
                accepted: 0,
                eof: false,
            }),
            stdin_ack: watch::channel(StdinAccepted {
                offset: 0,
                closed: !has_stdin,
            })
            .0,
            pty_master,
            members,
            exit: watch::channel(None).0,
            timed_out: AtomicBool::new(false),
            attached: Mutex::new(None),
        }
    }

    pub fn exit_status(&self) -> Option<proto::ExitStatus> {
        *self.exit.borrow()
    }

    pub fn subscribe_exit(&self) -> watch::Receiver<Option<proto::ExitStatus>> {
        self.exit.subscribe()
    }

    pub fn state(&self) -> proto::SessionState {
        proto::SessionState {
            session_id: self.id.clone(),
            stdout_end: self.stdout.end(),
            stderr_end: self.stderr.end(),
            exit: self.exit_status(),
            pid: self.pid,
            stdin_offset: self.stdin_accepted().offset,
        }
    }

    /// Stdin accepted so far (possibly a moment stale: only ever too low).
    pub fn stdin_accepted(&self) -> StdinAccepted {
        *self.stdin_ack.borrow()
    }

    /// Changes whenever more stdin is accepted or stdin closes.
    pub fn subscribe_stdin(&self) -> watch::Receiver<StdinAccepted> {
        self.stdin_ack.subscribe()
    }

    fn publish_stdin(&self, st: &StdinIn) {
        self.stdin_ack.send_replace(StdinAccepted {
            offset: st.accepted,
            closed: st.tx.is_none(),
        });
    }

    /// Accepts stdin at `offset` (None: a legacy frame, appended at the end). Bytes
    /// below what was accepted are dropped (a resend), so only a frame's new tail is
    /// written; a frame past it is a gap. Cancel-safe: nothing is accepted unless the
    /// hand-off to the writer completed.
    pub async fn write_stdin(
        &self,
        offset: Option<u64>,
        data: Bytes,
    ) -> Result<(), SessionInputError> {
        let mut st = self.stdin.lock().await;
        let at = offset.unwrap_or(st.accepted);
        let end = at + data.len() as u64;
        if at > st.accepted {
            if st.tx.is_none() {
                return Err(SessionInputError::StdinClosed(self.id.clone()));
            }
            return Err(SessionInputError::StdinGap {
                id: self.id.clone(),
                offset: at,
                accepted: st.accepted,
            });
        }
        if end <= st.accepted && (offset.is_some() || data.is_empty()) {
            return Ok(()); // already accepted: a resend
        }
        let Some(tx) = st.tx.clone() else {
            return Err(SessionInputError::StdinClosed(self.id.clone()));
        };
        let fresh = data.slice((st.accepted - at) as usize..);
        // A full queue waits here, which stops reading the session stream: HTTP/2
        // flow control then pushes back on the gateway.
        if tx.send(StdinCmd::Data(fresh)).await.is_err() {
            // The writer is gone (the process closed its stdin): closed for good.
            st.tx = None;
            self.publish_stdin(&st);
            return Err(SessionInputError::StdinClosed(self.id.clone()));
        }
        st.accepted = end;
        self.publish_stdin(&st);
        Ok(())
    }

    /// Closes stdin once every byte below `offset` was accepted (None: a legacy EOF,
    /// after whatever was accepted). A resent EOF at the same offset is ignored.
    /// Cancel-safe: the stdin handle is given up only once the EOF is queued.
    pub async fn close_stdin(&self, offset: Option<u64>) -> Result<(), SessionInputError> {
        let closed = || SessionInputError::StdinClosed(self.id.clone());
        let mut st = self.stdin.lock().await;
        let at = offset.unwrap_or(st.accepted);
        if st.eof && offset.is_some() && at == st.accepted {
            return Ok(()); // a resent EOF
        }
        let Some(tx) = st.tx.clone() else {
            return Err(closed());
        };
        if at > st.accepted {
            return Err(SessionInputError::StdinGap {
                id: self.id.clone(),
                offset: at,
                accepted: st.accepted,
            });
        }
        if at < st.accepted {
            return Err(SessionInputError::EofBehind {
                id: self.id.clone(),
                offset: at,
                accepted: st.accepted,
            });
        }
        let Ok(permit) = tx.reserve().await else {
            st.tx = None;
            self.publish_stdin(&st);
            return Err(closed());
        };
        permit.send(StdinCmd::Eof);
        st.tx = None;
        st.eof = true;
        self.publish_stdin(&st);
        Ok(())
    }

    pub fn resize(&self, cols: u32, rows: u32) -> Result<(), SessionInputError> {
        let master = self
            .pty_master
            .as_ref()
            .ok_or_else(|| SessionInputError::NotATty(self.id.clone()))?;
        let (c, r) = valid_size(cols, rows).ok_or(SessionInputError::BadSize(cols, rows))?;
        spawn::resize_pty(master, c, r).map_err(|source| SessionInputError::Signal {
            id: self.id.clone(),
            source,
        })?;
        // Linux's PTY signals the foreground group itself; gVisor's does not (nor does
        // it answer TIOCGPGRP on the master: then the session's own group). One more
        // SIGWINCH is harmless (pending signals coalesce; programs just re-read the
        // size), a missing one leaves a full-screen program drawn at the old size.
        let fg = foreground_group(master).unwrap_or(self.pid as i32);
        let _ = killpg(Pid::from_raw(fg), Signal::SIGWINCH);
        Ok(())
    }

    /// Delivers a signal. SIGTERM and SIGKILL end the session, so they reach every
    /// process of it, also those that left its process group (see `exec::kill`). Any
    /// other signal goes to the session's process group, and on a PTY also to the
    /// terminal's foreground group (where an interactive shell runs its current job),
    /// as a terminal would deliver it.
    pub fn signal(&self, signo: i32) -> Result<(), SessionInputError> {
        let sig = Signal::try_from(signo).map_err(|_| SessionInputError::BadSignal(signo))?;
        if self.exit_status().is_some() {
            return Ok(());
        }
        match sig {
            Signal::SIGKILL => {
                self.kill_all();
                Ok(())
            }
            Signal::SIGTERM => {
                self.members.signal_all(libc::SIGTERM);
                Ok(())
            }
            _ => {
                if let Some(fg) = self.pty_master.as_ref().and_then(foreground_group) {
                    if fg != self.pid as i32 {
                        let _ = killpg(Pid::from_raw(fg), sig);
                    }
                }
                match killpg(Pid::from_raw(self.pid as i32), sig) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                    Err(source) => Err(SessionInputError::Signal {
                        id: self.id.clone(),
                        source,
                    }),
                }
            }
        }
    }

    /// SIGKILLs every process of the session now, then keeps sweeping in a task until
    /// none is left (a process may fork between a scan and its kill).
    pub(crate) fn kill_all(&self) {
        self.members.signal_all(libc::SIGKILL);
        let members = self.members;
        let id = self.id.clone();
        tokio::spawn(async move {
            if !members.kill_all().await {
                tracing::warn!(event = "session.kill_incomplete", session_id = %id, left = members.members().len(), "processes of the session survived repeated SIGKILL");
            }
        });
    }

    /// Releases acknowledged bytes.
    pub fn ack(&self, stdout_offset: u64, stderr_offset: u64) {
        self.stdout.ack(stdout_offset);
        self.stderr.ack(stderr_offset);
    }
}

/// The terminal's foreground process group, if any.
fn foreground_group(master: &OwnedFd) -> Option<i32> {
    nix::unistd::tcgetpgrp(master)
        .ok()
        .map(|p| p.as_raw())
        .filter(|&p| p > 0)
}

pub(super) fn valid_size(cols: u32, rows: u32) -> Option<(u16, u16)> {
    let c = u16::try_from(cols).ok().filter(|&c| c > 0)?;
    let r = u16::try_from(rows).ok().filter(|&r| r > 0)?;
    Some((c, r))
}

/// Ends a session that runs past its `timeout_ms`: SIGTERM, then SIGKILL after `grace`.
pub(super) async fn enforce_timeout(session: Arc<Session>, timeout: Duration, grace: Duration) {
    let mut exit = session.subscribe_exit();
    if tokio::time::timeout(timeout, exit.wait_for(|e| e.is_some()))
        .await
        .is_ok()
    {
        return;
    }
    session.timed_out.store(true, Ordering::SeqCst);
    tracing::info!(event = "session.timed_out", session_id = %session.id, timeout_ms = timeout.as_millis() as u64, "session timed out; terminating");
    session.members.signal_all(libc::SIGTERM);
    let _ = tokio::time::timeout(grace, exit.wait_for(|e| e.is_some())).await;
    // Unconditionally: the leader may have obeyed TERM while a process that left the
    // group ignores it; a timed-out session leaves nothing behind.
    session.kill_all();
}

/// Waits for the leader's exit, drains output for a bounded time, then publishes the
/// exit status (always after the last byte of output is in the buffers).
pub(super) async fn finish(
    session: Arc<Session>,
    exit: tokio::sync::oneshot::Receiver<(ExitInfo, Instant)>,
    started_at: Instant,
    pumps: [tokio::task::JoinHandle<()>; 2],
    drain_timeout: Duration,
    events: mpsc::UnboundedSender<proto::SessionEvent>,
) {
    let (info, exited_at) = match exit.await {
        Ok(v) => v,
        // The reaper is gone: treat the process as lost (should not happen).
        Err(_) => (
            ExitInfo::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false,
            },
            Instant::now(),
        ),
    };
    let [a, b] = pumps;
    let (abort_a, abort_b) = (a.abort_handle(), b.abort_handle());
    let drained = tokio::time::timeout(drain_timeout, async {
        let _ = a.await;
        let _ = b.await;
    })
    .await
    .is_ok();
    if !drained {
        // Something outside the leader still holds the pipe: stop waiting for it.
        abort_a.abort();
        abort_b.abort();
        session.stdout.close();
        session.stderr.close();
        tracing::info!(event = "session.drain_timeout", session_id = %session.id, "output still held open after the leader exited; stopped draining");
    }
    let (how, core_dumped) = match info {
        ExitInfo::Exited(code) => (proto::exit_status::How::ExitCode(code), false),
        ExitInfo::Signaled {
            signal,
            core_dumped,
        } => (proto::exit_status::How::Signal(signal), core_dumped),
    };
    let status = proto::ExitStatus {
        how: Some(how),
        core_dumped,
        status: info.shell_status(),
        timed_out: session.timed_out.load(Ordering::SeqCst),
        duration_ms: exited_at.duration_since(started_at).as_millis() as u64,
    };
    tracing::info!(event = "session.exited", session_id = %session.id, status = status.status, timed_out = status.timed_out, duration_ms = status.duration_ms, "session exited");
    session.exit.send_replace(Some(status));
    let _ = events.send(proto::SessionEvent {
        session_id: session.id.clone(),
        event: Some(proto::session_event::Event::Exited(status)),
    });
}
