//! Tar archives (plain, gzip, zstd; told apart by magic bytes, never by file name) as seed
//! sources. Entries are never unpacked by the tar crate: each one goes through the
//! `Stager`, which refuses absolute paths, `..`, writes through links, hardlinks leaving
//! the seed, and anything but files, directories and links.

use super::fsutil;
use super::stage::{normalize, StageError, Stager};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Why an archive could not be used (entry problems come as `StageError`).
#[derive(Debug)]
pub(crate) enum ArchiveError {
    Format(String),
    Stage(StageError),
}

impl From<StageError> for ArchiveError {
    fn from(e: StageError) -> Self {
        ArchiveError::Stage(e)
    }
}

/// Hashes the raw (still compressed) bytes as the decompressor pulls them, so the source
/// digest costs no second read.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn detect(head: &[u8]) -> Compression {
    if head.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

fn entry_err(path: &[u8], problem: impl Into<String>) -> ArchiveError {
    ArchiveError::Stage(StageError::Entry {
        entry: fsutil::escape_bytes(path),
        problem: problem.into(),
    })
}

/// Extracts `reader` into the stager. Returns `sha256:<hex>` of the raw archive bytes
/// (everything the decompressor consumed; trailing bytes after the end of the tar are
/// drained so the digest covers the whole input).
pub(crate) fn extract<R: Read>(reader: R, stager: &mut Stager) -> Result<String, ArchiveError> {
    let hashing = HashingReader::new(reader);
    let mut buffered = BufReader::with_capacity(256 * 1024, hashing);
    let head = buffered
        .fill_buf()
        .map_err(|e| ArchiveError::Format(format!("cannot read the archive: {e}")))?;
    if head.is_empty() {
        return Err(ArchiveError::Format("the archive is empty".to_owned()));
    }
    let compression = detect(head);
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(&mut buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(&mut buffered)
                .map_err(|e| ArchiveError::Format(format!("zstd stream cannot be read: {e}")))?,
        ),
        Compression::None => Box::new(&mut buffered),
    };
    let mut archive = tar::Archive::new(decoded);
    let entries = archive
        .entries()
        .map_err(|e| ArchiveError::Format(format!("not a readable tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            ArchiveError::Format(format!("corrupt tar archive ({compression:?}): {e}"))
        })?;
        let raw = entry.path_bytes().into_owned();
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header
            .mtime()
            .ok()
            .map(|s| (s.min(i64::MAX as u64) as i64, 0));
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let rel = normalize(&raw).map_err(|p| entry_err(&raw, p))?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.is_empty() {
                    return Err(entry_err(&raw, "is a file entry naming the workspace root"));
                }
                stager.add_file(&rel, mode, mtime, &mut entry)?;
            }
            tar::EntryType::Directory => stager.add_dir(&rel, mode, mtime)?,
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(&raw, "is a symlink without a target"))?
                    .into_owned();
                stager.add_symlink(&rel, &target, mtime)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_err(&raw, "is a hardlink without a target"))?
                    .into_owned();
                let target_rel = normalize(&target).map_err(|p| {
                    entry_err(&raw, format!("is a hardlink whose target `{}` {p}", fsutil::escape_bytes(&target)))
                })?;
                stager.add_hardlink(&rel, &target_rel)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(entry_err(&raw, "is a device node; seeds may only hold files, directories and links"))
            }
            tar::EntryType::Fifo => {
                return Err(entry_err(&raw, "is a FIFO; seeds may only hold files, directories and links"))
            }
            tar::EntryType::GNUSparse => {
                return Err(entry_err(&raw, "is a GNU sparse file, which is not supported; re-create the archive without --sparse"))
            }
            other => return Err(entry_err(&raw, format!("has unsupported tar entry type {other:?}"))),
        }
    }
    drop(archive);
    std::io::copy(&mut buffered, &mut std::io::sink())
        .map_err(|e| ArchiveError::Format(format!("cannot read the end of the archive: {e}")))?;
    let hashing = buffered.into_inner();
    Ok(format!("sha256:{}", hex::encode(hashing.hasher.finalize())))
}
