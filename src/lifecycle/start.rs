//! Before the state machine: PID-1 duties started, the platform probed and logged,
//! probes listening; and where the seed comes from.

use std::sync::Arc;

use super::{exit, run};
use crate::config::RunConfig;
use crate::pid1;
use crate::telemetry::{self, Telemetry};
use crate::workspace::{self, SeedSource};

/// The `run` command: validated config in, exit code out.
pub async fn run_command(cfg: RunConfig, pid1: pid1::Pid1) -> i32 {
    let telemetry = Telemetry::new();
    let mode = pid1.mode();
    let (reaper, signals) = match pid1.start() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(event = "pid1.failed", error = %e, "cannot start the reaper");
            return exit::FATAL;
        }
    };
    let caps = crate::platform::get();
    crate::platform::log(caps);
    for c in &caps.features {
        telemetry.metrics.set_capability(c.name, c.available);
    }
    if mode == pid1::Mode::Subreaper {
        tracing::info!(
            event = "pid1.subreaper",
            pid = std::process::id(),
            "not PID 1: running as a child subreaper; only our descendants are workload"
        );
    }
    if cfg.gateway.starts_with("http://") {
        tracing::warn!(event = "relay.plaintext", gateway = %telemetry::redact_url(&cfg.gateway), "gateway connection is NOT encrypted (--allow-plaintext)");
    }
    if let Some(addr) = cfg.listen_probes.0 {
        let t = telemetry.clone();
        let r = reaper.clone();
        let refresh = Arc::new(move || t.metrics.sync_reaped(r.reaped_total()));
        match telemetry::serve(addr, telemetry.clone(), refresh).await {
            Ok(bound) => {
                tracing::info!(event = "telemetry.listening", addr = %bound, "probes and metrics listening")
            }
            Err(e) => {
                tracing::error!(event = "config.invalid", option = "listen-probes", addr = %addr, error = %e, "cannot listen for probes on {addr}: {e}");
                return exit::CONFIG;
            }
        }
    }
    run(cfg, reaper, signals, telemetry).await
}

pub(super) fn seed_source(cfg: &RunConfig) -> SeedSource {
    if let Some(url) = &cfg.seed_url {
        SeedSource::Url {
            url: url.clone(),
            sha256: cfg.seed_sha256.clone().unwrap_or_default(),
            ca_file: cfg.seed_ca.clone(),
            timeouts: workspace::SeedTimeouts {
                connect: cfg.seed_connect_timeout,
                idle: cfg.seed_idle_timeout,
                total: cfg.seed_timeout,
            },
        }
    } else if let Some(a) = &cfg.seed_archive {
        SeedSource::Archive(a.clone())
    } else if cfg.seed_dir.exists() {
        SeedSource::Directory(cfg.seed_dir.clone())
    } else {
        tracing::info!(event = "seed.none", dir = %cfg.seed_dir.display(), "no seed directory; starting with an empty workspace");
        SeedSource::None
    }
}
