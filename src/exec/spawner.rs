//! The spawner: the one thread that starts session processes, and the watchdog that
//! bounds each start.
//!
//! A vfork-style start (`exec::child`) suspends its calling thread until the child
//! execs. From `setuid` until `execve` the child already has the tenant's uid, so the
//! tenant can SIGSTOP it there and hold the caller forever. The caller is therefore
//! this dedicated thread, started with the session table (before any tenant exists, so
//! the pids limit cannot refuse it), never a runtime worker or the signal thread; and
//! no lock is held across the clone (`pid1::PendingSpawn`). A start that has not reached
//! `execve` within the bound is SIGKILLed (which also works on a stopped process), so a
//! stuck start delays the next ones by at most the bound.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::pid1::PendingSpawn;

type Job = Box<dyn FnOnce() + Send>;

/// Handle to the spawner thread.
#[derive(Clone)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
    /// How long a start may take from clone to `execve`.
    pub bound: Duration,
}

const QUEUED: u8 = 0;
const STARTING: u8 = 1;
const DONE: u8 = 2;

/// What the watchdog sees of one start.
struct Watch {
    phase: AtomicU8,
    since: Mutex<Option<Instant>>,
    killed: AtomicBool,
}

/// What a session gets when the spawner thread is gone (it exits only by panicking).
pub(crate) fn gone(program: String) -> super::ExecError {
    super::ExecError::Spawn {
        program,
        source: std::io::Error::other("the spawner thread is gone"),
    }
}

/// How a start ended.
pub enum Outcome<T> {
    Finished(T),
    /// The watchdog killed the child before it reached `execve` (its result is `T`).
    TimedOut(T),
    /// The spawner thread died (a bug): it starts nothing any more.
    Gone,
}

impl Spawner {
    /// Starts the thread. Fails only if the OS refuses a thread.
    pub fn start(bound: Duration) -> std::io::Result<Spawner> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("exec-spawner".into())
            // The thread itself needs little; each child gets its own stack.
            .stack_size(256 * 1024)
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Spawner { jobs, bound })
    }

    /// Runs `f` on the spawner thread (work that changes the thread's credentials for
    /// a moment, like the path checks as the session user) and returns what it gave.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }

    /// Runs `start` on the spawner thread. Its child writes its pid to `pending`; past
    /// the bound that pid is SIGKILLed and the outcome is `TimedOut`.
    pub async fn run<T: Send + 'static>(
        &self,
        pending: Arc<PendingSpawn>,
        start: impl FnOnce(&PendingSpawn) -> T + Send + 'static,
    ) -> Outcome<T> {
        let watch = Arc::new(Watch {
            phase: AtomicU8::new(QUEUED),
            since: Mutex::new(None),
            killed: AtomicBool::new(false),
        });
        let (tx, mut rx) = oneshot::channel();
        let (w, cell) = (watch.clone(), pending.clone());
        let job: Job = Box::new(move || {
            *w.since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            w.phase.store(STARTING, Ordering::SeqCst);
            let result = start(&cell);
            w.phase.store(DONE, Ordering::SeqCst);
            let _ = tx.send(result);
        });
        if self.jobs.send(job).is_err() {
            // The thread is gone (it exits only by panicking): nothing can be started.
            return Outcome::Gone;
        }
        loop {
            let since = *watch.since.lock().unwrap_or_else(|e| e.into_inner());
            let wait = match since {
                // Killed: the clone returns as soon as the kernel has ended the child.
                _ if watch.killed.load(Ordering::SeqCst) => Duration::from_millis(10),
                Some(t) => self.bound.saturating_sub(t.elapsed()),
                // Behind another start, whose own watchdog bounds it.
                None => self.bound,
            };
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(result)) => {
                    return if watch.killed.load(Ordering::SeqCst) {
                        Outcome::TimedOut(result)
                    } else {
                        Outcome::Finished(result)
                    };
                }
                Ok(Err(_)) => return Outcome::Gone,
                Err(_) => {
                    let pid = pending.child_pid.load(Ordering::SeqCst);
                    let overdue = since.is_some_and(|t| t.elapsed() >= self.bound);
                    if overdue
                        && pid > 0
                        && watch.phase.load(Ordering::SeqCst) == STARTING
                        && !watch.killed.swap(true, Ordering::SeqCst)
                    {
                        // Still inside the clone, so the pid is our unreaped child.
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}
