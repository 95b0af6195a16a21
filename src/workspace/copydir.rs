//! The directory seed source: a tree baked into the image, copied into staging with
//! every file hashed, on several threads (see `stage.rs` for the copy strategy).

use super::fsutil;
use super::seed::stage_err;
use super::stage::{self, Stager};
use super::SeedError;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One copied file: job index, content hash, size.
type Copied = (usize, [u8; 32], u64);

struct FileJob {
    src: PathBuf,
    rel: Vec<u8>,
    mode: u32,
    mtime: (i64, i64),
}

/// Copies a directory tree (baked into the image, so trusted to hold no tricks, but still
/// checked: only files, directories and symlinks). Directories and links are created in
/// one pass; file contents are copied and hashed on several threads; hardlinks last.
pub(super) fn copy_directory(
    src_root: &Path,
    stager: &mut Stager,
    cancel: &AtomicBool,
) -> Result<(), SeedError> {
    let desc = format!("directory:{}", src_root.display());
    let root_meta = std::fs::metadata(src_root).map_err(|e| SeedError::Source {
        source_desc: desc.clone(),
        problem: format!("cannot be read: {e}"),
    })?;
    if !root_meta.is_dir() {
        return Err(SeedError::Source {
            source_desc: desc,
            problem: "is not a directory".to_owned(),
        });
    }
    let mut jobs: Vec<FileJob> = Vec::new();
    let mut links: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut first_link: std::collections::HashMap<(u64, u64), Vec<u8>> = Default::default();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(src_root.to_path_buf(), Vec::new())];
    let src_err = |path: &Path, e: std::io::Error| SeedError::Source {
        source_desc: desc.clone(),
        problem: format!("{}: {e}", path.display()),
    };
    while let Some((dir, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| src_err(&dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| src_err(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| src_err(&path, e))?;
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(entry.file_name().as_bytes());
            let mtime = Some((meta.mtime(), meta.mtime_nsec()));
            let ft = meta.file_type();
            if ft.is_dir() {
                stager
                    .add_dir(&child_rel, meta.mode(), mtime)
                    .map_err(stage_err)?;
                stack.push((path, child_rel));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| src_err(&path, e))?;
                stager
                    .add_symlink(&child_rel, target.as_os_str().as_bytes(), mtime)
                    .map_err(stage_err)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = first_link.get(&(meta.dev(), meta.ino())) {
                        links.push((child_rel, first.clone()));
                        continue;
                    }
                    first_link.insert((meta.dev(), meta.ino()), child_rel.clone());
                }
                stager.reserve_file(&child_rel).map_err(stage_err)?;
                jobs.push(FileJob {
                    src: path,
                    rel: child_rel,
                    mode: meta.mode(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                });
            } else {
                return Err(SeedError::Entry {
                    entry: fsutil::escape_bytes(&child_rel),
                    problem: "is a device node, FIFO or socket; seeds may only hold files, directories and links".to_owned(),
                });
            }
        }
    }
    let results = copy_files(stager, &jobs, cancel)?;
    for (job, (hash, size)) in jobs.iter().zip(results) {
        stager.record_file(&job.rel, job.mode, hash, size);
    }
    for (rel, target) in links {
        stager.add_hardlink(&rel, &target).map_err(stage_err)?;
    }
    Ok(())
}

/// Copies and hashes the files on up to 4 threads. Each thread creates its files with
/// `O_EXCL|O_NOFOLLOW` by path below the staging tree: every directory on those paths
/// was created by this seed inside the root-only `.supervisor/`, so nothing can redirect it.
fn copy_files(
    stager: &Stager,
    jobs: &[FileJob],
    cancel: &AtomicBool,
) -> Result<Vec<([u8; 32], u64)>, SeedError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let tree = stager.tree();
    let chown = stager.chown();
    let reflink = &stager.reflink;
    let mut results: Vec<Option<([u8; 32], u64)>> = vec![None; jobs.len()];
    let outcome: Result<Vec<Vec<Copied>>, SeedError> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<Vec<Copied>, SeedError> {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut done = Vec::new();
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(done);
                        }
                        if cancel.load(Ordering::Relaxed) {
                            return Err(SeedError::Cancelled);
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else {
                            return Ok(done);
                        };
                        match copy_one(tree, job, chown, reflink, cancel, &mut buf) {
                            Ok((hash, size)) => done.push((i, hash, size)),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SeedError::Task("a copy thread panicked".to_owned())))
            })
            .collect()
    });
    for (i, hash, size) in outcome?.into_iter().flatten() {
        results[i] = Some((hash, size));
    }
    results
        .into_iter()
        .zip(jobs)
        .map(|(r, job)| {
            r.ok_or_else(|| SeedError::Entry {
                entry: fsutil::escape_bytes(&job.rel),
                problem: "was not copied".to_owned(),
            })
        })
        .collect()
}

fn copy_one(
    tree: std::os::fd::BorrowedFd<'_>,
    job: &FileJob,
    chown: Option<(u32, u32)>,
    reflink: &AtomicBool,
    cancel: &AtomicBool,
    buf: &mut [u8],
) -> Result<([u8; 32], u64), SeedError> {
    let entry = || fsutil::escape_bytes(&job.rel);
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: a file swapped for a FIFO since the walk fails instead of blocking.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&job.src)
        .map_err(|e| SeedError::Entry {
            entry: entry(),
            problem: format!("cannot be read from {}: {e}", job.src.display()),
        })?;
    let rel = CString::new(job.rel.clone()).map_err(|_| SeedError::Entry {
        entry: entry(),
        problem: "contains a NUL byte".to_owned(),
    })?;
    let dst = fcntl::openat(
        tree,
        rel.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| SeedError::Entry {
        entry: entry(),
        problem: format!("cannot be created in staging: {e}"),
    })?;
    let (hash, size) = stage::copy_content(&mut src, &dst, reflink, cancel, buf).map_err(|e| {
        SeedError::Entry {
            entry: entry(),
            problem: format!("copy failed: {e}"),
        }
    })?;
    stage::finish_file(&dst, job.mode, Some(job.mtime), chown).map_err(|e| SeedError::Entry {
        entry: entry(),
        problem: format!("cannot set owner/mode/time: {e}"),
    })?;
    Ok((hash, size))
}
