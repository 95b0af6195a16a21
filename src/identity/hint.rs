//! The claim hint: a downward-API file of the pod's annotations (`key="value"` lines,
//! values escaped like Go's %q). When the configured key appears, a claim adopted us.

use std::path::Path;

use crate::envfile::{self, EnvFileError};

/// Kubernetes caps a pod's annotations at 256 KiB; quoting can grow that a little.
pub const MAX_ANNOTATIONS_BYTES: u64 = 1024 * 1024;

/// The value of `key` in a downward-API annotations file, if present and non-empty. A
/// missing file is no hint (`Ok(None)`); a file that is not a regular file, too large or
/// unreadable is an error naming it (the caller logs it and carries on without a hint).
pub fn read_hint(path: &Path, key: &str) -> Result<Option<String>, EnvFileError> {
    let text = match envfile::read_bounded(path, "annotations file", MAX_ANNOTATIONS_BYTES) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.is_missing() => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k == key).then(|| unquote(v)).filter(|v| !v.is_empty())
    }))
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_and_unquotes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("annotations");
        assert_eq!(read_hint(&p, "k").unwrap(), None);
        std::fs::write(
            &p,
            "other=\"x\"\nagents.x-k8s.io/claim-uid=\"abc-\\\"1\\\"\"\n",
        )
        .unwrap();
        assert_eq!(
            read_hint(&p, "agents.x-k8s.io/claim-uid")
                .unwrap()
                .as_deref(),
            Some("abc-\"1\"")
        );
        assert_eq!(read_hint(&p, "missing").unwrap(), None);
    }

    #[test]
    fn a_fifo_or_device_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("annotations");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_hint(&p, "k").unwrap_err().to_string();
        assert!(err.contains("annotations") && err.contains("FIFO"), "{err}");
        let z = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &z).unwrap();
        assert!(read_hint(&z, "k").is_err());
    }
}
