//! Downloading a seed archive pinned by SHA-256.
//!
//! The archive is downloaded into the staging directory and hashed as it arrives; only
//! after the digest matches is it parsed. That way a hostile server that does not know the
//! pinned content never reaches the decompressors or the tar parser.

use super::SeedError;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Parses `sha256:<hex>` or `<hex>` (64 hex digits, any case) into lowercase hex.
pub(crate) fn parse_sha256(s: &str) -> Result<String, SeedError> {
    let hexpart = s
        .trim()
        .strip_prefix("sha256:")
        .unwrap_or(s.trim())
        .to_ascii_lowercase();
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SeedError::Config(format!(
            "seed sha256 `{s}` is not 64 hex digits; pass the archive's SHA-256, e.g. from `sha256sum`"
        )));
    }
    Ok(hexpart)
}

/// `scheme://host[:port]/path`: no credentials, no query, safe for logs and records.
pub(crate) fn redact(url: &reqwest::Url) -> String {
    let mut out = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(url.path());
    out
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// https anywhere; plain http only to loopback (local test servers).
pub(crate) fn check_url(raw: &str) -> Result<reqwest::Url, SeedError> {
    let url = reqwest::Url::parse(raw)
        .map_err(|e| SeedError::Config(format!("seed URL cannot be parsed: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(SeedError::Config(format!(
            "seed URL {} uses plain http to a non-loopback host; use https",
            redact(&url)
        ))),
        other => Err(SeedError::Config(format!(
            "seed URL scheme `{other}` is not supported; use https"
        ))),
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SeedError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                SeedError::Config(format!(
                    "cannot read the seed CA file {}: {e}",
                    path.display()
                ))
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    SeedError::Config(format!(
                        "CA file {} holds a bad PEM block: {e}",
                        path.display()
                    ))
                })?;
                roots.add(cert).map_err(|e| {
                    SeedError::Config(format!(
                        "CA file {} holds an unusable certificate: {e}",
                        path.display()
                    ))
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(SeedError::Config(format!(
                    "CA file {} holds no PEM certificates",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SeedError::Config(format!("TLS configuration failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

/// Downloads `url` into `dest`, hashing as it goes; fails unless the SHA-256 matches.
/// Returns `sha256:<hex>` of the bytes.
pub(crate) async fn download(
    url: &str,
    expected_sha256: &str,
    ca_file: Option<&Path>,
    dest: std::fs::File,
) -> Result<String, SeedError> {
    use tokio::io::AsyncWriteExt;
    let expected = parse_sha256(expected_sha256)?;
    let url = check_url(url)?;
    let shown = redact(&url);
    let err = |problem: String| SeedError::Download {
        url: shown.clone(),
        problem,
    };
    // Redirects may not downgrade to plain http (except loopback, as above).
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() >= 5 {
            attempt.error("more than 5 redirects")
        } else if check_url(attempt.url().as_str()).is_err() {
            attempt.error("redirect to a URL that is neither https nor loopback http")
        } else {
            attempt.follow()
        }
    });
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca_file)?)
        .redirect(policy)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
    let mut resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| err(format!("request failed: {e}")))?;
    if !resp.status().is_success() {
        return Err(err(format!("server answered {}", resp.status())));
    }
    let mut file = tokio::fs::File::from_std(dest);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| err(format!("download interrupted after {bytes} bytes: {e}")))?
    {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| err(format!("cannot write the download to staging: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| err(format!("cannot write the download to staging: {e}")))?;
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(SeedError::Digest {
            url: shown,
            expected: format!("sha256:{expected}"),
            actual: format!("sha256:{actual}"),
        });
    }
    tracing::info!(event = "seed.downloaded", url = %shown, bytes, "seed archive downloaded and verified");
    Ok(format!("sha256:{actual}"))
}
