//! The sandbox token: in memory only, shared by every call the relay makes, replaced on
//! refresh without reconnecting.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::SecretToken;

#[derive(Clone)]
pub struct SandboxCredentials {
    inner: Arc<RwLock<Current>>,
}

struct Current {
    token: SecretToken,
    /// Monotonic expiry, computed once on receipt: wall-clock jumps do not matter.
    expires_at: Instant,
    lifetime: Duration,
}

/// Converts the gateway's wall-clock expiry into a lifetime from now.
pub fn lifetime_from(expires_at_ms: i64) -> Duration {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    Duration::from_millis(expires_at_ms.saturating_sub(now_ms).max(0) as u64)
}

impl SandboxCredentials {
    pub fn new(token: SecretToken, expires_at_ms: i64) -> Self {
        let lifetime = lifetime_from(expires_at_ms);
        SandboxCredentials {
            inner: Arc::new(RwLock::new(Current {
                token,
                expires_at: Instant::now() + lifetime,
                lifetime,
            })),
        }
    }

    pub fn token(&self) -> SecretToken {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .token
            .clone()
    }

    pub fn replace(&self, token: SecretToken, expires_at_ms: i64) {
        let lifetime = lifetime_from(expires_at_ms);
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Current {
            token,
            expires_at: Instant::now() + lifetime,
            lifetime,
        };
    }

    /// When to refresh: at about 80 % of the lifetime, minus up to 10 % jitter so a
    /// fleet bound at the same moment does not refresh in lockstep.
    pub fn refresh_due(&self) -> Instant {
        let c = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let jitter = c.lifetime.mul_f64(rand::random::<f64>() * 0.1);
        let issued = c
            .expires_at
            .checked_sub(c.lifetime)
            .unwrap_or_else(Instant::now);
        issued + c.lifetime.mul_f64(0.8) - jitter
    }

    pub fn expires_at(&self) -> Instant {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .expires_at
    }
}

/// Exponential backoff with full jitter (≈100 ms base, 10 s cap), reset on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempt: 0,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The same schedule with a lower ceiling.
    pub fn with_cap(cap: Duration) -> Self {
        Backoff {
            cap,
            ..Backoff::default()
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
        assert_eq!(b.attempts(), 30);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn refresh_is_due_before_expiry() {
        let in_10s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 10_000;
        let c = SandboxCredentials::new(SecretToken::new("t"), in_10s);
        let due = c.refresh_due().saturating_duration_since(Instant::now());
        assert!(
            due >= Duration::from_millis(6_800) && due <= Duration::from_millis(8_100),
            "{due:?}"
        );
    }
}
