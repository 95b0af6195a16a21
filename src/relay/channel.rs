//! The connection to the gateway: TLS (trusting only the configured CA bundle), HTTP/2
//! keepalive, and bearer credentials on every call.
//!
//! The CA bundle is re-read whenever a channel is (re)built: after a failed call, on
//! every relay reconnect. A changed bundle that parses replaces the trusted set
//! (`identity.ca_reloaded`); one that does not is logged (`identity.ca_reload_failed`)
//! and the last good bundle stays in use, so a botched ConfigMap update cannot cut a
//! running sandbox off its gateway.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::SecretToken;
use crate::proto::gateway_client::GatewayClient;

/// Largest message either side may send; output frames are far smaller.
/// HTTP/2 PING interval on the gateway connection, also while idle (see `endpoint`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered this long drops the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// A CA bundle larger than this is not a CA bundle.
const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("gateway endpoint {url:?} is invalid: {why}")]
    Endpoint { url: String, why: String },
    #[error(
        "gateway CA bundle {path}: {why}; give a PEM file with the gateway's CA certificate(s)"
    )]
    CaBundle { path: String, why: String },
    #[error("client certificate/key {path}: {why}; give PEM files (--client-cert, --client-key)")]
    ClientIdentity { path: String, why: String },
    #[error("--client-cert and --client-key go together; only {given} was given")]
    ClientIdentityHalf { given: &'static str },
    #[error("https gateway {0:?} needs --gateway-ca: the supervisor trusts only the configured CA bundle")]
    NoCa(String),
    #[error("token cannot be sent: {0}")]
    Token(#[from] crate::identity::TokenFormatError),
}

/// A parsed, accepted CA bundle.
#[derive(Clone)]
struct LoadedBundle {
    pem: Vec<u8>,
    digest: [u8; 32],
    certificates: usize,
}

/// What the endpoint trusts now, shared by every clone (warm exchange, relay, report).
#[derive(Default)]
struct TrustState {
    good: Option<LoadedBundle>,
    /// Digest of the last bad bundle content (or error text) already logged, so a bad
    /// file is reported once per change, not on every reconnect.
    logged_bad: Option<[u8; 32]>,
}

impl std::fmt::Debug for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustState")
            .field("certificates", &self.good.as_ref().map(|b| b.certificates))
            .finish()
    }
}

/// Everything needed to (re)build the channel. Clones share the trusted CA state.
#[derive(Debug, Clone)]
pub struct GatewayEndpoint {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    trust: Arc<Mutex<TrustState>>,
}

/// Parses a PEM bundle as trust anchors: a garbage bundle must fail here, loudly, not
/// as a vague handshake error later. Returns the number of certificates.
fn parse_bundle(pem: &[u8]) -> Result<usize, String> {
    let mut reader = pem;
    let mut store = rustls::RootCertStore::empty();
    let mut count = 0;
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| format!("is not valid PEM ({e})"))?;
        store
            .add(cert)
            .map_err(|e| format!("holds a certificate that does not parse ({e})"))?;
        count += 1;
    }
    if count == 0 {
        return Err("contains no PEM certificates".into());
    }
    Ok(count)
}

/// Reads a PEM file through [`crate::envfile`]: a FIFO or device is refused at once
/// instead of hanging the boot or a reconnect. Errors are the problem alone (callers
/// name the file).
fn read_bounded(path: &Path, what: &'static str) -> Result<Vec<u8>, String> {
    crate::envfile::read_bounded(path, what, MAX_BUNDLE_BYTES).map_err(|e| e.problem())
}

/// Checks a client certificate chain and key as PEM, so a wrong file fails at boot.
fn read_client_identity(cert: &Path, key: &Path) -> Result<Identity, ChannelError> {
    let bad = |p: &Path, why: String| ChannelError::ClientIdentity {
        path: p.display().to_string(),
        why,
    };
    let cert_pem = read_bounded(cert, "client certificate").map_err(|w| bad(cert, w))?;
    let key_pem = read_bounded(key, "client key").map_err(|w| bad(key, w))?;
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, format!("is not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad(cert, "contains no PEM certificate".into()));
    }
    match rustls_pemfile::private_key(&mut &key_pem[..]) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(bad(key, "contains no PEM private key".into())),
        // The parser's error may quote key bytes: say only that it failed.
        Err(_) => return Err(bad(key, "is not a valid PEM private key".into())),
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

impl GatewayEndpoint {
    pub fn new(
        url: impl Into<String>,
        ca: Option<PathBuf>,
        server_name: Option<String>,
        client_cert: Option<PathBuf>,
        client_key: Option<PathBuf>,
    ) -> Self {
        GatewayEndpoint {
            url: url.into(),
            ca,
            server_name,
            client_cert,
            client_key,
            trust: Arc::default(),
        }
    }

    /// Validates the TLS material without connecting (used at boot and on reload).
    pub fn check(&self) -> Result<(), ChannelError> {
        self.endpoint().map(drop)
    }

    /// The CA bundle to trust now: the file's current content when it parses, else the
    /// last good one (logging the failure once per change). Errors only when no good
    /// bundle was ever loaded.
    fn current_bundle(&self, path: &Path) -> Result<Vec<u8>, ChannelError> {
        let mut trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        let read = read_bounded(path, "gateway CA bundle");
        let digest: [u8; 32] = match &read {
            Ok(pem) => Sha256::digest(pem).into(),
            Err(why) => Sha256::digest(why.as_bytes()).into(),
        };
        if let Some(good) = &trust.good {
            if good.digest == digest {
                return Ok(good.pem.clone());
            }
        }
        let parsed = read.and_then(|pem| parse_bundle(&pem).map(|n| (pem, n)));
        match (parsed, trust.good.clone()) {
            (Ok((pem, certificates)), previous) => {
                if let Some(prev) = previous {
                    tracing::info!(event = "identity.ca_reloaded", path = %path.display(), certificates, previous_certificates = prev.certificates, "gateway CA bundle changed; trusting the new bundle from the next connection");
                }
                trust.good = Some(LoadedBundle {
                    pem: pem.clone(),
                    digest,
                    certificates,
                });
                trust.logged_bad = None;
                Ok(pem)
            }
            (Err(why), Some(prev)) => {
                if trust.logged_bad != Some(digest) {
                    trust.logged_bad = Some(digest);
                    tracing::error!(event = "identity.ca_reload_failed", path = %path.display(), reason = %why, kept_certificates = prev.certificates, "gateway CA bundle {} {why}; keeping the previous bundle until it is fixed", path.display());
                }
                Ok(prev.pem)
            }
            (Err(why), None) => Err(ChannelError::CaBundle {
                path: path.display().to_string(),
                why,
            }),
        }
    }

    fn endpoint(&self) -> Result<Endpoint, ChannelError> {
        let bad = |why: String| ChannelError::Endpoint {
            url: crate::telemetry::redact_url(&self.url),
            why,
        };
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            // Heartbeats (parked: the gateway's on `Register`; bound: both ways on the
            // control stream) already notice a dead gateway within 3 intervals. The
            // ping is only for what carries none (a unary call, a session stream) and
            // for NATs: 30 s is far below their idle expiry, and a parked pod wakes for
            // it 2 (+2 acks) times a minute instead of 6 (issue 15).
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // Large windows: one session can stream at memory speed, while per-stream
            // flow control still isolates a slow consumer.
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(32 * 1024 * 1024));
        if self.url.starts_with("https://") {
            let ca_path = self
                .ca
                .as_ref()
                .ok_or_else(|| ChannelError::NoCa(crate::telemetry::redact_url(&self.url)))?;
            // `ca_certificate` alone: tonic adds no web PKI roots unless asked to.
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(self.current_bundle(ca_path)?));
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            match (&self.client_cert, &self.client_key) {
                (Some(cert), Some(key)) => tls = tls.identity(read_client_identity(cert, key)?),
                (Some(_), None) => {
                    return Err(ChannelError::ClientIdentityHalf {
                        given: "--client-cert",
                    })
                }
                (None, Some(_)) => {
                    return Err(ChannelError::ClientIdentityHalf {
                        given: "--client-key",
                    })
                }
                (None, None) => {}
            }
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        Ok(ep)
    }

    /// A lazily connecting channel; calls on it reconnect as needed.
    pub fn channel(&self) -> Result<Channel, ChannelError> {
        Ok(self.endpoint()?.connect_lazy())
    }

    pub fn client(&self) -> Result<GatewayClient<Channel>, ChannelError> {
        Ok(client(self.channel()?))
    }
}

/// The channel the identity exchange uses, rebuilt after a failed call: the old
/// connection may be half-open, and a rebuild picks up a rotated CA bundle.
#[derive(Debug, Clone)]
pub struct GatewayChannel {
    endpoint: GatewayEndpoint,
    current: Arc<Mutex<Channel>>,
}

impl GatewayChannel {
    /// Builds the first channel; fails on bad TLS material (a configuration error).
    pub fn new(endpoint: GatewayEndpoint) -> Result<Self, ChannelError> {
        let ch = endpoint.channel()?;
        Ok(GatewayChannel {
            endpoint,
            current: Arc::new(Mutex::new(ch)),
        })
    }

    pub fn get(&self) -> Channel {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn endpoint(&self) -> &GatewayEndpoint {
        &self.endpoint
    }

    /// Replaces the channel with a fresh one. If that cannot be built (the bundle was
    /// never good, which boot rules out), the current one is kept.
    pub fn rebuild(&self) {
        match self.endpoint.channel() {
            Ok(ch) => *self.current.lock().unwrap_or_else(|p| p.into_inner()) = ch,
            Err(e) => {
                tracing::error!(event = "relay.channel_failed", error = %e, "cannot rebuild the gateway connection; keeping the current one")
            }
        }
    }
}

/// A status with its whole cause chain: tonic says only "transport error"; the cause
/// (connection refused, unknown CA, certificate expired, name mismatch) is underneath.
pub fn describe_status(status: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

pub fn client(channel: Channel) -> GatewayClient<Channel> {
    GatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Wraps a message with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &SecretToken) -> Result<tonic::Request<T>, ChannelError> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", token.bearer()?);
    Ok(req)
}

#[cfg(all(test, feature = "reference-gateway"))]
mod tests {
    use super::*;
    use crate::gateway::pki::TestCa;

    fn endpoint(ca: &Path) -> GatewayEndpoint {
        GatewayEndpoint::new(
            "https://localhost:1",
            Some(ca.to_path_buf()),
            None,
            None,
            None,
        )
    }

    #[test]
    fn a_bad_new_bundle_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let (a, b) = (TestCa::new("a").unwrap(), TestCa::new("b").unwrap());
        std::fs::write(&path, a.cert_pem()).unwrap();
        let ep = endpoint(&path);
        assert_eq!(ep.current_bundle(&path).unwrap(), a.cert_pem().as_bytes());

        // Garbage, then a missing file: the old bundle stays trusted.
        std::fs::write(&path, "not a certificate").unwrap();
        assert_eq!(ep.current_bundle(&path).unwrap(), a.cert_pem().as_bytes());
        assert!(ep.check().is_ok());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            ep.clone().current_bundle(&path).unwrap(),
            a.cert_pem().as_bytes()
        );

        // A good new bundle (old + new CA) replaces it, for every clone.
        let both = format!("{}{}", a.cert_pem(), b.cert_pem());
        std::fs::write(&path, &both).unwrap();
        let clone = ep.clone();
        assert_eq!(clone.current_bundle(&path).unwrap(), both.as_bytes());
        assert_eq!(
            ep.trust.lock().unwrap().good.as_ref().unwrap().certificates,
            2
        );
    }

    #[test]
    fn a_bundle_that_was_never_good_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let err = endpoint(&path).check().unwrap_err().to_string();
        assert!(err.contains("ca.pem"), "{err}");
        std::fs::write(&path, "hello").unwrap();
        let err = endpoint(&path).check().unwrap_err().to_string();
        assert!(err.contains("no PEM certificates"), "{err}");
        let err = endpoint(&dir.path().join("missing.pem"))
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.pem") && err.contains("does not exist"),
            "{err}"
        );
        let fifo = dir.path().join("fifo.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = endpoint(&fifo).check().unwrap_err().to_string();
        assert!(err.contains("fifo.pem") && err.contains("FIFO"), "{err}");
    }

    #[test]
    fn client_identity_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("a").unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        let pair = ca.client_cert("sandbox").unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, &pair.cert_pem).unwrap();
        std::fs::write(&key, &pair.key_pem).unwrap();
        let mut ep = endpoint(&ca_path);
        ep.client_cert = Some(cert.clone());
        ep.client_key = Some(key.clone());
        assert!(ep.check().is_ok());
        std::fs::write(&key, "garbage").unwrap();
        let err = ep.check().unwrap_err().to_string();
        assert!(
            err.contains("k.pem") && err.contains("private key"),
            "{err}"
        );
        ep.client_key = None;
        assert!(matches!(
            ep.check(),
            Err(ChannelError::ClientIdentityHalf { .. })
        ));
    }
}
