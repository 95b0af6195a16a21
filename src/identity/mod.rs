//! Identity: the projected ServiceAccount token, the exchange for a sandbox token, its
//! refresh, and fingerprints for logs.

mod token;

pub use token::{bearer_from_metadata, fingerprint, SecretToken, TokenFormatError};
