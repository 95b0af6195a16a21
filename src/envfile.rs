//! Files the environment hands us (projected token, CA bundles, client identity,
//! annotations, passwd, seed archive), opened so that a hostile or broken one cannot
//! hang the supervisor.
//!
//! A FIFO would block `open` until a writer appears and `read` until it writes; a device
//! like `/dev/zero` never ends. So every such file is opened with `O_NONBLOCK` (a FIFO
//! opens at once), `O_NOCTTY` (PID 1 must not acquire a terminal) and `O_CLOEXEC`, then
//! `fstat`ed: anything but a regular file is refused with its path, the type found and
//! what to do. Symlinks are followed on purpose: kubelet volumes reach the file through
//! `..data` links. Reads are bounded; a larger file is refused with its size and the limit.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Why an environment file cannot be used. Every message names the file.
#[derive(Debug)]
pub enum EnvFileError {
    Missing {
        what: &'static str,
        path: String,
    },
    NotRegular {
        what: &'static str,
        path: String,
        found: &'static str,
    },
    TooLarge {
        what: &'static str,
        path: String,
        size: u64,
        limit: u64,
    },
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

impl std::fmt::Display for EnvFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, path) = self.file();
        write!(f, "{what} {path} {}", self.problem())
    }
}

impl std::error::Error for EnvFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EnvFileError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl EnvFileError {
    pub fn is_missing(&self) -> bool {
        matches!(self, EnvFileError::Missing { .. })
    }

    /// What the file is for and its path.
    pub fn file(&self) -> (&'static str, &str) {
        match self {
            EnvFileError::Missing { what, path }
            | EnvFileError::NotRegular { what, path, .. }
            | EnvFileError::TooLarge { what, path, .. }
            | EnvFileError::Io { what, path, .. } => (what, path),
        }
    }

    /// The problem alone, for messages that name the file themselves.
    pub fn problem(&self) -> String {
        match self {
            EnvFileError::Missing { .. } => "does not exist".to_owned(),
            EnvFileError::NotRegular { found, .. } => format!(
                "is a {found}, not a regular file; point it at a regular file (a FIFO or device would block or never end)"
            ),
            EnvFileError::TooLarge { what, size, limit, .. } => {
                format!("is {size} bytes, more than the limit of {limit} bytes for a {what}")
            }
            EnvFileError::Io { source, .. } => format!("cannot be read ({source})"),
        }
    }
}

/// The name of a file type, for messages.
pub fn type_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO (named pipe)"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Checks, without opening it, that `path` (symlinks followed) is a regular file of at
/// most `limit` bytes. `stat` never blocks on a FIFO; used at boot to fail naming the
/// option. The file is checked again, on the opened fd, when it is read.
pub fn check(path: &Path, what: &'static str, limit: Option<u64>) -> Result<(), EnvFileError> {
    let shown = || path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| io_err(what, path, source))?;
    check_meta(&meta, what, &shown(), limit)
}

fn check_meta(
    meta: &std::fs::Metadata,
    what: &'static str,
    path: &str,
    limit: Option<u64>,
) -> Result<(), EnvFileError> {
    if !meta.file_type().is_file() {
        return Err(EnvFileError::NotRegular {
            what,
            path: path.to_owned(),
            found: type_name(meta.file_type()),
        });
    }
    if let Some(limit) = limit {
        if meta.size() > limit {
            return Err(EnvFileError::TooLarge {
                what,
                path: path.to_owned(),
                size: meta.size(),
                limit,
            });
        }
    }
    Ok(())
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> EnvFileError {
    let path = path.display().to_string();
    if source.kind() == std::io::ErrorKind::NotFound {
        EnvFileError::Missing { what, path }
    } else {
        EnvFileError::Io { what, path, source }
    }
}

/// Opens `path` for reading without blocking and returns it only if it is a regular
/// file (for streaming a large one, like the seed archive). `O_NONBLOCK` stays set: it
/// has no effect on regular files.
pub fn open_regular(path: &Path, what: &'static str) -> Result<File, EnvFileError> {
    // `stat` first: opening some devices has effects of its own (a watchdog starts, a
    // tape rewinds). The fstat below closes the window between the two.
    check(path, what, None)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| io_err(what, path, source))?;
    let meta = file
        .metadata()
        .map_err(|source| io_err(what, path, source))?;
    check_meta(&meta, what, &path.display().to_string(), None)?;
    Ok(file)
}

/// Reads a regular file of at most `limit` bytes (see [`open_regular`]). The bound holds
/// on the bytes read too, so a file that grows while being read is still refused.
pub fn read_bounded(path: &Path, what: &'static str, limit: u64) -> Result<Vec<u8>, EnvFileError> {
    let file = open_regular(path, what)?;
    let too_large = |size| EnvFileError::TooLarge {
        what,
        path: path.display().to_string(),
        size,
        limit,
    };
    let size = file.metadata().map(|m| m.size()).unwrap_or(0);
    if size > limit {
        return Err(too_large(size));
    }
    let mut buf = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|source| io_err(what, path, source))?;
    if buf.len() as u64 > limit {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

/// As [`read_bounded`], as UTF-8 text.
pub fn read_text(path: &Path, what: &'static str, limit: u64) -> Result<String, EnvFileError> {
    let bytes = read_bounded(path, what, limit)?;
    String::from_utf8(bytes).map_err(|_| EnvFileError::Io {
        what,
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fifos_and_devices_are_refused_at_once_naming_path_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let started = Instant::now();
        for (p, found) in [(&fifo, "FIFO"), (&zero, "character device")] {
            for err in [
                read_bounded(p, "token", 10).unwrap_err(),
                open_regular(p, "token").unwrap_err(),
                check(p, "token", None).unwrap_err(),
            ] {
                let msg = err.to_string();
                assert!(
                    matches!(err, EnvFileError::NotRegular { .. })
                        && msg.contains(&p.display().to_string())
                        && msg.contains(found),
                    "{msg}"
                );
            }
        }
        let err = read_bounded(dir.path(), "token", 10).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn size_is_bounded_and_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "0123456789").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("f", &link).unwrap();
        assert_eq!(read_bounded(&link, "file", 10).unwrap(), b"0123456789");
        let err = read_bounded(&link, "file", 9).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("10 bytes") && msg.contains("9 bytes"), "{msg}");
        assert!(check(&f, "file", Some(9)).is_err());
        assert!(read_bounded(&dir.path().join("nope"), "file", 9)
            .unwrap_err()
            .is_missing());
    }
}
