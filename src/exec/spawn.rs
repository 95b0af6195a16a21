//! Starting a session's process: pipes or a PTY, a clean environment, and a child that
//! holds none of the supervisor's privileges, signal state or file descriptors.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::sync::oneshot;

use super::spec::Resolved;
use super::ExecError;
use crate::pid1::{ExitInfo, Reaper};

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

pub fn spawn(
    r: &Resolved,
    io: Io,
    creds: Option<Credentials>,
    reaper: &Reaper,
) -> Result<Spawned, ExecError> {
    // The child changes directory itself, after dropping privileges (see
    // `child_hardening`), so exec must not depend on the supervisor's cwd.
    let program = if r.program.is_absolute() {
        r.program.clone()
    } else {
        r.cwd.join(&r.program)
    };
    let cwd = CString::new(r.cwd.as_os_str().as_bytes()).map_err(|_| ExecError::BadCwd {
        cwd: r.cwd.display().to_string(),
        why: "contains a NUL byte".into(),
    })?;
    let mut cmd = Command::new(&program);
    cmd.arg0(&r.argv[0])
        .args(&r.argv[1..])
        .env_clear()
        .envs(r.env.iter().map(|(k, v)| (k, v)));

    let is_pty = matches!(io, Io::Pty { .. });
    let (stdin, stdout, stderr) = match io {
        Io::Pipes { stdin } => {
            let parent_stdin = if stdin {
                let (parent, child) = pipe_for(false)?;
                cmd.stdin(Stdio::from(child));
                Some(parent)
            } else {
                cmd.stdin(Stdio::null());
                None
            };
            let (out_parent, out_child) = pipe_for(true)?;
            let (err_parent, err_child) = pipe_for(true)?;
            cmd.stdout(Stdio::from(out_child))
                .stderr(Stdio::from(err_child));
            (parent_stdin, out_parent, Some(err_parent))
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
            let slave = pty.slave;
            let dup = |fd: &OwnedFd| {
                fd.try_clone().map_err(|e| ExecError::Spawn {
                    program: r.argv[0].to_string_lossy().into(),
                    source: e,
                })
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            let master = pty.master;
            (Some(dup(&master)?), master, None)
        }
    };

    let nofile = ORIGINAL_NOFILE_SOFT.load(Ordering::Relaxed);
    // SAFETY: the closure runs between fork and exec in the child and only makes
    // async-signal-safe syscalls (setsid, ioctl, sigaction, sigprocmask, setrlimit,
    // close_range/fcntl, setgroups/setgid/setuid, chdir, prctl); it allocates nothing
    // (the cwd C string is built before the fork and moved in).
    unsafe {
        cmd.pre_exec(move || child_hardening(is_pty, creds, &cwd, nofile));
    }

    let started_at = Instant::now();
    let mut guard = reaper.spawn_guard();
    let child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: r.argv[0].to_string_lossy().into(),
        source,
    })?;
    let pid = child.id();
    let exit = guard.watch(pid);
    // Read while the reaper is locked out: the process (or its zombie) still exists.
    let start_time = super::kill::start_time(pid).unwrap_or(0);
    drop(guard);
    // Dropping `Child` never waits; the reaper owns the exit. Dropping `cmd` closes the
    // child's ends of the pipes in this process, so EOF is seen when the child exits.
    drop(child);
    drop(cmd);
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        exit,
        started_at,
        start_time,
    })
}

/// Runs in the child after fork: its own session, the terminal as controlling tty,
/// default signal dispositions and an empty mask, the original fd limit, no inherited
/// fds beyond 0-2, then the identity switch, the working directory and `no_new_privs`.
///
/// The identity switch is done here rather than with `Command::uid/gid`: std applies
/// those *before* `pre_exec` and always clears the supplementary groups, and its
/// `groups()` is unstable. DESIGN says "supplementary groups cleared"; we deviate on
/// purpose: the list holds exactly one group, the session's marker, which owns no
/// files and which the unprivileged child can never drop (no CAP_SETGID, and
/// `no_new_privs` stops setuid binaries from granting it). Order matters: setgroups
/// and setgid need root, so they come before setuid. The chdir follows the switch so
/// the directory is entered with the user's permissions, as with std's `current_dir`.
fn child_hardening(
    is_pty: bool,
    creds: Option<Credentials>,
    cwd: &CString,
    nofile_soft: u64,
) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY (whole fn): raw libc calls that are async-signal-safe; see `spawn`.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if is_pty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            // Kernels before 5.11: mark the usual range close-on-exec one by one.
            for fd in 3..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if nofile_soft > 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = nofile_soft as libc::rlim_t;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        if let Some(c) = creds {
            let groups: [libc::gid_t; 1] = [c.marker.unwrap_or(0)];
            let n = usize::from(c.marker.is_some());
            if libc::setgroups(n, groups.as_ptr()) < 0
                || libc::setgid(c.gid) < 0
                || libc::setuid(c.uid) < 0
            {
                return fail();
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 {
            return fail();
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return fail();
        }
    }
    Ok(())
}

/// Sets a PTY's window size; the kernel sends SIGWINCH to its foreground group.
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
