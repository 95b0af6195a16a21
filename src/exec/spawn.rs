//! Starting a session's process: pipes or a PTY, a clean environment, and a child that
//! holds none of the supervisor's privileges, signal state or file descriptors.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
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

pub fn spawn(r: &Resolved, io: Io, reaper: &Reaper) -> Result<Spawned, ExecError> {
    let mut cmd = Command::new(&r.program);
    cmd.arg0(&r.argv[0])
        .args(&r.argv[1..])
        .env_clear()
        .envs(r.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&r.cwd);
    if r.switch_user {
        // std drops supplementary groups when root sets a uid without explicit groups.
        cmd.uid(r.user.uid).gid(r.user.gid);
    }

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

    // SAFETY: the closure runs between fork and exec in the child and only makes
    // async-signal-safe syscalls (setsid, ioctl, sigaction, sigprocmask, prctl,
    // close_range/fcntl); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || child_hardening(is_pty));
    }

    let started_at = Instant::now();
    let mut guard = reaper.spawn_guard();
    let child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: r.argv[0].to_string_lossy().into(),
        source,
    })?;
    let pid = child.id();
    let exit = guard.watch(pid);
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
    })
}

/// Runs in the child after fork (already as the target user): its own session, the
/// terminal as controlling tty, default signal dispositions and an empty mask,
/// no inherited fds beyond 0-2, and `no_new_privs`.
fn child_hardening(is_pty: bool) -> std::io::Result<()> {
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
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(std::io::Error::last_os_error());
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
