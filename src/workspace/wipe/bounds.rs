//! How the walk keeps its resources bounded whatever the tree's shape: names read one
//! buffer at a time, a budget for all pending batches, a depth past which directories
//! are moved up to the root, a budget of open directory fds (closed ancestors reopened
//! and checked), and the final check that nothing is still listed.

use super::{Frame, Walk, NAME_OVERHEAD};
use crate::workspace::fsutil;
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};

impl Walk {
    /// Reads one buffer of names of the top directory into its pending batch.
    pub(super) fn read_batch(&mut self) -> Result<(), Errno> {
        let top = self.stack.last_mut().expect("non-empty stack");
        let fd = top.dir.as_ref().expect("the top frame is open").as_fd();
        let n = fsutil::getdents(fd, &mut self.buf)?;
        if n == 0 {
            top.eof = true;
            return Ok(());
        }
        for name in fsutil::dirent_names(&self.buf[..n]) {
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." || top.left.contains(name) {
                continue;
            }
            let cost = bytes.len() + NAME_OVERHEAD;
            top.pending.push(name.to_owned());
            top.pending_bytes += cost;
            self.pending_total += cost;
            top.found_in_pass = true;
        }
        self.enforce_pending_budget();
        Ok(())
    }

    /// Over budget (a deep tree of wide directories): forget the batches of the
    /// shallowest directories; each is read again from its start when the walk returns.
    pub(super) fn enforce_pending_budget(&mut self) {
        let top = self.stack.len() - 1;
        let mut i = 0;
        while self.pending_total > self.opts.pending_budget && i < top {
            let f = &mut self.stack[i];
            if !f.pending.is_empty() {
                self.pending_total -= f.pending_bytes;
                f.pending = Vec::new();
                f.pending_bytes = 0;
                f.eof = false;
                f.rewind = true;
            }
            i += 1;
        }
    }

    /// Moves the directory `name` of the top directory up into the wiped root under a
    /// fresh name and queues it there: its subtree is walked later from the root, so the
    /// stack never grows past [`MAX_DEPTH`](super::MAX_DEPTH). Both ends are directory fds we hold on the
    /// same mount (the caller checked), and `RENAME_NOREPLACE` never overwrites anything.
    /// `false` (descend as usual) if the rename is refused.
    pub(super) fn flatten(&mut self, name: &CStr) -> bool {
        let root = self.stack[0]
            .dir
            .as_ref()
            .expect("the root frame stays open")
            .as_fd();
        for _ in 0..4 {
            self.flattened += 1;
            let new = CString::new(format!(
                ".wipe-deep-{}-{:016x}",
                self.flattened,
                rand::random::<u64>()
            ))
            .expect("no NUL in a formatted name");
            match fsutil::rename_noreplace(self.top_fd(), name, root, &new) {
                Ok(()) => {
                    let cost = new.as_bytes().len() + NAME_OVERHEAD;
                    let root_frame = &mut self.stack[0];
                    root_frame.pending.push(new);
                    root_frame.pending_bytes += cost;
                    root_frame.found_in_pass = true;
                    self.pending_total += cost;
                    return true;
                }
                Err(Errno::EEXIST) => continue,
                Err(errno) => {
                    tracing::debug!(event = "wipe.flatten_refused", error = %errno, "cannot move a deep directory up; descending into it");
                    return false;
                }
            }
        }
        false
    }

    /// After the walk: whatever the top directory still lists, other than what was
    /// reported, means the wipe did not finish (e.g. a file system whose unlink said yes
    /// but whose readdir still shows the entry).
    pub(super) fn verify_empty(&mut self) {
        if self.aborted || self.stack.len() != 1 {
            return;
        }
        let top = &self.stack[0];
        let fd = top.dir.as_ref().expect("the top frame is open").as_fd();
        let mut left = Vec::new();
        let read = fsutil::rewind_dir(fd).and_then(|()| loop {
            let n = fsutil::getdents(fd, &mut self.buf)?;
            if n == 0 {
                return Ok(());
            }
            for name in fsutil::dirent_names(&self.buf[..n]) {
                let b = name.to_bytes();
                if b != b"." && b != b".." && !top.left.contains(name) && left.len() < 10 {
                    left.push(fsutil::escape_bytes(b));
                }
            }
            if left.len() >= 10 {
                return Ok(());
            }
        });
        match read {
            Err(errno) => self.skip(
                ".".to_owned(),
                format!("cannot check that the directory is empty: {errno}"),
            ),
            Ok(()) => {
                for path in left {
                    self.skip(
                        path,
                        "still listed after the wipe removed everything it found".to_owned(),
                    );
                }
            }
        }
    }

    pub(super) fn enforce_fd_budget(&mut self) {
        let open = 1 + self.stack.len() - self.first_open;
        if open > self.opts.max_open_dirs && self.first_open < self.stack.len() - 1 {
            let f = &mut self.stack[self.first_open];
            f.dir = None;
            f.eof = false;
            self.first_open += 1;
        }
    }

    /// Reopens a closed ancestor: through the child's `..` (one syscall), which must be the
    /// same inode we held; otherwise by name from the root frame, checked at every step.
    pub(super) fn reopen_parent(&self, child: &Frame, parent_idx: usize) -> Option<OwnedFd> {
        let want = self.stack[parent_idx].meta;
        if let Some(child_dir) = child.dir.as_ref() {
            if let Ok(fd) = fcntl::openat(
                child_dir.as_fd(),
                c"..",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                if fsutil::stat_fd(fd.as_fd()).is_ok_and(|m| m.same_object(&want)) {
                    return Some(fd);
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
        Some(current)
    }
}
