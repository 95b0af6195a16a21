//! URLs as they may appear in logs and errors: without credentials, query or fragment.
//! `https://user:pass@gw:443/x?sig=…` is shown as `https://***@gw:443/x`; the `***`
//! says credentials were given (and ignored by nothing that logs them).

/// Redacts a URL given as text, parseable or not: the userinfo of the authority becomes
/// `***`, the query and fragment are dropped.
pub fn redact_url(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(i) => (&raw[..i + 3], &raw[i + 3..]),
        None => ("", raw),
    };
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    format!("{scheme}{authority}{path}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_query_and_fragment_never_survive() {
        for (raw, want) in [
            ("https://gw:443", "https://gw:443"),
            ("https://u:p@gw:443/a/b?sig=x#f", "https://***@gw:443/a/b"),
            ("http://u@127.0.0.1:1", "http://***@127.0.0.1:1"),
            ("ftp://u:p@x", "ftp://***@x"),
            ("u:p@host/path", "***@host/path"),
            ("https://u:p%40q@[::1]:8/x", "https://***@[::1]:8/x"),
            ("https://gw/p@th?q", "https://gw/p@th"),
        ] {
            assert_eq!(redact_url(raw), want, "{raw}");
        }
    }
}
