//! Starting a session's process: pipes or a PTY, a clean environment, and a child that
//! holds none of the supervisor's privileges, signal state or file descriptors.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::sync::oneshot;

use super::child;
use super::spawner::{Outcome, Spawner};
use super::spec::Resolved;
use super::ExecError;
use crate::pid1::{ExitInfo, PendingSpawn, Reaper};

/// The parent's ends of a freshly started process.
pub struct Spawned {
    pub pid: u32,
    /// Pipe write end (pipes) or the PTY master (tty); `None` when stdin is /dev/null.
    pub stdin: Option<OwnedFd>,
    /// Pipe read end, or the PTY master.
    pub stdout: OwnedFd,
    /// `None` for a PTY: its output is all on stdout.
    pub stderr: Option<OwnedFd>,
    pub exit: oneshot::Receiver<(ExitInfo, Instant)>,
    pub started_at: Instant,
    /// The leader's start time in /proc (0 if it could not be read).
    pub start_time: u64,
}

pub enum Io {
    Pipes { stdin: bool },
    Pty { cols: u16, rows: u16 },
}

fn setup(what: &'static str) -> impl Fn(nix::Error) -> ExecError {
    move |source| ExecError::Setup { what, source }
}

/// Pipe with both ends close-on-exec; the parent's end is made non-blocking.
fn pipe_for(parent_reads: bool) -> Result<(OwnedFd, OwnedFd), ExecError> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(setup("pipe"))?;
    let (parent, child) = if parent_reads { (r, w) } else { (w, r) };
    set_nonblocking(&parent)?;
    if parent_reads {
        // A larger pipe means fewer wake-ups per MiB streamed; best effort.
        let _ = fcntl(&parent, FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    Ok((parent, child))
}

pub(crate) fn set_nonblocking(fd: &OwnedFd) -> Result<(), ExecError> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(setup("fd flags"))?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(setup("fd flags"))?;
    Ok(())
}

/// The soft `RLIMIT_NOFILE` the supervisor started with (0 = never raised). Children get
/// it back: the raised limit is for the supervisor's own fds, and some programs loop
/// over every possible fd or use `select()`, which a huge soft limit breaks.
static ORIGINAL_NOFILE_SOFT: AtomicU64 = AtomicU64::new(0);

/// Raises the supervisor's soft `RLIMIT_NOFILE` to the hard limit: every session holds
/// up to three fds, so a thousand sessions need more than the usual 1024. Returns
/// (old, new) when it changed anything.
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    // Past ~1M fds the kernel's per-process table is the limit anyway (nr_open).
    let target = hard.min(1 << 20);
    if soft >= target {
        return None;
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).ok()?;
    ORIGINAL_NOFILE_SOFT.store(soft, Ordering::Relaxed);
    Some((soft, target))
}

/// Who the child becomes. `None` in [`spawn`] keeps the supervisor's identity (it is
/// not root and cannot switch).
#[derive(Debug, Clone, Copy)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// The session's marker group (see `exec::kill`), the only supplementary group.
    pub marker: Option<u32>,
}

/// What a session's process is made with, besides the request itself: fixed at boot.
#[derive(Debug, Clone, Default)]
pub struct Hardening {
    /// `RLIMIT_NPROC` for the sandbox user's processes (0: no cap).
    pub max_processes: u64,
    /// The session processes' `oom_score_adj` (None: inherit the supervisor's).
    pub oom_score_adj: Option<i32>,
}

pub async fn spawn(
    resolve: impl FnOnce() -> Result<Resolved, ExecError> + Send + 'static,
    creds_for: impl FnOnce(&Resolved) -> Option<Credentials> + Send + 'static,
    io: Io,
    hardening: &Hardening,
    reaper: &Reaper,
    spawner: &Spawner,
    program_hint: &str,
) -> Result<(Resolved, Spawned), ExecError> {
    let max_processes = hardening.max_processes;
    let hardening = hardening.clone();
    let started_at = Instant::now();
    let pending = reaper.begin_spawn();
    // One job on the spawner thread resolves the request (path checks as the session
    // user), prepares the descriptors and clones: each hop to that thread and back is
    // two wake-ups, on the critical path of every exec. Everything the child reads is
    // made there and lives there until the clone returns.
    let outcome = spawner
        .run(pending.clone(), move |cell: &PendingSpawn| {
            let r = resolve()?;
            let creds = creds_for(&r);
            let p = prepare(&r, io, &hardening)?;
            let (argv_ptrs, envp_ptrs) = (child::pointers(&p.argv), child::pointers(&p.envp));
            let plan = child::ChildPlan {
                program: &p.program,
                argv: &argv_ptrs,
                envp: &envp_ptrs,
                stdio: [
                    p.child_stdio[0].as_fd(),
                    p.child_stdio[1].as_fd(),
                    p.child_stdio[2].as_fd(),
                ],
                is_pty: p.is_pty,
                creds,
                cwd: &p.cwd,
                nofile_soft: p.nofile_soft,
                max_processes: p.max_processes,
                oom_score_adj: p.oom_score_adj.as_deref(),
                child_pid: &cell.child_pid,
            };
            let result = child::start(&plan);
            let Prepared {
                stdin,
                stdout,
                stderr,
                child_stdio,
                ..
            } = p;
            // The child's ends close here, so EOF is seen once the child and its heirs
            // exit.
            drop(child_stdio);
            Ok(Started {
                resolved: r,
                stdin,
                stdout,
                stderr,
                result,
            })
        })
        .await;
    let (job, timed_out) = match outcome {
        Outcome::Finished(r) => (r, false),
        Outcome::TimedOut(r) => (r, true),
        Outcome::Gone => {
            reaper.end_spawn(&pending, None, |_| ());
            return Err(super::spawner::gone(program_hint.to_owned()));
        }
    };
    let Started {
        resolved: r,
        stdin,
        stdout,
        stderr,
        result,
    } = match job {
        Ok(started) => started,
        Err(e) => {
            // Refused before any clone: no child exists.
            reaper.end_spawn(&pending, None, |_| ());
            return Err(e);
        }
    };
    let spawn_error = |source: std::io::Error| ExecError::Spawn {
        program: r.argv[0].to_string_lossy().into(),
        source,
    };
    let pid = match &result {
        Ok(pid) => Some(*pid),
        Err((child::Step::Clone, _)) => None,
        Err(_) => Some(pending.child_pid.load(Ordering::SeqCst) as u32).filter(|&p| p > 0),
    };
    // Read while the reaper is locked out: the process (or its zombie) still exists.
    let watched = reaper.end_spawn(&pending, pid, |pid| {
        super::kill::start_time(pid).unwrap_or(0)
    });
    if timed_out {
        return Err(ExecError::SpawnTimeout {
            program: r.argv[0].to_string_lossy().into(),
            bound: spawner.bound,
        });
    }
    let pid = result.map_err(|(step, errno)| {
        // The errno stays the error's OS code: it picks the protocol code.
        let source = std::io::Error::from_raw_os_error(errno as i32);
        let step = match step {
            // Like runc and Go's os/exec (and unlike execvp), a file without `#!` is
            // not handed to /bin/sh: say how to run it instead.
            child::Step::Exec if errno == nix::errno::Errno::ENOEXEC => {
                "execve (not a binary for this machine and no '#!' line: add one, or run it as [\"/bin/sh\", \"<file>\"])".to_string()
            }
            // setuid marked the user over its RLIMIT_NPROC; execve refuses then.
            child::Step::Exec if errno == nix::errno::Errno::EAGAIN && max_processes > 0 => {
                return ExecError::TooManyProcesses {
                    program: r.argv[0].to_string_lossy().into(),
                    limit: max_processes,
                };
            }
            child::Step::Exec => return spawn_error(source),
            child::Step::WorkingDirectory => {
                format!("{} '{}'", step.describe(), r.cwd.display())
            }
            _ => step.describe().to_string(),
        };
        ExecError::SpawnStep {
            program: r.argv[0].to_string_lossy().into(),
            step,
            source,
        }
    })?;
    let (exit, start_time) = watched.expect("a started child has a pid");
    let spawned = Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        exit,
        started_at,
        start_time: start_time.unwrap_or(0),
    };
    Ok((r, spawned))
}

/// What the spawner job makes from a resolved request before the clone.
struct Prepared {
    program: CString,
    cwd: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    is_pty: bool,
    /// The child's stdin, stdout and stderr, above the stdio numbers.
    child_stdio: [OwnedFd; 3],
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    nofile_soft: u64,
    max_processes: u64,
    oom_score_adj: Option<Vec<u8>>,
}

/// What the spawner job hands back: the parent's ends and how the start went.
struct Started {
    resolved: Resolved,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    result: Result<u32, (child::Step, nix::errno::Errno)>,
}

fn prepare(r: &Resolved, io: Io, hardening: &Hardening) -> Result<Prepared, ExecError> {
    let spawn_error = |source: std::io::Error| ExecError::Spawn {
        program: r.argv[0].to_string_lossy().into(),
        source,
    };
    // The child changes directory itself, after dropping privileges, so exec must not
    // depend on the supervisor's cwd.
    let program = if r.program.is_absolute() {
        r.program.clone()
    } else {
        r.cwd.join(&r.program)
    };
    // `resolve` refused NUL bytes in argv and env; the paths are checked here.
    let c_path = |p: &std::path::Path, what: &str| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| ExecError::BadCwd {
            cwd: p.display().to_string(),
            why: format!("the {what} contains a NUL byte"),
        })
    };
    let cwd = c_path(&r.cwd, "working directory")?;
    let program = c_path(&program, "program path")?;
    let argv: Vec<CString> = r
        .argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let envp: Vec<CString> = r
        .env
        .iter()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();

    let is_pty = matches!(io, Io::Pty { .. });
    // The child's ends (closed here once it has exec'd) and the parent's.
    let (child_stdio, stdin, stdout, stderr): ([OwnedFd; 3], _, _, _) = match io {
        Io::Pipes { stdin } => {
            let (parent_stdin, child_stdin) = if stdin {
                let (parent, child) = pipe_for(false)?;
                (Some(parent), child)
            } else {
                let null = nix::fcntl::open(
                    "/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(setup("/dev/null for stdin"))?;
                (None, null)
            };
            let (out_parent, out_child) = pipe_for(true)?;
            let (err_parent, err_child) = pipe_for(true)?;
            (
                [child_stdin, out_child, err_child],
                parent_stdin,
                out_parent,
                Some(err_parent),
            )
        }
        Io::Pty { cols, rows } => {
            // The size is set before the child exists, so its first read of the window
            // size is already right (never 0x0).
            let ws = Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = openpty(Some(&ws), None).map_err(setup("pseudo-terminal"))?;
            fcntl(&pty.master, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(setup("pseudo-terminal"))?;
            fcntl(&pty.slave, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(setup("pseudo-terminal"))?;
            set_nonblocking(&pty.master)?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(spawn_error);
            let slave = pty.slave;
            let master = pty.master;
            (
                [dup(&slave)?, dup(&slave)?, slave],
                Some(dup(&master)?),
                master,
                None,
            )
        }
    };
    let [a, b, c] = child_stdio;
    let raise = |fd| child::above_stdio(fd).map_err(setup("stdio descriptors"));
    let child_stdio = [raise(a)?, raise(b)?, raise(c)?];

    Ok(Prepared {
        program,
        cwd,
        argv,
        envp,
        is_pty,
        child_stdio,
        stdin,
        stdout,
        stderr,
        nofile_soft: ORIGINAL_NOFILE_SOFT.load(Ordering::Relaxed),
        max_processes: hardening.max_processes,
        oom_score_adj: hardening.oom_score_adj.map(|v| v.to_string().into_bytes()),
    })
}

/// Sets a PTY's window size (Linux then sends SIGWINCH to its foreground group).
pub fn resize_pty(master: &OwnedFd, cols: u16, rows: u16) -> nix::Result<()> {
    let ws = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    nix::errno::Errno::result(rc).map(drop)
}
