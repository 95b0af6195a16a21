//! The small operations: stat, list, mkdir, remove, rename. Each runs on the worker (with
//! the sandbox user's identity) on paths confined by [`super::resolve`].

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{self, FileStat, Mode};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd};

use super::resolve::{errno_error, Roots};
use super::FileError;
use crate::proto::{self, ErrorCode, FileType};
use crate::workspace::fsutil;

/// Page size of a list without one, and the largest allowed.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

pub(crate) fn info_from(name: String, st: &FileStat, link: Option<String>) -> proto::FileInfo {
    let ty = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileType::File,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    };
    proto::FileInfo {
        name,
        r#type: ty as i32,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        mtime_ms: st.st_mtime * 1000 + st.st_mtime_nsec / 1_000_000,
        symlink_target: link.unwrap_or_default(),
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)` of `name` in `dir` (a symlink's target is read, never
/// followed); `None` for the directory itself.
pub(crate) fn stat_entry(
    dir: BorrowedFd<'_>,
    name: Option<&CStr>,
) -> Result<proto::FileInfo, Errno> {
    let Some(name) = name else {
        let st = stat::fstat(dir)?;
        return Ok(info_from(String::new(), &st, None));
    };
    let st = stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let link = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        nix::fcntl::readlinkat(dir, name)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(info_from(
        String::from_utf8_lossy(name.to_bytes()).into_owned(),
        &st,
        link,
    ))
}

pub(crate) fn stat(roots: &Roots, req: &proto::StatPath) -> Result<proto::FileResult, FileError> {
    let t = roots.target(&req.path)?;
    let parent = t.open_parent(roots.resolve)?;
    let info =
        stat_entry(parent.as_fd(), t.leaf().map(|c| c.as_c_str())).map_err(|e| t.err(e, "stat"))?;
    Ok(proto::FileResult {
        info: Some(info),
        ..Default::default()
    })
}

pub(crate) fn list(roots: &Roots, req: &proto::ListDir) -> Result<proto::FileResult, FileError> {
    let t = roots.target(&req.path)?;
    let page = match req.page_size as usize {
        0 => DEFAULT_PAGE,
        n if n > MAX_PAGE => {
            return Err(FileError::new(
                ErrorCode::InvalidArgument,
                format!("page_size {n} is above the limit of {MAX_PAGE}"),
            ))
        }
        n => n,
    };
    let dir = t.open_dir(roots.resolve)?;
    let after = req.page_token.as_bytes();
    // Bounded memory: only the `page + 1` smallest names after the token are kept.
    let mut best: std::collections::BinaryHeap<Vec<u8>> = std::collections::BinaryHeap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = fsutil::getdents(dir.as_fd(), &mut buf).map_err(|e| t.err(e, "list"))?;
        if n == 0 {
            break;
        }
        for name in fsutil::dirent_names(&buf[..n]) {
            let b = name.to_bytes();
            if b == b"." || b == b".." || b <= after {
                continue;
            }
            if best.len() <= page {
                best.push(b.to_vec());
            } else if best.peek().is_some_and(|top| b < top.as_slice()) {
                best.pop();
                best.push(b.to_vec());
            }
        }
    }
    let mut names = best.into_sorted_vec();
    let more = names.len() > page;
    names.truncate(page);
    let mut entries = Vec::with_capacity(names.len());
    for name in &names {
        let c = CString::new(name.clone()).expect("dirent names have no NUL");
        match stat_entry(dir.as_fd(), Some(&c)) {
            Ok(info) => entries.push(info),
            Err(Errno::ENOENT) => continue, // removed meanwhile
            Err(e) => return Err(t.err(e, "stat entry")),
        }
    }
    let next = if more {
        names
            .last()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(proto::FileResult {
        entries,
        next_page_token: next,
        ..Default::default()
    })
}

pub(crate) fn mkdir(roots: &Roots, req: &proto::MakeDir) -> Result<proto::FileResult, FileError> {
    let t = roots.target(&req.path)?;
    let Some(leaf) = t.leaf() else {
        return Err(FileError::new(
            ErrorCode::AlreadyExists,
            format!("{}: is the root itself", t.shown),
        ));
    };
    let mode = if req.mode == 0 {
        0o755
    } else {
        req.mode & 0o7777
    };
    let parent = if req.parents {
        t.make_dirs(t.parts.len() - 1, 0o755, roots.resolve)?
    } else {
        t.open_parent(roots.resolve)?
    };
    match stat::mkdirat(
        parent.as_fd(),
        leaf.as_c_str(),
        Mode::from_bits_truncate(mode),
    ) {
        Ok(()) => {
            // The umask never applies: set the requested bits exactly.
            let _ = stat::fchmodat(
                parent.as_fd(),
                leaf.as_c_str(),
                Mode::from_bits_truncate(mode),
                stat::FchmodatFlags::NoFollowSymlink,
            )
            .or_else(|_| {
                let fd = fsutil::open_dir_beneath(parent.as_fd(), leaf, roots.resolve)?;
                stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))
            });
        }
        Err(Errno::EEXIST) if req.parents => {
            // Must be a directory (not a symlink to one).
            fsutil::open_dir_beneath(parent.as_fd(), leaf, roots.resolve)
                .map_err(|e| t.err(e, "open existing directory"))?;
        }
        Err(e) => return Err(t.err(e, "create directory")),
    }
    let info = stat_entry(parent.as_fd(), Some(leaf)).map_err(|e| t.err(e, "stat"))?;
    Ok(proto::FileResult {
        info: Some(info),
        ..Default::default()
    })
}

pub(crate) fn remove(
    roots: &Roots,
    req: &proto::RemovePath,
) -> Result<proto::FileResult, FileError> {
    let t = roots.target(&req.path)?;
    let Some(leaf) = t.leaf() else {
        return Err(FileError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{}: the root itself cannot be removed (remove its entries)",
                t.shown
            ),
        ));
    };
    let parent = t.open_parent(roots.resolve)?;
    let st = stat::fstatat(
        parent.as_fd(),
        leaf.as_c_str(),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| t.err(e, "stat"))?;
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let mut result = proto::FileResult::default();
    if !is_dir {
        nix::unistd::unlinkat(
            parent.as_fd(),
            leaf.as_c_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| t.err(e, "remove"))?;
        result.bytes = st.st_size as u64;
        result.entry_count = 1;
        return Ok(result);
    }
    if req.recursive {
        let dir = fsutil::open_dir_beneath(parent.as_fd(), leaf, roots.resolve)
            .map_err(|e| t.err(e, "open directory"))?;
        let mut opts = crate::workspace::wipe::WipeOptions::detect();
        opts.resolve = roots.resolve;
        // Only the tenant's own rights: never clear an immutable flag it could not.
        opts.can_clear_immutable = false;
        let report = crate::workspace::wipe::wipe_contents(dir, &t.shown, opts).map_err(|e| {
            FileError::new(ErrorCode::Internal, format!("{}: remove: {e}", t.shown))
        })?;
        result.bytes = report.bytes_removed;
        result.entry_count = report.files_removed + report.dirs_removed;
        if !report.skipped_mounts.is_empty() {
            return Err(FileError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{}: mount points below were left in place (never entered): {}",
                    t.shown,
                    report.skipped_mounts.join(", ")
                ),
            ));
        }
        if let Some((path, why)) = report.skipped.first() {
            let code = if why.contains("ermission") {
                ErrorCode::PermissionDenied
            } else {
                ErrorCode::FailedPrecondition
            };
            return Err(FileError::new(
                code,
                format!(
                    "{}: {} entries could not be removed, e.g. {path}: {why}",
                    t.shown,
                    report.skipped.len()
                ),
            ));
        }
    }
    nix::unistd::unlinkat(
        parent.as_fd(),
        leaf.as_c_str(),
        nix::unistd::UnlinkatFlags::RemoveDir,
    )
    .map_err(|e| t.err(e, "remove directory"))?;
    result.entry_count += 1;
    Ok(result)
}

pub(crate) fn rename(
    roots: &Roots,
    req: &proto::RenamePath,
) -> Result<proto::FileResult, FileError> {
    let from = roots.target(&req.from)?;
    let to = roots.target(&req.to)?;
    let (Some(fl), Some(tl)) = (from.leaf(), to.leaf()) else {
        return Err(FileError::new(
            ErrorCode::InvalidArgument,
            format!(
                "rename {} -> {}: a root cannot be renamed",
                from.shown, to.shown
            ),
        ));
    };
    let fp = from.open_parent(roots.resolve)?;
    let tp = to.open_parent(roots.resolve)?;
    let r = if req.replace {
        nix::fcntl::renameat(fp.as_fd(), fl.as_c_str(), tp.as_fd(), tl.as_c_str())
    } else {
        fsutil::rename_noreplace(fp.as_fd(), fl, tp.as_fd(), tl)
    };
    r.map_err(|e| {
        let shown = format!("rename {} -> {}", from.shown, to.shown);
        errno_error(&shown, e, "rename")
    })?;
    let info = stat_entry(tp.as_fd(), Some(tl)).map_err(|e| to.err(e, "stat"))?;
    Ok(proto::FileResult {
        info: Some(info),
        ..Default::default()
    })
}
