//! The table of exec sessions: one place that opens (validates, spawns and starts the
//! pumps, the timeout and the exit watch of) sessions, finds them and forgets them.
//! One session is in `session.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

use super::kill::{Membership, MARKER_BASE};
use super::pumps::{pump, stdin_writer, Stream};
use super::session::{enforce_timeout, finish, valid_size, Session};
use super::spawn::{self, Credentials, Io};
use super::spec::{self, ExecPolicy};
use super::ExecError;
use crate::pid1::Reaper;
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
        let session = Arc::new(Session::new(
            id,
            spawned.pid,
            is_tty,
            cap,
            has_stdin.then_some(stdin_tx),
            pty_master,
            Membership {
                leader: spawned.pid,
                leader_start: spawned.start_time,
                marker: creds.and_then(|c| c.marker),
            },
        ));
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
