//! The volume layout and its boot-time checks (DESIGN section 4):
//!
//! ```text
//! <root>             root-owned 0755 (fixed at boot if fsGroup or emptyDir loosened it)
//! ├── workspace/     the tenant's files, owned by the sandbox user, created 0750
//! └── .supervisor/   root-owned 0700: seed.json, binding.json, tombstone.json,
//!                    tombstone.reserve (room for the tombstone on a full volume), staging-*
//! ```
//!
//! What is fixed and what is refused: on the first boot (no `.supervisor/` yet) nothing
//! has been entrusted to the volume, so the root directory is simply made right. Later,
//! only what a kubelet `fsGroup` change does (group changed, group bits and setgid added,
//! nothing for others) is restored; anything else means someone other than the kubelet
//! changed the directories that protect the records, and opening fails.

use super::fsutil::{self, Kind, Meta, Resolve};
use super::records::{fsgroup_loosened, Ownership};

use super::{Owner, VolumeConfig, WorkspaceError};
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::{self, Mode};
use nix::unistd::{Gid, Uid};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub(crate) const SUPERVISOR_DIR: &str = ".supervisor";
pub(crate) const WORKSPACE_DIR: &str = "workspace";
const ROOT_MODE: u32 = 0o755;
const SUPERVISOR_MODE: u32 = 0o700;

pub(crate) struct Opened {
    pub root_fd: OwnedFd,
    pub root_meta: Meta,
    pub sup_fd: OwnedFd,
    pub sup_meta: Meta,
    pub own: Ownership,
    pub limits: Vec<String>,
}

fn layout(path: impl Into<String>, problem: impl Into<String>) -> WorkspaceError {
    WorkspaceError::Layout {
        path: path.into(),
        problem: problem.into(),
    }
}

fn tampered(path: impl Into<String>, problem: impl Into<String>) -> WorkspaceError {
    WorkspaceError::Tampered {
        path: path.into(),
        problem: problem.into(),
    }
}

fn io(op: &'static str, path: impl Into<String>, errno: Errno) -> WorkspaceError {
    WorkspaceError::Io {
        op,
        path: path.into(),
        errno,
    }
}

pub(crate) fn open(cfg: &VolumeConfig) -> Result<Opened, WorkspaceError> {
    let euid = fsutil::euid();
    let root_s = cfg.root.display().to_string();
    if cfg.privileged && euid != 0 {
        return Err(WorkspaceError::Config(format!(
            "the volume is configured as privileged but the supervisor runs as uid {euid}; run it as root or configure it unprivileged"
        )));
    }
    let own = Ownership {
        uid: if cfg.privileged { 0 } else { euid },
        gid: if cfg.privileged { 0 } else { fsutil::egid() },
        privileged: cfg.privileged,
    };
    let mut limits = Vec::new();
    let root_fd = fcntl::open(
        &cfg.root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT => layout(&root_s, "does not exist; mount the sandbox volume there"),
        Errno::ELOOP => layout(
            &root_s,
            "is a symbolic link; point the volume root at the mount itself",
        ),
        Errno::ENOTDIR => layout(&root_s, "is not a directory"),
        e => io("open volume root", &root_s, e),
    })?;
    let root_meta = fsutil::stat_fd(root_fd.as_fd()).map_err(|e| io("stat", &root_s, e))?;
    let sup_path = format!("{root_s}/{SUPERVISOR_DIR}");
    let first_boot = match fsutil::stat_at(root_fd.as_fd(), c".supervisor") {
        Err(Errno::ENOENT) => true,
        Err(e) => return Err(io("stat", &sup_path, e)),
        Ok(_) => false,
    };
    let root_meta = fix_root(
        root_fd.as_fd(),
        root_meta,
        &own,
        first_boot,
        &root_s,
        &mut limits,
    )?;

    // .supervisor: created on first boot, otherwise checked (and fsGroup undone).
    if first_boot {
        stat::mkdirat(
            root_fd.as_fd(),
            c".supervisor",
            Mode::from_bits_truncate(SUPERVISOR_MODE),
        )
        .map_err(|e| io("create", &sup_path, e))?;
    }
    let sup_fd = fsutil::open_dir_beneath(root_fd.as_fd(), c".supervisor", Resolve::detect())
        .map_err(|e| match e {
            Errno::ELOOP => tampered(&sup_path, "is a symbolic link"),
            Errno::ENOTDIR => tampered(&sup_path, "is not a directory"),
            Errno::EXDEV => layout(
                &sup_path,
                "is a mount point; it must be a directory on the volume itself",
            ),
            e => io("open", &sup_path, e),
        })?;
    let mut sup_meta = fsutil::stat_fd(sup_fd.as_fd()).map_err(|e| io("stat", &sup_path, e))?;
    if first_boot {
        if cfg.privileged {
            nix::unistd::fchown(&sup_fd, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                .map_err(|e| io("chown", &sup_path, e))?;
        }
        stat::fchmod(&sup_fd, Mode::from_bits_truncate(SUPERVISOR_MODE))
            .map_err(|e| io("chmod", &sup_path, e))?;
        sup_meta = fsutil::stat_fd(sup_fd.as_fd()).map_err(|e| io("stat", &sup_path, e))?;
    }
    check_supervisor_dir(sup_fd.as_fd(), &mut sup_meta, &own, &sup_path)?;

    ensure_workspace(
        root_fd.as_fd(),
        &root_meta,
        &cfg.owner,
        cfg.privileged,
        &root_s,
    )?;

    if !cfg.privileged {
        limits.push(format!(
            "the supervisor is not root: {sup_path} and its records are protected only by uid {euid}; a workload running as uid {euid} can rewrite or delete the binding record and the tombstone"
        ));
        if cfg.owner.uid != euid {
            limits.push(format!(
                "cannot chown seeded files to uid {}: they stay owned by uid {euid}",
                cfg.owner.uid
            ));
        }
    }
    if !fsutil::has_effective_cap(fsutil::CAP_LINUX_IMMUTABLE) {
        limits.push("no CAP_LINUX_IMMUTABLE: immutable or append-only files in the workspace cannot be cleared; the wipe leaves them and reports it".to_owned());
    }
    Ok(Opened {
        root_fd,
        root_meta,
        sup_fd,
        sup_meta,
        own,
        limits,
    })
}

fn fix_root(
    fd: BorrowedFd<'_>,
    meta: Meta,
    own: &Ownership,
    first_boot: bool,
    path: &str,
    limits: &mut Vec<String>,
) -> Result<Meta, WorkspaceError> {
    let want_uid = own.uid;
    if meta.uid != want_uid {
        if !own.privileged {
            if meta.perm & 0o022 != 0 {
                limits.push(format!(
                    "volume root {path} is owned by uid {} with mode {:04o} and cannot be fixed without root: whoever can write it (the workload included) can replace workspace/ and .supervisor/",
                    meta.uid, meta.perm
                ));
            }
            return Ok(meta);
        }
        if !first_boot {
            return Err(layout(
                path,
                format!(
                    "is owned by uid {} instead of root although records exist: someone else controlled the directory holding .supervisor/",
                    meta.uid
                ),
            ));
        }
    }
    if !first_boot {
        if meta.perm & 0o002 != 0 {
            return Err(layout(
                path,
                format!(
                    "has mode {:04o}: writable by everyone although records exist",
                    meta.perm
                ),
            ));
        }
        // Group write is what fsGroup adds, and only together with its own group.
        if meta.perm & 0o020 != 0 && meta.gid == own.gid {
            return Err(layout(
                path,
                format!(
                    "has mode {:04o}: writable by group {} although records exist",
                    meta.perm, meta.gid
                ),
            ));
        }
    }
    let mut fixed = false;
    if meta.uid != want_uid || meta.gid != own.gid {
        nix::unistd::fchown(
            fd,
            Some(Uid::from_raw(want_uid)),
            Some(Gid::from_raw(own.gid)),
        )
        .map_err(|e| io("chown", path, e))?;
        fixed = true;
    }
    if meta.perm != ROOT_MODE {
        stat::fchmod(fd, Mode::from_bits_truncate(ROOT_MODE)).map_err(|e| io("chmod", path, e))?;
        fixed = true;
    }
    if fixed {
        tracing::warn!(
            event = "layout.fixed",
            path,
            uid = meta.uid,
            gid = meta.gid,
            mode = format!("{:04o}", meta.perm),
            "volume root restored to {ROOT_MODE:04o} owned by uid {want_uid}"
        );
        return fsutil::stat_fd(fd).map_err(|e| io("stat", path, e));
    }
    Ok(meta)
}

/// `.supervisor/`: ours, a real directory, private (fsGroup loosening is undone).
pub(crate) fn check_supervisor_dir(
    fd: BorrowedFd<'_>,
    meta: &mut Meta,
    own: &Ownership,
    path: &str,
) -> Result<(), WorkspaceError> {
    if meta.kind != Kind::Dir {
        return Err(tampered(
            path,
            format!("is a {}, not a directory", meta.kind.describe()),
        ));
    }
    if meta.uid != own.uid {
        return Err(tampered(
            path,
            format!("is owned by uid {}, expected uid {}", meta.uid, own.uid),
        ));
    }
    if meta.perm != SUPERVISOR_MODE {
        if meta.perm & 0o077 == 0 || fsgroup_loosened(meta.perm, meta.gid, own, true) {
            nix::unistd::fchown(fd, None, Some(Gid::from_raw(own.gid)))
                .map_err(|e| io("chown", path, e))?;
            stat::fchmod(fd, Mode::from_bits_truncate(SUPERVISOR_MODE))
                .map_err(|e| io("chmod", path, e))?;
            tracing::warn!(
                event = "layout.fixed",
                path,
                gid = meta.gid,
                mode = format!("{:04o}", meta.perm),
                "restored {SUPERVISOR_MODE:04o} on the records directory"
            );
            *meta = fsutil::stat_fd(fd).map_err(|e| io("stat", path, e))?;
        } else {
            return Err(tampered(
                path,
                format!("has mode {:04o}: others may access the records, expected {SUPERVISOR_MODE:04o}", meta.perm),
            ));
        }
    }
    Ok(())
}

fn ensure_workspace(
    root: BorrowedFd<'_>,
    root_meta: &Meta,
    owner: &Owner,
    privileged: bool,
    root_s: &str,
) -> Result<(), WorkspaceError> {
    let path = format!("{root_s}/{WORKSPACE_DIR}");
    let created = match stat::mkdirat(root, c"workspace", Mode::from_bits_truncate(0o700)) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(io("create", &path, e)),
    };
    let fd = open_workspace(root, root_meta, root_s)?;
    let meta = fsutil::stat_fd(fd.as_fd()).map_err(|e| io("stat", &path, e))?;
    if created {
        if privileged {
            nix::unistd::fchown(
                &fd,
                Some(Uid::from_raw(owner.uid)),
                Some(Gid::from_raw(owner.gid)),
            )
            .map_err(|e| io("chown", &path, e))?;
        }
        stat::fchmod(&fd, Mode::from_bits_truncate(super::stage::WORKSPACE_MODE))
            .map_err(|e| io("chmod", &path, e))?;
        return Ok(());
    }
    if privileged && meta.uid != owner.uid {
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| io("open", &path, e))?;
        let empty = dir
            .iter()
            .filter_map(Result::ok)
            .all(|e| matches!(e.file_name().to_bytes(), b"." | b".."));
        if !empty {
            return Err(layout(
                &path,
                format!(
                    "is owned by uid {} but the sandbox user is uid {} and it is not empty",
                    meta.uid, owner.uid
                ),
            ));
        }
        nix::unistd::fchown(
            dir.as_fd(),
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )
        .map_err(|e| io("chown", &path, e))?;
        stat::fchmod(
            dir.as_fd(),
            Mode::from_bits_truncate(super::stage::WORKSPACE_MODE),
        )
        .map_err(|e| io("chmod", &path, e))?;
    }
    Ok(())
}

/// Opens `workspace/` below the root: a real directory on the same mount as the root.
pub(crate) fn open_workspace(
    root: BorrowedFd<'_>,
    root_meta: &Meta,
    root_s: &str,
) -> Result<OwnedFd, WorkspaceError> {
    let path = format!("{root_s}/{WORKSPACE_DIR}");
    let fd = fsutil::open_dir_beneath(root, c"workspace", Resolve::detect()).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => layout(&path, not_a_dir(root, c"workspace")),
        Errno::EXDEV => layout(&path, "is a separate mount; it must live on the same volume as .supervisor/ so records travel with the data and the seed can rename into place"),
        e => io("open", &path, e),
    })?;
    let meta = fsutil::stat_fd(fd.as_fd()).map_err(|e| io("stat", &path, e))?;
    if root_meta.other_mount(&meta) {
        return Err(layout(
            &path,
            "is on a different mount than the volume root",
        ));
    }
    Ok(fd)
}

/// What an entry that should be a directory is instead (for the error message).
fn not_a_dir(parent: BorrowedFd<'_>, name: &std::ffi::CStr) -> String {
    match fsutil::stat_at(parent, name) {
        Ok(m) => format!("is a {}, not a directory", m.kind.describe()),
        Err(e) => format!("is not a directory ({e})"),
    }
}

/// Whether a directory fd has no entries.
pub(crate) fn dir_is_empty(fd: OwnedFd) -> Result<bool, Errno> {
    let mut dir = nix::dir::Dir::from_fd(fd)?;
    for e in dir.iter() {
        let e = e?;
        if !matches!(e.file_name().to_bytes(), b"." | b"..") {
            return Ok(false);
        }
    }
    Ok(true)
}
