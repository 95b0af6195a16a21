//! Metrics of port forwards (`src/ports`): bytes by direction, forwards by outcome,
//! forwards open now.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardOutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Default)]
pub struct ForwardMetrics {
    bytes_total: Family<DirectionLabel, Counter>,
    total: Family<ForwardOutcomeLabel, Counter>,
    pub active: Gauge,
}

impl ForwardMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "forward_bytes",
            "Port-forward bytes relayed, by direction (to_sandbox: written to the server in the sandbox; from_sandbox: read from it)",
            self.bytes_total.clone(),
        );
        registry.register("forwards", "Port forwards by outcome", self.total.clone());
        registry.register(
            "forwards_active",
            "Port forwards open now",
            self.active.clone(),
        );
    }

    pub fn to_sandbox(&self, n: usize) {
        self.bytes_total
            .get_or_create(&DirectionLabel {
                direction: "to_sandbox",
            })
            .inc_by(n as u64);
    }

    pub fn from_sandbox(&self, n: usize) {
        self.bytes_total
            .get_or_create(&DirectionLabel {
                direction: "from_sandbox",
            })
            .inc_by(n as u64);
    }

    pub fn ended(&self, outcome: &'static str) {
        self.total
            .get_or_create(&ForwardOutcomeLabel { outcome })
            .inc();
    }
}
