//! Prometheus metrics (prometheus-client; names follow Prometheus conventions: base
//! units, `_seconds`, `_total`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

// ── file streams (issue #14) ──
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileOpLabel {
    pub op: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapabilityLabel {
    pub capability: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// How a session ended, for `sessions_total{outcome}`.
#[derive(Debug, Clone, Copy)]
pub enum SessionOutcome {
    Exited,
    Signaled,
    TimedOut,
    Failed,
}

impl SessionOutcome {
    fn as_str(self) -> &'static str {
        match self {
            SessionOutcome::Exited => "exited",
            SessionOutcome::Signaled => "signaled",
            SessionOutcome::TimedOut => "timed_out",
            SessionOutcome::Failed => "failed",
        }
    }
}

pub const STATES: [&str; 8] = [
    "boot",
    "seeding",
    "warm",
    "binding",
    "bound",
    "releasing",
    "released",
    "refused",
];

pub struct Metrics {
    registry: Registry,
    state: Family<StateLabel, Gauge>,
    pub seed_duration_seconds: Gauge<f64, AtomicU64>,
    pub bind_duration_seconds: Histogram,
    pub wipe_duration_seconds: Gauge<f64, AtomicU64>,
    pub sessions_active: Gauge,
    sessions_total: Family<OutcomeLabel, Counter>,
    output_bytes_total: Family<StreamLabel, Counter>,
    pub relay_reconnects_total: Counter,
    pub reaped_processes_total: Counter,
    token_refreshes_total: Family<ResultLabel, Counter>,
    pub register_attempts_total: Counter,
    platform_capability: Family<CapabilityLabel, Gauge>,
    file_bytes_total: Family<DirectionLabel, Counter>,
    file_operations_total: Family<FileOpLabel, Counter>,
    /// Port forwards (src/ports).
    pub forwards: super::forwards::ForwardMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sandbox_supervisor");
        let m = Metrics {
            state: Family::default(),
            seed_duration_seconds: Gauge::default(),
            bind_duration_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
            wipe_duration_seconds: Gauge::default(),
            sessions_active: Gauge::default(),
            sessions_total: Family::default(),
            output_bytes_total: Family::default(),
            relay_reconnects_total: Counter::default(),
            reaped_processes_total: Counter::default(),
            token_refreshes_total: Family::default(),
            register_attempts_total: Counter::default(),
            platform_capability: Family::default(),
            file_bytes_total: Family::default(),
            file_operations_total: Family::default(),
            forwards: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "state",
            "Lifecycle state (1 for the current state)",
            m.state.clone(),
        );
        registry.register(
            "seed_duration_seconds",
            "Time the workspace seed took",
            m.seed_duration_seconds.clone(),
        );
        registry.register(
            "bind_duration_seconds",
            "Activation received to relay accepted",
            m.bind_duration_seconds.clone(),
        );
        registry.register(
            "wipe_duration_seconds",
            "Time the release wipe took",
            m.wipe_duration_seconds.clone(),
        );
        registry.register(
            "sessions_active",
            "Exec sessions currently running",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions",
            "Exec sessions by outcome",
            m.sessions_total.clone(),
        );
        registry.register(
            "output_bytes",
            "Session output bytes read from processes, by stream",
            m.output_bytes_total.clone(),
        );
        registry.register(
            "relay_reconnects",
            "Relay reconnections after a drop",
            m.relay_reconnects_total.clone(),
        );
        registry.register(
            "reaped_processes",
            "Processes reaped (children and orphans)",
            m.reaped_processes_total.clone(),
        );
        registry.register(
            "token_refreshes",
            "Sandbox token refreshes by result",
            m.token_refreshes_total.clone(),
        );
        registry.register(
            "register_attempts",
            "Register calls made to the gateway",
            m.register_attempts_total.clone(),
        );
        registry.register(
            "platform_capability",
            "Kernel features probed at boot (1 available, 0 missing: a fallback is taken)",
            m.platform_capability.clone(),
        );
        registry.register(
            "file_bytes",
            "File content bytes moved by file streams (up: into the sandbox, down: out of it)",
            m.file_bytes_total.clone(),
        );
        registry.register(
            "file_operations",
            "File operations by op and outcome",
            m.file_operations_total.clone(),
        );
        m.forwards.register(&mut registry);
        for s in STATES {
            m.state
                .get_or_create(&StateLabel { state: s.into() })
                .set(0);
        }
        Metrics { registry, ..m }
    }

    pub fn set_state(&self, state: &str) {
        for s in STATES {
            self.state
                .get_or_create(&StateLabel { state: s.into() })
                .set(i64::from(s == state));
        }
    }

    pub fn set_capability(&self, name: &str, available: bool) {
        self.platform_capability
            .get_or_create(&CapabilityLabel {
                capability: name.into(),
            })
            .set(i64::from(available));
    }

    pub fn session_ended(&self, outcome: SessionOutcome) {
        self.sessions_total
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().into(),
            })
            .inc();
    }

    pub fn file_bytes(&self, direction: &'static str, n: u64) {
        self.file_bytes_total
            .get_or_create(&DirectionLabel {
                direction: direction.into(),
            })
            .inc_by(n);
    }

    pub fn file_operation(&self, op: &'static str, outcome: &'static str) {
        self.file_operations_total
            .get_or_create(&FileOpLabel {
                op: op.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn output_bytes(&self, stream: &'static str, n: u64) {
        self.output_bytes_total
            .get_or_create(&StreamLabel {
                stream: stream.into(),
            })
            .inc_by(n);
    }

    pub fn token_refresh(&self, result: &'static str) {
        self.token_refreshes_total
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub fn observe_bind(&self, d: Duration) {
        self.bind_duration_seconds.observe(d.as_secs_f64());
    }

    /// Brings counters fed from elsewhere up to date (called before each scrape).
    pub fn sync_reaped(&self, total: u64) {
        let now = self.reaped_processes_total.get();
        if total > now {
            self.reaped_processes_total.inc_by(total - now);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
