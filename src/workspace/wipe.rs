//! The wipe: removes everything below a directory fd without ever leaving it.
//!
//! Rules, each with its reason:
//! - Only directory-fd relative calls (`openat2`/`openat`, `statx`, `unlinkat`) with single
//!   names read from the directory itself: no path is ever resolved from `/`, so nothing a
//!   tenant renames can redirect us.
//! - Directories are opened with `RESOLVE_BENEATH|RESOLVE_NO_XDEV|RESOLVE_NO_SYMLINKS|
//!   RESOLVE_NO_MAGICLINKS` (or `O_NOFOLLOW` plus a mount-id check where `openat2` is
//!   missing) and the opened fd must be the inode `statx` saw: a directory swapped for a
//!   symlink fails with `ELOOP`/`ENOTDIR`, is re-examined and the link itself is unlinked.
//! - Nothing but directories is ever opened: files, links, FIFOs, sockets and devices are
//!   unlinked by name. A FIFO or device swapped in under a directory's name is not opened
//!   either: the kernel checks `O_DIRECTORY` before it opens anything (`ENOTDIR`).
//! - Mount points (mount id or device differs from the parent's) are skipped and reported,
//!   and so are file bind mounts (`unlinkat` says `EBUSY`).
//! - Iterative with an explicit stack; at most `max_open_dirs` directory fds are open.
//!   Closed ancestors are reopened through the child's `..` and must be the same inode as
//!   before (else a re-descent by name from the root, checked at each step; else stop).

use super::flags::{immutable_action, FlagAction};
use super::fsutil::{self, Kind, Meta, Resolve};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

/// What a wipe did and what it had to leave.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WipeReport {
    /// Non-directory entries unlinked (files, symlinks, FIFOs, sockets, device nodes).
    pub files_removed: u64,
    /// Directories removed.
    pub dirs_removed: u64,
    /// Sum of the sizes of the regular files unlinked (hardlinked data may survive
    /// elsewhere; this counts what the workspace held).
    pub bytes_removed: u64,
    /// Mount points found inside the directory (relative paths, escaped), left untouched.
    pub skipped_mounts: Vec<String>,
    /// Entries that could not be removed, with the reason.
    pub skipped: Vec<(String, String)>,
    pub duration_ms: u64,
    /// True when the directory is empty afterwards and nothing was skipped.
    pub fully_wiped: bool,
}

/// A wipe that could not start. Problems with single entries are in the report instead.
#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("cannot open {path} for wiping: {errno}; check that it is a directory on the volume and not a symlink or mount point")]
    Open { path: String, errno: Errno },
    #[error("cannot read directory {path} for wiping: {errno}")]
    Read { path: String, errno: Errno },
}

pub(crate) const DEFAULT_MAX_OPEN_DIRS: usize = 128;
const MAX_RESCANS: u8 = 4;
const MAX_ATTEMPTS: usize = 4;

#[derive(Debug, Clone, Copy)]
pub(crate) struct WipeOptions {
    pub resolve: Resolve,
    pub max_open_dirs: usize,
    pub can_clear_immutable: bool,
}

impl WipeOptions {
    pub(crate) fn detect() -> WipeOptions {
        WipeOptions {
            resolve: Resolve::detect(),
            max_open_dirs: DEFAULT_MAX_OPEN_DIRS,
            can_clear_immutable: fsutil::has_effective_cap(fsutil::CAP_LINUX_IMMUTABLE),
        }
    }
}

struct Frame {
    dir: Option<Dir>,
    /// Name in the parent (empty for the top directory).
    name: CString,
    meta: Meta,
    pending: Vec<CString>,
    rescans: u8,
    /// Something below could not be removed: rescanning would only find it again.
    blocked: bool,
}

enum Step {
    Done,
    Retry,
}

struct Walk {
    stack: Vec<Frame>,
    /// Frames `1..first_open` have their fd closed; the top frame is always open.
    first_open: usize,
    opts: WipeOptions,
    report: WipeReport,
    aborted: bool,
}

/// Removes everything below `root` (an open directory) and keeps `root` itself.
/// `label` prefixes paths in the report and logs.
pub(crate) fn wipe_contents(
    root: OwnedFd,
    label: &str,
    opts: WipeOptions,
) -> Result<WipeReport, WipeError> {
    let started = Instant::now();
    let meta = fsutil::stat_fd(root.as_fd()).map_err(|errno| WipeError::Open {
        path: label.to_owned(),
        errno,
    })?;
    let mut dir = Dir::from_fd(root).map_err(|errno| WipeError::Open {
        path: label.to_owned(),
        errno,
    })?;
    if meta.perm & 0o700 != 0o700 {
        // The tenant may have chmod'ed its own top directory; we need rwx to empty it.
        let _ = nix::sys::stat::fchmod(dir.as_fd(), Mode::from_bits_truncate(meta.perm | 0o700));
    }
    let pending = read_names(&mut dir).map_err(|errno| WipeError::Read {
        path: label.to_owned(),
        errno,
    })?;
    let mut walk = Walk {
        stack: vec![Frame {
            dir: Some(dir),
            name: CString::default(),
            meta,
            pending,
            rescans: 0,
            blocked: false,
        }],
        first_open: 1,
        opts: WipeOptions {
            max_open_dirs: opts.max_open_dirs.max(2),
            ..opts
        },
        report: WipeReport::default(),
        aborted: false,
    };
    walk.run();
    let mut report = walk.report;
    report.fully_wiped =
        !walk.aborted && report.skipped.is_empty() && report.skipped_mounts.is_empty();
    report.duration_ms = started.elapsed().as_millis() as u64;
    // Debug only: this walk also cleans staging during seeding; the release's own
    // `wipe.completed` (lifecycle) is the operator-facing event.
    tracing::debug!(
        event = "wipe.walk_finished",
        target_dir = label,
        files = report.files_removed,
        dirs = report.dirs_removed,
        bytes = report.bytes_removed,
        skipped = report.skipped.len(),
        skipped_mounts = report.skipped_mounts.len(),
        fully_wiped = report.fully_wiped,
        duration_ms = report.duration_ms,
        "wipe finished"
    );
    Ok(report)
}

fn read_names(dir: &mut Dir) -> Result<Vec<CString>, Errno> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

impl Walk {
    fn run(&mut self) {
        while !self.aborted {
            let top = self
                .stack
                .last_mut()
                .expect("the stack always holds the top directory");
            if let Some(name) = top.pending.pop() {
                self.entry(name);
                continue;
            }
            if !top.blocked && top.rescans < MAX_RESCANS {
                // Entries created while we walked (a racing writer) show up here.
                top.rescans += 1;
                let dir = top.dir.as_mut().expect("the top frame is open");
                match read_names(dir) {
                    Ok(names) if !names.is_empty() => {
                        top.pending = names;
                        continue;
                    }
                    Ok(_) => {}
                    Err(errno) => {
                        top.blocked = true;
                        let path = self.path(None);
                        self.skip(path, format!("cannot read directory: {errno}"));
                    }
                }
            }
            if self.stack.len() == 1 {
                break;
            }
            self.finish_dir();
        }
    }

    fn top_fd(&self) -> BorrowedFd<'_> {
        self.stack
            .last()
            .and_then(|f| f.dir.as_ref())
            .expect("the top frame is open")
            .as_fd()
    }

    /// The path of `name` in the top directory (or of the top directory), escaped.
    fn path(&self, name: Option<&CStr>) -> String {
        let mut parts: Vec<String> = self.stack[1..]
            .iter()
            .map(|f| fsutil::escape_bytes(f.name.to_bytes()))
            .collect();
        if let Some(n) = name {
            parts.push(fsutil::escape_bytes(n.to_bytes()));
        }
        if parts.is_empty() {
            ".".to_owned()
        } else {
            parts.join("/")
        }
    }

    fn skip(&mut self, path: String, why: String) {
        tracing::warn!(event = "wipe.skipped", path = %path, reason = %why, "wipe left an entry");
        self.report.skipped.push((path, why));
    }

    fn skip_mount(&mut self, name: &CStr) {
        let path = self.path(Some(name));
        tracing::warn!(event = "wipe.skipped_mount", path = %path, "mount point inside the wiped directory left untouched");
        self.report.skipped_mounts.push(path);
        self.block_top();
    }

    fn block_top(&mut self) {
        if let Some(top) = self.stack.last_mut() {
            top.blocked = true;
        }
    }

    fn entry(&mut self, name: CString) {
        for _ in 0..MAX_ATTEMPTS {
            let parent_meta = self.stack.last().expect("non-empty stack").meta;
            let meta = match fsutil::stat_at(self.top_fd(), &name) {
                Ok(m) => m,
                Err(Errno::ENOENT) => return,
                Err(errno) => {
                    let path = self.path(Some(&name));
                    self.skip(path, format!("cannot stat: {errno}"));
                    self.block_top();
                    return;
                }
            };
            if parent_meta.other_mount(&meta) {
                self.skip_mount(&name);
                return;
            }
            let step = if meta.kind == Kind::Dir {
                self.enter_dir(&name, &meta)
            } else {
                self.unlink(&name, &meta)
            };
            if let Step::Done = step {
                return;
            }
        }
        let path = self.path(Some(&name));
        self.skip(
            path,
            "kept changing while being removed (a concurrent writer?)".to_owned(),
        );
        self.block_top();
    }

    fn enter_dir(&mut self, name: &CStr, meta: &Meta) -> Step {
        let opened = fsutil::open_dir_beneath(self.top_fd(), name, self.opts.resolve);
        let fd = match opened {
            Ok(fd) => fd,
            // Swapped for a symlink or a file since the stat: look again.
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Step::Retry,
            Err(Errno::EXDEV) => {
                self.skip_mount(name);
                return Step::Done;
            }
            Err(Errno::ENOENT) => return Step::Done,
            Err(Errno::EACCES) => return self.unlock_dir(name, meta),
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot open directory: {errno}"));
                self.block_top();
                return Step::Done;
            }
        };
        let opened_meta = match fsutil::stat_fd(fd.as_fd()) {
            Ok(m) => m,
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot stat opened directory: {errno}"));
                self.block_top();
                return Step::Done;
            }
        };
        if !opened_meta.same_object(meta) {
            return Step::Retry;
        }
        let parent_meta = self.stack.last().expect("non-empty stack").meta;
        if parent_meta.other_mount(&opened_meta) {
            self.skip_mount(name);
            return Step::Done;
        }
        if opened_meta.perm & 0o700 != 0o700 {
            // Mode-000 (or read-only) directories: fchmod on the fd we hold, never by path.
            let _ = nix::sys::stat::fchmod(
                fd.as_fd(),
                Mode::from_bits_truncate(opened_meta.perm | 0o700),
            );
        }
        let mut dir = match Dir::from_fd(fd) {
            Ok(d) => d,
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot read directory: {errno}"));
                self.block_top();
                return Step::Done;
            }
        };
        let pending = match read_names(&mut dir) {
            Ok(p) => p,
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot read directory: {errno}"));
                self.block_top();
                return Step::Done;
            }
        };
        self.stack.push(Frame {
            dir: Some(dir),
            name: name.to_owned(),
            meta: opened_meta,
            pending,
            rescans: 0,
            blocked: false,
        });
        self.enforce_fd_budget();
        Step::Done
    }

    /// An unreadable directory (mode 000, supervisor not root): open it `O_PATH` (needs no
    /// read permission), check it is the directory we saw, add `u+rwx` through the fd.
    fn unlock_dir(&mut self, name: &CStr, meta: &Meta) -> Step {
        let result = (|| {
            let opath = fsutil::open_path_nofollow(self.top_fd(), name)?;
            let m = fsutil::stat_fd(opath.as_fd())?;
            if !m.same_object(meta) || m.kind != Kind::Dir {
                return Ok(false);
            }
            if m.perm & 0o700 == 0o700 {
                return Err(Errno::EACCES);
            }
            fsutil::chmod_opath(opath.as_fd(), m.perm | 0o700)?;
            Ok(true)
        })();
        match result {
            Ok(_) => Step::Retry,
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(
                    path,
                    format!("directory not readable and not fixable: {errno}"),
                );
                self.block_top();
                Step::Done
            }
        }
    }

    fn unlink(&mut self, name: &CStr, meta: &Meta) -> Step {
        match unlinkat(self.top_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                self.report.files_removed += 1;
                if meta.kind == Kind::File {
                    self.report.bytes_removed += meta.size;
                }
                Step::Done
            }
            Err(Errno::ENOENT) => Step::Done,
            Err(Errno::EISDIR) => Step::Retry,
            Err(Errno::EBUSY) => {
                self.skip_mount(name);
                Step::Done
            }
            Err(Errno::EPERM) => self.unflag(name, meta),
            Err(Errno::EACCES) => {
                // Parent not writable for us (not root): give ourselves u+rwx via its fd.
                let top = self.stack.last().expect("non-empty stack");
                let perm = top.meta.perm;
                if perm & 0o700 != 0o700 {
                    let fixed = nix::sys::stat::fchmod(
                        self.top_fd(),
                        Mode::from_bits_truncate(perm | 0o700),
                    );
                    if fixed.is_ok() {
                        if let Some(t) = self.stack.last_mut() {
                            t.meta.perm |= 0o700;
                        }
                        return Step::Retry;
                    }
                }
                let path = self.path(Some(name));
                self.skip(path, "permission denied".to_owned());
                self.block_top();
                Step::Done
            }
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot unlink: {errno}"));
                self.block_top();
                Step::Done
            }
        }
    }

    /// `EPERM` from `unlinkat`: an immutable or append-only flag on the parent directory or
    /// on the entry. Cleared only with `CAP_LINUX_IMMUTABLE`; otherwise fail closed.
    fn unflag(&mut self, name: &CStr, meta: &Meta) -> Step {
        let can_clear = self.opts.can_clear_immutable;
        // The parent directory first: its flag blocks every unlink inside it.
        if let Ok(flags) = fsutil::get_inode_flags(self.top_fd()) {
            match immutable_action(flags, can_clear) {
                FlagAction::NotFlagged => {}
                FlagAction::Clear(new) => {
                    return match fsutil::set_inode_flags(self.top_fd(), new) {
                        Ok(()) => {
                            let path = self.path(None);
                            tracing::info!(event = "wipe.cleared_flag", path = %path, "cleared immutable/append-only flag on a directory");
                            Step::Retry
                        }
                        Err(errno) => self.flag_failure(None, format!("immutable or append-only directory; clearing the flag failed: {errno}")),
                    };
                }
                FlagAction::FailClosed => {
                    return self.flag_failure(None, "immutable or append-only directory and no CAP_LINUX_IMMUTABLE: left in place (clear it with chattr -ia from a privileged context)".to_owned());
                }
            }
        }
        if !matches!(meta.kind, Kind::File | Kind::Dir) {
            return self.flag_failure(Some(name), "cannot unlink: EPERM".to_owned());
        }
        let entry_flags = (|| {
            let opath = fsutil::open_path_nofollow(self.top_fd(), name)?;
            let m = fsutil::stat_fd(opath.as_fd())?;
            if !m.same_object(meta) || m.kind != meta.kind {
                return Err(Errno::EAGAIN);
            }
            let fd = fsutil::reopen(opath.as_fd(), OFlag::O_RDONLY)?;
            let flags = fsutil::get_inode_flags(fd.as_fd())?;
            Ok((fd, flags))
        })();
        match entry_flags {
            Err(Errno::EAGAIN) => Step::Retry,
            Err(errno) => self.flag_failure(Some(name), format!("cannot unlink (EPERM) and cannot read its flags: {errno}")),
            Ok((fd, flags)) => match immutable_action(flags, can_clear) {
                FlagAction::NotFlagged => self.flag_failure(Some(name), "cannot unlink: EPERM".to_owned()),
                FlagAction::Clear(new) => match fsutil::set_inode_flags(fd.as_fd(), new) {
                    Ok(()) => {
                        let path = self.path(Some(name));
                        tracing::info!(event = "wipe.cleared_flag", path = %path, "cleared immutable/append-only flag");
                        Step::Retry
                    }
                    Err(errno) => self.flag_failure(Some(name), format!("immutable or append-only; clearing the flag failed: {errno}")),
                },
                FlagAction::FailClosed => self.flag_failure(Some(name), "immutable or append-only and no CAP_LINUX_IMMUTABLE: left in place (clear it with chattr -ia from a privileged context)".to_owned()),
            },
        }
    }

    fn flag_failure(&mut self, name: Option<&CStr>, why: String) -> Step {
        let path = self.path(name);
        self.skip(path, why);
        self.block_top();
        Step::Done
    }

    fn enforce_fd_budget(&mut self) {
        let open = 1 + self.stack.len() - self.first_open;
        if open > self.opts.max_open_dirs && self.first_open < self.stack.len() - 1 {
            self.stack[self.first_open].dir = None;
            self.first_open += 1;
        }
    }

    /// The top directory is empty (or blocked): remove it from its parent.
    fn finish_dir(&mut self) {
        let child = self.stack.pop().expect("caller checked depth");
        let parent_idx = self.stack.len() - 1;
        if self.stack[parent_idx].dir.is_none() {
            match self.reopen_parent(&child, parent_idx) {
                Some(dir) => {
                    self.stack[parent_idx].dir = Some(dir);
                    self.first_open = parent_idx.max(1);
                }
                None => {
                    let path = self.path(None);
                    self.skip(
                        path,
                        "the directory chain changed during the wipe (moved by someone else); stopped so nothing outside the workspace is touched".to_owned(),
                    );
                    self.aborted = true;
                    return;
                }
            }
        }
        if self.first_open > self.stack.len() {
            self.first_open = self.stack.len();
        }
        drop(child.dir);
        let mut tried_unflag = false;
        loop {
            match unlinkat(
                self.top_fd(),
                child.name.as_c_str(),
                UnlinkatFlags::RemoveDir,
            ) {
                Ok(()) => self.report.dirs_removed += 1,
                Err(Errno::ENOENT) => {}
                // Swapped for something else: the parent's rescan will find and handle it.
                Err(Errno::ENOTDIR) => {}
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                    if !child.blocked {
                        let path = self.path(Some(&child.name));
                        self.skip(
                            path,
                            "directory still not empty after rescans (a concurrent writer?)"
                                .to_owned(),
                        );
                    }
                    self.block_top();
                }
                Err(Errno::EBUSY) => self.skip_mount(&child.name),
                Err(Errno::EPERM) if !tried_unflag => {
                    tried_unflag = true;
                    if let Step::Retry = self.unflag(&child.name, &child.meta) {
                        continue;
                    }
                }
                Err(errno) => {
                    let path = self.path(Some(&child.name));
                    self.skip(path, format!("cannot remove directory: {errno}"));
                    self.block_top();
                }
            }
            break;
        }
    }

    /// Reopens a closed ancestor: through the child's `..` (one syscall), which must be the
    /// same inode we held; otherwise by name from the root frame, checked at every step.
    fn reopen_parent(&self, child: &Frame, parent_idx: usize) -> Option<Dir> {
        let want = self.stack[parent_idx].meta;
        if let Some(child_dir) = child.dir.as_ref() {
            if let Ok(fd) = fcntl::openat(
                child_dir.as_fd(),
                c"..",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                if fsutil::stat_fd(fd.as_fd()).is_ok_and(|m| m.same_object(&want)) {
                    return Dir::from_fd(fd).ok();
                }
            }
        }
        let root = self.stack[0].dir.as_ref()?;
        let mut current = fsutil::dup(root.as_fd()).ok()?;
        for frame in &self.stack[1..=parent_idx] {
            let fd =
                fsutil::open_dir_beneath(current.as_fd(), &frame.name, self.opts.resolve).ok()?;
            let m = fsutil::stat_fd(fd.as_fd()).ok()?;
            if !m.same_object(&frame.meta) {
                return None;
            }
            current = fd;
        }
        Dir::from_fd(current).ok()
    }
}
