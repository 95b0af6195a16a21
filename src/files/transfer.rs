//! Writes and reads: the blocking halves, run on the worker one frame at a time.
//!
//! A write goes to `.<name>.ssv-<random>.tmp` in the target's directory (created
//! `O_EXCL|O_NOFOLLOW`, mode 0600 until the end), hashed as it is written; `FileEnd`
//! checks the size and the expected SHA-256, sets the mode, fsyncs and renames it over
//! the target (`RENAME_NOREPLACE` unless replace). Anything else removes it.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{self, Mode};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};

use super::ops::stat_entry;
use super::resolve::{errno_error, Roots};
use super::FileError;
use crate::proto::{self, ErrorCode};
use crate::workspace::fsutil::{self, Kind};

/// A write in progress (or parked for resume).
pub(crate) struct WriteState {
    dir: OwnedFd,
    tmp: CString,
    leaf: CString,
    shown: String,
    file: std::fs::File,
    pub accepted: u64,
    hasher: Sha256,
    req: proto::WriteFile,
}

pub(crate) fn begin_write(
    roots: &Roots,
    req: &proto::WriteFile,
    max_size: u64,
) -> Result<WriteState, FileError> {
    let t = roots.target(&req.path)?;
    if let Some(size) = req.size {
        if size > max_size {
            return Err(too_big(&t.shown, max_size));
        }
    }
    if !req.expect_sha256.is_empty()
        && (req.expect_sha256.len() != 64 || hex::decode(&req.expect_sha256).is_err())
    {
        return Err(FileError::new(
            ErrorCode::InvalidArgument,
            format!("{}: expect_sha256 must be 64 hex digits", t.shown),
        ));
    }
    let Some(leaf) = t.leaf().cloned() else {
        return Err(FileError::new(
            ErrorCode::FailedPrecondition,
            format!("{}: is a directory (the root); name a file", t.shown),
        ));
    };
    let dir = if req.create_parents {
        t.make_dirs(t.parts.len() - 1, 0o755, roots.resolve)?
    } else {
        t.open_parent(roots.resolve)?
    };
    match stat::fstatat(dir.as_fd(), leaf.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            if !req.replace {
                return Err(t.err(Errno::EEXIST, "write"));
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(t.err(Errno::EISDIR, "write"));
            }
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(t.err(e, "stat")),
    }
    let tmp = temp_name(leaf.as_bytes());
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        tmp.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| t.err(e, "create temporary file"))?;
    Ok(WriteState {
        dir,
        tmp,
        leaf,
        shown: t.shown.clone(),
        file: std::fs::File::from(fd),
        accepted: 0,
        hasher: Sha256::new(),
        req: req.clone(),
    })
}

pub(crate) fn temp_name(leaf: &[u8]) -> CString {
    let mut n = b".".to_vec();
    // Keep the name within NAME_MAX (255) with the suffix.
    n.extend_from_slice(&leaf[..leaf.len().min(200)]);
    n.extend_from_slice(format!(".ssv-{:016x}.tmp", rand::random::<u64>()).as_bytes());
    CString::new(n).expect("no NUL")
}

fn too_big(shown: &str, max: u64) -> FileError {
    FileError::new(
        ErrorCode::ResourceExhausted,
        format!("{shown}: the file would exceed the size limit of {max} bytes (--max-file-size)"),
    )
}

impl WriteState {
    /// Applies one data frame. Bytes below `accepted` are a resend (ignored); a frame
    /// starting past it is a gap.
    pub(crate) fn data(&mut self, offset: u64, data: &[u8], max: u64) -> Result<u64, FileError> {
        use std::io::Write;
        if offset > self.accepted {
            return Err(FileError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{}: data at offset {offset} leaves a gap: {} bytes accepted so far; resend from there",
                    self.shown, self.accepted
                ),
            ));
        }
        let skip = (self.accepted - offset) as usize;
        if skip >= data.len() {
            return Ok(0);
        }
        let fresh = &data[skip..];
        if self.accepted + fresh.len() as u64 > max {
            return Err(too_big(&self.shown, max));
        }
        self.file
            .write_all(fresh)
            .map_err(|e| errno_error(&self.shown, fsutil::io_errno(e), "write"))?;
        self.hasher.update(fresh);
        self.accepted += fresh.len() as u64;
        Ok(fresh.len() as u64)
    }

    /// `FileEnd`: checks, fsync, mode, rename. On error the caller discards the state.
    pub(crate) fn finish(&mut self, size: u64) -> Result<proto::FileResult, FileError> {
        if size != self.accepted {
            return Err(FileError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "{}: FileEnd.size is {size} but {} bytes were sent",
                    self.shown, self.accepted
                ),
            ));
        }
        if let Some(expected) = self.req.size {
            if expected != size {
                return Err(FileError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "{}: WriteFile.size was {expected} but {size} bytes were sent",
                        self.shown
                    ),
                ));
            }
        }
        let digest = hex::encode(self.hasher.clone().finalize());
        if !self.req.expect_sha256.is_empty()
            && !self.req.expect_sha256.eq_ignore_ascii_case(&digest)
        {
            return Err(FileError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{}: content SHA-256 is {digest}, expected {}; the old file is untouched",
                    self.shown, self.req.expect_sha256
                ),
            ));
        }
        let mode = if self.req.mode == 0 {
            0o644
        } else {
            self.req.mode & 0o7777
        };
        stat::fchmod(self.file.as_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| errno_error(&self.shown, e, "chmod"))?;
        self.file
            .sync_all()
            .map_err(|e| errno_error(&self.shown, fsutil::io_errno(e), "fsync"))?;
        let r = if self.req.replace {
            nix::fcntl::renameat(
                self.dir.as_fd(),
                self.tmp.as_c_str(),
                self.dir.as_fd(),
                self.leaf.as_c_str(),
            )
        } else {
            fsutil::rename_noreplace(self.dir.as_fd(), &self.tmp, self.dir.as_fd(), &self.leaf)
        };
        r.map_err(|e| errno_error(&self.shown, e, "rename into place"))?;
        let _ = nix::unistd::fsync(self.dir.as_fd());
        let info = stat_entry(self.dir.as_fd(), Some(&self.leaf))
            .map_err(|e| errno_error(&self.shown, e, "stat"))?;
        Ok(proto::FileResult {
            info: Some(info),
            sha256: digest,
            bytes: size,
            ..Default::default()
        })
    }

    /// Removes the temporary file (a failed, cancelled or expired write).
    pub(crate) fn discard(self) {
        let _ = nix::unistd::unlinkat(
            self.dir.as_fd(),
            self.tmp.as_c_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }

    pub(crate) fn request(&self) -> &proto::WriteFile {
        &self.req
    }
}

/// A read in progress: the file opened (a regular file, checked on an `O_PATH` handle
/// before any open for reading, so a FIFO or device is never opened).
pub(crate) struct ReadState {
    file: std::fs::File,
    pub pos: u64,
    pub end: u64,
    pub size: u64,
    hasher: Sha256,
    shown: String,
}

pub(crate) fn begin_read(roots: &Roots, req: &proto::ReadFile) -> Result<ReadState, FileError> {
    let t = roots.target(&req.path)?;
    let Some(leaf) = t.leaf() else {
        return Err(t.err(Errno::EISDIR, "read"));
    };
    let parent = t.open_parent(roots.resolve)?;
    let opath = fsutil::open_path_nofollow(parent.as_fd(), leaf).map_err(|e| t.err(e, "open"))?;
    let meta = fsutil::stat_fd(opath.as_fd()).map_err(|e| t.err(e, "stat"))?;
    if meta.kind != Kind::File {
        let code = if meta.kind == Kind::Dir {
            ErrorCode::FailedPrecondition
        } else {
            ErrorCode::InvalidArgument
        };
        return Err(FileError::new(
            code,
            format!(
                "{}: is a {}; only regular files can be read",
                t.shown,
                meta.kind.describe()
            ),
        ));
    }
    let fd =
        fsutil::reopen(opath.as_fd(), OFlag::O_RDONLY).map_err(|e| t.err(e, "open for reading"))?;
    let size = meta.size;
    if req.offset > size {
        return Err(FileError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{}: offset {} is past the end ({size} bytes)",
                t.shown, req.offset
            ),
        ));
    }
    let end = if req.length == 0 {
        size
    } else {
        size.min(req.offset.saturating_add(req.length))
    };
    let mut st = ReadState {
        file: std::fs::File::from(fd),
        pos: 0,
        end,
        size,
        hasher: Sha256::new(),
        shown: t.shown.clone(),
    };
    // The digest is over the whole file: hash what comes before the offset first.
    let mut buf = vec![0u8; 1 << 20];
    while st.pos < req.offset {
        let want = ((req.offset - st.pos) as usize).min(buf.len());
        let n = st.read_into(&mut buf[..want])?;
        if n == 0 {
            break;
        }
    }
    Ok(st)
}

impl ReadState {
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, FileError> {
        use std::os::unix::fs::FileExt;
        let n = loop {
            match self.file.read_at(buf, self.pos) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        }
        .map_err(|e| errno_error(&self.shown, fsutil::io_errno(e), "read"))?;
        self.hasher.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    /// The next chunk to send (empty at `end`).
    pub(crate) fn next(&mut self, max: usize) -> Result<Vec<u8>, FileError> {
        let want = ((self.end - self.pos.min(self.end)) as usize).min(max);
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = self.read_into(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Hashes the rest of the file (past `length`) and returns the digest.
    pub(crate) fn digest(mut self) -> Result<String, FileError> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if self.read_into(&mut buf)? == 0 {
                break;
            }
        }
        Ok(hex::encode(self.hasher.finalize()))
    }
}
