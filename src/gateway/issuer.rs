//! A local stand-in for the Kubernetes ServiceAccount token issuer: an ES256 key pair that
//! mints projected tokens shaped like the kubelet's, and writers that lay files out the
//! way the kubelet does (`..data` symlink swap), so the supervisor's reader is exercised
//! against the real on-disk shape, including rotation.

use crate::identity::SecretToken;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("generating an ES256 key pair failed: {0}; the ring backend of rcgen is required")]
    KeyGeneration(String),
    #[error("loading the ES256 key into jsonwebtoken failed: {0}")]
    KeyLoad(String),
    #[error("signing the token failed: {0}")]
    Sign(String),
    #[error("writing {path}: {source}; check that the directory exists and is writable")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} has no parent directory or file name; pass a path like <dir>/annotations")]
    BadPath { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IssuerError + '_ {
    move |source| IssuerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `metadata.name` + `metadata.uid` of an object named in the token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` private claim of a projected token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    pub serviceaccount: ObjectRef,
}

/// The claims of a projected ServiceAccount token. Every field is public so adversarial
/// tests can bend any of them (wrong audience, expired, another pod, no pod claim).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectedClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    #[serde(
        rename = "kubernetes.io",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes_io: Option<KubernetesClaims>,
}

/// The pod a token is minted for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub service_account: String,
    pub service_account_uid: String,
}

impl PodSpec {
    /// A pod in namespace `sandboxes` with service account `sandbox` and random UIDs.
    pub fn new(pod_name: &str) -> Self {
        PodSpec {
            namespace: "sandboxes".into(),
            pod_name: pod_name.into(),
            pod_uid: random_uid(),
            service_account: "sandbox".into(),
            service_account_uid: random_uid(),
        }
    }
}

/// A UUID-shaped random identifier (like `metadata.uid`).
pub fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An ES256 key pair acting as the cluster's ServiceAccount issuer.
pub struct LocalIssuer {
    issuer_url: String,
    encoding: EncodingKey,
    public_pem: String,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("issuer_url", &self.issuer_url)
            .finish_non_exhaustive()
    }
}

/// A fresh ES256 key pair: (private PKCS#8 PEM, public SPKI PEM).
pub(crate) fn generate_es256() -> Result<(String, String), IssuerError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssuerError::KeyGeneration(e.to_string()))?;
    Ok((kp.serialize_pem(), kp.public_key_pem()))
}

impl LocalIssuer {
    /// A new key pair; `issuer_url` goes into the `iss` claim.
    pub fn generate(issuer_url: &str) -> Result<Self, IssuerError> {
        let (private_pem, public_pem) = generate_es256()?;
        let encoding = EncodingKey::from_ec_pem(private_pem.as_bytes())
            .map_err(|e| IssuerError::KeyLoad(e.to_string()))?;
        Ok(LocalIssuer {
            issuer_url: issuer_url.to_owned(),
            encoding,
            public_pem,
        })
    }

    /// The public key (SPKI PEM) a gateway is configured with.
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    pub fn decoding_key(&self) -> Result<DecodingKey, IssuerError> {
        DecodingKey::from_ec_pem(self.public_pem.as_bytes())
            .map_err(|e| IssuerError::KeyLoad(e.to_string()))
    }

    /// The claims the kubelet would request for `pod`: valid now, for `ttl`.
    pub fn claims_for(&self, pod: &PodSpec, audience: &str, ttl: Duration) -> ProjectedClaims {
        let now = unix_now();
        ProjectedClaims {
            iss: self.issuer_url.clone(),
            sub: format!(
                "system:serviceaccount:{}:{}",
                pod.namespace, pod.service_account
            ),
            aud: vec![audience.to_owned()],
            exp: now + ttl.as_secs() as i64,
            iat: now,
            nbf: now,
            kubernetes_io: Some(KubernetesClaims {
                namespace: pod.namespace.clone(),
                pod: Some(ObjectRef {
                    name: pod.pod_name.clone(),
                    uid: pod.pod_uid.clone(),
                }),
                serviceaccount: ObjectRef {
                    name: pod.service_account.clone(),
                    uid: pod.service_account_uid.clone(),
                },
            }),
        }
    }

    /// Signs arbitrary claims.
    pub fn mint(&self, claims: &ProjectedClaims) -> Result<SecretToken, IssuerError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(crate::identity::fingerprint(self.public_pem.as_bytes()));
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map(SecretToken::new)
            .map_err(|e| IssuerError::Sign(e.to_string()))
    }

    /// A valid token for `pod` and `audience`, living `ttl`.
    pub fn mint_for(
        &self,
        pod: &PodSpec,
        audience: &str,
        ttl: Duration,
    ) -> Result<SecretToken, IssuerError> {
        self.mint(&self.claims_for(pod, audience, ttl))
    }

    /// Re-mints a token for `pod` every `every` and rewrites it into `dir` like the
    /// kubelet's rotation. The first token is written before this returns.
    pub fn spawn_rotation(
        self: &Arc<Self>,
        dir: PathBuf,
        pod: PodSpec,
        audience: String,
        ttl: Duration,
        every: Duration,
    ) -> Result<RotationHandle, IssuerError> {
        write_projected(&dir, &self.mint_for(&pod, &audience, ttl)?)?;
        let rotations = Arc::new(AtomicU64::new(1));
        let issuer = Arc::clone(self);
        let counter = Arc::clone(&rotations);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let written = issuer
                    .mint_for(&pod, &audience, ttl)
                    .and_then(|t| write_projected(&dir, &t));
                match written {
                    Ok(()) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(event = "gateway.issuer.rotation_failed", error = %e, "projected token rotation failed");
                    }
                }
            }
        });
        Ok(RotationHandle { task, rotations })
    }
}

/// Stops the rotation when stopped or dropped.
pub struct RotationHandle {
    task: tokio::task::JoinHandle<()>,
    rotations: Arc<AtomicU64>,
}

impl RotationHandle {
    /// How many tokens were written so far (including the first).
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    pub fn stop(self) {}
}

impl Drop for RotationHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A copy of `token` whose signature no longer matches (one signature byte flipped).
pub fn tamper_signature(token: &SecretToken) -> SecretToken {
    let raw = token.expose();
    let Some(dot) = raw.rfind('.') else {
        return SecretToken::new(format!("{raw}x"));
    };
    let (head, sig) = raw.split_at(dot + 1);
    let mut sig: Vec<u8> = sig.bytes().collect();
    // Flip a character in the middle: stays valid base64url but decodes to other bytes.
    let i = sig.len() / 2;
    if let Some(c) = sig.get_mut(i) {
        *c = if *c == b'A' { b'B' } else { b'A' };
    }
    SecretToken::new(format!("{head}{}", String::from_utf8_lossy(&sig)))
}

/// Writes the projected token like the kubelet: `dir/..<timestamp>/token` (0600), the
/// `..data` symlink swapped atomically to it, and `dir/token -> ..data/token`. The
/// generation before the current one is kept until the next write.
pub fn write_projected(dir: &Path, token: &SecretToken) -> Result<(), IssuerError> {
    atomic_write_dir(dir, &[("token", token.expose().as_bytes(), 0o600)])
}

/// Writes a downward-API annotations file at `path` (`key="value"` lines, sorted, values
/// quoted like Go's `%q` as the kubelet does), swapped in through `..data` like
/// `write_projected`. The directory of `path` must be dedicated to this file, as a
/// downward-API volume is.
pub fn write_annotations(path: &Path, map: &BTreeMap<String, String>) -> Result<(), IssuerError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(IssuerError::BadPath {
            path: path.to_path_buf(),
        });
    };
    let body = map
        .iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n");
    atomic_write_dir(dir, &[(name, body.as_bytes(), 0o644)])
}

/// Go's `strconv.Quote`, which the kubelet uses for annotation values.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32))
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32))
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The kubelet's AtomicWriter, reduced to what matters to a reader: the visible names
/// are symlinks through `..data`, and `..data` moves from one complete directory to the
/// next with a single rename, so a reader never sees a missing or half-written file.
fn atomic_write_dir(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), IssuerError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let data_link = dir.join("..data");
    let old_target = std::fs::read_link(&data_link).ok();

    let stamp = timestamp_dir_name();
    let ts_dir = dir.join(&stamp);
    std::fs::create_dir(&ts_dir).map_err(io_err(&ts_dir))?;
    std::fs::set_permissions(&ts_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(&ts_dir))?;
    for (name, bytes, mode) in files {
        let p = ts_dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(&p)
            .map_err(io_err(&p))?;
        f.write_all(bytes).map_err(io_err(&p))?;
        f.sync_all().map_err(io_err(&p))?;
    }

    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link).map_err(io_err(&tmp_link))?;
    std::fs::rename(&tmp_link, &data_link).map_err(io_err(&data_link))?;

    for (name, _, _) in files {
        let visible = dir.join(name);
        if std::fs::symlink_metadata(&visible).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &visible)
                .map_err(io_err(&visible))?;
        }
    }
    // Remove older generations but keep the one just replaced: a reader that resolved
    // `..data` a moment before the swap still finds its file. (The kubelet removes it at
    // once, so a real reader can see a brief ENOENT and should retry once.)
    let keep = old_target.map(|p| p.to_string_lossy().into_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let generation = name.starts_with("..") && name != "..data" && name != "..data_tmp";
            if generation && name != stamp && Some(&name) != keep.as_ref() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// `..2026_01_31_12_00_00.<nanos><n>`, the kubelet's naming, unique per call.
fn timestamp_dir_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "..{y:04}_{m:02}_{d:02}_{:02}_{:02}_{:02}.{:09}{}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        now.subsec_nanos(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
