//! A running (or exited, not yet forgotten) exec session, and the table of them.
//!
//! A session outlives any stream attached to it: its pumps fill the replay buffers
//! whether or not the gateway is connected, and its exit is kept until the gateway
//! forgets it.

use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use super::kill::{Membership, MARKER_BASE};
use super::output::OutputBuffer;
use super::pumps::{pump, stdin_writer, StdinCmd, Stream};
use super::spawn::{self, Credentials, Io};
use super::spec::{self, ExecPolicy};
use super::ExecError;
use crate::pid1::{ExitInfo, Reaper};
use crate::proto;

/// Limits and defaults for sessions, fixed at boot.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub policy: ExecPolicy,
    /// Unacknowledged bytes held per output stream before the process is paused.
    pub buffer_capacity: usize,
    pub max_sessions: usize,
    /// How long output is drained after the leader exits while something else still
    /// holds the pipe (a background grandchild).
    pub drain_timeout: Duration,
    pub default_kill_grace: Duration,
}

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
        })
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

    /// SIGKILLs every process of the session now, then keeps sweeping on a blocking
    /// thread until none is left (a process may fork between a scan and its kill).
    pub(crate) fn kill_all(&self) {
        self.members.signal_all(libc::SIGKILL);
        let members = self.members;
        let id = self.id.clone();
        let sweep = move || {
            if !members.kill_all_blocking() {
                tracing::warn!(event = "session.kill_incomplete", session_id = %id, left = members.members().len(), "processes of the session survived repeated SIGKILL");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sweep)),
            Err(_) => sweep(),
        }
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

fn valid_size(cols: u32, rows: u32) -> Option<(u16, u16)> {
    let c = u16::try_from(cols).ok().filter(|&c| c > 0)?;
    let r = u16::try_from(rows).ok().filter(|&r| r > 0)?;
    Some((c, r))
}

fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The table of sessions: one place that opens, finds and forgets them.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

struct SessionsInner {
    table: Mutex<HashMap<String, Arc<Session>>>,
    reaper: Reaper,
    cfg: ExecConfig,
    accepting: AtomicBool,
    events: mpsc::UnboundedSender<proto::SessionEvent>,
    /// Sessions opened so far: the next session's marker group is `MARKER_BASE + n`.
    opened: AtomicU32,
}

impl Sessions {
    pub fn new(
        cfg: ExecConfig,
        reaper: Reaper,
    ) -> (Self, mpsc::UnboundedReceiver<proto::SessionEvent>) {
        if let Some((old, new)) = spawn::raise_nofile_limit() {
            tracing::info!(
                event = "exec.nofile_raised",
                old,
                new,
                "raised the open-file limit for many concurrent sessions; sessions keep the original"
            );
        }
        let (events, rx) = mpsc::unbounded_channel();
        let inner = SessionsInner {
            opened: AtomicU32::new(0),
            table: Mutex::new(HashMap::new()),
            reaper,
            cfg,
            accepting: AtomicBool::new(true),
            events,
        };
        (
            Sessions {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.table().get(id).cloned()
    }

    pub fn states(&self) -> Vec<proto::SessionState> {
        let mut v: Vec<_> = self.table().values().map(|s| s.state()).collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    pub fn live_count(&self) -> usize {
        self.table()
            .values()
            .filter(|s| s.exit_status().is_none())
            .count()
    }

    /// Refuses every later `open` (release has begun).
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
    }

    /// Drops a session; a running one has every process killed.
    pub fn forget(&self, id: &str) -> bool {
        let Some(s) = self.table().remove(id) else {
            return false;
        };
        if s.exit_status().is_none() {
            s.kill_all();
        }
        if let Some(h) = s.attached.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        tracing::info!(
            event = "session.forgotten",
            session_id = id,
            "session forgotten"
        );
        true
    }

    /// Validates and starts a session. The caller reports `started`/`failed`.
    pub fn open(&self, id: &str, spec: &proto::ExecSpec) -> Result<Arc<Session>, ExecError> {
        if !self.inner.accepting.load(Ordering::SeqCst) {
            return Err(ExecError::Releasing);
        }
        if !valid_session_id(id) {
            return Err(ExecError::BadSessionId { id: id.into() });
        }
        let io = match &spec.tty {
            Some(t) => {
                let (cols, rows) = valid_size(t.cols, t.rows).ok_or(ExecError::BadTtySize {
                    cols: t.cols,
                    rows: t.rows,
                })?;
                Io::Pty { cols, rows }
            }
            None => Io::Pipes { stdin: spec.stdin },
        };
        let resolved = spec::resolve(spec, &self.inner.cfg.policy)?;
        {
            let table = self.table();
            if table.contains_key(id) {
                return Err(ExecError::DuplicateSession { id: id.into() });
            }
            if table.len() >= self.inner.cfg.max_sessions {
                return Err(ExecError::TooManySessions {
                    limit: self.inner.cfg.max_sessions,
                });
            }
        }
        let is_tty = matches!(io, Io::Pty { .. });
        let n = self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let marker = MARKER_BASE.checked_add(n + 1);
        let creds = resolved.switch_user.then_some(Credentials {
            uid: resolved.user.uid,
            gid: resolved.user.gid,
            marker,
        });
        let spawned = spawn::spawn(&resolved, io, creds, &self.inner.reaper)?;
        let cap = self.inner.cfg.buffer_capacity;
        let (stdin_tx, stdin_rx) = mpsc::channel(64);
        let has_stdin = spawned.stdin.is_some();
        let pty_master = if is_tty {
            Some(spawned.stdout.try_clone().map_err(|e| ExecError::Spawn {
                program: spec.argv[0].clone(),
                source: e,
            })?)
        } else {
            None
        };
        let session = Arc::new(Session {
            id: id.to_string(),
            pid: spawned.pid,
            is_tty,
            stdout: OutputBuffer::new(cap),
            stderr: OutputBuffer::new(cap),
            stdin: tokio::sync::Mutex::new(StdinIn {
                tx: has_stdin.then_some(stdin_tx),
                accepted: 0,
                eof: false,
            }),
            stdin_ack: watch::channel(StdinAccepted {
                offset: 0,
                closed: !has_stdin,
            })
            .0,
            pty_master,
            members: Membership {
                leader: spawned.pid,
                leader_start: spawned.start_time,
                marker: creds.and_then(|c| c.marker),
            },
            exit: watch::channel(None).0,
            timed_out: AtomicBool::new(false),
            attached: Mutex::new(None),
        });
        self.table().insert(id.to_string(), session.clone());

        let out_pump = tokio::spawn(pump(spawned.stdout, session.clone(), Stream::Stdout));
        let err_pump = match spawned.stderr {
            Some(fd) => tokio::spawn(pump(fd, session.clone(), Stream::Stderr)),
            None => {
                session.stderr.close();
                tokio::spawn(async {})
            }
        };
        if let Some(fd) = spawned.stdin {
            tokio::spawn(stdin_writer(fd, stdin_rx, is_tty));
        }
        if spec.timeout_ms > 0 {
            let grace = if spec.kill_grace_ms > 0 {
                Duration::from_millis(spec.kill_grace_ms)
            } else {
                self.inner.cfg.default_kill_grace
            };
            tokio::spawn(enforce_timeout(
                session.clone(),
                Duration::from_millis(spec.timeout_ms),
                grace,
            ));
        }
        tokio::spawn(finish(
            session.clone(),
            spawned.exit,
            spawned.started_at,
            [out_pump, err_pump],
            self.inner.cfg.drain_timeout,
            self.inner.events.clone(),
        ));
        tracing::info!(event = "session.started", session_id = id, pid = spawned.pid, tty = is_tty, program = %resolved.program.display(), "session started");
        Ok(session)
    }
}

async fn enforce_timeout(session: Arc<Session>, timeout: Duration, grace: Duration) {
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
async fn finish(
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
