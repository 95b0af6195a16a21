//! What operators see: structured logs with stable event names, `/livez`, `/readyz`
//! and `/metrics` (Prometheus text).

pub mod forwards;
pub mod logs;
mod metrics;
mod redact;
mod server;

pub use metrics::{Metrics, SessionOutcome};
pub use redact::redact_url;
pub use server::{probe, serve};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Health and metrics shared by every module; one per process.
pub struct Telemetry {
    pub metrics: Metrics,
    ready: AtomicBool,
    state: Mutex<&'static str>,
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        Arc::new(Telemetry {
            metrics: Metrics::new(),
            ready: AtomicBool::new(false),
            state: Mutex::new("boot"),
        })
    }

    /// Ready = seeded and parked at the gateway, or bound. Never while seeding, refused
    /// or releasing.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_state(&self, state: &'static str) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.metrics.set_state(state);
    }

    pub fn state(&self) -> &'static str {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
