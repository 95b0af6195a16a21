//! The connection to the gateway: TLS (trusting only the configured CA bundle), HTTP/2
//! keepalive, and bearer credentials on every call.

use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::SecretToken;
use crate::proto::gateway_client::GatewayClient;

/// Largest message either side may send; output frames are far smaller.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("gateway endpoint {url:?} is invalid: {why}")]
    Endpoint { url: String, why: String },
    #[error(
        "gateway CA bundle {path}: {why}; give a PEM file with the gateway's CA certificate(s)"
    )]
    CaBundle { path: String, why: String },
    #[error("client certificate/key {path}: {why}")]
    ClientIdentity { path: String, why: String },
    #[error("https gateway {0:?} needs --gateway-ca: the supervisor trusts only the configured CA bundle")]
    NoCa(String),
    #[error("token cannot be sent: {0}")]
    Token(#[from] crate::identity::TokenFormatError),
}

/// Everything needed to (re)build the channel. The CA bundle is re-read each time, so a
/// rotated bundle takes effect on the next reconnect.
#[derive(Debug, Clone)]
pub struct GatewayEndpoint {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

fn read_pem_certs(path: &PathBuf) -> Result<Vec<u8>, ChannelError> {
    let err = |why: String| ChannelError::CaBundle {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot be read ({e})")))?;
    let mut reader = &pem[..];
    let mut count = 0;
    // Parse each certificate as a trust anchor now: a garbage bundle must fail here,
    // loudly, not as a vague handshake error later.
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|e| err(format!("is not valid PEM ({e})")))?;
        store
            .add(cert)
            .map_err(|e| err(format!("holds a certificate that does not parse ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(err("contains no PEM certificates".into()));
    }
    Ok(pem)
}

impl GatewayEndpoint {
    /// Validates the TLS material without connecting (used at boot and on reload).
    pub fn check(&self) -> Result<(), ChannelError> {
        self.endpoint().map(drop)
    }

    fn endpoint(&self) -> Result<Endpoint, ChannelError> {
        let bad = |why: String| ChannelError::Endpoint {
            url: self.url.clone(),
            why,
        };
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| bad(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            // Large windows: one session can stream at memory speed, while per-stream
            // flow control still isolates a slow consumer.
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(32 * 1024 * 1024));
        if self.url.starts_with("https://") {
            let ca_path = self
                .ca
                .as_ref()
                .ok_or_else(|| ChannelError::NoCa(self.url.clone()))?;
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read_pem_certs(ca_path)?));
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(|e| ChannelError::ClientIdentity {
                        path: p.display().to_string(),
                        why: e.to_string(),
                    })
                };
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
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
