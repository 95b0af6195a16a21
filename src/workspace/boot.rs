//! What a boot may do, decided from the records. Fail closed: anything that does not add up
//! is a `Refusal`, and a refused pod never registers with the gateway.

use super::records::{BindingRecord, SeedRecord, Tombstone, TombstonePhase};
use std::fmt;

/// What the records allow this boot to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootState {
    /// No records: seed, then go warm. (Also after an interrupted seed: `seed` discards
    /// the staging directory and any half-renamed content and starts over.)
    Fresh,
    /// Seeded, never bound: go warm.
    Seeded(SeedRecord),
    /// Crashed while bound: may only resume this claim.
    Bound {
        seed: Option<SeedRecord>,
        binding: BindingRecord,
    },
    /// The tombstone says released but not wiped: the caller finishes the wipe, writes the
    /// `wiped` tombstone, then refuses.
    ReleasedNotWiped(Tombstone),
}

/// Why boot refuses. `as_str` gives the stable name used in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    Tombstone,
    CorruptRecord,
    TamperedRecord,
    ForeignPod,
    UnexpectedContent,
    Layout,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Tombstone => "tombstone",
            RefusalReason::CorruptRecord => "corrupt_record",
            RefusalReason::TamperedRecord => "tampered_record",
            RefusalReason::ForeignPod => "foreign_pod",
            RefusalReason::UnexpectedContent => "unexpected_content",
            RefusalReason::Layout => "layout",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            RefusalReason::Tombstone => "this pod was released and is never reused; delete the pod",
            RefusalReason::CorruptRecord => "the records cannot be trusted; delete the pod and its volume instead of repairing them",
            RefusalReason::TamperedRecord => "something other than the supervisor changed .supervisor/; investigate, then delete the pod and its volume",
            RefusalReason::ForeignPod => "the volume carries another pod's state; give this pod a fresh volume",
            RefusalReason::UnexpectedContent => "the workspace holds files the supervisor did not seed; give the pod a fresh volume",
            RefusalReason::Layout => "fix the volume layout (DESIGN section 4) or give the pod a fresh volume",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal to go warm or resume, with what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: RefusalReason, detail: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing reuse ({}): {}; {}",
            self.reason,
            self.detail,
            self.reason.advice()
        )
    }
}

impl std::error::Error for Refusal {}

/// What boot found on the volume.
pub(crate) struct Found {
    pub tombstone: Option<Tombstone>,
    pub binding: Option<BindingRecord>,
    pub seed: Option<SeedRecord>,
    pub staging_present: bool,
    pub workspace_empty: bool,
}

/// The boot rules, free of I/O.
pub(crate) fn decide(
    found: Found,
    pod_uid: Option<&str>,
    sup_dir: &str,
) -> Result<BootState, Refusal> {
    let Found {
        tombstone,
        binding,
        seed,
        staging_present,
        workspace_empty,
    } = found;
    if let Some(t) = tombstone {
        match (&t.claim_uid, &binding) {
            (Some(tc), Some(b)) if *tc != b.claim_uid => {
                return Err(Refusal::new(
                    RefusalReason::TamperedRecord,
                    format!(
                        "{sup_dir}/tombstone.json names claim {tc} but binding.json names claim {}",
                        b.claim_uid
                    ),
                ))
            }
            (Some(tc), None) => {
                return Err(Refusal::new(
                    RefusalReason::TamperedRecord,
                    format!(
                        "{sup_dir}/tombstone.json names claim {tc} but binding.json is missing"
                    ),
                ))
            }
            _ => {}
        }
        return match t.phase {
            TombstonePhase::Wiped => Err(Refusal::new(
                RefusalReason::Tombstone,
                format!(
                    "{sup_dir}/tombstone.json: released (claim {}, pod {}) at {} ms and wiped",
                    t.claim_uid.as_deref().unwrap_or("none"),
                    t.pod_uid.as_deref().unwrap_or("unknown"),
                    t.released_at_ms
                ),
            )),
            // Whatever pod wrote it, finishing the wipe is always right.
            TombstonePhase::Released => Ok(BootState::ReleasedNotWiped(t)),
        };
    }
    let seed_bound = seed.as_ref().and_then(|s| s.bound_claim_uid.clone());
    if let Some(b) = binding {
        if let Some(sc) = seed_bound.filter(|sc| *sc != b.claim_uid) {
            return Err(Refusal::new(
                RefusalReason::TamperedRecord,
                format!(
                    "{sup_dir}/seed.json was handed to claim {sc} but binding.json names claim {}",
                    b.claim_uid
                ),
            ));
        }
        if seed.is_none() {
            return Err(Refusal::new(
                RefusalReason::TamperedRecord,
                format!("{sup_dir}/binding.json (claim {}) exists without seed.json, which is always written before any binding", b.claim_uid),
            ));
        }
        if let Some(p) = pod_uid {
            if p != b.pod_uid {
                return Err(Refusal::new(
                    RefusalReason::ForeignPod,
                    format!(
                        "{sup_dir}/binding.json binds claim {} to pod {}, but this is pod {p}",
                        b.claim_uid, b.pod_uid
                    ),
                ));
            }
        }
        return Ok(BootState::Bound { seed, binding: b });
    }
    if let Some(sc) = seed_bound {
        return Err(Refusal::new(
            RefusalReason::TamperedRecord,
            format!("{sup_dir}/seed.json was handed to claim {sc} but binding.json is missing (deleted?); the workspace may hold that tenant's files"),
        ));
    }
    if let Some(s) = seed {
        // The seed record's pod is informational: seed content never held tenant data, and
        // a PVC may legitimately be seeded by an earlier pod of the same sandbox.
        if let (Some(p), Some(sp)) = (pod_uid, s.pod_uid.as_deref()) {
            if p != sp {
                tracing::info!(
                    event = "seed.other_pod",
                    seed_pod = sp,
                    pod = p,
                    "seed record written by another pod of this volume"
                );
            }
        }
        return Ok(BootState::Seeded(s));
    }
    if staging_present {
        return Ok(BootState::Fresh);
    }
    if !workspace_empty {
        return Err(Refusal::new(
            RefusalReason::UnexpectedContent,
            format!("workspace/ holds files but {sup_dir} has no records and no interrupted seed (records deleted?); these files will not be handed to a tenant"),
        ));
    }
    Ok(BootState::Fresh)
}
