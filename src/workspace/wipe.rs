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
//! - Mount points are skipped and reported, never descended into: a directory whose mount
//!   id or device differs from its parent's, a file whose mount id differs, anything the
//!   mount table (`/proc/thread-self/mountinfo`) lists below the directory, found by path
//!   or by the inode mounted there (gVisor has neither mount ids nor `openat2`, and a bind
//!   mount of the same file system has its parent's device), and file bind mounts
//!   (`unlinkat` says `EBUSY`). Devices are compared for directories only: on gVisor's
//!   overlay a file reports its layer's device, not the directory's. At the end every
//!   mount point reported must still be in the mount table, else the wipe failed.
//! - Iterative with an explicit stack; at most `max_open_dirs` directory fds are open.
//!   Closed ancestors are reopened through the child's `..` and must be the same inode as
//!   before (else a re-descent by name from the root, checked at each step; else stop).
//! - Memory is bounded whatever the tree's shape: a directory is read one `getdents64`
//!   buffer at a time and its entries are deleted before more are read (a directory of
//!   millions of long names never sits in memory); all pending batches together stay under
//!   [`PENDING_BUDGET`] (over it, the batch of the shallowest directory is dropped and that
//!   directory is read again from its start when the walk gets back to it); entries that
//!   cannot be removed are remembered so a re-read never retries them, and past
//!   [`MAX_LEFT`] of them the wipe stops as failed.
//! - Whatever is still listed at the end (other than what was reported) fails the wipe: a
//!   file system that says "removed" but keeps listing the entry is never "fully wiped".

mod bounds;
mod mounts;
mod unflag;

use super::fsutil::{self, Kind, Meta, Resolve};
use nix::errno::Errno;

use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::collections::HashSet;
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
    /// Allocated bytes (`st_blocks` × 512) of the regular files unlinked: a sparse file
    /// counts what it occupied, not its apparent size. Hardlinked data may survive
    /// elsewhere; this counts what the workspace held.
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
const MAX_PASSES: u8 = 64;
const MAX_ATTEMPTS: usize = 4;
/// One `getdents64` call's buffer: the largest batch of names read at once.
const READ_BUFFER: usize = 32 * 1024;
/// All pending names of all directories on the stack together (bytes, with overhead).
pub(crate) const PENDING_BUDGET: usize = 4 << 20;
/// Entries the wipe gives up on before it stops (each is reported and remembered).
pub(crate) const MAX_LEFT: usize = 1000;
/// Deepest stack the walk keeps: a directory found deeper is moved up to the wiped root
/// (see [`Walk::flatten`]) so the frames' memory is bounded however deep the tree.
pub(crate) const MAX_DEPTH: usize = 1024;
/// Longest path written into the report (the tail is kept).
const MAX_REPORT_PATH: usize = 4096;
/// What a pending name costs beyond its bytes (the boxed slice and allocator rounding).
const NAME_OVERHEAD: usize = 32;

#[derive(Debug, Clone, Copy)]
pub(crate) struct WipeOptions {
    pub resolve: Resolve,
    pub max_open_dirs: usize,
    pub can_clear_immutable: bool,
    /// Bytes of pending names across the stack ([`PENDING_BUDGET`]; smaller in tests).
    pub pending_budget: usize,
}

impl WipeOptions {
    pub(crate) fn detect() -> WipeOptions {
        WipeOptions {
            resolve: Resolve::detect(),
            max_open_dirs: DEFAULT_MAX_OPEN_DIRS,
            can_clear_immutable: fsutil::has_effective_cap(fsutil::CAP_LINUX_IMMUTABLE),
            pending_budget: PENDING_BUDGET,
        }
    }
}

struct Frame {
    dir: Option<OwnedFd>,
    /// Name in the parent (empty for the top directory).
    name: CString,
    meta: Meta,
    /// Names read but not handled yet (one read's worth at most).
    pending: Vec<CString>,
    pending_bytes: usize,
    /// The stream reached its end since the directory was opened or rewound.
    eof: bool,
    /// A pass over the directory found something to handle (so a rescan may find more).
    found_in_pass: bool,
    /// The stream position no longer matches `pending` (its batch was dropped to stay in
    /// budget): rewind before reading on.
    rewind: bool,
    /// Passes over the directory that removed nothing / passes in all.
    rescans: u8,
    passes: u8,
    /// `files_removed + dirs_removed` when the current pass started.
    removed_at_pass: u64,
    /// Something below could not be removed: rescanning would only find it again.
    blocked: bool,
    /// Names in this directory the wipe gave up on: never handled twice.
    left: HashSet<CString>,
}

impl Frame {
    fn new(dir: OwnedFd, name: CString, meta: Meta) -> Frame {
        Frame {
            dir: Some(dir),
            name,
            meta,
            pending: Vec::new(),
            pending_bytes: 0,
            eof: false,
            found_in_pass: false,
            rewind: false,
            rescans: 0,
            passes: 0,
            removed_at_pass: 0,
            blocked: false,
            left: HashSet::new(),
        }
    }
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
    buf: Vec<u8>,
    pending_total: usize,
    left_total: usize,
    flattened: u64,
    /// The mount table's mount points below the wiped directory (`None`: unreadable).
    mounts: Option<mounts::Mounts>,
    /// The raw relative paths of `report.skipped_mounts`, for the final check.
    mount_paths: Vec<Vec<u8>>,
}

/// Removes everything below `root` (an open directory) and keeps `root` itself.
/// `label` prefixes paths in the report and logs.
pub(crate) fn wipe_contents(
    root: OwnedFd,
    label: &str,
    opts: WipeOptions,
) -> Result<WipeReport, WipeError> {
    let started = Instant::now();
    let mut meta = fsutil::stat_fd(root.as_fd()).map_err(|errno| WipeError::Open {
        path: label.to_owned(),
        errno,
    })?;
    if !opts.resolve.mount_ids {
        meta.mnt_id = None;
    }
    if meta.kind != Kind::Dir {
        return Err(WipeError::Open {
            path: label.to_owned(),
            errno: Errno::ENOTDIR,
        });
    }
    if meta.perm & 0o700 != 0o700 {
        // The tenant may have chmod'ed its own top directory; we need rwx to empty it.
        let _ = nix::sys::stat::fchmod(root.as_fd(), Mode::from_bits_truncate(meta.perm | 0o700));
    }
    let mounts = mounts::Mounts::load(root.as_fd());
    let mut walk = Walk {
        stack: vec![Frame::new(root, CString::default(), meta)],
        first_open: 1,
        opts: WipeOptions {
            max_open_dirs: opts.max_open_dirs.max(2),
            ..opts
        },
        report: WipeReport::default(),
        aborted: false,
        buf: vec![0u8; READ_BUFFER],
        pending_total: 0,
        left_total: 0,
        flattened: 0,
        mounts,
        mount_paths: Vec::new(),
    };
    // The first read of the top directory failing means the wipe cannot start at all.
    if let Err(errno) = walk.read_batch() {
        return Err(WipeError::Read {
            path: label.to_owned(),
            errno,
        });
    }
    walk.run();
    walk.verify_empty();
    walk.verify_mounts();
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

impl Walk {
    /// `statx` of `name` in the top directory, with the mount id dropped where it is not
    /// to be trusted (so every check below sees what a kernel without mount ids gives).
    fn stat_at(&self, name: &CStr) -> Result<Meta, Errno> {
        fsutil::stat_at(self.top_fd(), name).map(|m| self.trusted(m))
    }

    fn stat_fd(&self, fd: BorrowedFd<'_>) -> Result<Meta, Errno> {
        fsutil::stat_fd(fd).map(|m| self.trusted(m))
    }

    fn trusted(&self, mut m: Meta) -> Meta {
        if !self.opts.resolve.mount_ids {
            m.mnt_id = None;
        }
        m
    }

    fn run(&mut self) {
        while !self.aborted {
            let top = self
                .stack
                .last_mut()
                .expect("the stack always holds the top directory");
            if let Some(name) = top.pending.pop() {
                let cost = name.as_bytes().len() + NAME_OVERHEAD;
                top.pending_bytes -= cost;
                self.pending_total -= cost;
                self.entry(name);
                continue;
            }
            let removed = self.report.files_removed + self.report.dirs_removed;
            // A pass that removed something earns another (a file system whose readdir
            // positions shift as entries go skips some each pass); one that removed
            // nothing gets a few (a racing writer), then the directory is done.
            let progressed = removed != top.removed_at_pass;
            let rescan = top.eof
                && top.found_in_pass
                && !top.blocked
                && if progressed {
                    top.passes < MAX_PASSES
                } else {
                    top.rescans < MAX_RESCANS
                };
            if top.rewind || rescan {
                // A dropped batch, or a rescan: entries created while we walked (a racing
                // writer) or skipped by a file system's readdir show up here.
                if !top.rewind {
                    top.passes += 1;
                    if !progressed {
                        top.rescans += 1;
                    }
                }
                top.removed_at_pass = removed;
                top.rewind = false;
                let dir = top.dir.as_ref().expect("the top frame is open");
                if let Err(errno) = fsutil::rewind_dir(dir.as_fd()) {
                    top.blocked = true;
                    top.eof = true;
                    let path = self.path(None);
                    self.skip(path, format!("cannot rewind directory: {errno}"));
                    continue;
                }
                top.eof = false;
                top.found_in_pass = false;
            }
            if !top.eof {
                if let Err(errno) = self.read_batch() {
                    let top = self.stack.last_mut().expect("non-empty stack");
                    top.blocked = true;
                    top.eof = true;
                    let path = self.path(None);
                    self.skip(path, format!("cannot read directory: {errno}"));
                }
                continue;
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

    /// The path of `name` in the top directory (or of the top directory), escaped; a path
    /// longer than [`MAX_REPORT_PATH`] keeps its tail (a 10k-deep tree's path is megabytes).
    fn path(&self, name: Option<&CStr>) -> String {
        let names = self.stack[1..]
            .iter()
            .map(|f| f.name.as_c_str())
            .chain(name);
        let mut parts: Vec<String> = Vec::new();
        let mut len = 0;
        for n in names.rev() {
            let part = fsutil::escape_bytes(n.to_bytes());
            len += part.len() + 1;
            if len > MAX_REPORT_PATH && !parts.is_empty() {
                parts.push("…".to_owned());
                break;
            }
            parts.push(part);
        }
        if parts.is_empty() {
            return ".".to_owned();
        }
        parts.reverse();
        parts.join("/")
    }

    /// The relative path of `name` in the top directory, unescaped and whole.
    fn raw_path(&self, name: &CStr) -> Vec<u8> {
        let mut out = Vec::new();
        for n in self.stack[1..]
            .iter()
            .map(|f| f.name.as_c_str())
            .chain([name])
        {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(n.to_bytes());
        }
        out
    }

    /// `name` in the top directory was a mount point when the wipe started.
    fn listed_mount_point(&self, name: &CStr) -> bool {
        let Some(m) = self.mounts.as_ref() else {
            return false;
        };
        // An entry at depth d has d components: deeper than every mount point, no match.
        !m.is_empty() && self.stack.len() <= m.max_depth() && m.is_mount_path(&self.raw_path(name))
    }

    /// Every mount point reported must be one: anything else left behind (a file taken
    /// for a mount by a device number, a directory swapped in at a mount's old path) is
    /// tenant data, and the wipe did not finish.
    fn verify_mounts(&mut self) {
        let paths = std::mem::take(&mut self.mount_paths);
        for (i, raw) in paths.iter().enumerate() {
            let listed = self.mounts.as_ref().and_then(|m| m.listed_now(raw));
            let why = match listed {
                Some(true) => continue,
                Some(false) => "was taken for a mount point, but the mount table does not list it: left behind",
                None => "cannot be confirmed as a mount point (the mount table cannot be read): left behind",
            };
            let path = self.report.skipped_mounts[i].clone();
            self.skip(path, why.to_owned());
        }
        self.mount_paths = paths;
    }

    fn skip(&mut self, path: String, why: String) {
        tracing::warn!(event = "wipe.skipped", path = %path, reason = %why, "wipe left an entry");
        self.report.skipped.push((path, why));
    }

    fn skip_mount(&mut self, name: &CStr) {
        let raw = self.raw_path(name);
        self.mount_paths.push(raw);
        let path = self.path(Some(name));
        tracing::warn!(event = "wipe.skipped_mount", path = %path, "mount point inside the wiped directory left untouched");
        self.report.skipped_mounts.push(path);
        self.give_up(name);
    }

    /// `name` in the top directory stays: remember it (so a re-read never handles it
    /// again) and stop rescanning the directory. Past [`MAX_LEFT`] the wipe stops.
    fn give_up(&mut self, name: &CStr) {
        let Some(top) = self.stack.last_mut() else {
            return;
        };
        top.blocked = true;
        if top.left.insert(name.to_owned()) {
            self.left_total += 1;
        }
        if self.left_total > MAX_LEFT && !self.aborted {
            self.aborted = true;
            self.report.skipped.push((
                ".".to_owned(),
                format!("more than {MAX_LEFT} entries could not be removed; stopped"),
            ));
        }
    }

    fn entry(&mut self, name: CString) {
        for _ in 0..MAX_ATTEMPTS {
            let parent_meta = self.stack.last().expect("non-empty stack").meta;
            let meta = match self.stat_at(&name) {
                Ok(m) => m,
                Err(Errno::ENOENT) => return,
                Err(errno) => {
                    let path = self.path(Some(&name));
                    self.skip(path, format!("cannot stat: {errno}"));
                    self.give_up(&name);
                    return;
                }
            };
            // A device differing from the directory's means a mount only for directories:
            // gVisor's overlay gives files their layer's device.
            let crosses = if meta.kind == Kind::Dir {
                parent_meta.other_mount(&meta)
            } else {
                parent_meta.other_mount_id(&meta)
            };
            if crosses || self.listed_mount_point(&name) {
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
        self.give_up(&name);
    }

    fn enter_dir(&mut self, name: &CStr, meta: &Meta) -> Step {
        if self.stack.len() >= MAX_DEPTH && self.flatten(name) {
            return Step::Done;
        }
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
                self.give_up(name);
                return Step::Done;
            }
        };
        let opened_meta = match self.stat_fd(fd.as_fd()) {
            Ok(m) => m,
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot stat opened directory: {errno}"));
                self.give_up(name);
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
        // The inode mounted somewhere below: a mount point that moved since the table was
        // read, or the source of a bind mount inside the workspace (tenant data, wiped).
        // The table read now, and the path of the fd we hold, tell which.
        if self
            .mounts
            .as_ref()
            .is_some_and(|m| m.is_mounted_root(&opened_meta))
            && mounts::Mounts::fd_is_mount_point(fd.as_fd())
        {
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
        let mut frame = Frame::new(fd, name.to_owned(), opened_meta);
        frame.removed_at_pass = self.report.files_removed + self.report.dirs_removed;
        self.stack.push(frame);
        self.enforce_fd_budget();
        Step::Done
    }

    /// An unreadable directory (mode 000, supervisor not root): open it `O_PATH` (needs no
    /// read permission), check it is the directory we saw, add `u+rwx` through the fd.
    fn unlock_dir(&mut self, name: &CStr, meta: &Meta) -> Step {
        let result = (|| {
            let opath = fsutil::open_path_nofollow(self.top_fd(), name)?;
            let m = self.stat_fd(opath.as_fd())?;
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
                self.give_up(name);
                Step::Done
            }
        }
    }

    fn unlink(&mut self, name: &CStr, meta: &Meta) -> Step {
        match unlinkat(self.top_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => {
                self.report.files_removed += 1;
                if meta.kind == Kind::File {
                    self.report.bytes_removed += meta.blocks.saturating_mul(512);
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
                self.give_up(name);
                Step::Done
            }
            Err(errno) => {
                let path = self.path(Some(name));
                self.skip(path, format!("cannot unlink: {errno}"));
                self.give_up(name);
                Step::Done
            }
        }
    }

    /// The top directory is empty (or blocked): remove it from its parent.
    fn finish_dir(&mut self) {
        let child = self.stack.pop().expect("caller checked depth");
        let parent_idx = self.stack.len() - 1;
        if self.stack[parent_idx].dir.is_none() {
            match self.reopen_parent(&child, parent_idx) {
                Some(dir) => {
                    // A new fd reads from the start: entries handled before are gone or
                    // remembered in `left`, so reading it again only finds the rest.
                    let parent = &mut self.stack[parent_idx];
                    parent.dir = Some(dir);
                    parent.eof = false;
                    parent.found_in_pass = false;
                    parent.removed_at_pass = self.report.files_removed + self.report.dirs_removed;
                    parent.rewind = false;
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
                    self.give_up(&child.name);
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
                    self.give_up(&child.name);
                }
            }
            break;
        }
    }
}
