//! Identity: the projected ServiceAccount token, the exchange for a sandbox token, its
//! refresh, and fingerprints for logs.

mod credentials;
mod exchange;
mod hint;
mod hint_watch;
mod projected;
mod token;

pub use credentials::{lifetime_from, Backoff, SandboxCredentials};
pub use exchange::{check_activation, ClaimOutcome, Exchange, PodFacts};
pub use hint::read_hint;
pub use hint_watch::{HintWatch, WatchMode, HINT_FALLBACK_POLL, HINT_FAST_POLL};
pub use projected::{ProjectedToken, ProjectedTokenError, MAX_TOKEN_BYTES};
pub use token::{bearer_from_metadata, fingerprint, SecretToken, TokenFormatError};
