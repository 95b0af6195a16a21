//! Directories as tar streams, both ways.
//!
//! Upload (`ExtractArchive`): the archive is extracted by the seed's `Stager` (its
//! hygiene: no absolute or `..` paths, no devices or FIFOs, no write through a link,
//! hardlinks only within the archive) into a hidden temporary directory
//! `.<name>.ssv-<random>.tmp` *inside the target directory*, as the sandbox user (the
//! worker's fs identity; the Stager's root-owned staging in `.supervisor/` does not fit:
//! the tenant's files must be the tenant's). Each top-level entry is then renamed into
//! the target with `RENAME_NOREPLACE` (an existing name is ALREADY_EXISTS, nothing is
//! overwritten). Any failure removes the temporary tree (with the wipe's rules).
//!
//! Download (`ArchiveDir`): a walk by directory fds, never following a link: symlinks are
//! archived as links, directories on another device (mounts) are skipped, FIFOs,
//! sockets and devices are skipped, files are opened through `O_PATH` + type check.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat;
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::resolve::{errno_error, Roots};
use super::FileError;
use crate::proto::{self, ErrorCode};
use crate::workspace::{archive as seed_archive, fsutil, stage::Stager, wipe};

/// Chunks of an upload, from the stream task to the worker.
pub(crate) enum Chunk {
    Data(bytes::Bytes),
    End,
}

/// A `Read` over the chunks the stream task forwards; a stream that ended without
/// `FileEnd` is an error, so nothing half-read is put in place.
pub(crate) struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: bytes::Bytes,
    done: bool,
}

impl ChunkReader {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> Self {
        ChunkReader {
            rx,
            cur: bytes::Bytes::new(),
            done: false,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(d)) => self.cur = d,
                Some(Chunk::End) => self.done = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upload stream ended before FileEnd",
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

fn remove_tree(parent: BorrowedFd<'_>, name: &CStr, label: &str, roots: &Roots) {
    if let Ok(fd) = fsutil::open_dir_beneath(parent, name, roots.resolve) {
        let mut opts = wipe::WipeOptions::detect();
        opts.resolve = roots.resolve;
        opts.can_clear_immutable = false;
        let _ = wipe::wipe_contents(fd, label, opts);
    }
    let _ = nix::unistd::unlinkat(parent, name, nix::unistd::UnlinkatFlags::RemoveDir);
}

pub(crate) fn extract(
    roots: &Roots,
    req: &proto::ExtractArchive,
    reader: ChunkReader,
) -> Result<proto::FileResult, FileError> {
    let t = roots.target(&req.path)?;
    let dir = if req.create_parents {
        t.make_dirs(t.parts.len(), 0o755, roots.resolve)?
    } else {
        t.open_dir(roots.resolve)?
    };
    let base = t
        .parts
        .last()
        .map(|c| c.as_bytes().to_vec())
        .unwrap_or_else(|| b"root".to_vec());
    let tmp = super::transfer::temp_name(&base);
    stat::mkdirat(
        dir.as_fd(),
        tmp.as_c_str(),
        stat::Mode::from_bits_truncate(0o700),
    )
    .map_err(|e| t.err(e, "create temporary directory"))?;
    let label = format!("{}/{}", t.shown, tmp.to_string_lossy());
    let result = (|| {
        let tree = fsutil::open_dir_beneath(dir.as_fd(), &tmp, roots.resolve)
            .map_err(|e| t.err(e, "open temporary directory"))?;
        let mut stager = Stager::new(tree, None);
        let digest =
            seed_archive::extract(reader, &mut stager).map_err(|e| archive_error(&t.shown, e))?;
        let summary = stager
            .finish()
            .map_err(|e| archive_error(&t.shown, seed_archive::ArchiveError::Stage(e)))?;
        let tree = fsutil::open_dir_beneath(dir.as_fd(), &tmp, roots.resolve)
            .map_err(|e| t.err(e, "open temporary directory"))?;
        // Move the top-level entries into place, refusing to overwrite.
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = fsutil::getdents(tree.as_fd(), &mut buf).map_err(|e| t.err(e, "list"))?;
            if n == 0 {
                break;
            }
            for name in fsutil::dirent_names(&buf[..n]) {
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    names.push(name.to_owned());
                }
            }
        }
        for name in &names {
            if let Err(e) = fsutil::rename_noreplace(tree.as_fd(), name, dir.as_fd(), name) {
                return Err(errno_error(
                    &format!("{}/{}", t.shown, name.to_string_lossy()),
                    e,
                    "move extracted entry into place",
                ));
            }
        }
        let _ = nix::unistd::fsync(dir.as_fd());
        Ok(proto::FileResult {
            sha256: digest.trim_start_matches("sha256:").to_owned(),
            bytes: summary.bytes,
            entry_count: summary.files + summary.dirs + summary.symlinks,
            ..Default::default()
        })
    })();
    remove_tree(dir.as_fd(), &tmp, &label, roots);
    result
}

fn archive_error(shown: &str, e: seed_archive::ArchiveError) -> FileError {
    use crate::workspace::stage::StageError;
    match e {
        seed_archive::ArchiveError::Format(m) => FileError::new(
            ErrorCode::InvalidArgument,
            format!("{shown}: archive refused: {m}"),
        ),
        seed_archive::ArchiveError::Stage(StageError::Entry { entry, problem }) => FileError::new(
            ErrorCode::InvalidArgument,
            format!("{shown}: archive entry {entry} refused: {problem}"),
        ),
        seed_archive::ArchiveError::Stage(StageError::Io { entry, op, errno }) => {
            errno_error(&format!("{shown}: archive entry {entry}"), errno, op)
        }
    }
}

/// Sends tar bytes to the stream task in frames, hashing them.
pub(crate) struct FrameWriter {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
    pub hasher: Sha256,
    pub bytes: u64,
}

const FRAME: usize = 256 * 1024;

impl FrameWriter {
    pub(crate) fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Self {
        FrameWriter {
            tx,
            buf: Vec::with_capacity(FRAME),
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
    fn push(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(FRAME));
        self.hasher.update(&chunk);
        self.bytes += chunk.len() as u64;
        self.tx.blocking_send(chunk.into()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the download stream ended")
        })
    }
}

impl Write for FrameWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME {
            self.push()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.push()
    }
}

struct Walk<'a, W: Write> {
    tar: tar::Builder<W>,
    roots: &'a Roots,
    entries: u64,
    content: u64,
}

fn io_err(path: &str, e: std::io::Error) -> FileError {
    errno_error(path, fsutil::io_errno(e), "archive")
}

impl<W: Write> Walk<'_, W> {
    fn header(st: &stat::FileStat, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(st.st_uid as u64);
        h.set_gid(st.st_gid as u64);
        h.set_mtime(st.st_mtime.max(0) as u64);
        h.set_size(size);
        h
    }

    fn dir(&mut self, fd: &OwnedFd, rel: &str, dev: u64, depth: usize) -> Result<(), FileError> {
        if depth > wipe::MAX_DEPTH {
            return Err(FileError::new(
                ErrorCode::FailedPrecondition,
                format!("{rel}: nested too deep to archive"),
            ));
        }
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n =
                fsutil::getdents(fd.as_fd(), &mut buf).map_err(|e| errno_error(rel, e, "list"))?;
            if n == 0 {
                break;
            }
            for name in fsutil::dirent_names(&buf[..n]) {
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        for name in names {
            let path = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            self.entry(fd, &name, &path, dev, depth)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        name: &CString,
        path: &str,
        dev: u64,
        depth: usize,
    ) -> Result<(), FileError> {
        let st = match stat::fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(errno_error(path, e, "stat")),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if st.st_dev != dev {
                    tracing::info!(
                        event = "file.archive_skipped_mount",
                        path,
                        "mount point skipped in a directory download"
                    );
                    return Ok(());
                }
                let sub = fsutil::open_dir_beneath(dir.as_fd(), name, self.roots.resolve)
                    .map_err(|e| errno_error(path, e, "open directory"))?;
                let mut h = Self::header(&st, tar::EntryType::Directory, 0);
                self.tar
                    .append_data(&mut h, format!("{path}/"), std::io::empty())
                    .map_err(|e| io_err(path, e))?;
                self.entries += 1;
                self.dir(&sub, path, dev, depth + 1)
            }
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir.as_fd(), name.as_c_str())
                    .map_err(|e| errno_error(path, e, "readlink"))?;
                let mut h = Self::header(&st, tar::EntryType::Symlink, 0);
                self.tar
                    .append_link(&mut h, path, target)
                    .map_err(|e| io_err(path, e))?;
                self.entries += 1;
                Ok(())
            }
            libc::S_IFREG => {
                let opath = fsutil::open_path_nofollow(dir.as_fd(), name)
                    .map_err(|e| errno_error(path, e, "open"))?;
                let meta =
                    fsutil::stat_fd(opath.as_fd()).map_err(|e| errno_error(path, e, "stat"))?;
                if meta.kind != fsutil::Kind::File {
                    return Ok(()); // swapped meanwhile
                }
                let fd = fsutil::reopen(opath.as_fd(), OFlag::O_RDONLY)
                    .map_err(|e| errno_error(path, e, "open for reading"))?;
                let file = std::fs::File::from(fd);
                let mut h = Self::header(&st, tar::EntryType::Regular, meta.size);
                // Exactly `size` bytes: a file growing meanwhile is cut, one shrinking fails.
                self.tar
                    .append_data(&mut h, path, file.take(meta.size))
                    .map_err(|e| io_err(path, e))?;
                self.entries += 1;
                self.content += meta.size;
                Ok(())
            }
            _ => Ok(()), // FIFOs, sockets, devices are not archived
        }
    }
}

/// Writes `path` (a directory) as a tar stream into `out`.
pub(crate) fn archive(
    roots: &Roots,
    req: &proto::ArchiveDir,
    out: FrameWriter,
) -> Result<proto::FileResult, FileError> {
    let compression =
        proto::Compression::try_from(req.compression).unwrap_or(proto::Compression::Unspecified);
    if compression == proto::Compression::Zstd {
        // A zstd encoder would cost the static binary ~1 MiB (only the decoder is linked
        // for the seed); gzip is the compressed download.
        return Err(FileError::new(
            ErrorCode::InvalidArgument,
            "downloads are plain tar or gzip: zstd compression is not built in; ask for COMPRESSION_GZIP or COMPRESSION_NONE",
        ));
    }
    let t = roots.target(&req.path)?;
    let dir = t.open_dir(roots.resolve)?;
    let dev = stat::fstat(dir.as_fd())
        .map_err(|e| t.err(e, "stat"))?
        .st_dev;
    let finish = |w: Walk<'_, Box<dyn Write>>| -> Result<(u64, u64), FileError> {
        let (entries, content) = (w.entries, w.content);
        let mut inner = w.tar.into_inner().map_err(|e| io_err(&t.shown, e))?;
        inner.flush().map_err(|e| io_err(&t.shown, e))?;
        Ok((entries, content))
    };
    // The writer chain owns `out`; its digest is read back through a shared cell.
    let shared = std::sync::Arc::new(std::sync::Mutex::new(None::<(String, u64)>));
    struct Last(
        FrameWriter,
        std::sync::Arc<std::sync::Mutex<Option<(String, u64)>>>,
    );
    impl Write for Last {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            self.0.write(d)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()?;
            *self.1.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((hex::encode(self.0.hasher.clone().finalize()), self.0.bytes));
            Ok(())
        }
    }
    let last = Last(out, shared.clone());
    let sink: Box<dyn Write> = match compression {
        proto::Compression::Gzip => Box::new(GzipFinishOnFlush(Some(
            flate2::write::GzEncoder::new(last, flate2::Compression::fast()),
        ))),
        _ => Box::new(last),
    };
    let mut walk = Walk {
        tar: tar::Builder::new(sink),
        roots,
        entries: 0,
        content: 0,
    };
    walk.tar.follow_symlinks(false);
    walk.dir(&dir, "", dev, 0)?;
    walk.tar.finish().map_err(|e| io_err(&t.shown, e))?;
    let (entries, _content) = finish(walk)?;
    let (sha, bytes) = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    Ok(proto::FileResult {
        sha256: sha,
        bytes,
        entry_count: entries,
        ..Default::default()
    })
}

/// A gzip compressor whose `flush` writes its trailer and flushes the sink (once).
struct GzipFinishOnFlush<W: Write>(Option<flate2::write::GzEncoder<W>>);

impl<W: Write> Write for GzipFinishOnFlush<W> {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        match &mut self.0 {
            Some(e) => e.write(d),
            None => Err(std::io::Error::other("compressor already finished")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.take() {
            Some(e) => e.finish()?.flush(),
            None => Ok(()),
        }
    }
}
