//! TLS material for tests and the `local` command: a throwaway CA and certificates it
//! signs, as PEM, plus the tonic server configuration built from them.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether a certificate is valid now or expired (for tests of the client's checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid from an hour ago for 30 days.
    Current,
    /// Expired a day ago.
    Expired,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair").finish_non_exhaustive()
    }
}

/// A throwaway certificate authority.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (from, to) = match validity {
        Validity::Current => (now - 3600, now + 30 * 86_400),
        Validity::Expired => (now - 30 * 86_400, now - 86_400),
    };
    // rcgen's date type supports adding a std Duration; no direct `time` dependency.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(from);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(to);
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::Current);
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(TestCa {
            params,
            key,
            cert_pem,
        })
    }

    /// The CA certificate clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP literals).
    pub fn server_cert(&self, names: &[&str], validity: Validity) -> Result<CertPair, PkiError> {
        self.leaf(names, validity, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (for optional mutual TLS).
    pub fn client_cert(&self, common_name: &str) -> Result<CertPair, PkiError> {
        self.leaf(
            &[common_name],
            Validity::Current,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(
        &self,
        names: &[&str],
        validity: Validity,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertPair, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Server-side TLS for the reference gateway.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub server: CertPair,
    /// When set, client certificates signed by this CA are accepted (optional mTLS).
    pub client_ca_pem: Option<String>,
}

impl ServerTls {
    pub fn to_tonic(&self) -> tonic::transport::ServerTlsConfig {
        let identity =
            tonic::transport::Identity::from_pem(&self.server.cert_pem, &self.server.key_pem);
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_pem {
            cfg = cfg
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        cfg
    }
}

/// The files a `local` run or an integration test hands to the supervisor and gateway.
#[derive(Clone, Debug)]
pub struct PkiFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A CA plus a server certificate for `names`, written to `dir` as `ca.pem`,
/// `server.pem`, `server-key.pem` (key 0600).
pub fn write_pki(
    dir: &Path,
    names: &[&str],
    validity: Validity,
) -> Result<(TestCa, CertPair, PkiFiles), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new("sandbox-supervisor test CA")?;
    let server = ca.server_cert(names, validity)?;
    let files = PkiFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::write(&files.ca_cert, ca.cert_pem()).map_err(io(&files.ca_cert))?;
    std::fs::write(&files.server_cert, &server.cert_pem).map_err(io(&files.server_cert))?;
    std::fs::write(&files.server_key, &server.key_pem).map_err(io(&files.server_key))?;
    std::fs::set_permissions(&files.server_key, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&files.server_key))?;
    Ok((ca, server, files))
}
