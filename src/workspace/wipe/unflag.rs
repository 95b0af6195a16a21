//! `EPERM` while removing: immutable and append-only flags, cleared only with
//! `CAP_LINUX_IMMUTABLE`, otherwise left in place and reported (fail closed).

use super::{Step, Walk};
use crate::workspace::flags::{immutable_action, FlagAction};
use crate::workspace::fsutil::{self, Kind, Meta};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::ffi::CStr;
use std::os::fd::AsFd;

impl Walk {
    /// `EPERM` from `unlinkat`: an immutable or append-only flag on the parent directory or
    /// on the entry. Cleared only with `CAP_LINUX_IMMUTABLE`; otherwise fail closed.
    pub(super) fn unflag(&mut self, name: &CStr, meta: &Meta) -> Step {
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
                        Err(errno) => self.flag_failure(name, true, format!("immutable or append-only directory; clearing the flag failed: {errno}")),
                    };
                }
                FlagAction::FailClosed => {
                    return self.flag_failure(name, true, "immutable or append-only directory and no CAP_LINUX_IMMUTABLE: left in place (clear it with chattr -ia from a privileged context)".to_owned());
                }
            }
        }
        if !matches!(meta.kind, Kind::File | Kind::Dir) {
            return self.flag_failure(name, false, "cannot unlink: EPERM".to_owned());
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
            Err(errno) => self.flag_failure(name, false, format!("cannot unlink (EPERM) and cannot read its flags: {errno}")),
            Ok((fd, flags)) => match immutable_action(flags, can_clear) {
                FlagAction::NotFlagged => self.flag_failure(name, false, "cannot unlink: EPERM".to_owned()),
                FlagAction::Clear(new) => match fsutil::set_inode_flags(fd.as_fd(), new) {
                    Ok(()) => {
                        let path = self.path(Some(name));
                        tracing::info!(event = "wipe.cleared_flag", path = %path, "cleared immutable/append-only flag");
                        Step::Retry
                    }
                    Err(errno) => self.flag_failure(name, false, format!("immutable or append-only; clearing the flag failed: {errno}")),
                },
                FlagAction::FailClosed => self.flag_failure(name, false, "immutable or append-only and no CAP_LINUX_IMMUTABLE: left in place (clear it with chattr -ia from a privileged context)".to_owned()),
            },
        }
    }

    /// Gives up on `name`; `about_parent`: the reason is the top directory's own flag.
    pub(super) fn flag_failure(&mut self, name: &CStr, about_parent: bool, why: String) -> Step {
        let path = self.path((!about_parent).then_some(name));
        self.skip(path, why);
        self.give_up(name);
        Step::Done
    }
}
