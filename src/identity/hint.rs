//! The claim hint: a downward-API file of the pod's annotations (`key="value"` lines,
//! values escaped like Go's %q). When the configured key appears, a claim adopted us.

use std::path::Path;

/// The value of `key` in a downward-API annotations file, if present and non-empty.
pub fn read_hint(path: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k == key).then(|| unquote(v)).filter(|v| !v.is_empty())
    })
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
        assert_eq!(read_hint(&p, "k"), None);
        std::fs::write(
            &p,
            "other=\"x\"\nagents.x-k8s.io/claim-uid=\"abc-\\\"1\\\"\"\n",
        )
        .unwrap();
        assert_eq!(
            read_hint(&p, "agents.x-k8s.io/claim-uid").as_deref(),
            Some("abc-\"1\"")
        );
        assert_eq!(read_hint(&p, "missing"), None);
    }
}
