//! The blocking side of file operations: a small fixed pool of threads started at bind
//! time (never a thread per request: a tenant exhausting the pids limit must not stop
//! file operations). Each thread takes the sandbox user's identity for file system
//! checks once at start, per thread: `setgroups` by raw syscall (glibc's wrapper would
//! change every thread of the process), then `setfsgid` and `setfsuid`. The kernel then
//! checks the sandbox user's permissions for every file syscall these threads make.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Handle to the pool; cloning is cheap.
#[derive(Clone)]
pub(crate) struct Worker {
    tx: std_mpsc::Sender<Job>,
}

/// The identity the pool takes (`None`: keep the supervisor's, when it is not root).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsIdentity {
    pub uid: u32,
    pub gid: u32,
}

impl Worker {
    /// Starts `threads` workers. Fails if a thread cannot start or cannot take the
    /// identity (the pool never runs with the supervisor's root by accident).
    pub(crate) fn start(threads: usize, identity: Option<FsIdentity>) -> Result<Worker, String> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let (ready_tx, ready_rx) = std_mpsc::channel();
            std::thread::Builder::new()
                .name(format!("ssv-files-{i}"))
                .spawn(move || {
                    let taken = match identity {
                        Some(id) => take_identity(id),
                        None => Ok(()),
                    };
                    let ok = taken.is_ok();
                    let _ = ready_tx.send(taken);
                    if !ok {
                        return;
                    }
                    loop {
                        let job = {
                            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| format!("cannot start file worker thread: {e}"))?;
            ready_rx
                .recv()
                .map_err(|_| "file worker thread died at start".to_owned())??;
        }
        Ok(Worker { tx })
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
        let queued = self.tx.send(job).map_err(|_| gone());
        async move {
            queued?;
            rx.await.map_err(|_| gone())
        }
    }
}

fn gone() -> super::FileError {
    super::FileError::new(
        crate::proto::ErrorCode::Unavailable,
        "the file worker stopped; the supervisor is shutting down",
    )
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
