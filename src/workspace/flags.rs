//! Immutable and append-only inode flags (`chattr +i` / `+a`): a tenant holding
//! `CAP_LINUX_IMMUTABLE` could set them to make the wipe fail. The wipe clears them only
//! when it holds that capability itself; otherwise it leaves the entry and reports it.

use super::fsutil::{FS_APPEND_FL, FS_IMMUTABLE_FL};

/// What to do about an entry whose removal failed with `EPERM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagAction {
    /// Neither immutable nor append-only: `EPERM` has another cause.
    NotFlagged,
    /// Clear the flags (we hold `CAP_LINUX_IMMUTABLE`) and retry; carries the new flags.
    Clear(libc::c_int),
    /// Flagged and we may not clear it: leave it, report it, the wipe is not complete.
    FailClosed,
}

/// The decision, separate from the syscalls so the no-capability path is testable as root.
pub(crate) fn immutable_action(flags: libc::c_int, can_clear: bool) -> FlagAction {
    let sticky = flags & (FS_IMMUTABLE_FL | FS_APPEND_FL);
    if sticky == 0 {
        FlagAction::NotFlagged
    } else if can_clear {
        FlagAction::Clear(flags & !sticky)
    } else {
        FlagAction::FailClosed
    }
}
