//! What this kernel gives, probed once at boot. gVisor, older kernels and sandboxed
//! runtimes each lack some Linux features; the supervisor keeps every invariant with a
//! fallback, but some guarantees get weaker. Operators see which in one
//! `platform.capabilities` event and in `platform_capability{capability}` gauges.
//! Probes try the feature itself, never a version number.

use std::os::fd::{AsFd, AsRawFd};

use std::sync::OnceLock;

use nix::errno::Errno;

/// One probed feature.
#[derive(Debug, Clone, Copy)]
pub struct Capability {
    pub name: &'static str,
    pub available: bool,
    /// What is weaker, and what the supervisor does instead, when it is missing.
    pub without: &'static str,
}

#[derive(Debug, Clone)]
pub struct Capabilities {
    pub features: Vec<Capability>,
    /// `uname -r` and whether it looks like gVisor (for the log only; code asks the
    /// features).
    pub kernel: String,
    pub gvisor: bool,
}

impl Capabilities {
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|c| c.name == name && c.available)
    }

    pub fn missing(&self) -> impl Iterator<Item = &Capability> {
        self.features.iter().filter(|c| !c.available)
    }
}

static PROBED: OnceLock<Capabilities> = OnceLock::new();

/// Capability bits (linux/capability.h); libc does not define them.
const CAP_LINUX_IMMUTABLE: u32 = 9;
const CAP_SYS_RESOURCE: u32 = 24;

/// The capabilities, probed on first use.
pub fn get() -> &'static Capabilities {
    PROBED.get_or_init(probe)
}

fn probe() -> Capabilities {
    let cap_eff = effective_capabilities();
    let cap = |bit: u32| cap_eff.map(|c| c & (1u64 << bit) != 0).unwrap_or(false);
    let resolve = |flags: u64| openat2_accepts(flags);
    let features = vec![
        Capability {
            name: "openat2",
            available: resolve(0),
            without: "the wipe walks with O_NOFOLLOW opens and checks each directory it enters instead of RESOLVE_BENEATH|RESOLVE_NO_XDEV",
        },
        Capability {
            name: "openat2_resolve_beneath",
            available: resolve(libc::RESOLVE_BENEATH),
            without: "path confinement is checked by the walk, not by the kernel",
        },
        Capability {
            name: "openat2_resolve_no_xdev",
            available: resolve(libc::RESOLVE_NO_XDEV),
            without: "mount crossings are found by mount id or /proc/self/mountinfo, not refused by the kernel",
        },
        Capability {
            name: "openat2_resolve_no_symlinks",
            available: resolve(libc::RESOLVE_NO_SYMLINKS),
            without: "symlinks are refused per component with O_NOFOLLOW",
        },
        Capability {
            name: "statx_mnt_id",
            available: statx_mnt_id(),
            without: "mount points are told by fdinfo mnt_id, else by /proc/self/mountinfo (path and device), else by st_dev of directories only",
        },
        Capability {
            name: "fdinfo_mnt_id",
            available: fdinfo_mnt_id(),
            without: "mount points are told by /proc/self/mountinfo (path and device) and st_dev of directories",
        },
        Capability {
            name: "statx_no_automount",
            available: statx_accepts(libc::AT_NO_AUTOMOUNT),
            without: "statx is called without AT_NO_AUTOMOUNT (an automount point below the workspace could be triggered by a stat)",
        },
        Capability {
            name: "pidfd",
            available: pidfd(),
            without: "signals go by pid after a start-time check: a pid reused between the check and kill(2) could be signalled",
        },
        Capability {
            name: "close_range",
            available: close_range(),
            without: "session children mark descriptors 3..4095 close-on-exec one by one (slower starts; fds above 4095 would leak)",
        },
        Capability {
            name: "pid_namespaces",
            available: std::path::Path::new("/proc/self/ns/pid").exists(),
            without: "`local` cannot make the supervisor PID 1 and runs it as a subreaper",
        },
        Capability {
            name: "mount_namespaces",
            available: std::path::Path::new("/proc/self/ns/mnt").exists(),
            without: "`local` cannot give the sandbox its own /proc",
        },
        Capability {
            name: "cap_linux_immutable",
            available: cap(CAP_LINUX_IMMUTABLE),
            without: "an immutable or append-only file planted in the workspace cannot be cleared: the wipe fails closed and reports it",
        },
        Capability {
            name: "cap_sys_resource",
            available: cap(CAP_SYS_RESOURCE),
            without: "the supervisor keeps the oom_score_adj it inherited instead of -1000; sessions still rank above it",
        },
    ];
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    // gVisor reports a fixed, old-looking version string; only for the log.
    let gvisor = std::fs::read_to_string("/proc/version")
        .map(|v| v.contains("#1 SMP Sun Jan 10 15:06:54 PST 2016"))
        .unwrap_or(false);
    Capabilities {
        features,
        kernel,
        gvisor,
    }
}

/// Logs the one `platform.capabilities` event.
pub fn log(caps: &Capabilities) {
    let available: Vec<&str> = caps
        .features
        .iter()
        .filter(|c| c.available)
        .map(|c| c.name)
        .collect();
    let missing: Vec<String> = caps
        .missing()
        .map(|c| format!("{}: {}", c.name, c.without))
        .collect();
    if missing.is_empty() {
        tracing::info!(event = "platform.capabilities", kernel = %caps.kernel, gvisor = caps.gvisor, available = ?available, "the kernel gives every feature the supervisor uses");
    } else {
        tracing::warn!(event = "platform.capabilities", kernel = %caps.kernel, gvisor = caps.gvisor, available = ?available, missing = ?missing, "some kernel features are missing: fallbacks taken, guarantees weaker as listed");
    }
}

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

fn openat2_accepts(resolve: u64) -> bool {
    let how = nix::fcntl::OpenHow::new()
        .flags(nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC)
        .resolve(nix::fcntl::ResolveFlag::from_bits_truncate(resolve));
    !matches!(
        nix::fcntl::openat2(nix::fcntl::AT_FDCWD, c"/", how),
        Err(Errno::ENOSYS | Errno::EINVAL | Errno::E2BIG | Errno::EPERM)
    )
}

fn statx_raw(flags: libc::c_int, mask: libc::c_uint) -> Result<libc::statx, Errno> {
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes one `struct statx` into the buffer, which outlives the call.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c"/".as_ptr(), flags, mask, buf.as_mut_ptr()) };
    Errno::result(rc)?;
    // SAFETY: statx succeeded and the buffer was zeroed before.
    Ok(unsafe { buf.assume_init() })
}

fn statx_accepts(flag: libc::c_int) -> bool {
    statx_raw(flag | libc::AT_SYMLINK_NOFOLLOW, libc::STATX_BASIC_STATS).is_ok()
}

fn statx_mnt_id() -> bool {
    statx_raw(
        libc::AT_SYMLINK_NOFOLLOW,
        libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
    )
    .is_ok_and(|st| st.stx_mask & libc::STATX_MNT_ID != 0)
}

fn fdinfo_mnt_id() -> bool {
    let Ok(root) = std::fs::File::open("/") else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", root.as_fd().as_raw_fd()))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("mnt_id:")))
}

fn pidfd() -> bool {
    // SAFETY: pidfd_open on our own pid returns a new fd (closed below) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the fd just opened, once.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

/// `close_range(fd, INT_MAX, CLOSE_RANGE_CLOEXEC)` from a descriptor of its own: what
/// the session child does (gVisor before 2025 refuses larger bounds). Descriptors above
/// it are the supervisor's, all close-on-exec already.
fn close_range() -> bool {
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return false;
    };
    // SAFETY: marks close-on-exec fds this process owns; closes none.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            null.as_raw_fd() as libc::c_uint,
            libc::c_int::MAX as libc::c_uint,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    rc == 0
}
