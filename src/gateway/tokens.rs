//! Token checks on the gateway side: projected ServiceAccount tokens validated the way a
//! TokenReview would, and the gateway's own short-lived sandbox tokens. Errors say which
//! check failed and by how much; they never carry token material.

use super::issuer::{generate_es256, unix_now_ms, IssuerError, ProjectedClaims};
use crate::identity::SecretToken;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no bearer token in the `authorization` metadata; send `authorization: Bearer <token>`"
    )]
    Missing,
    #[error("token is not a well-formed JWT ({0}); check the token file is the projected token")]
    Malformed(String),
    #[error("token algorithm is {got}, want ES256")]
    Algorithm { got: String },
    #[error("signature does not verify against the issuer key ({keys} key(s) configured); the token was signed by another issuer or altered")]
    Signature { keys: usize },
    #[error(
        "audience is {got:?}, want {want:?}; set the projected token volume's audience to {want:?}"
    )]
    Audience { got: Vec<String>, want: String },
    #[error("expired {0} s ago; the kubelet should have rotated it, re-read the token file")]
    Expired(i64),
    #[error("not valid for another {0} s (nbf in the future); check the clocks")]
    NotYetValid(i64),
    #[error("token has no kubernetes.io pod claim (name and uid); only pod-bound projected tokens are accepted")]
    NoPodClaim,
    #[error("token is missing claim {0}")]
    MissingClaim(&'static str),
}

/// The pod a valid projected token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub service_account: String,
    /// Unix seconds at which the presented token expires.
    pub token_exp: i64,
}

/// Maps jsonwebtoken failures to messages that cannot echo token content (serde errors
/// may quote claim values, so their text is dropped).
fn map_jwt_error(e: &jsonwebtoken::errors::Error, keys: usize) -> TokenError {
    match e.kind() {
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => TokenError::Signature { keys },
        ErrorKind::InvalidAlgorithm => TokenError::Algorithm {
            got: "not ES256".into(),
        },
        ErrorKind::Base64(_) => TokenError::Malformed("a segment is not base64url".into()),
        ErrorKind::Json(_) => TokenError::Malformed("claims are not the expected JSON".into()),
        ErrorKind::Utf8(_) => TokenError::Malformed("a segment is not UTF-8".into()),
        ErrorKind::InvalidToken => {
            TokenError::Malformed("expected three dot-separated parts".into())
        }
        _ => TokenError::Malformed("undecodable".into()),
    }
}

/// Verifies the ES256 signature against any of `keys` and decodes the claims.
fn verify<T: serde::de::DeserializeOwned>(
    token: &SecretToken,
    keys: &[DecodingKey],
) -> Result<T, TokenError> {
    let header =
        jsonwebtoken::decode_header(token.expose()).map_err(|e| map_jwt_error(&e, keys.len()))?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::Algorithm {
            got: format!("{:?}", header.alg),
        });
    }
    let mut v = Validation::new(Algorithm::ES256);
    // Time and audience are checked by hand below so the errors can be precise.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let mut last = TokenError::Signature { keys: keys.len() };
    for key in keys {
        match jsonwebtoken::decode::<T>(token.expose(), key, &v) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                last = map_jwt_error(&e, keys.len());
                if !matches!(last, TokenError::Signature { .. }) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn check_times(exp: i64, nbf: Option<i64>, leeway: i64) -> Result<(), TokenError> {
    // Milliseconds, so a token is dead at exactly `exp`, not up to a second later.
    let now_ms = unix_now_ms();
    if now_ms >= (exp + leeway) * 1000 {
        return Err(TokenError::Expired((now_ms - exp * 1000) / 1000));
    }
    if let Some(nbf) = nbf {
        if nbf * 1000 > now_ms + leeway * 1000 {
            return Err(TokenError::NotYetValid((nbf * 1000 - now_ms) / 1000));
        }
    }
    Ok(())
}

/// Validates projected tokens against the issuer's public key(s) and the audience.
pub struct ProjectedValidator {
    keys: Vec<DecodingKey>,
    audience: String,
    leeway: Duration,
}

impl ProjectedValidator {
    /// `issuer_keys`: SPKI PEM public keys (several during an issuer key rotation).
    pub fn new(
        issuer_keys: &[String],
        audience: &str,
        leeway: Duration,
    ) -> Result<Self, IssuerError> {
        let keys = issuer_keys
            .iter()
            .map(|pem| {
                DecodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|e| IssuerError::KeyLoad(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProjectedValidator {
            keys,
            audience: audience.to_owned(),
            leeway,
        })
    }

    pub fn validate(&self, token: &SecretToken) -> Result<PodIdentity, TokenError> {
        let claims: ProjectedClaims = verify(token, &self.keys)?;
        if !claims.aud.iter().any(|a| a == &self.audience) {
            return Err(TokenError::Audience {
                got: claims.aud,
                want: self.audience.clone(),
            });
        }
        check_times(claims.exp, Some(claims.nbf), self.leeway.as_secs() as i64)?;
        let k8s = claims.kubernetes_io.ok_or(TokenError::NoPodClaim)?;
        let pod = k8s.pod.ok_or(TokenError::NoPodClaim)?;
        if pod.name.is_empty() || pod.uid.is_empty() {
            return Err(TokenError::NoPodClaim);
        }
        if k8s.namespace.is_empty() {
            return Err(TokenError::MissingClaim("kubernetes.io.namespace"));
        }
        Ok(PodIdentity {
            namespace: k8s.namespace,
            pod_name: pod.name,
            pod_uid: pod.uid,
            service_account: k8s.serviceaccount.name,
            token_exp: claims.exp,
        })
    }
}

/// The claims of a sandbox token minted by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxClaims {
    pub sandbox_id: String,
    pub claim_uid: String,
    pub pod_uid: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
}

/// The gateway's own ES256 key for sandbox tokens.
pub struct SandboxTokens {
    encoding: EncodingKey,
    decoding: Vec<DecodingKey>,
    ttl: Duration,
    /// The claims of every unexpired token minted here, by the token's SHA-256. Every
    /// Connect and Session stream presents a token; an ES256 verification each time
    /// was a visible share of an exec round trip, and the bytes this gateway signed
    /// need no signature check. Anything else is verified as before.
    minted: Mutex<HashMap<[u8; 32], SandboxClaims>>,
}

impl SandboxTokens {
    pub fn generate(ttl: Duration) -> Result<Self, IssuerError> {
        let (private_pem, public_pem) = generate_es256()?;
        Ok(SandboxTokens {
            encoding: EncodingKey::from_ec_pem(private_pem.as_bytes())
                .map_err(|e| IssuerError::KeyLoad(e.to_string()))?,
            decoding: vec![DecodingKey::from_ec_pem(public_pem.as_bytes())
                .map_err(|e| IssuerError::KeyLoad(e.to_string()))?],
            ttl,
            minted: Mutex::new(HashMap::new()),
        })
    }

    /// A fresh token and its expiry (Unix ms). `exp` is whole seconds, and the expiry
    /// reported to the supervisor is exactly `exp`, so both sides agree.
    pub fn mint(
        &self,
        sandbox_id: &str,
        claim_uid: &str,
        pod_uid: &str,
    ) -> Result<(SecretToken, i64), IssuerError> {
        let now_ms = unix_now_ms();
        let exp = (now_ms + self.ttl.as_millis() as i64) / 1000;
        let jti: [u8; 12] = rand::random();
        let claims = SandboxClaims {
            sandbox_id: sandbox_id.to_owned(),
            claim_uid: claim_uid.to_owned(),
            pod_uid: pod_uid.to_owned(),
            exp,
            iat: now_ms / 1000,
            jti: hex::encode(jti),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .map_err(|e| IssuerError::Sign(e.to_string()))?;
        let token = SecretToken::new(token);
        let mut minted = self.minted();
        minted.retain(|_, c| c.exp * 1000 > now_ms);
        minted.insert(digest(&token), claims);
        Ok((token, exp * 1000))
    }

    fn minted(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], SandboxClaims>> {
        self.minted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signature and expiry (no leeway: the gateway is the only clock involved).
    pub fn validate(&self, token: &SecretToken) -> Result<SandboxClaims, TokenError> {
        let known = self.minted().get(&digest(token)).cloned();
        let claims = match known {
            Some(claims) => claims,
            None => verify(token, &self.decoding)?,
        };
        check_times(claims.exp, None, 0)?;
        Ok(claims)
    }
}

fn digest(token: &SecretToken) -> [u8; 32] {
    Sha256::digest(token.expose().as_bytes()).into()
}
