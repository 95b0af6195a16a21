//! Retiring a tenant's files, on every path that ends a binding (release, a SIGTERM
//! while resuming, a restart that finds the claim gone): tombstone, wipe, tombstone,
//! and the report of it. The order and its fallbacks are the lifecycle's; the wipe
//! itself is `workspace`'s.

use std::sync::Arc;

use super::non_empty;
use crate::proto;
use crate::telemetry::Telemetry;
use crate::workspace::{TombstonePhase, Volume};

/// Release without a workload (a restart after a crash): `released` tombstone, wipe,
/// `wiped` tombstone. Failures are logged; returns whether the workspace was wiped.
pub(super) async fn retire(volume: &Arc<Volume>, telemetry: &Telemetry, pod_uid: &str) -> bool {
    tombstone_and_wipe(volume, telemetry, non_empty(pod_uid))
        .await
        .error
        .is_empty()
}

/// The end of a tenant's files, on every path that retires them: the `released`
/// tombstone, the wipe, the `wiped` tombstone. The tombstone normally goes first (the
/// workspace reserves room for it; see `Volume::write_tombstone`). If it still cannot be
/// written the wipe goes ahead anyway, with the binding record as the fence (a restart
/// may only resume that same claim, never take a second one), and the tombstone is
/// written once the wipe has made room. Any failure is in `report.error`.
pub(super) async fn tombstone_and_wipe(
    volume: &Arc<Volume>,
    telemetry: &Telemetry,
    pod_uid: Option<&str>,
) -> proto::ReleaseReport {
    let fenced = match volume.write_tombstone(TombstonePhase::Released, pod_uid) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(event = "release.tombstone_failed", error = %e, "cannot write the tombstone before the wipe; wiping anyway (the binding record stays the fence) and writing it after");
            false
        }
    };
    let mut report = wipe(volume, telemetry).await;
    let phase = if report.error.is_empty() {
        TombstonePhase::Wiped
    } else {
        TombstonePhase::Released
    };
    if phase == TombstonePhase::Wiped || !fenced {
        if let Err(e) = volume.write_tombstone(phase, pod_uid) {
            let what = format!("cannot write the {} tombstone: {e}", phase.as_str());
            tracing::error!(event = "release.tombstone_failed", error = %e, "{what}");
            report.error = if report.error.is_empty() {
                what
            } else {
                format!("{}; {what}", report.error)
            };
        }
    }
    report
}

async fn wipe(volume: &Arc<Volume>, telemetry: &Telemetry) -> proto::ReleaseReport {
    // Marks the start so operators (and the crash tests) can tell a wipe in progress.
    tracing::info!(event = "wipe.started", workspace = %volume.workspace_dir().display(), "wiping the workspace");
    let v = volume.clone();
    let result = tokio::task::spawn_blocking(move || v.wipe()).await;
    let mut report = proto::ReleaseReport::default();
    match result {
        Ok(Ok(w)) => {
            telemetry
                .metrics
                .wipe_duration_seconds
                .set(w.duration_ms as f64 / 1000.0);
            report.files_removed = w.files_removed;
            report.bytes_removed = w.bytes_removed;
            report.skipped_mounts = w.skipped_mounts.clone();
            // A mount point is another file system, not tenant data on this volume: it is
            // reported in `skipped_mounts` and dies with the pod's mount namespace. Anything
            // else left behind means the wipe did not finish.
            if !w.skipped.is_empty() || (!w.fully_wiped && w.skipped_mounts.is_empty()) {
                const SHOWN: usize = 10;
                let mut listed: Vec<String> = w
                    .skipped
                    .iter()
                    .take(SHOWN)
                    .map(|(p, why)| format!("{p}: {why}"))
                    .collect();
                if w.skipped.len() > SHOWN {
                    listed.push(format!("and {} more", w.skipped.len() - SHOWN));
                }
                report.error = format!("not everything could be removed: {}", listed.join("; "));
                tracing::error!(
                    event = "wipe.failed",
                    files = w.files_removed,
                    bytes = w.bytes_removed,
                    left = w.skipped.len(),
                    skipped_mounts = w.skipped_mounts.len(),
                    duration_ms = w.duration_ms,
                    error = %report.error,
                    "the wipe left tenant files behind"
                );
            } else {
                tracing::info!(
                    event = "wipe.completed",
                    files = w.files_removed,
                    bytes = w.bytes_removed,
                    skipped_mounts = w.skipped_mounts.len(),
                    duration_ms = w.duration_ms,
                    "workspace wiped"
                );
            }
        }
        Ok(Err(e)) => {
            tracing::error!(event = "wipe.failed", error = %e, "wipe failed");
            report.error = e.to_string();
        }
        Err(e) => {
            report.error = format!("wipe task failed: {e}");
            tracing::error!(event = "wipe.failed", error = %report.error, "wipe failed");
        }
    }
    report
}
