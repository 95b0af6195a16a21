//! Starting a session's process: `clone(CLONE_VM | CLONE_VFORK)`, then, in the child,
//! the hardening steps and `execve`.
//!
//! Why not `std::process::Command`: with a `pre_exec` hook std has to `fork()`, which
//! copies the page tables of the whole multi-threaded supervisor. On the 2-core VM the
//! benchmarks run on, fork-until-exec took ~1.1 ms where a vfork-style spawn returns in
//! ~55 µs (BENCHMARKS.md, "exec round trip"). A vfork-style child borrows the
//! supervisor's memory until it execs while the calling thread waits, as glibc's
//! `posix_spawn` and Go's `os/exec` do. That asks for discipline in the child, kept in
//! this one file:
//! - everything is prepared before the clone: the child allocates nothing and takes no
//!   lock (another supervisor thread may hold malloc's);
//! - credentials change with raw syscalls: glibc's `setuid`/`setgid`/`setgroups` would
//!   try to broadcast the change to the supervisor's other threads, whose list is
//!   shared memory here;
//! - every signal is blocked around the clone, and the child resets every disposition
//!   before it unblocks any, so no supervisor handler ever runs in the child. Both with
//!   raw syscalls: glibc's wrappers skip its internal signals (SIGCANCEL, SIGSETXID), so
//!   one ignored when the supervisor started would stay ignored in every session;
//! - a failing step writes (step, errno) to memory the parent reads once the child is
//!   gone, then `_exit(127)`s. The zombie is the reaper's, like every other;
//! - the calling thread is suspended until the child execs, and from `setuid` on the
//!   tenant may SIGSTOP the child: so the caller is the spawner's own thread, never a
//!   runtime worker, and the child first writes its pid where a watchdog can kill it
//!   (`exec::spawner`).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sched::CloneFlags;

use super::spawn::Credentials;

/// The child's stack. Its path is shallow (a few libc wrappers); the margin is wide
/// because an overflow would land in the supervisor's memory.
const CHILD_STACK: usize = 256 * 1024;

/// The kernel's signals and the size of its signal set: 64 and 8 bytes on x86_64 and
/// aarch64 (glibc's `sigset_t` is 128 bytes, and hides signals 32 and 33).
const KERNEL_NSIG: libc::c_int = 64;
const KERNEL_SIGSET_BYTES: usize = 8;

/// `rt_sigprocmask(SIG_SETMASK, set, old)` on the calling thread, every signal included.
///
/// # Safety
/// A raw syscall on the two words; the caller knows what the new mask does to it.
unsafe fn set_signal_mask(set: u64, old: Option<&mut u64>) -> libc::c_long {
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut u64);
    libc::syscall(
        libc::SYS_rt_sigprocmask,
        libc::SIG_SETMASK,
        &set as *const u64,
        old,
        KERNEL_SIGSET_BYTES,
    )
}

/// The set-up step that failed in the child (or the clone before it), for the error
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// In the parent: blocking signals or the clone itself (e.g. EAGAIN at the pid limit).
    Clone,
    NewSession,
    Stdio,
    ControllingTerminal,
    FdLimit,
    ProcessLimit,
    Groups,
    Gid,
    Uid,
    WorkingDirectory,
    NoNewPrivs,
    Exec,
}

impl Step {
    const ALL: [Step; 12] = [
        Step::Clone,
        Step::NewSession,
        Step::Stdio,
        Step::ControllingTerminal,
        Step::FdLimit,
        Step::ProcessLimit,
        Step::Groups,
        Step::Gid,
        Step::Uid,
        Step::WorkingDirectory,
        Step::NoNewPrivs,
        Step::Exec,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Step::Clone => "creating the process (clone)",
            Step::NewSession => "setsid",
            Step::Stdio => "setting up stdin/stdout/stderr",
            Step::ControllingTerminal => "taking the terminal as controlling tty",
            Step::FdLimit => "restoring the open-file limit",
            Step::ProcessLimit => "setting the process limit (--max-workload-processes)",
            Step::Groups => "setgroups",
            Step::Gid => "setgid",
            Step::Uid => "setuid",
            Step::WorkingDirectory => "entering the working directory",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::Exec => "execve",
        }
    }
}

/// Everything the child needs, built before the clone.
pub struct ChildPlan<'a> {
    pub program: &'a CStr,
    /// NULL-terminated `argv` and `envp`, pointing into strings that outlive the call.
    pub argv: &'a [*const libc::c_char],
    pub envp: &'a [*const libc::c_char],
    /// What becomes fds 0, 1 and 2; each is 3 or above (see [`above_stdio`]).
    pub stdio: [BorrowedFd<'a>; 3],
    pub is_pty: bool,
    pub creds: Option<Credentials>,
    pub cwd: &'a CStr,
    /// The soft `RLIMIT_NOFILE` to restore (0: leave it).
    pub nofile_soft: u64,
    /// `RLIMIT_NPROC` (soft and hard) for the sandbox user's processes (0: leave it).
    pub max_processes: u64,
    /// Written to `/proc/self/oom_score_adj` (decimal), best effort.
    pub oom_score_adj: Option<&'a [u8]>,
    /// Where the child writes its pid before anything else.
    pub child_pid: &'a AtomicI32,
}

const OOM_SCORE_ADJ: &CStr = c"/proc/self/oom_score_adj";

/// NULL-terminated pointers into `strings` (which must outlive them).
pub fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Starts the child. Returns its pid once it has exec'd, or the step that failed (the
/// child has then exited; the reaper collects it. [`Step::Clone`]: there is no child).
pub fn start(plan: &ChildPlan<'_>) -> Result<u32, (Step, Errno)> {
    debug_assert!(plan.argv.last().is_some_and(|p| p.is_null()));
    debug_assert!(plan.envp.last().is_some_and(|p| p.is_null()));
    debug_assert!(plan.stdio.iter().all(|fd| fd.as_raw_fd() > 2));
    let mut stack = vec![0u8; CHILD_STACK];
    // (step index + 1) << 32 | errno; 0 while nothing failed.
    let failure = AtomicU64::new(0);
    let mut saved = 0u64;
    // SAFETY: blocks everything on this thread until the restore below.
    if unsafe { set_signal_mask(!0, Some(&mut saved)) } < 0 {
        return Err((Step::Clone, Errno::last()));
    }
    let child_fn = Box::new(|| child(plan, &failure));
    // SAFETY: CLONE_VFORK suspends this thread until the child execs or exits, so the
    // plan, `failure` and `stack` outlive every use the child makes of them; the child
    // keeps to the rules in the module comment.
    let cloned = unsafe {
        nix::sched::clone(
            child_fn,
            &mut stack,
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    };
    // SAFETY: puts back the mask this thread had.
    unsafe { set_signal_mask(saved, None) };
    let pid = cloned.map_err(|e| (Step::Clone, e))?;
    match failure.load(Ordering::SeqCst) {
        0 => Ok(pid.as_raw() as u32),
        f => {
            let step = Step::ALL[((f >> 32) as usize - 1).min(Step::ALL.len() - 1)];
            Err((step, Errno::from_raw(f as u32 as i32)))
        }
    }
}

/// Runs in the child, on its own stack, in the supervisor's memory. Never returns.
fn child(plan: &ChildPlan<'_>, failure: &AtomicU64) -> isize {
    let fail = |step: Step| -> isize {
        let index = Step::ALL.iter().position(|s| *s == step).unwrap_or(0) as u64 + 1;
        failure.store(
            index << 32 | Errno::last_raw() as u32 as u64,
            Ordering::SeqCst,
        );
        // SAFETY: _exit ends the child at once, running nothing of the supervisor's.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (whole block): raw libc calls on memory prepared by the parent; none
    // allocates, locks, or touches glibc's thread list (see the module comment).
    unsafe {
        // Before anything the tenant could stop: the watchdog kills by this pid.
        plan.child_pid
            .store(libc::syscall(libc::SYS_getpid) as i32, Ordering::SeqCst);
        // Dispositions first: signals stay blocked until the very end. A kernel
        // `struct sigaction` for SIG_DFL is all zeros (handler 0, no flags, empty mask)
        // whatever the field order; four words cover the largest layout.
        let default_action: [libc::c_ulong; 4] = [0; 4];
        for sig in 1..=KERNEL_NSIG {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default_action.as_ptr(),
                    std::ptr::null_mut::<libc::c_void>(),
                    KERNEL_SIGSET_BYTES,
                );
            }
        }
        if libc::setsid() < 0 {
            return fail(Step::NewSession);
        }
        for (target, fd) in plan.stdio.iter().enumerate() {
            // dup2 leaves the copy without FD_CLOEXEC; the sources are all above 2.
            if libc::dup2(fd.as_raw_fd(), target as libc::c_int) < 0 {
                return fail(Step::Stdio);
            }
        }
        if plan.is_pty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
            return fail(Step::ControllingTerminal);
        }
        // INT_MAX, not u32::MAX, as the last fd: gVisor before 2025 rejects the larger
        // bound with EINVAL, and no fd number reaches it.
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            libc::c_int::MAX as u32,
            libc::CLOSE_RANGE_CLOEXEC,
        ) < 0
        {
            // Kernels before 5.11: mark the usual range close-on-exec one by one.
            for fd in 3..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if plan.nofile_soft > 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = plan.nofile_soft as libc::rlim_t;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) < 0 {
                    return fail(Step::FdLimit);
                }
            }
        }
        if let Some(adj) = plan.oom_score_adj {
            // Raising needs no privilege; a vfork child gets a value of its own (the
            // kernel does not propagate it to the supervisor sharing this memory).
            let fd = libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, adj.as_ptr().cast(), adj.len());
                libc::close(fd);
            }
        }
        if plan.max_processes > 0 {
            // Soft and hard, before setuid: the user cannot raise it again, and its
            // fork()s fail once it runs this many processes, leaving PID 1 headroom.
            let lim = libc::rlimit {
                rlim_cur: plan.max_processes as libc::rlim_t,
                rlim_max: plan.max_processes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &lim) < 0 {
                return fail(Step::ProcessLimit);
            }
        }
        if let Some(c) = plan.creds {
            // Raw syscalls: this process is single-threaded, the libc wrappers would
            // signal the supervisor's threads. setgroups and setgid need root, so
            // they come before setuid. DESIGN says "supplementary groups cleared"; we
            // deviate on purpose: the list holds exactly one group, the session's
            // marker (`exec::kill`), which owns no files and which the unprivileged
            // child can never drop (no CAP_SETGID; `no_new_privs` stops setuid
            // binaries from granting it). The chdir follows the switch, so the
            // directory is entered with the user's permissions.
            let groups: [libc::gid_t; 1] = [c.marker.unwrap_or(0)];
            let n = usize::from(c.marker.is_some());
            if libc::syscall(libc::SYS_setgroups, n, groups.as_ptr()) < 0 {
                return fail(Step::Groups);
            }
            if libc::syscall(libc::SYS_setgid, c.gid) < 0 {
                return fail(Step::Gid);
            }
            if libc::syscall(libc::SYS_setuid, c.uid) < 0 {
                return fail(Step::Uid);
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return fail(Step::WorkingDirectory);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return fail(Step::NoNewPrivs);
        }
        set_signal_mask(0, None);
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(Step::Exec)
    }
}

/// `fd` itself when it is above 2, else a close-on-exec duplicate that is: the child
/// `dup2`s its stdio sources onto 0-2 in order, which a source below 3 would clobber.
/// (A supervisor started with 0-2 closed gets pipes numbered from 0.)
pub fn above_stdio(fd: std::os::fd::OwnedFd) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raised = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raised) })
}
