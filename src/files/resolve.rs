//! Confinement: every path of a file operation is resolved below an open root (the
//! workspace, or an absolute root allowed by `--file-roots`) without following a symlink
//! in any component, without `..` and without crossing a mount. With `openat2` the kernel
//! enforces it (`RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV|RESOLVE_NO_MAGICLINKS`);
//! elsewhere (gVisor) a checked `O_NOFOLLOW` walk one component at a time does
//! (`crate::workspace::fsutil::open_dir_beneath`). The leaf is never followed either.
//!
//! `.supervisor/` is a sibling of `workspace/` in the volume (src/workspace/layout.rs),
//! so nothing beneath the workspace can name it: confinement beneath the root suffices.

use nix::errno::Errno;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use super::FileError;
use crate::proto::ErrorCode;
use crate::workspace::fsutil::{self, Resolve};

/// A root file operations may resolve below.
pub(crate) struct Root {
    /// Shown in messages ("workspace" or the absolute root).
    pub label: String,
    pub path: Option<PathBuf>,
    pub fd: OwnedFd,
}

pub(crate) struct Roots {
    pub workspace: Root,
    pub extra: Vec<Root>,
    pub resolve: Resolve,
}

/// A path split into its root and its components (no `.`, no `..`, no empty ones).
pub(crate) struct Target<'a> {
    pub root: &'a Root,
    pub parts: Vec<CString>,
    /// The path as the gateway sent it, for messages.
    pub shown: String,
}

fn open_root(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

impl Roots {
    /// Opens the workspace and the allowed roots (at bind time, as the supervisor).
    pub(crate) fn open(workspace: &Path, extra: &[PathBuf]) -> Result<Roots, String> {
        let ws = open_root(workspace)
            .map_err(|e| format!("cannot open the workspace {}: {e}", workspace.display()))?;
        let mut roots = Vec::new();
        for p in extra {
            if !p.is_absolute() {
                return Err(format!(
                    "--file-roots entry {} is not absolute: give absolute directories such as /tmp",
                    p.display()
                ));
            }
            let fd = open_root(p)
                .map_err(|e| format!("--file-roots entry {} cannot be opened: {e}", p.display()))?;
            roots.push(Root {
                label: p.display().to_string(),
                path: Some(p.clone()),
                fd,
            });
        }
        Ok(Roots {
            workspace: Root {
                label: "the workspace".into(),
                path: None,
                fd: ws,
            },
            extra: roots,
            resolve: Resolve::detect(),
        })
    }

    /// Splits `path` into a root and confined components. Refuses `..`, NUL bytes and
    /// absolute paths outside the allowed roots, naming the path.
    pub(crate) fn target<'a>(&'a self, path: &str) -> Result<Target<'a>, FileError> {
        if path.as_bytes().contains(&0) {
            return Err(FileError::new(
                ErrorCode::InvalidArgument,
                format!("path {path:?} contains a NUL byte"),
            ));
        }
        let p = Path::new(path);
        let (root, rest): (&Root, &Path) = if p.is_absolute() {
            let found = self.extra.iter().find_map(|r| {
                let rp = r.path.as_ref()?;
                p.strip_prefix(rp).ok().map(|rest| (r, rest))
            });
            match found {
                Some(f) => f,
                None => {
                    let allowed = if self.extra.is_empty() {
                        "none are allowed (--file-roots)".to_owned()
                    } else {
                        let list: Vec<_> = self.extra.iter().map(|r| r.label.clone()).collect();
                        format!("allowed roots (--file-roots): {}", list.join(", "))
                    };
                    return Err(FileError::new(
                        ErrorCode::PermissionDenied,
                        format!("{path}: absolute path outside the workspace; use a path relative to the workspace ({allowed})"),
                    ));
                }
            }
        } else {
            (&self.workspace, p)
        };
        let mut parts = Vec::new();
        for c in rest.components() {
            match c {
                Component::Normal(n) => {
                    use std::os::unix::ffi::OsStrExt;
                    parts.push(CString::new(n.as_bytes()).expect("NUL checked"));
                }
                Component::CurDir | Component::RootDir => {}
                Component::ParentDir => {
                    return Err(FileError::new(
                        ErrorCode::PermissionDenied,
                        format!("{path}: '..' is not allowed in a path (it could leave {}); give the path without it", root.label),
                    ))
                }
                Component::Prefix(_) => unreachable!("no prefixes on Unix"),
            }
        }
        Ok(Target {
            root,
            parts,
            shown: if path.is_empty() {
                ".".into()
            } else {
                path.to_owned()
            },
        })
    }
}

impl Target<'_> {
    pub(crate) fn leaf(&self) -> Option<&CString> {
        self.parts.last()
    }

    /// Opens the directory holding the leaf (the root itself for a one-component path).
    pub(crate) fn open_parent(&self, resolve: Resolve) -> Result<OwnedFd, FileError> {
        let n = self.parts.len().saturating_sub(1);
        self.open_prefix(n, resolve)
    }

    /// Opens the whole path as a directory (the root for an empty path).
    pub(crate) fn open_dir(&self, resolve: Resolve) -> Result<OwnedFd, FileError> {
        self.open_prefix(self.parts.len(), resolve)
    }

    fn open_prefix(&self, n: usize, resolve: Resolve) -> Result<OwnedFd, FileError> {
        if n == 0 {
            return fsutil::dup(self.root.fd.as_fd()).map_err(|e| self.err(e, "open"));
        }
        let joined = self.parts[..n]
            .iter()
            .map(|c| c.as_bytes())
            .collect::<Vec<_>>()
            .join(&b'/');
        let c = CString::new(joined).expect("no NUL");
        fsutil::open_dir_beneath(self.root.fd.as_fd(), &c, resolve).map_err(|e| self.err(e, "open"))
    }

    /// Creates every missing directory of the first `n` components (`mkdir -p`), each
    /// opened without following links before descending, and returns the last one.
    pub(crate) fn make_dirs(
        &self,
        n: usize,
        mode: u32,
        resolve: Resolve,
    ) -> Result<OwnedFd, FileError> {
        let mut cur = fsutil::dup(self.root.fd.as_fd()).map_err(|e| self.err(e, "open"))?;
        for comp in &self.parts[..n] {
            match nix::sys::stat::mkdirat(
                cur.as_fd(),
                comp.as_c_str(),
                nix::sys::stat::Mode::from_bits_truncate(mode),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.err(e, "create directory")),
            }
            cur = fsutil::open_dir_beneath(cur.as_fd(), comp.as_c_str(), resolve)
                .map_err(|e| self.err(e, "open"))?;
        }
        Ok(cur)
    }

    /// A precise error for `errno` met while doing `what` on this path.
    pub(crate) fn err(&self, errno: Errno, what: &str) -> FileError {
        errno_error(&self.shown, errno, what)
    }
}

/// Maps an errno to the protocol's code and a message naming the path and the problem.
pub(crate) fn errno_error(path: &str, errno: Errno, what: &str) -> FileError {
    use ErrorCode as C;
    let (code, problem) = match errno {
        Errno::ENOENT => (C::NotFound, "no such file or directory".to_owned()),
        Errno::EEXIST => (
            C::AlreadyExists,
            "already exists (set replace to overwrite)".to_owned(),
        ),
        Errno::EACCES | Errno::EPERM => (
            C::PermissionDenied,
            "permission denied for the sandbox user".to_owned(),
        ),
        Errno::ELOOP => (
            C::FailedPrecondition,
            "a path component is a symbolic link; file operations never follow links".to_owned(),
        ),
        Errno::EXDEV => (
            C::FailedPrecondition,
            "the path crosses a mount point or leaves its root".to_owned(),
        ),
        Errno::ENOTDIR => (
            C::FailedPrecondition,
            "a path component is not a directory (or is a symbolic link)".to_owned(),
        ),
        Errno::EISDIR => (C::FailedPrecondition, "is a directory".to_owned()),
        Errno::ENOTEMPTY => (
            C::FailedPrecondition,
            "directory not empty (set recursive to remove a tree)".to_owned(),
        ),
        Errno::ENOSPC | Errno::EDQUOT => (
            C::ResourceExhausted,
            "no space left on the volume (or quota exceeded); free space and retry".to_owned(),
        ),
        Errno::ENAMETOOLONG => (C::InvalidArgument, "name too long".to_owned()),
        Errno::EBUSY => (C::FailedPrecondition, "busy (a mount point?)".to_owned()),
        Errno::EROFS => (C::PermissionDenied, "read-only file system".to_owned()),
        e => (C::Internal, format!("{e}")),
    };
    FileError::new(code, format!("{path}: {what}: {problem}"))
}
