//! The table of exec sessions: one place that opens (validates, spawns and starts the
//! pumps, the timeout and the exit watch of) sessions, finds them and forgets them.
//! One session is in `session.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

use super::kill::{Membership, MARKER_BASE};
use super::output::{OutputBudget, OutputBuffer};
use super::pumps::{pump, stdin_writer, Stream};
use super::session::{enforce_timeout, finish, valid_size, Session};
use super::spawn::{self, Credentials, Hardening, Io};
use super::spawner::Spawner;
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
    /// Unacknowledged output across all sessions (bytes allocated) before every
    /// process that writes more is paused.
    pub output_budget: usize,
    pub max_sessions: usize,
    /// How long output is drained after the leader exits while something else still
    /// holds the pipe (a background grandchild).
    pub drain_timeout: Duration,
    pub default_kill_grace: Duration,
    /// How long a start may take from clone to `execve` before it is killed.
    pub spawn_timeout: Duration,
    pub hardening: Hardening,
}

fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Arc<Session>>,
    /// Ids whose process is being started: taken, and counted against the limit.
    starting: HashSet<String>,
}

/// The table of sessions: one place that opens, finds and forgets them.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

struct SessionsInner {
    table: Mutex<Table>,
    spawner: Spawner,
    budget: Arc<OutputBudget>,
    reaper: Reaper,
    cfg: ExecConfig,
    accepting: AtomicBool,
    events: mpsc::UnboundedSender<proto::SessionEvent>,
    /// Sessions opened so far: the next session's marker group is `MARKER_BASE + n`.
    opened: AtomicU32,
}

impl Sessions {
    /// Starts the spawner thread too: here, before any tenant process exists, so a
    /// full pids limit can never refuse it. Fails only if the OS refuses that thread.
    pub fn new(
        cfg: ExecConfig,
        reaper: Reaper,
    ) -> std::io::Result<(Self, mpsc::UnboundedReceiver<proto::SessionEvent>)> {
        let spawner = Spawner::start(cfg.spawn_timeout)?;
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
            table: Mutex::new(Table::default()),
            spawner,
            budget: OutputBudget::new(cfg.output_budget),
            reaper,
            cfg,
            accepting: AtomicBool::new(true),
            events,
        };
        Ok((
            Sessions {
                inner: Arc::new(inner),
            },
            rx,
        ))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.table().sessions.get(id).cloned()
    }

    pub fn states(&self) -> Vec<proto::SessionState> {
        let mut v: Vec<_> = self.table().sessions.values().map(|s| s.state()).collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    pub fn live_count(&self) -> usize {
        self.table()
            .sessions
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
        let Some(s) = self.table().sessions.remove(id) else {
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

    /// Validates and starts a session, and reports it on the events channel: `Started`
    /// (ahead of anything else about the session) or `Failed`. Returns the session to
    /// attach a stream to. Takes up to the spawn timeout: run it off the control loop.
    pub async fn open(&self, id: &str, spec: &proto::ExecSpec) -> Option<Arc<Session>> {
        let reserved = self.reserve(id, spec);
        let result = match reserved {
            Ok(io) => {
                let r = self.start(id, spec, io).await;
                self.table().starting.remove(id);
                r
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(session) => Some(session),
            Err(e) => {
                tracing::info!(event = "session.failed", session_id = %id, code = ?e.code(), error = %e, "session could not be started");
                let _ = self.inner.events.send(proto::SessionEvent {
                    session_id: id.to_string(),
                    event: Some(proto::session_event::Event::Failed(e.to_proto())),
                });
                None
            }
        }
    }

    /// Checks what needs no process, and takes the id.
    fn reserve(&self, id: &str, spec: &proto::ExecSpec) -> Result<Io, ExecError> {
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
        let mut table = self.table();
        if table.sessions.contains_key(id) || table.starting.contains(id) {
            return Err(ExecError::DuplicateSession { id: id.into() });
        }
        if table.sessions.len() + table.starting.len() >= self.inner.cfg.max_sessions {
            return Err(ExecError::TooManySessions {
                limit: self.inner.cfg.max_sessions,
            });
        }
        table.starting.insert(id.to_string());
        Ok(io)
    }

    async fn start(
        &self,
        id: &str,
        spec: &proto::ExecSpec,
        io: Io,
    ) -> Result<Arc<Session>, ExecError> {
        // On the spawner thread, in the same job as the clone: it checks paths with the
        // session user's file-system identity for a moment, which must not be a
        // runtime worker's.
        let (req, policy) = (spec.clone(), self.inner.cfg.policy.clone());
        let is_tty = matches!(io, Io::Pty { .. });
        let n = self.inner.opened.fetch_add(1, Ordering::Relaxed);
        let marker = MARKER_BASE.checked_add(n + 1);
        let creds_for = move |resolved: &spec::Resolved| {
            resolved.switch_user.then_some(Credentials {
                uid: resolved.user.uid,
                gid: resolved.user.gid,
                marker,
            })
        };
        let (resolved, spawned) = spawn::spawn(
            move || spec::resolve(&req, &policy),
            creds_for,
            io,
            &self.inner.cfg.hardening,
            &self.inner.reaper,
            &self.inner.spawner,
            spec.argv.first().map_or("", String::as_str),
        )
        .await?;
        let creds = creds_for(&resolved);
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
            [(); 2].map(|_| OutputBuffer::new(cap, self.inner.budget.clone())),
            has_stdin.then_some(stdin_tx),
            pty_master,
            Membership {
                leader: spawned.pid,
                leader_start: spawned.start_time,
                marker: creds.and_then(|c| c.marker),
            },
        ));
        self.table()
            .sessions
            .insert(id.to_string(), session.clone());
        // Before the exit watch below exists, so nothing of the session overtakes it.
        let _ = self.inner.events.send(proto::SessionEvent {
            session_id: id.to_string(),
            event: Some(proto::session_event::Event::Started(proto::Started {
                pid: spawned.pid,
            })),
        });

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
