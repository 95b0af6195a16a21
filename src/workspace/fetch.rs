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

use super::SeedTimeouts;

/// A CA bundle larger than this is not a CA bundle.
const MAX_CA_BYTES: u64 = 1024 * 1024;

/// A duration as the options spell it (`30s`, `1.5s`, `500ms`).
fn show(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A reqwest error without the URL it carries (which may hold credentials or a signed
/// query), with its causes: reqwest alone says only "error sending request".
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

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
            let pem = crate::envfile::read_bounded(path, "seed CA file", MAX_CA_BYTES)
                .map_err(|e| SeedError::Config(e.to_string()))?;
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
/// Returns `sha256:<hex>` of the bytes. Bounded by `timeouts`: connect, the wait for
/// each next bytes (idle), and the whole download (total); each error names the option.
pub(crate) async fn download(
    url: &str,
    expected_sha256: &str,
    ca_file: Option<&Path>,
    timeouts: SeedTimeouts,
    dest: std::fs::File,
) -> Result<String, SeedError> {
    let expected = parse_sha256(expected_sha256)?;
    let url = check_url(url)?;
    let shown = redact(&url);
    let total = tokio::time::timeout(
        timeouts.total,
        fetch(&url, &shown, &expected, ca_file, timeouts, dest),
    );
    match total.await {
        Ok(r) => r,
        Err(_) => Err(SeedError::Download {
            url: shown,
            problem: format!(
                "did not finish within the --seed-timeout of {}",
                show(timeouts.total)
            ),
        }),
    }
}

async fn fetch(
    url: &reqwest::Url,
    shown: &str,
    expected: &str,
    ca_file: Option<&Path>,
    timeouts: SeedTimeouts,
    dest: std::fs::File,
) -> Result<String, SeedError> {
    use tokio::io::AsyncWriteExt;
    let err = |problem: String| SeedError::Download {
        url: shown.to_owned(),
        problem,
    };
    let idle = || {
        format!(
            "no data for the --seed-idle-timeout of {}",
            show(timeouts.idle)
        )
    };
    let failed = |what: &str, e: reqwest::Error| {
        if e.is_connect() && e.is_timeout() {
            format!(
                "{what}: cannot connect within the --seed-connect-timeout of {}",
                show(timeouts.connect)
            )
        } else if e.is_timeout() {
            format!("{what}: {}", idle())
        } else {
            format!("{what}: {}", describe(e))
        }
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
        .connect_timeout(timeouts.connect)
        .read_timeout(timeouts.idle)
        .build()
        .map_err(|e| err(format!("cannot build the HTTP client: {}", describe(e))))?;
    // The answer's headers are bounded by the idle timeout too: read_timeout covers
    // body reads, not the wait for the response to begin.
    let resp = tokio::time::timeout(timeouts.idle, client.get(url.clone()).send()).await;
    let mut resp = match resp {
        Err(_) => return Err(err(format!("no answer: {}", idle()))),
        Ok(r) => r.map_err(|e| err(failed("request failed", e)))?,
    };
    if !resp.status().is_success() {
        return Err(err(format!("server answered {}", resp.status())));
    }
    let mut file = tokio::fs::File::from_std(dest);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let chunk = match tokio::time::timeout(timeouts.idle, resp.chunk()).await {
            Err(_) => {
                return Err(err(format!(
                    "download stalled after {bytes} bytes: {}",
                    idle()
                )))
            }
            Ok(c) => c.map_err(|e| {
                err(failed(
                    &format!("download interrupted after {bytes} bytes"),
                    e,
                ))
            })?,
        };
        let Some(chunk) = chunk else { break };
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
            url: shown.to_owned(),
            expected: format!("sha256:{expected}"),
            actual: format!("sha256:{actual}"),
        });
    }
    tracing::info!(event = "seed.downloaded", url = %shown, bytes, "seed archive downloaded and verified");
    Ok(format!("sha256:{actual}"))
}
