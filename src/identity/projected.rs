//! The projected ServiceAccount token, re-read from its path on every use.
//!
//! The kubelet rotates the token by swapping the `..data` symlink of the volume, so the
//! leaf is a symlink: it is followed (no `O_NOFOLLOW`). The file is read through
//! [`crate::envfile`] (non-blocking open, regular files only, bounded in size), trimmed,
//! and never cached past the call that needs it.

use std::path::{Path, PathBuf};

use crate::envfile::{self, EnvFileError};

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
    #[error("projected token {path} has audience {found:?}, but the gateway expects '{want}': set the serviceAccountToken volume's audience to '{want}' (retrying)")]
    WrongAudience {
        path: String,
        found: Vec<String>,
        want: String,
    },
    #[error("projected token {path} is not a JWT with an 'aud' claim; is --token-path pointing at a serviceAccountToken projection? (retrying)")]
    NotAJwt { path: String },
    /// Not a regular file, or unreadable (the message names the path and what is wrong).
    #[error("{0} (retrying)")]
    Unusable(#[source] EnvFileError),
}

/// Where the projected token lives, and the audience it must carry (when configured).
#[derive(Debug, Clone)]
pub struct ProjectedToken {
    path: PathBuf,
    audience: Option<String>,
}

impl ProjectedToken {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProjectedToken {
            path: path.into(),
            audience: None,
        }
    }

    /// Checks each read token's `aud` claim locally, so a misconfigured volume gives a
    /// precise error instead of an opaque rejection from the gateway. The gateway still
    /// verifies everything; this reads the claims without trusting them.
    pub fn with_audience(mut self, audience: Option<String>) -> Self {
        self.audience = audience.filter(|a| !a.is_empty());
        self
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
        let raw = match envfile::read_text(&self.path, "projected token", MAX_TOKEN_BYTES) {
            Ok(raw) => raw,
            Err(EnvFileError::Missing { .. }) => return Err(ProjectedTokenError::Missing { path }),
            Err(EnvFileError::TooLarge { .. }) => {
                return Err(ProjectedTokenError::TooLarge { path })
            }
            Err(e) => return Err(ProjectedTokenError::Unusable(e)),
        };
        let token = SecretToken::new(raw);
        if token.is_empty() {
            return Err(ProjectedTokenError::Empty { path });
        }
        if let Some(want) = &self.audience {
            let found = audiences(token.expose())
                .ok_or_else(|| ProjectedTokenError::NotAJwt { path: path.clone() })?;
            if !found.iter().any(|a| a == want) {
                return Err(ProjectedTokenError::WrongAudience {
                    path,
                    found,
                    want: want.clone(),
                });
            }
        }
        Ok(token)
    }
}

/// The `aud` claim of a JWT (a string or an array), read without verification.
fn audiences(jwt: &str) -> Option<Vec<String>> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match &claims["aud"] {
        serde_json::Value::String(a) => Some(vec![a.clone()]),
        serde_json::Value::Array(v) => Some(
            v.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
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
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = ProjectedToken::new(&p).read().unwrap_err().to_string();
        assert!(err.contains("FIFO") && err.contains("token"), "{err}");
    }

    #[test]
    fn audience_is_checked_locally_with_a_precise_error() {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let jwt = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"ES256"}"#),
            enc(r#"{"aud":["kubernetes"]}"#)
        );
        std::fs::write(&p, &jwt).unwrap();
        let src = ProjectedToken::new(&p).with_audience(Some("sandbox-gateway".into()));
        let err = src.read().unwrap_err();
        assert!(
            matches!(err, ProjectedTokenError::WrongAudience { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("\"kubernetes\"")
                && msg.contains("sandbox-gateway")
                && !msg.contains(&jwt),
            "{msg}"
        );
        std::fs::write(
            &p,
            format!("{}.{}.sig", enc("{}"), enc(r#"{"aud":"sandbox-gateway"}"#)),
        )
        .unwrap();
        assert!(src.read().is_ok());
        std::fs::write(&p, "opaque").unwrap();
        assert!(matches!(
            src.read(),
            Err(ProjectedTokenError::NotAJwt { .. })
        ));
        assert!(
            ProjectedToken::new(&p).read().is_ok(),
            "without --audience any token is passed on"
        );
    }
}
