//! File operations through the relay (`OpenFile` → a `File` stream): write, read, stat,
//! list, mkdir, remove, rename. Confined to the workspace (plus `--file-roots`), run on
//! a fixed worker pool that took the sandbox user's fs identity. See docs/PROTOCOL.md §12.
//!
//! - [`resolve`]: confinement (no symlink, no `..`, no mount crossing).
//! - [`ops`]: stat, list, mkdir, remove, rename.
//! - [`transfer`]: streamed atomic writes and reads.
//! - [`archive`]: tar upload (extract) and download.
//! - [`worker`]: the blocking pool and its identity.
//!
//! Writes survive a relay drop: a write whose stream broke is parked for the resume
//! window (`--file-resume-window`); an `OpenFile` with the same transfer id and the same
//! `WriteFile` re-attaches it from the accepted offset; a finished write's result is
//! remembered as long. A stream the gateway ends cleanly without `FileEnd` cancels it.

mod archive;
mod archive_stream;
mod ops;
mod resolve;
mod streams;
mod transfer;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::proto::{self, file_down, file_up, open_file::Op, ErrorCode, FileUp};
use crate::relay::Opener;
use crate::telemetry::Telemetry;
use streams::{read_ended, serve_read, serve_write, AbortOnDrop};
use transfer::WriteState;
pub(crate) use worker::FsIdentity;

/// Largest `FileData` frame sent up.
const READ_FRAME: usize = 256 * 1024;
/// What one worker job reads of a file: a few frames, so the hop to the worker thread
/// and back is paid per MiB, not per frame.
const READ_CHUNK: usize = 1 << 20;
/// A `FileAck` at least every this many accepted bytes.
const ACK_EVERY: u64 = 4 << 20;
/// Worker threads of the pool (fixed at bind time). An archive upload or download holds
/// one for its duration; other operations take one per frame.
const WORKER_THREADS: usize = 4;
/// How long the supervisor waits for the gateway to end its side after the last frame.
const LINGER: Duration = Duration::from_secs(30);

/// An error of one file operation: its protocol code and a message naming the path.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FileError {
    pub code: ErrorCode,
    pub message: String,
}

impl FileError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FileError {
            code,
            message: message.into(),
        }
    }
}

/// What the file service needs at bind time.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    pub workspace: PathBuf,
    pub roots: Vec<PathBuf>,
    /// The sandbox user's ids for the worker (`None`: unprivileged supervisor, keep ours).
    pub identity: Option<(u32, u32)>,
    pub resume_window: Duration,
    pub max_file_size: u64,
    pub max_operations: usize,
}

enum Slot {
    Active(WriteState),
    Done(proto::FileResult),
    Gone,
}

/// A write known by transfer id: running, parked or finished.
struct Upload {
    req: proto::WriteFile,
    slot: Arc<Mutex<Slot>>,
    /// Bumped on every attach; an expiry only fires for the epoch it was armed for.
    epoch: AtomicU64,
}

#[derive(Default)]
struct State {
    closed: bool,
    next_gen: u64,
    running: HashMap<String, (u64, AbortHandle)>,
    uploads: HashMap<String, Arc<Upload>>,
}

struct Inner {
    cfg: FilesConfig,
    roots: Arc<resolve::Roots>,
    worker: worker::Worker,
    telemetry: Arc<Telemetry>,
    state: Mutex<State>,
}

/// The file service of a bound supervisor. Cloning is cheap.
#[derive(Clone)]
pub struct Files {
    inner: Result<Arc<Inner>, String>,
}

impl Files {
    /// Opens the roots; the worker pool starts later (`start_workers`). A failure
    /// leaves a service that refuses every request with the reason (the supervisor
    /// keeps serving sessions).
    pub fn new(cfg: FilesConfig, telemetry: Arc<Telemetry>) -> Self {
        let built = (|| {
            let roots = resolve::Roots::open(&cfg.workspace, &cfg.roots)?;
            let identity = cfg.identity.map(|(uid, gid)| FsIdentity { uid, gid });
            let worker = worker::Worker::new(WORKER_THREADS, identity);
            Ok::<_, String>(Arc::new(Inner {
                cfg: cfg.clone(),
                roots: Arc::new(roots),
                worker,
                telemetry,
                state: Mutex::new(State::default()),
            }))
        })();
        if let Err(e) = &built {
            tracing::error!(event = "file.unavailable", error = %e, "file operations are unavailable");
        }
        Files { inner: built }
    }

    /// Starts the worker threads now rather than with the first request (the lifecycle
    /// calls it once the relay is accepted, before any workload runs).
    pub fn start_workers(&self) {
        if let Ok(inner) = &self.inner {
            inner.worker.start_once();
        }
    }

    /// Serves one `OpenFile` on a stream of its own. Never blocks the control loop.
    pub fn open(&self, req: proto::OpenFile, opener: Opener) {
        let inner = match &self.inner {
            Ok(i) => i.clone(),
            Err(e) => {
                let msg = format!("file operations are unavailable: {e}");
                tokio::spawn(async move {
                    opener
                        .refuse(&req.transfer_id, ErrorCode::Unavailable, msg)
                        .await
                });
                return;
            }
        };
        let id = req.transfer_id.clone();
        let Some(op) = req.op else {
            tokio::spawn(async move {
                opener
                    .refuse(
                        &id,
                        ErrorCode::InvalidArgument,
                        "OpenFile names no operation",
                    )
                    .await
            });
            return;
        };
        let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let refusal = if st.closed {
            Some((
                ErrorCode::Unavailable,
                "the sandbox is releasing; no new file operations".to_owned(),
            ))
        } else if id.is_empty() {
            Some((
                ErrorCode::InvalidArgument,
                "OpenFile.transfer_id is empty".to_owned(),
            ))
        } else if let Some((_, handle)) = st.running.get(&id) {
            let same_write =
                matches!(&op, Op::Write(w) if st.uploads.get(&id).is_some_and(|u| u.req == *w));
            if same_write {
                // A resume racing the old stream's failure: the new stream wins.
                handle.abort();
                None
            } else {
                Some((
                    ErrorCode::AlreadyExists,
                    format!("a file operation with id '{id}' is already running"),
                ))
            }
        } else if st.running.len() >= inner.cfg.max_operations {
            Some((ErrorCode::ResourceExhausted, format!(
                "{} file operations are already running (--max-file-operations); retry when one ends",
                st.running.len()
            )))
        } else {
            None
        };
        if let Some((code, msg)) = refusal {
            drop(st);
            inner
                .telemetry
                .metrics
                .file_operation(op_name(&op), "refused");
            tokio::spawn(async move { opener.refuse(&id, code, msg).await });
            return;
        }
        st.next_gen += 1;
        let gen = st.next_gen;
        let task = tokio::spawn(serve(inner.clone(), id.clone(), gen, op, opener));
        st.running.insert(id, (gen, task.abort_handle()));
    }

    /// Aborts every running operation and removes every unfinished write's temporary
    /// file (release: before the workload is killed).
    pub async fn abort_all(&self) {
        let Ok(inner) = &self.inner else { return };
        let (running, uploads) = {
            let mut st = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.closed = true;
            (
                std::mem::take(&mut st.running),
                std::mem::take(&mut st.uploads),
            )
        };
        for (_, h) in running.values() {
            h.abort();
        }
        let n = uploads.len();
        let slots: Vec<_> = uploads.into_values().map(|u| u.slot.clone()).collect();
        let _ = inner
            .worker
            .run(move || {
                for s in slots {
                    let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                    if let Slot::Active(w) = std::mem::replace(&mut *g, Slot::Gone) {
                        w.discard();
                    }
                }
            })
            .await;
        tracing::info!(
            event = "file.aborted_all",
            running = running.len(),
            writes = n,
            "file operations aborted for release"
        );
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Write(_) => "write",
        Op::Read(_) => "read",
        Op::Stat(_) => "stat",
        Op::List(_) => "list",
        Op::Mkdir(_) => "mkdir",
        Op::Remove(_) => "remove",
        Op::Rename(_) => "rename",
        Op::Extract(_) => "extract",
        Op::Archive(_) => "archive",
    }
}

fn up(msg: file_up::Msg) -> FileUp {
    FileUp { msg: Some(msg) }
}

fn error_frame(e: &FileError) -> FileUp {
    up(file_up::Msg::Error(proto::Error {
        code: e.code as i32,
        message: e.message.clone(),
    }))
}

/// Removes the running entry of generation `gen` when the task ends (or is aborted).
struct RunningGuard {
    inner: Arc<Inner>,
    id: String,
    gen: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st
            .running
            .get(&self.id)
            .is_some_and(|(g, _)| *g == self.gen)
        {
            st.running.remove(&self.id);
        }
    }
}

/// How the gateway's side of a stream ended.
enum DownEnd {
    /// Ended cleanly (or the operation needs nothing more from it).
    Closed,
    /// Broke: a reset, a relay drop, a refused call.
    Broken(String),
}

async fn serve(inner: Arc<Inner>, id: String, gen: u64, op: Op, opener: Opener) {
    let _guard = RunningGuard {
        inner: inner.clone(),
        id: id.clone(),
        gen,
    };
    let name = op_name(&op);
    let started = std::time::Instant::now();
    let outcome = match op {
        Op::Write(w) => serve_write(&inner, &id, w, &opener).await,
        Op::Read(r) => serve_read(&inner, &id, r, &opener).await,
        Op::Extract(x) => archive_stream::serve_extract(&inner, &id, x, &opener).await,
        Op::Archive(a) => archive_stream::serve_archive(&inner, &id, a, &opener).await,
        other => {
            let roots = inner.roots.clone();
            let result = inner
                .worker
                .run(move || match &other {
                    Op::Stat(r) => ops::stat(&roots, r),
                    Op::List(r) => ops::list(&roots, r),
                    Op::Mkdir(r) => ops::mkdir(&roots, r),
                    Op::Remove(r) => ops::remove(&roots, r),
                    Op::Rename(r) => ops::rename(&roots, r),
                    _ => unreachable!("handled above"),
                })
                .await
                .and_then(|r| r);
            simple(&inner, &id, result, &opener).await
        }
    };
    let label = match &outcome {
        Outcome::Ok => "ok",
        Outcome::Failed(_) => "failed",
        Outcome::Interrupted => "interrupted",
        Outcome::Cancelled => "cancelled",
    };
    inner.telemetry.metrics.file_operation(name, label);
    match outcome {
        Outcome::Failed(e) => {
            tracing::info!(event = "file.failed", transfer_id = %id, op = name, code = ?e.code, error = %e.message, "file operation failed")
        }
        _ => {
            tracing::info!(event = "file.done", transfer_id = %id, op = name, outcome = label, duration_us = started.elapsed().as_micros() as u64, "file operation ended")
        }
    }
}

enum Outcome {
    Ok,
    Failed(FileError),
    /// The stream broke; a write is parked for resume.
    Interrupted,
    /// The gateway ended the stream before the operation finished.
    Cancelled,
}

/// Opens the File stream with `first` frames queued; returns the sender and the call.
type DownCall = Result<tonic::Response<tonic::Streaming<proto::FileDown>>, tonic::Status>;

/// Opens the File stream for `id` with its `FileAttach{offset}` queued as the first frame.
async fn open_stream(
    opener: &Opener,
    id: &str,
    offset: u64,
) -> Option<(
    mpsc::Sender<FileUp>,
    impl std::future::Future<Output = DownCall>,
)> {
    let (tx, rx) = mpsc::channel::<FileUp>(8);
    let req = crate::relay::authed(ReceiverStream::new(rx), &opener.creds.token()).ok()?;
    let mut grpc = crate::relay::channel::client(opener.channel.clone());
    let attach = up(file_up::Msg::Attach(proto::FileAttach {
        transfer_id: id.to_owned(),
        offset,
    }));
    let _ = tx.send(attach).await;
    Some((tx, async move { grpc.file(req).await }))
}

/// Waits for the gateway to end its side (bounded), so the last frames are delivered
/// before the stream is dropped.
async fn linger(down: &mut tonic::Streaming<proto::FileDown>) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(Some(_)) = down.message().await {}
    })
    .await;
}

async fn simple(
    inner: &Inner,
    id: &str,
    result: Result<proto::FileResult, FileError>,
    opener: &Opener,
) -> Outcome {
    let Some((tx, call)) = open_stream(opener, id, 0).await else {
        return Outcome::Interrupted;
    };
    let last = match &result {
        Ok(r) => up(file_up::Msg::Result(r.clone())),
        Err(e) => error_frame(e),
    };
    let _ = tx.send(last).await;
    drop(tx);
    if let Ok(resp) = call.await {
        linger(&mut resp.into_inner()).await;
    }
    let _ = inner;
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Failed(e),
    }
}
