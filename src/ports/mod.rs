//! TCP port forwards through the relay (`OpenForward` → a `Forward` stream): the
//! supervisor connects inside the pod (loopback unless `--forward-allow` lists the
//! address) and relays both ways with half-close. See docs/PROTOCOL.md §13.
//!
//! What is refused where: a request that gets no stream at all (the sandbox is
//! releasing, `--max-forwards` reached, a duplicate or empty id) is answered with
//! `ChannelFailed` on the control stream; everything about the target (an invalid
//! port or host, an address not allowed, a refused or unreachable port) is a result of
//! that one connection and arrives as the `Error` frame of its own stream, after
//! `ForwardAttach`.
//!
//! A forward lives on one HTTP/2 stream of the relay connection: a relay drop breaks
//! it (a TCP connection cannot be resumed mid-stream), and the gateway opens a new one.

mod conn;
mod target;

// The reference gateway's end of a forward reads its socket the same way.
#[cfg(feature = "reference-gateway")]
pub(crate) use conn::read_coalesced;
pub use target::{parse_allow, resolve, AllowList, TargetError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use crate::proto::{self, ErrorCode};
use crate::relay::Opener;

/// How long `close_all` lets forwards say goodbye (their `Error{UNAVAILABLE}` frame)
/// before it aborts the rest.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Limits and policy of port forwards (from `run`'s options).
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// `--forward-allow`: non-loopback addresses that may be reached.
    pub allow: AllowList,
    /// `--forward-connect-timeout`.
    pub connect_timeout: Duration,
    /// `--max-forwards`.
    pub max: usize,
}

impl ForwardConfig {
    pub fn from_run(cfg: &crate::config::RunConfig) -> Self {
        ForwardConfig {
            allow: cfg.forward_allow.clone(),
            connect_timeout: cfg.forward_connect_timeout,
            max: cfg.max_forwards as usize,
        }
    }
}

/// The forwards of a bound supervisor. Cloning is cheap.
#[derive(Clone)]
pub struct Forwards {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ForwardConfig,
    state: Mutex<State>,
    /// Set once at release: every forward ends with `Error{UNAVAILABLE}`.
    closing: watch::Sender<bool>,
    /// Signalled whenever a forward ends.
    ended: Notify,
}

#[derive(Default)]
struct State {
    closing: bool,
    /// Open forwards by id (None until the task's handle is known).
    open: HashMap<String, Option<AbortHandle>>,
}

/// One forward's slot: freed when its task ends or is aborted.
pub(super) struct Slot {
    inner: Arc<Inner>,
    id: String,
    opener: Opener,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.lock().open.remove(&self.id);
        self.opener.telemetry.metrics.forwards.active.dec();
        self.inner.ended.notify_waiters();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Forwards {
    pub fn new(cfg: ForwardConfig) -> Self {
        Forwards {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State::default()),
                closing: watch::channel(false).0,
                ended: Notify::new(),
            }),
        }
    }

    /// Serves one `OpenForward` on a stream of its own. Never blocks the control loop.
    pub fn open(&self, req: proto::OpenForward, opener: Opener) {
        let id = req.forward_id.clone();
        let refusal = {
            let mut st = self.inner.lock();
            if st.closing {
                Some((ErrorCode::Unavailable, crate::relay::RELEASING.to_string()))
            } else if id.is_empty() {
                Some((
                    ErrorCode::InvalidArgument,
                    "OpenForward has an empty forward_id: give each forward a unique id"
                        .to_string(),
                ))
            } else if st.open.contains_key(&id) {
                Some((
                    ErrorCode::AlreadyExists,
                    format!(
                        "a forward with id '{id}' is already open: give each forward a unique id"
                    ),
                ))
            } else if st.open.len() >= self.inner.cfg.max {
                Some((
                    ErrorCode::ResourceExhausted,
                    format!(
                        "{} port forwards are open, the most --max-forwards allows: close one first or raise --max-forwards",
                        st.open.len()
                    ),
                ))
            } else {
                st.open.insert(id.clone(), None);
                None
            }
        };
        let metrics = &opener.telemetry.metrics.forwards;
        if let Some((code, message)) = refusal {
            metrics.ended("rejected");
            tracing::info!(event = "forward.refused", forward_id = %id, host = %req.host, port = req.port, code = ?code, error = %message, "port forward refused before a stream was opened");
            tokio::spawn(async move { opener.refuse(&id, code, message).await });
            return;
        }
        metrics.active.inc();
        let slot = Slot {
            inner: self.inner.clone(),
            id: id.clone(),
            opener: opener.clone(),
        };
        let closing = self.inner.closing.subscribe();
        let cfg = self.inner.cfg.clone();
        let task = tokio::spawn(async move {
            conn::serve(req, opener, &cfg, closing, slot).await;
        });
        if let Some(h) = self.inner.lock().open.get_mut(&id) {
            *h = Some(task.abort_handle());
        }
    }

    /// Closes every forward and refuses new ones (release: before the workload is
    /// killed). Each open forward sends `Error{UNAVAILABLE}` and ends its stream;
    /// whatever has not ended within a short grace is aborted (its stream is reset).
    pub async fn close_all(&self) {
        {
            self.inner.lock().closing = true;
        }
        self.inner.closing.send_replace(true);
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let left = self.inner.lock().open.len();
            if left == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                break;
            }
        }
        let handles: Vec<AbortHandle> =
            self.inner.lock().open.values().flatten().cloned().collect();
        tracing::info!(
            event = "forward.aborted",
            forwards = handles.len(),
            "port forwards still open after the release grace were aborted"
        );
        for h in handles {
            h.abort();
        }
    }
}
