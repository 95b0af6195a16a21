//! The staging tree a seed is built in, and the tree digest.
//!
//! Staging lives at `.supervisor/staging-<random>/tree`: on the volume (so the final
//! `rename` into `workspace/` is atomic and copies nothing), inside the root-only
//! `.supervisor/` (so no tenant process can see or race a half-built tree), and its
//! presence at boot marks an interrupted seed, which is discarded and redone.
//!
//! Every entry passes through one gate (`Stager`): paths are normalized (no absolute
//! paths, no `..`), an entry may not be created below anything but a directory the seed
//! itself created (no writes through links), parents are opened with
//! `RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH`, leaves with `O_EXCL|O_NOFOLLOW`.
//!
//! Copy strategy (the seed must hash every byte, and must be as fast as `cp -a`): where
//! the file system can reflink (`FICLONE`: btrfs, XFS) the copy is metadata only and the
//! hash reads the source once from the page cache. Elsewhere (ext4, overlayfs, tmpfs) we
//! read each buffer once, hash it and write it. `copy_file_range` is not used: on those
//! file systems it is a page-cache-to-page-cache copy, so it plus a separate read for the
//! hash moves every byte twice, which is what read+hash+write costs already, and where it
//! does better it does so by reflinking, which `FICLONE` already covers. The directory
//! source copies files on several threads to stay within `cp -a` time despite hashing.

use super::fsutil::{self, Resolve};
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Mode of `workspace/` itself: the sandbox user has everything, its group may read; other
/// uids in the pod get nothing (they have no business in the tenant's files).
pub(crate) const WORKSPACE_MODE: u32 = 0o750;
const IMPLICIT_DIR_MODE: u32 = 0o755;
const COPY_BUF: usize = 1 << 20;

/// A problem with one entry of the seed, named by its (escaped) path.
#[derive(Debug)]
pub(crate) enum StageError {
    Entry {
        entry: String,
        problem: String,
    },
    Io {
        entry: String,
        op: &'static str,
        errno: Errno,
    },
}

impl StageError {
    fn entry(path: &[u8], problem: impl Into<String>) -> Self {
        StageError::Entry {
            entry: fsutil::escape_bytes(path),
            problem: problem.into(),
        }
    }
    fn io(path: &[u8], op: &'static str, errno: Errno) -> Self {
        StageError::Io {
            entry: fsutil::escape_bytes(path),
            op,
            errno,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Dir,
    File,
    Symlink,
}

impl Seen {
    fn describe(self) -> &'static str {
        match self {
            Seen::Dir => "directory",
            Seen::File => "file",
            Seen::Symlink => "symlink",
        }
    }
}

/// Totals and digest of a finished staging tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StageSummary {
    pub digest: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub reflinked: bool,
}

/// Normalizes an entry path: strips `.` components and repeated or trailing slashes;
/// rejects absolute paths, `..` components and NUL bytes. An empty result is the root.
pub(crate) fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.first() == Some(&b'/') {
        return Err("has an absolute path; seed entries must be relative".to_owned());
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte".to_owned());
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => {
                return Err(
                    "contains a `..` component; seed entries must stay inside the workspace"
                        .to_owned(),
                )
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn cstring(path: &[u8]) -> Result<CString, StageError> {
    CString::new(path).map_err(|_| StageError::entry(path, "contains a NUL byte"))
}

fn mtime_spec(mtime: Option<(i64, i64)>) -> Option<TimeSpec> {
    mtime.map(|(s, ns)| TimeSpec::new(s, ns))
}

/// Copies `src` into the new file `dst`, hashing every byte once. Returns the content
/// hash and the size. `reflink` starts true and is cleared on the first file system that
/// cannot clone, so later files go straight to read+write.
pub(crate) fn copy_content(
    src: &mut std::fs::File,
    dst: &OwnedFd,
    reflink: &AtomicBool,
    cancel: &AtomicBool,
    buf: &mut [u8],
) -> Result<([u8; 32], u64), Errno> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    // Checked per chunk: a stopped seed must not finish copying a huge file first.
    let stopped = || {
        if cancel.load(Ordering::Relaxed) {
            Err(Errno::ECANCELED)
        } else {
            Ok(())
        }
    };
    if reflink.load(Ordering::Relaxed) {
        // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
        if rc == 0 {
            loop {
                stopped()?;
                let n = read_retry(src, buf)?;
                if n == 0 {
                    return Ok((hasher.finalize().into(), size));
                }
                hasher.update(&buf[..n]);
                size += n as u64;
            }
        }
        reflink.store(false, Ordering::Relaxed);
    }
    let mut out = std::fs::File::from(fsutil::dup(dst.as_fd())?);
    loop {
        stopped()?;
        let n = read_retry(src, buf)?;
        if n == 0 {
            return Ok((hasher.finalize().into(), size));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(fsutil::io_errno)?;
        size += n as u64;
    }
}

fn read_retry<R: Read + ?Sized>(src: &mut R, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match src.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fsutil::io_errno(e)),
        }
    }
}

/// Sets owner, mode (no setuid/setgid: a seed never needs them and an archive must not be
/// able to plant them) and mtime on a freshly written file.
pub(crate) fn finish_file(
    fd: &OwnedFd,
    mode: u32,
    mtime: Option<(i64, i64)>,
    chown: Option<(u32, u32)>,
) -> Result<(), Errno> {
    if let Some((uid, gid)) = chown {
        nix::unistd::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o777))?;
    if let Some(t) = mtime_spec(mtime) {
        stat::futimens(fd, &TimeSpec::UTIME_OMIT, &t)?;
    }
    Ok(())
}

/// A directory to finish: path, mode, mtime.
type DirMeta = (Vec<u8>, u32, Option<(i64, i64)>);

struct DigestEntry {
    path: Vec<u8>,
    kind: u8,
    mode: u32,
    data: Vec<u8>,
}

/// The gate every seeded entry passes through.
pub(crate) struct Stager {
    tree: OwnedFd,
    resolve: Resolve,
    chown: Option<(u32, u32)>,
    seen: HashMap<Vec<u8>, Seen>,
    file_hashes: HashMap<Vec<u8>, (u32, [u8; 32])>,
    dir_meta: Vec<DirMeta>,
    dir_index: HashMap<Vec<u8>, usize>,
    digest: Vec<DigestEntry>,
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    pub(crate) reflink: AtomicBool,
    buf: Vec<u8>,
    files: u64,
    symlinks: u64,
    bytes: u64,
}

impl Stager {
    pub(crate) fn new(tree: OwnedFd, chown: Option<(u32, u32)>) -> Stager {
        Stager {
            tree,
            resolve: Resolve::detect(),
            chown,
            seen: HashMap::new(),
            file_hashes: HashMap::new(),
            dir_meta: Vec::new(),
            dir_index: HashMap::new(),
            digest: Vec::new(),
            parent_cache: None,
            reflink: AtomicBool::new(true),
            buf: vec![0u8; COPY_BUF],
            files: 0,
            symlinks: 0,
            bytes: 0,
        }
    }

    pub(crate) fn tree(&self) -> BorrowedFd<'_> {
        self.tree.as_fd()
    }

    pub(crate) fn chown(&self) -> Option<(u32, u32)> {
        self.chown
    }

    /// Checks that `rel` is new and that every ancestor is a directory of this seed,
    /// creating missing ancestors; returns an fd of the parent directory and the leaf name.
    fn prepare(&mut self, rel: &[u8]) -> Result<(BorrowedFd<'_>, CString), StageError> {
        if rel.is_empty() {
            return Err(StageError::entry(rel, "names the workspace root itself"));
        }
        if let Some(kind) = self.seen.get(rel) {
            return Err(StageError::entry(
                rel,
                format!(
                    "appears twice (first as a {}); a later entry may not replace an earlier one",
                    kind.describe()
                ),
            ));
        }
        let (parent, leaf) = split_parent(rel);
        let leaf = cstring(leaf)?;
        // Every ancestor must be a directory created by this seed; create missing ones.
        let mut end = 0;
        while end < parent.len() {
            end = parent[end..]
                .iter()
                .position(|b| *b == b'/')
                .map_or(parent.len(), |p| end + p);
            let prefix = &parent[..end];
            match self.seen.get(prefix) {
                Some(Seen::Dir) => {}
                Some(other) => {
                    return Err(StageError::entry(
                        rel,
                        format!(
                            "would be written through the {} entry `{}`; writes through links are refused",
                            other.describe(),
                            fsutil::escape_bytes(prefix)
                        ),
                    ))
                }
                None => self.make_dir(prefix, IMPLICIT_DIR_MODE, None)?,
            }
            end += 1;
        }
        let cached = matches!(&self.parent_cache, Some((p, _)) if p.as_slice() == parent);
        if !cached {
            let fd = if parent.is_empty() {
                fsutil::dup(self.tree.as_fd()).map_err(|e| StageError::io(rel, "dup", e))?
            } else {
                let cpath = cstring(parent)?;
                fsutil::open_dir_beneath(self.tree.as_fd(), &cpath, self.resolve)
                    .map_err(|e| StageError::io(parent, "open parent directory", e))?
            };
            self.parent_cache = Some((parent.to_vec(), fd));
        }
        let fd = self
            .parent_cache
            .as_ref()
            .map(|(_, fd)| fd.as_fd())
            .expect("just cached");
        Ok((fd, leaf))
    }

    fn make_dir(
        &mut self,
        rel: &[u8],
        mode: u32,
        mtime: Option<(i64, i64)>,
    ) -> Result<(), StageError> {
        let (parent_fd, leaf) = self.prepare(rel)?;
        // 0700 while we fill it; the real mode is applied in `finish`, deepest first.
        stat::mkdirat(parent_fd, leaf.as_c_str(), Mode::from_bits_truncate(0o700))
            .map_err(|e| StageError::io(rel, "mkdir", e))?;
        self.seen.insert(rel.to_vec(), Seen::Dir);
        self.dir_index.insert(rel.to_vec(), self.dir_meta.len());
        self.dir_meta.push((rel.to_vec(), mode & 0o1777, mtime));
        Ok(())
    }

    /// A directory entry; declaring an existing directory again only updates its mode.
    pub(crate) fn add_dir(
        &mut self,
        rel: &[u8],
        mode: u32,
        mtime: Option<(i64, i64)>,
    ) -> Result<(), StageError> {
        if rel.is_empty() {
            return Ok(());
        }
        if let Some(&i) = self.dir_index.get(rel) {
            self.dir_meta[i].1 = mode & 0o1777;
            self.dir_meta[i].2 = mtime;
            return Ok(());
        }
        self.make_dir(rel, mode, mtime)
    }

    /// A regular file whose content comes from `content` (an archive stream).
    pub(crate) fn add_file(
        &mut self,
        rel: &[u8],
        mode: u32,
        mtime: Option<(i64, i64)>,
        content: &mut dyn Read,
    ) -> Result<(), StageError> {
        let chown = self.chown;
        let (parent_fd, leaf) = self.prepare(rel)?;
        let fd = fcntl::openat(
            parent_fd,
            leaf.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| StageError::io(rel, "create", e))?;
        let mut buf = std::mem::take(&mut self.buf);
        let copied = (|| {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut out = std::fs::File::from(fsutil::dup(fd.as_fd())?);
            loop {
                let n = read_retry(content, &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(fsutil::io_errno)?;
                size += n as u64;
            }
            finish_file(&fd, mode, mtime, chown)?;
            Ok::<_, Errno>((hasher.finalize().into(), size))
        })();
        self.buf = buf;
        let (hash, size) = copied.map_err(|e| StageError::io(rel, "write", e))?;
        self.record_file(rel, mode, hash, size);
        Ok(())
    }

    /// Registers a file written elsewhere (the directory source's copy threads).
    pub(crate) fn record_file(&mut self, rel: &[u8], mode: u32, hash: [u8; 32], size: u64) {
        self.seen.insert(rel.to_vec(), Seen::File);
        self.file_hashes.insert(rel.to_vec(), (mode & 0o777, hash));
        self.digest.push(DigestEntry {
            path: rel.to_vec(),
            kind: b'f',
            mode: mode & 0o777,
            data: hash.to_vec(),
        });
        self.files += 1;
        self.bytes += size;
    }

    /// Reserves a file path for a copy thread: checks and creates its ancestors.
    pub(crate) fn reserve_file(&mut self, rel: &[u8]) -> Result<(), StageError> {
        self.prepare(rel).map(drop)
    }

    pub(crate) fn add_symlink(
        &mut self,
        rel: &[u8],
        target: &[u8],
        mtime: Option<(i64, i64)>,
    ) -> Result<(), StageError> {
        if target.is_empty() || target.contains(&0) {
            return Err(StageError::entry(
                rel,
                "is a symlink with an empty or NUL-containing target",
            ));
        }
        let chown = self.chown;
        let (parent_fd, leaf) = self.prepare(rel)?;
        let ctarget = cstring(target)?;
        nix::unistd::symlinkat(ctarget.as_c_str(), parent_fd, leaf.as_c_str())
            .map_err(|e| StageError::io(rel, "symlink", e))?;
        if let Some((uid, gid)) = chown {
            nix::unistd::fchownat(
                parent_fd,
                leaf.as_c_str(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| StageError::io(rel, "chown symlink", e))?;
        }
        if let Some(t) = mtime_spec(mtime) {
            stat::utimensat(
                parent_fd,
                leaf.as_c_str(),
                &TimeSpec::UTIME_OMIT,
                &t,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| StageError::io(rel, "set symlink time", e))?;
        }
        self.seen.insert(rel.to_vec(), Seen::Symlink);
        self.digest.push(DigestEntry {
            path: rel.to_vec(),
            kind: b'l',
            mode: 0o777,
            data: target.to_vec(),
        });
        self.symlinks += 1;
        Ok(())
    }

    /// A hardlink to `target`, which must be a regular file this seed created before.
    pub(crate) fn add_hardlink(&mut self, rel: &[u8], target: &[u8]) -> Result<(), StageError> {
        let (mode, hash) = match (self.seen.get(target), self.file_hashes.get(target)) {
            (Some(Seen::File), Some(&(mode, hash))) => (mode, hash),
            _ => {
                return Err(StageError::entry(
                    rel,
                    format!(
                        "is a hardlink to `{}`, which is not a regular file earlier in the seed; hardlinks may only point inside the seed",
                        fsutil::escape_bytes(target)
                    ),
                ))
            }
        };
        let ctarget = cstring(target)?;
        let tree = fsutil::dup(self.tree.as_fd()).map_err(|e| StageError::io(rel, "dup", e))?;
        let (parent_fd, leaf) = self.prepare(rel)?;
        // Both ends were created by this seed below directories it created: no link in the way.
        nix::unistd::linkat(
            tree.as_fd(),
            ctarget.as_c_str(),
            parent_fd,
            leaf.as_c_str(),
            AtFlags::empty(),
        )
        .map_err(|e| StageError::io(rel, "hardlink", e))?;
        self.seen.insert(rel.to_vec(), Seen::File);
        self.file_hashes.insert(rel.to_vec(), (mode, hash));
        self.digest.push(DigestEntry {
            path: rel.to_vec(),
            kind: b'f',
            mode,
            data: hash.to_vec(),
        });
        self.files += 1;
        Ok(())
    }

    /// Applies directory owners, modes and times (deepest first, so a read-only directory
    /// is closed only after its children are done), sets the tree root to the workspace
    /// owner and mode, flushes the file system and computes the digest.
    pub(crate) fn finish(mut self) -> Result<StageSummary, StageError> {
        self.parent_cache = None;
        let tree = self.tree.as_fd();
        for (rel, mode, mtime) in self.dir_meta.iter().rev() {
            let c = cstring(rel)?;
            if let Some((uid, gid)) = self.chown {
                nix::unistd::fchownat(
                    tree,
                    c.as_c_str(),
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| StageError::io(rel, "chown directory", e))?;
            }
            stat::fchmodat(
                tree,
                c.as_c_str(),
                Mode::from_bits_truncate(*mode),
                stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| StageError::io(rel, "chmod directory", e))?;
            if let Some(t) = mtime_spec(*mtime) {
                stat::utimensat(
                    tree,
                    c.as_c_str(),
                    &TimeSpec::UTIME_OMIT,
                    &t,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| StageError::io(rel, "set directory time", e))?;
            }
            self.digest.push(DigestEntry {
                path: rel.clone(),
                kind: b'd',
                mode: *mode,
                data: Vec::new(),
            });
        }
        if let Some((uid, gid)) = self.chown {
            nix::unistd::fchown(tree, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(|e| StageError::io(b".", "chown workspace", e))?;
        }
        stat::fchmod(tree, Mode::from_bits_truncate(WORKSPACE_MODE))
            .map_err(|e| StageError::io(b".", "chmod workspace", e))?;
        // The record written after this must never outlive the data it vouches for.
        nix::unistd::syncfs(tree).map_err(|e| StageError::io(b".", "syncfs", e))?;
        let digest = tree_digest(&mut self.digest);
        Ok(StageSummary {
            digest,
            files: self.files,
            dirs: self.dir_meta.len() as u64,
            symlinks: self.symlinks,
            bytes: self.bytes,
            reflinked: self.reflink.load(Ordering::Relaxed) && self.bytes > 0,
        })
    }
}

/// `sha256:<hex>` over the entries sorted by path bytes, each as
/// `kind, len(path), path, mode, len(data), data` (lengths as u64 LE, mode as u32 LE).
fn tree_digest(entries: &mut [DigestEntry]) -> String {
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    let mut h = Sha256::new();
    for e in entries.iter() {
        h.update([e.kind]);
        h.update((e.path.len() as u64).to_le_bytes());
        h.update(&e.path);
        h.update(e.mode.to_le_bytes());
        h.update((e.data.len() as u64).to_le_bytes());
        h.update(&e.data);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The digest of an empty seed.
#[cfg(test)]
pub(crate) fn empty_digest() -> String {
    tree_digest(&mut [])
}

/// Creates a directory fd-relative and opens it (used for the staging dirs).
pub(crate) fn mkdir_open(parent: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<OwnedFd, Errno> {
    stat::mkdirat(parent, name, Mode::from_bits_truncate(mode))?;
    fsutil::open_dir_beneath(parent, name, Resolve::detect())
}
