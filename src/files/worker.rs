//! The blocking side of file operations: a small fixed pool of threads started once
//! the relay is accepted, before any workload runs (never a thread per request: a
//! tenant exhausting the pids limit must not stop file operations). Each thread takes
//! the sandbox user's identity for file system checks once at start, per thread:
//! `setgroups` by raw syscall (glibc's wrapper would change every thread of the
//! process), then `setfsgid` and `setfsuid`. The kernel then checks the sandbox user's
//! permissions for every file syscall these threads make.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Once, OnceLock};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Handle to the pool; cloning is cheap.
#[derive(Clone)]
pub(crate) struct Worker {
    tx: std_mpsc::Sender<Job>,
    rx: Arc<Mutex<std_mpsc::Receiver<Job>>>,
    threads: usize,
    identity: Option<FsIdentity>,
    started: Arc<Once>,
    /// Why the pool cannot serve (its first thread could not start, or could not take
    /// the sandbox user's identity), once it has tried.
    failed: Arc<OnceLock<String>>,
}

/// The identity the pool takes (`None`: keep the supervisor's, when it is not root).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsIdentity {
    pub uid: u32,
    pub gid: u32,
}

impl Worker {
    /// A pool of `threads` workers, started by `start_once` or else by the first job:
    /// not here, since the pool is made at bind and starting four threads one by one
    /// (a clone and a hand-shake each) cost ~0.5 ms of every claim on a 2-vCPU guest.
    /// The first thread takes the identity and then starts the others; jobs queue
    /// until a thread has taken it, so none ever runs with the supervisor's root. If
    /// the first thread cannot take it (a kernel refusing `setfsuid`, as the 2022
    /// gVisor build does), the pool refuses every job with that reason, logged once as
    /// `file.unavailable`.
    pub(crate) fn new(threads: usize, identity: Option<FsIdentity>) -> Worker {
        let (tx, rx) = std_mpsc::channel::<Job>();
        Worker {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            threads,
            identity,
            started: Arc::new(Once::new()),
            failed: Arc::new(OnceLock::new()),
        }
    }

    /// Starts the threads unless they were started already.
    pub(crate) fn start_once(&self) {
        self.started.call_once(|| {
            if let Err(e) = self.start() {
                fail(&self.failed, e);
            }
        });
    }

    fn start(&self) -> Result<(), String> {
        let (rx, failed) = (self.rx.clone(), self.failed.clone());
        let (threads, identity) = (self.threads, self.identity);
        spawn_thread(0, move || {
            if let Some(id) = identity {
                if let Err(e) = take_identity(id) {
                    fail(&failed, e);
                    // Dropping a job drops its reply channel: the caller gets `failed`.
                    drain(&rx, drop);
                    return;
                }
            }
            for i in 1..threads {
                let rx = rx.clone();
                let started = spawn_thread(i, move || {
                    match identity.map_or(Ok(()), take_identity) {
                        Ok(()) => drain(&rx, |job| job()),
                        // The first thread took it, so this is not expected; the pool
                        // serves on with fewer threads rather than not at all.
                        Err(e) => {
                            tracing::warn!(event = "file.worker_failed", error = %e, "a file worker thread could not take the sandbox user's identity")
                        }
                    }
                });
                if let Err(e) = started {
                    tracing::warn!(event = "file.worker_failed", error = %e, "file worker threads: fewer than planned");
                }
            }
            drain(&rx, |job| job());
        })
    }

    /// Runs `f` on a worker thread and waits for its result.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, super::FileError> {
        self.submit(f).await
    }

    /// Queues `f` now (not when the result is first polled), so a caller can have the
    /// next job running while it works on the last result: a read's next chunk comes
    /// off the disk while the previous one is on the wire.
    pub(crate) fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, super::FileError>> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let failed = self.failed.clone();
        let gone = move || match failed.get() {
            Some(why) => unavailable(why),
            None => super::FileError::new(
                crate::proto::ErrorCode::Unavailable,
                "the file worker stopped; the supervisor is shutting down",
            ),
        };
        self.start_once();
        let queued = match self.failed.get() {
            None => self.tx.send(job).map_err(|_| gone()),
            Some(why) => Err(unavailable(why)),
        };
        async move {
            queued?;
            rx.await.map_err(|_| gone())
        }
    }
}

/// Records why the pool cannot serve, logged once.
fn fail(failed: &OnceLock<String>, why: String) {
    tracing::error!(event = "file.unavailable", error = %why, "file operations are unavailable");
    let _ = failed.set(why);
}

fn unavailable(why: &str) -> super::FileError {
    super::FileError::new(
        crate::proto::ErrorCode::Unavailable,
        format!("file operations are unavailable: {why}"),
    )
}

fn spawn_thread(i: usize, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(format!("ssv-files-{i}"))
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("cannot start file worker thread: {e}"))
}

/// Hands every job to `each` until the pool is dropped.
fn drain(rx: &Mutex<std_mpsc::Receiver<Job>>, each: impl Fn(Job)) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        match job {
            Ok(job) => each(job),
            Err(_) => return,
        }
    }
}

fn take_identity(id: FsIdentity) -> Result<(), String> {
    let groups = [id.gid as libc::gid_t];
    // SAFETY: raw setgroups changes only this thread's credentials (glibc's wrapper would
    // broadcast to all threads); the pointer and length describe a live array.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "file worker: setgroups([{}]) failed: {}",
            id.gid,
            std::io::Error::last_os_error()
        ));
    }
    // setfsgid/setfsuid return the previous value and cannot report failure directly:
    // calling again with the new value returns it when the change took.
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id.gid));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id.uid));
    let gid_now = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id.gid)).as_raw();
    let uid_now = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id.uid)).as_raw();
    if gid_now != id.gid || uid_now != id.uid {
        return Err(format!(
            "file worker: could not take fsuid {} / fsgid {} (have {uid_now}/{gid_now})",
            id.uid, id.gid
        ));
    }
    Ok(())
}
