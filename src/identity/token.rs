//! Secrets with a type: a token can be passed around, presented as a bearer credential
//! and compared, but never printed. `Debug` and `Display` show only a SHA-256
//! fingerprint, so a token that slips into a log line or an error leaks nothing.

use sha2::{Digest, Sha256};
use std::fmt;

/// A bearer token (projected ServiceAccount token or sandbox token).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    /// Wraps a token; surrounding whitespace (a trailing newline in a file) is trimmed.
    pub fn new(raw: impl Into<String>) -> Self {
        let raw = raw.into();
        let trimmed = raw.trim();
        if trimmed.len() == raw.len() {
            SecretToken(raw)
        } else {
            SecretToken(trimmed.to_owned())
        }
    }

    /// `sha256:<12 hex>`: enough to correlate log lines, useless to an attacker.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }

    /// The raw token, for the one place that needs it: the `authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The `authorization` metadata value for a gRPC call.
    pub fn bearer(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, TokenFormatError> {
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| TokenFormatError {
                fingerprint: self.fingerprint(),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A token holding bytes that cannot travel in an HTTP header.
#[derive(Debug, thiserror::Error)]
#[error("token {fingerprint} contains characters that are not valid in an HTTP header; check the token source")]
pub struct TokenFormatError {
    pub fingerprint: String,
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretToken({})", self.fingerprint())
    }
}

impl fmt::Display for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// `sha256:<first 12 hex digits>` of arbitrary bytes.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    format!("sha256:{}", &hex::encode(digest)[..12])
}

/// Reads `authorization: Bearer <token>` from gRPC request metadata.
pub fn bearer_from_metadata(meta: &tonic::metadata::MetadataMap) -> Option<SecretToken> {
    let value = meta.get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(SecretToken::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_token() {
        // Built at run time so nothing JWT-shaped is committed; starts with "eyJ" like a
        // real token's header.
        use base64::Engine;
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#);
        let raw = format!("{header}.payload.signature");
        let t = SecretToken::new(format!("{raw}\n"));
        for shown in [format!("{t:?}"), format!("{t}"), format!("{:?}", Some(&t))] {
            assert!(!shown.contains("eyJ"), "{shown}");
            assert!(!shown.contains("payload"), "{shown}");
            assert!(shown.contains("sha256:"), "{shown}");
        }
        assert!(raw.starts_with("eyJ"));
        assert_eq!(t.expose(), raw);
    }

    #[test]
    fn fingerprint_is_stable_and_short() {
        let a = SecretToken::new("abc");
        assert_eq!(a.fingerprint(), SecretToken::new(" abc ").fingerprint());
        assert_eq!(a.fingerprint().len(), "sha256:".len() + 12);
        assert_ne!(a.fingerprint(), SecretToken::new("abd").fingerprint());
    }

    #[test]
    fn bearer_round_trips_through_metadata() {
        let t = SecretToken::new("tok-123");
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert("authorization", t.bearer().unwrap());
        assert_eq!(bearer_from_metadata(&meta), Some(t));
    }
}
