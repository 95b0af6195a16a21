//! The projected ServiceAccount token, re-read from its path on every use.
//!
//! The kubelet rotates the token by swapping the `..data` symlink of the volume, so the
//! leaf is a symlink: it is followed (no `O_NOFOLLOW`). The file is bounded in size,
//! trimmed, and never cached past the call that needs it.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::SecretToken;

/// Kubernetes tokens are a few KiB; anything much larger is not a token.
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProjectedTokenError {
    #[error("projected token {path} does not exist yet; is the serviceAccountToken volume mounted there? (retrying)")]
    Missing { path: String },
    #[error("projected token {path} is empty (retrying)")]
    Empty { path: String },
    #[error("projected token {path} is larger than {MAX_TOKEN_BYTES} bytes; that is not a token")]
    TooLarge { path: String },
    #[error("projected token {path} cannot be read: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the projected token lives.
#[derive(Debug, Clone)]
pub struct ProjectedToken {
    path: PathBuf,
}

impl ProjectedToken {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProjectedToken { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the current token. One retry on "missing": the kubelet removes the old
    /// `..data` generation right after swapping the link, so a reader that resolved the
    /// old target a moment earlier can see ENOENT once.
    pub fn read(&self) -> Result<SecretToken, ProjectedTokenError> {
        match self.read_once() {
            Err(ProjectedTokenError::Missing { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
                self.read_once()
            }
            other => other,
        }
    }

    fn read_once(&self) -> Result<SecretToken, ProjectedTokenError> {
        let path = self.path.display().to_string();
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProjectedTokenError::Missing { path })
            }
            Err(source) => return Err(ProjectedTokenError::Unreadable { path, source }),
        };
        let mut raw = String::new();
        file.take(MAX_TOKEN_BYTES + 1)
            .read_to_string(&mut raw)
            .map_err(|source| ProjectedTokenError::Unreadable {
                path: path.clone(),
                source,
            })?;
        if raw.len() as u64 > MAX_TOKEN_BYTES {
            return Err(ProjectedTokenError::TooLarge { path });
        }
        let token = SecretToken::new(raw);
        if token.is_empty() {
            return Err(ProjectedTokenError::Empty { path });
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fresh_each_time_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "first\n").unwrap();
        std::fs::write(dir.path().join("b"), "second").unwrap();
        let link = dir.path().join("token");
        std::os::unix::fs::symlink("a", &link).unwrap();
        let src = ProjectedToken::new(&link);
        assert_eq!(src.read().unwrap().expose(), "first");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("b", &link).unwrap();
        assert_eq!(src.read().unwrap().expose(), "second");
    }

    #[test]
    fn missing_empty_and_huge_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        assert!(matches!(
            ProjectedToken::new(&p).read(),
            Err(ProjectedTokenError::Missing { .. })
        ));
        std::fs::write(&p, " \n").unwrap();
        assert!(matches!(
            ProjectedToken::new(&p).read(),
            Err(ProjectedTokenError::Empty { .. })
        ));
        std::fs::write(&p, vec![b'a'; MAX_TOKEN_BYTES as usize + 10]).unwrap();
        let err = ProjectedToken::new(&p).read().unwrap_err();
        assert!(matches!(err, ProjectedTokenError::TooLarge { .. }));
        assert!(!err.to_string().contains("aaaa"));
    }
}
