//! Starting `local`'s supervisor: PID 1 of a new PID namespace with its own mount
//! namespace and /proc where the kernel gives both, else a child subreaper. Either way it
//! gets `PR_SET_PDEATHSIG`, so it never outlives `local`.
//!
//! The PID namespace is made by `clone(CLONE_NEWPID)`, not `unshare(CLONE_NEWPID)`: the
//! runtime's threads exist already, and gVisor refuses `unshare(CLONE_NEWPID)` in a
//! threaded process (Linux also forbids a threaded process to create threads after it).
//! The clone happens on the calling thread, which must live as long as `local` (the main
//! thread): the death signal fires when the parent *thread* exits.

use anyhow::Context;
use nix::errno::Errno;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How the supervisor runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mode {
    Pid1,
    /// Not PID 1, and why.
    Subreaper(String),
}

/// The supervisor process (not a `std::process::Child`: the PID-1 path clones it raw).
pub(super) struct Supervisor {
    pub pid: i32,
}

/// How the supervisor ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ended {
    Code(i32),
    Signal(i32),
}

impl Ended {
    pub(super) fn success(self) -> bool {
        matches!(self, Ended::Code(0))
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit code {c}"),
            Ended::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

impl Supervisor {
    /// Blocks until the supervisor exits (run it on a blocking thread).
    pub(super) fn wait(pid: i32) -> std::io::Result<Ended> {
        use nix::sys::wait::{waitpid, WaitStatus};
        loop {
            match waitpid(nix::unistd::Pid::from_raw(pid), None) {
                Ok(WaitStatus::Exited(_, c)) => return Ok(Ended::Code(c)),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(Ended::Signal(s as i32)),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
    }
}

/// Everything the child needs, made before the clone: after it only syscalls run (the
/// parent has other threads, which may hold the allocator's lock).
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    devnull: OwnedFd,
    log: OwnedFd,
    /// The child reports a failed step here (close-on-exec: EOF means exec worked).
    report_r: OwnedFd,
    report_w: OwnedFd,
    /// `MS_PRIVATE` on `/` may say EINVAL (gVisor has no propagation): acceptable only
    /// when no mount is shared, so nothing this namespace mounts can leak out.
    nothing_shared: bool,
    parent: i32,
}

// The steps the child reports (with the errno).
const STEP_NEWNS: u8 = 1;
const STEP_PRIVATE: u8 = 2;
const STEP_PROC: u8 = 3;
const STEP_STDIO: u8 = 4;
const STEP_EXEC: u8 = 5;
const STEP_PDEATHSIG: u8 = 6;

fn step_name(step: u8) -> &'static str {
    match step {
        STEP_NEWNS => "creating a mount namespace",
        STEP_PRIVATE => "making the mounts private (MS_REC|MS_PRIVATE on /)",
        STEP_PROC => "mounting the namespace's /proc",
        STEP_STDIO => "setting up stdin/stdout/stderr",
        STEP_EXEC => "executing the supervisor",
        STEP_PDEATHSIG => "tying the supervisor's life to local (PR_SET_PDEATHSIG)",
        _ => "starting the supervisor",
    }
}

/// Starts `program args…` with only `PATH` in its environment, stdin/stdout on
/// /dev/null and stderr to `log`: as PID 1 when `pid1` is asked and the kernel gives
/// PID and mount namespaces, else as a child subreaper (the reason in [`Mode`]).
pub(super) fn spawn(
    program: &Path,
    args: &[String],
    path_var: &OsStr,
    log: std::fs::File,
    pid1: bool,
) -> anyhow::Result<(Supervisor, Mode)> {
    let caps = crate::platform::get();
    let why_not = if !pid1 {
        Some("not root".to_owned())
    } else if !caps.has("pid_namespaces") {
        Some("this kernel gives no PID namespaces".to_owned())
    } else if !caps.has("mount_namespaces") {
        // A new PID namespace under the old /proc would show the supervisor other pids
        // than its own children's: it could signal the wrong process. Not PID 1, then.
        Some(
            "this kernel gives no mount namespaces (the supervisor could not have its own /proc)"
                .to_owned(),
        )
    } else {
        None
    };
    let log: OwnedFd = log.into();
    if let Some(why) = why_not {
        let sup = start(prepare(program, args, path_var, log)?, false)?;
        return Ok((sup, Mode::Subreaper(why)));
    }
    let keep = log.try_clone().context("duplicating the log fd")?;
    match start(prepare(program, args, path_var, log)?, true) {
        Ok(sup) => Ok((sup, Mode::Pid1)),
        Err(Failure::Namespace(why)) => {
            let sup = start(prepare(program, args, path_var, keep)?, false)?;
            Ok((sup, Mode::Subreaper(why)))
        }
        Err(Failure::Other(e)) => Err(e),
    }
}

fn prepare(
    program: &Path,
    args: &[String],
    path_var: &OsStr,
    log: OwnedFd,
) -> anyhow::Result<Prepared> {
    let cstr = |b: &[u8]| CString::new(b).context("a NUL byte in the supervisor's arguments");
    let program = cstr(program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for a in args {
        argv.push(cstr(a.as_bytes())?);
    }
    let mut path = b"PATH=".to_vec();
    path.extend_from_slice(path_var.as_bytes());
    let envp = vec![cstr(&path)?];
    let devnull = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .context("opening /dev/null")?;
    let (report_r, report_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    let nothing_shared = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| !t.contains(" shared:"))
        .unwrap_or(false);
    Ok(Prepared {
        program,
        argv,
        envp,
        devnull,
        log,
        report_r,
        report_w,
        nothing_shared,
        parent: nix::unistd::getpid().as_raw(),
    })
}

enum Failure {
    /// The namespaces could not be made: run as a subreaper instead.
    Namespace(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Other(e)
    }
}

impl From<Failure> for anyhow::Error {
    fn from(f: Failure) -> anyhow::Error {
        match f {
            Failure::Namespace(why) => anyhow::anyhow!(why),
            Failure::Other(e) => e,
        }
    }
}

fn start(p: Prepared, new_pid_ns: bool) -> Result<Supervisor, Failure> {
    let mut flags = libc::SIGCHLD as libc::c_long;
    if new_pid_ns {
        flags |= libc::CLONE_NEWPID as libc::c_long;
    }
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = p
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    // SAFETY: a fork-like clone (no CLONE_VM, no new stack): the child runs on a copy of
    // this stack and only makes the syscalls in `child` before execve or _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        let errno = Errno::last();
        if new_pid_ns {
            return Err(Failure::Namespace(format!(
                "creating a PID namespace failed: {errno}"
            )));
        }
        return Err(Failure::Other(anyhow::anyhow!(
            "starting the supervisor: {errno}"
        )));
    }
    if pid == 0 {
        // SAFETY: in the fresh child; see `child`.
        unsafe { child(&p, new_pid_ns, &argv, &envp) }
    }
    let pid = pid as i32;
    drop(p.report_w);
    let mut buf = [0u8; 5];
    let n = read_full(&p.report_r, &mut buf);
    if n == 0 {
        return Ok(Supervisor { pid });
    }
    // The child failed before exec and exits 127: reap it, then say where.
    let _ = Supervisor::wait(pid);
    let step = buf[0];
    let errno = Errno::from_raw(i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]));
    let what = format!("{}: {errno}", step_name(step));
    if new_pid_ns && matches!(step, STEP_NEWNS | STEP_PRIVATE | STEP_PROC) {
        return Err(Failure::Namespace(what));
    }
    Err(Failure::Other(anyhow::anyhow!("{what}")))
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

/// The child between clone and exec. Only raw syscalls: no allocation, no locks.
///
/// # Safety
/// Must be called only in the child of a fork-like clone, with `argv`/`envp`
/// null-terminated arrays of pointers into `p`.
unsafe fn child(
    p: &Prepared,
    new_pid_ns: bool,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let fail = |step: u8| fail(p.report_w.as_raw_fd(), step);
    // SAFETY (whole block): plain syscalls on fds and C strings prepared before the clone.
    unsafe {
        // The supervisor must not outlive local. The parent thread is the caller's (the
        // main thread): the signal fires when it exits, i.e. when local does. SIGTERM:
        // the supervisor releases and wipes, then exits.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(STEP_PDEATHSIG);
        }
        // Local died between the clone and the prctl: nobody would signal us. (In a new
        // PID namespace the parent is outside it and getppid says 0: no check there.)
        let ppid = libc::getppid();
        if ppid != 0 && ppid != p.parent {
            libc::_exit(127);
        }
        if new_pid_ns {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                fail(STEP_NEWNS);
            }
            let private = libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            if private != 0 && !(Errno::last() == Errno::EINVAL && p.nothing_shared) {
                fail(STEP_PRIVATE);
            }
            if libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                fail(STEP_PROC);
            }
        }
        if libc::dup2(p.devnull.as_raw_fd(), 0) < 0
            || libc::dup2(p.devnull.as_raw_fd(), 1) < 0
            || libc::dup2(p.log.as_raw_fd(), 2) < 0
        {
            fail(STEP_STDIO);
        }
        libc::execve(p.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(STEP_EXEC)
    }
}

/// Reports the failed `step` with errno on the pipe and exits (in the child).
fn fail(report: i32, step: u8) -> ! {
    let errno = Errno::last_raw().to_ne_bytes();
    let msg = [step, errno[0], errno[1], errno[2], errno[3]];
    // SAFETY: write(2) of a stack buffer to the report pipe, then _exit(2).
    unsafe {
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The supervisor's own words on why it stopped: the refusal or error lines of its log
/// (text format), else its last lines.
pub(super) fn reason_from_log(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let picked: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains(" error ") || l.contains("reuse.refused") || l.contains("aborting"))
        .collect();
    let shown = if picked.is_empty() {
        &lines[lines.len().saturating_sub(5)..]
    } else {
        &picked[picked.len().saturating_sub(5)..]
    };
    if shown.is_empty() {
        "(its log is empty)".to_owned()
    } else {
        shown.join("\n")
    }
}
