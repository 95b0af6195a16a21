//! Directory-fd relative file system primitives shared by the layout checks, the seed and
//! the wipe. Everything here works on a directory fd plus a single name (or a path below
//! a directory the supervisor alone can write), never on an absolute path a tenant could
//! have influenced.

use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// File type as reported by `statx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    Unknown,
}

impl Kind {
    fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::Unknown,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::File => "regular file",
            Kind::Symlink => "symbolic link",
            Kind::Fifo => "FIFO",
            Kind::Socket => "socket",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
            Kind::Unknown => "file of unknown type",
        }
    }
}

/// The subset of `statx` the module needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Allocated 512-byte blocks (`st_blocks`): what the file really occupies, sparse
    /// holes excluded.
    pub blocks: u64,
    pub nlink: u32,
    /// `None` where the kernel does not report mount ids (before 5.8, some sandboxes).
    pub mnt_id: Option<u64>,
}

impl Meta {
    /// Same inode on the same device (and, when both are known, the same mount).
    pub(crate) fn same_object(&self, other: &Meta) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && match (self.mnt_id, other.mnt_id) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Whether both mount ids are known and differ (the only mount test that means
    /// something for a non-directory: an overlay's files report their layer's device).
    pub(crate) fn other_mount_id(&self, other: &Meta) -> bool {
        matches!((self.mnt_id, other.mnt_id), (Some(a), Some(b)) if a != b)
    }

    /// Whether `other` lives on a different mount than `self` (a directory we hold).
    /// Compare directories only: see [`Meta::other_mount_id`].
    pub(crate) fn other_mount(&self, other: &Meta) -> bool {
        if self.dev != other.dev {
            return true;
        }
        match (self.mnt_id, other.mnt_id) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        }
    }
}

fn statx_raw(dirfd: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> Result<Meta, Errno> {
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let mask = libc::STATX_TYPE
        | libc::STATX_MODE
        | libc::STATX_UID
        | libc::STATX_GID
        | libc::STATX_INO
        | libc::STATX_SIZE
        | libc::STATX_BLOCKS
        | libc::STATX_NLINK
        | libc::STATX_MNT_ID;
    // SAFETY: valid dirfd, NUL-terminated name and a zeroed out-buffer of the right type.
    let rc = unsafe {
        libc::statx(
            dirfd.as_raw_fd(),
            name.as_ptr(),
            flags,
            mask,
            buf.as_mut_ptr(),
        )
    };
    match Errno::result(rc) {
        // No statx at all (kernels before 4.11, seccomp profiles that predate it): the
        // same facts from fstatat, without a mount id.
        Err(Errno::ENOSYS) => return fstatat_meta(dirfd, name, flags),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    // SAFETY: statx succeeded, so the kernel filled the buffer (it was zeroed before).
    let st = unsafe { buf.assume_init() };
    let mode = u32::from(st.stx_mode);
    let mnt_id = if st.stx_mask & libc::STATX_MNT_ID != 0 {
        Some(st.stx_mnt_id)
    } else {
        None
    };
    Ok(Meta {
        kind: Kind::from_mode(mode),
        perm: mode & 0o7777,
        uid: st.stx_uid,
        gid: st.stx_gid,
        dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        size: st.stx_size,
        blocks: st.stx_blocks,
        nlink: st.stx_nlink,
        mnt_id,
    })
}

fn fstatat_meta(dirfd: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> Result<Meta, Errno> {
    let mut buf = std::mem::MaybeUninit::<libc::stat>::zeroed();
    let flags = flags & (libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH | libc::AT_NO_AUTOMOUNT);
    // SAFETY: valid dirfd, NUL-terminated name and a zeroed out-buffer of the right type.
    let rc = unsafe { libc::fstatat(dirfd.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr(), flags) };
    Errno::result(rc)?;
    // SAFETY: fstatat succeeded and filled the buffer.
    let st = unsafe { buf.assume_init() };
    Ok(Meta {
        kind: Kind::from_mode(st.st_mode),
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        nlink: st.st_nlink as u32,
        mnt_id: None,
    })
}

/// `statx(dirfd, name, AT_SYMLINK_NOFOLLOW)`: describes the entry itself, never a link target.
/// `AT_NO_AUTOMOUNT` is asked for where the boot probe found the kernel accepts it; older
/// gVisor refuses the flag with `EINVAL`, and a supervisor that cannot stat cannot boot
/// (what is weaker then is in the `platform.capabilities` event).
pub(crate) fn stat_at(dirfd: BorrowedFd<'_>, name: &CStr) -> Result<Meta, Errno> {
    let mut flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT;
    if crate::platform::get().has("statx_no_automount") {
        flags |= libc::AT_NO_AUTOMOUNT;
    }
    statx_raw(dirfd, name, flags)
}

/// `statx` of an open fd. Falls back to `/proc/self/fdinfo` for the mount id.
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> Result<Meta, Errno> {
    let mut meta = statx_raw(
        fd,
        c"",
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT,
    )?;
    if meta.mnt_id.is_none() {
        meta.mnt_id = fdinfo_mnt_id(fd);
    }
    Ok(meta)
}

fn fdinfo_mnt_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether `openat2` confines a lookup here: the boot probe found it with every resolve
/// flag [`open_dir_beneath`] asks for.
pub(crate) fn openat2_available() -> bool {
    let caps = crate::platform::get();
    [
        "openat2_resolve_beneath",
        "openat2_resolve_no_xdev",
        "openat2_resolve_no_symlinks",
    ]
    .iter()
    .all(|c| caps.has(c))
}

/// How to resolve a name below a directory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolve {
    /// Use `openat2` (when the kernel has it); `false` forces the checked fallback.
    pub openat2: bool,
    /// Trust the kernel's mount ids (`STATX_MNT_ID`, fdinfo `mnt_id`); `false` where it
    /// reports none (gVisor) and in tests that simulate such a kernel.
    pub mount_ids: bool,
}

impl Resolve {
    pub(crate) fn detect() -> Resolve {
        let caps = crate::platform::get();
        Resolve {
            openat2: openat2_available(),
            mount_ids: caps.has("statx_mnt_id") || caps.has("fdinfo_mnt_id"),
        }
    }
}

/// Opens the directory `path` (one name, or a relative path without `..`) below `dirfd`
/// without following any symlink and without crossing a mount. With `openat2` the kernel
/// enforces it (`RESOLVE_BENEATH|RESOLVE_NO_XDEV|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS`);
/// the fallback walks one component at a time with `O_NOFOLLOW` and compares the mount of
/// each opened directory with its parent's. Errors: `ELOOP` (a symlink), `ENOTDIR`, `EXDEV`
/// (a mount point), `ENOENT`, `EACCES`.
pub(crate) fn open_dir_beneath(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    resolve: Resolve,
) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if resolve.openat2 && openat2_available() {
        let how = fcntl::OpenHow::new().flags(flags).resolve(
            fcntl::ResolveFlag::RESOLVE_BENEATH
                | fcntl::ResolveFlag::RESOLVE_NO_XDEV
                | fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS
                | fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        // EAGAIN: a concurrent rename or mount raced the resolution; retry a few times.
        let mut last = Errno::EAGAIN;
        for _ in 0..8 {
            match fcntl::openat2(dirfd, path, how) {
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    last = e;
                    break;
                }
                Ok(fd) => return Ok(fd),
            }
        }
        return Err(last);
    }
    let stat = |fd: BorrowedFd<'_>| {
        stat_fd(fd).map(|mut m| {
            if !resolve.mount_ids {
                m.mnt_id = None;
            }
            m
        })
    };
    let parent_meta = stat(dirfd)?;
    let bytes = path.to_bytes();
    if bytes.is_empty() || bytes.starts_with(b"/") {
        return Err(Errno::EXDEV);
    }
    let mut current: Option<OwnedFd> = None;
    let mut current_meta = parent_meta;
    for comp in bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        if comp == b".." {
            return Err(Errno::EXDEV);
        }
        let name = CString::new(comp).map_err(|_| Errno::EINVAL)?;
        let base = match &current {
            Some(fd) => fd.as_fd(),
            None => dirfd,
        };
        let fd = fcntl::openat(base, name.as_c_str(), flags, Mode::empty())?;
        let meta = stat(fd.as_fd())?;
        if current_meta.other_mount(&meta) {
            return Err(Errno::EXDEV);
        }
        current_meta = meta;
        current = Some(fd);
    }
    match current {
        Some(fd) => Ok(fd),
        None => Err(Errno::EINVAL),
    }
}

/// Opens `name` below `dirfd` as an `O_PATH` handle without following it: no read of the
/// object happens, so a FIFO or device is never opened.
pub(crate) fn open_path_nofollow(dirfd: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Errno> {
    fcntl::openat(
        dirfd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Reopens the exact inode behind an `O_PATH` fd with real access flags through
/// `/proc/self/fd`. The caller has checked the type on the `O_PATH` fd, so this can never
/// open a FIFO or device that was swapped in under the name.
pub(crate) fn reopen(opath: BorrowedFd<'_>, flags: OFlag) -> Result<OwnedFd, Errno> {
    let path = format!("/proc/self/fd/{}", opath.as_raw_fd());
    fcntl::open(
        path.as_str(),
        flags | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        Mode::empty(),
    )
}

/// Changes the mode of the inode behind an `O_PATH` fd (`fchmod` refuses `O_PATH` fds).
pub(crate) fn chmod_opath(opath: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    let path = format!("/proc/self/fd/{}", opath.as_raw_fd());
    nix::sys::stat::fchmodat(
        fcntl::AT_FDCWD,
        path.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
}

pub(crate) const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;
pub(crate) const FS_APPEND_FL: libc::c_int = 0x0000_0020;

/// `FS_IOC_GETFLAGS` (chattr flags). `ENOTTY`/`EOPNOTSUPP` where the fs has none.
pub(crate) fn get_inode_flags(fd: BorrowedFd<'_>) -> Result<libc::c_int, Errno> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the ioctl writes one int (the kernel's actual size for this request) into `flags`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    Errno::result(rc)?;
    Ok(flags)
}

/// `FS_IOC_SETFLAGS`; needs `CAP_LINUX_IMMUTABLE` to change the immutable/append bits.
pub(crate) fn set_inode_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: the ioctl reads one int from `flags`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    Errno::result(rc).map(drop)
}

/// Whether the effective capability set holds `cap` (read from `/proc/self/status`, which
/// every Linux and gVisor provides; unreadable means "no").
pub(crate) fn has_effective_cap(cap: u32) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|bits| bits & (1u64 << cap) != 0)
}

pub(crate) const CAP_LINUX_IMMUTABLE: u32 = 9;

/// Writes `name` in `dirfd` durably: a fresh temp file (0600), `fsync`, `rename` over the
/// name, `fsync` of the directory. A crash leaves either the old or the new content.
pub(crate) fn write_durable(dirfd: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> Result<(), Errno> {
    use std::io::Write;
    let tmp = format!(".{name}.tmp-{:016x}", rand::random::<u64>());
    let fd = fcntl::openat(
        dirfd,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let result = (|| {
        // The umask may have removed bits but never adds any; make the mode exact anyway.
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o600))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes).map_err(io_errno)?;
        file.sync_all().map_err(io_errno)?;
        drop(file);
        fcntl::renameat(dirfd, tmp.as_str(), dirfd, name)?;
        nix::unistd::fsync(dirfd)
    })();
    if result.is_err() {
        let _ = nix::unistd::unlinkat(dirfd, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    result
}

pub(crate) fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// A name for reports and logs: printable ASCII as is, every other byte as `\xNN`, so a
/// newline or invalid UTF-8 in a tenant's file name cannot forge log lines.
pub(crate) fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// One `getdents64` call on a directory fd into `buf`: the number of bytes filled, 0 at
/// the end of the directory. The fd's own file position is the stream position, so
/// reading resumes where the last call stopped and nothing is held in memory between
/// calls (unlike `readdir`, whose `DIR` buffers ahead).
pub(crate) fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        match Errno::result(rc) {
            Ok(n) => return Ok(n as usize),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The names in a buffer filled by [`getdents`] (`.` and `..` included).
pub(crate) fn dirent_names(buf: &[u8]) -> impl Iterator<Item = &CStr> {
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    const NAME_AT: usize = 19;
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(at..)?;
        let reclen = u16::from_ne_bytes(rest.get(16..18)?.try_into().ok()?) as usize;
        if reclen <= NAME_AT || reclen > rest.len() {
            return None;
        }
        at += reclen;
        CStr::from_bytes_until_nul(&rest[NAME_AT..reclen]).ok()
    })
}

/// `renameat2(RENAME_NOREPLACE)`, or where the kernel lacks it (`EINVAL`/`ENOSYS`) a
/// check for the target followed by `renameat` (the callers' targets are random names in
/// a directory no one else writes any more).
pub(crate) fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
) -> Result<(), Errno> {
    match fcntl::renameat2(
        from_dir,
        from,
        to_dir,
        to,
        fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Err(Errno::EINVAL | Errno::ENOSYS) => match stat_at(to_dir, to) {
            Ok(_) => Err(Errno::EEXIST),
            Err(Errno::ENOENT) => fcntl::renameat(from_dir, from, to_dir, to),
            Err(e) => Err(e),
        },
        other => other,
    }
}

/// Moves a directory fd's stream back to its first entry.
pub(crate) fn rewind_dir(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekSet).map(drop)
}

/// Duplicates a borrowed fd into an owned one.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    fd.try_clone_to_owned().map_err(io_errno)
}

pub(crate) fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

pub(crate) fn egid() -> u32 {
    nix::unistd::getegid().as_raw()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without statx (ENOSYS) the same facts come from fstatat, minus the mount id.
    #[test]
    fn fstatat_fallback_describes_what_statx_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 5000]).unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let fd = fcntl::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        for name in [c"f", c"l", c"."] {
            let a = stat_at(fd.as_fd(), name).unwrap();
            let b = fstatat_meta(fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW).unwrap();
            assert_eq!(
                (a.kind, a.perm, a.uid, a.gid, a.dev, a.ino, a.size, a.blocks, a.nlink),
                (b.kind, b.perm, b.uid, b.gid, b.dev, b.ino, b.size, b.blocks, b.nlink),
                "{name:?}"
            );
            assert_eq!(b.mnt_id, None);
        }
        let a = stat_fd(fd.as_fd()).unwrap();
        let b = fstatat_meta(fd.as_fd(), c"", libc::AT_EMPTY_PATH).unwrap();
        assert_eq!((a.dev, a.ino, a.kind), (b.dev, b.ino, b.kind));
    }
}
