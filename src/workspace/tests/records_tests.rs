use super::super::records::{self, Ownership};
use super::super::{
    BindingRecord, BootState, RefusalReason, SeedRecord, SeedSource, TombstonePhase, Volume,
    WorkspaceError,
};
use super::*;
use std::os::unix::fs::symlink;

fn binding(claim: &str, pod: &str) -> BindingRecord {
    BindingRecord {
        sandbox_id: "sbx-1".to_owned(),
        claim_uid: claim.to_owned(),
        pod_uid: pod.to_owned(),
        instance_id: "inst-1".to_owned(),
        bound_at_ms: 1_700_000_000_000,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A fixture whose workspace is seeded (empty seed) and, optionally, bound to claim X.
fn seeded(bound: bool) -> Fixture {
    let fx = fixture();
    runtime().block_on(fx.vol.seed(&SeedSource::None)).unwrap();
    if bound {
        fx.vol.write_binding(&binding("claim-x", "pod-a")).unwrap();
    }
    fx
}

fn refusal(fx: &Fixture, pod: Option<&str>) -> RefusalReason {
    match fx.vol.boot_state(pod) {
        Ok(s) => panic!("expected a refusal, got {s:?}"),
        Err(r) => {
            assert!(!r.detail.is_empty());
            assert!(r.to_string().contains(r.reason.as_str()), "{r}");
            r.reason
        }
    }
}

#[test]
fn fresh_seeded_bound_lifecycle() {
    let fx = fixture();
    assert_eq!(fx.vol.boot_state(Some("pod-a")).unwrap(), BootState::Fresh);
    let rec = runtime().block_on(fx.vol.seed(&SeedSource::None)).unwrap();
    assert_eq!(rec.files, 0);
    assert_eq!(rec.digest, super::super::stage::empty_digest());
    assert!(matches!(fx.vol.boot_state(Some("pod-a")).unwrap(), BootState::Seeded(r) if r == rec));
    fx.vol.write_binding(&binding("claim-x", "pod-a")).unwrap();
    match fx.vol.boot_state(Some("pod-a")).unwrap() {
        BootState::Bound { seed, binding } => {
            assert_eq!(binding.claim_uid, "claim-x");
            // The seed record now names the claim it was handed to.
            let marked = SeedRecord {
                bound_claim_uid: Some("claim-x".to_owned()),
                ..rec
            };
            assert_eq!(seed, Some(marked));
        }
        other => panic!("expected Bound, got {other:?}"),
    }
    // The same claim may be re-written (resume); another claim may not.
    fx.vol.write_binding(&binding("claim-x", "pod-a")).unwrap();
    assert!(matches!(
        fx.vol.write_binding(&binding("claim-y", "pod-a")),
        Err(WorkspaceError::AlreadyBound { .. })
    ));
    // Records are root-owned (our uid) 0600 regular files.
    let m = std::fs::symlink_metadata(fx.sup().join("binding.json")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
}

#[test]
fn tombstone_released_then_wiped_then_refuse() {
    let mut fx = seeded(true);
    fx.vol
        .write_tombstone(TombstonePhase::Released, Some("pod-a"))
        .unwrap();
    fx.reopen();
    match fx.vol.boot_state(Some("pod-a")).unwrap() {
        BootState::ReleasedNotWiped(t) => {
            assert_eq!(t.claim_uid.as_deref(), Some("claim-x"));
            assert_eq!(t.phase, TombstonePhase::Released);
        }
        other => panic!("expected ReleasedNotWiped, got {other:?}"),
    }
    fx.vol
        .write_tombstone(TombstonePhase::Wiped, Some("pod-a"))
        .unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::Tombstone);
    // Never moves back to Released, never binds again, never seeds again.
    fx.vol
        .write_tombstone(TombstonePhase::Released, Some("pod-a"))
        .unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::Tombstone);
    assert!(matches!(
        fx.vol.write_binding(&binding("claim-x", "pod-a")),
        Err(WorkspaceError::Tombstoned { .. })
    ));
}

#[test]
fn tombstone_without_binding_from_warm_release() {
    let fx = seeded(false);
    fx.vol.write_tombstone(TombstonePhase::Wiped, None).unwrap();
    assert_eq!(refusal(&fx, None), RefusalReason::Tombstone);
}

#[test]
fn foreign_pod_binding_refused() {
    let fx = seeded(true);
    assert_eq!(refusal(&fx, Some("pod-b")), RefusalReason::ForeignPod);
    assert!(matches!(
        fx.vol.boot_state(None),
        Ok(BootState::Bound { .. })
    ));
}

#[test]
fn records_deleted_with_content_left_is_unexpected_content() {
    let fx = seeded(true);
    std::fs::write(fx.ws().join("tenant-file"), b"x").unwrap();
    for r in ["seed.json", "binding.json"] {
        std::fs::remove_file(fx.sup().join(r)).unwrap();
    }
    assert_eq!(
        refusal(&fx, Some("pod-a")),
        RefusalReason::UnexpectedContent
    );
}

#[test]
fn seed_record_deleted_under_binding_is_tampering() {
    let fx = seeded(true);
    std::fs::remove_file(fx.sup().join("seed.json")).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
}

/// The binding record alone deleted: the seed record remembers the claim, so this is not
/// mistaken for a warm, never-bound pod (which would hand the tenant's files to the next).
#[test]
fn binding_deleted_alone_is_tampering_not_warm() {
    let fx = seeded(true);
    std::fs::write(fx.ws().join("tenant.txt"), "left by claim-x").unwrap();
    std::fs::remove_file(fx.sup().join("binding.json")).unwrap();
    let err = fx.vol.boot_state(Some("pod-a")).unwrap_err();
    assert_eq!(err.reason, RefusalReason::TamperedRecord, "{err}");
    assert!(
        err.detail.contains("claim-x") && err.detail.contains("binding.json"),
        "{err}"
    );
    // And the volume refuses to bind anyone else through the seed record.
    assert!(matches!(
        fx.vol.write_binding(&binding("claim-y", "pod-a")),
        Err(WorkspaceError::AlreadyBound { .. })
    ));
}

#[test]
fn binding_deleted_under_tombstone_is_tampering() {
    let fx = seeded(true);
    fx.vol
        .write_tombstone(TombstonePhase::Released, Some("pod-a"))
        .unwrap();
    std::fs::remove_file(fx.sup().join("binding.json")).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
}

#[test]
fn corrupted_records_are_refused() {
    // A flipped byte in a value (checksum catches it) and a flipped byte that breaks JSON.
    for (file, needle) in [
        ("binding.json", "claim-x"),
        ("seed.json", "sha256:"),
        ("binding.json", "{"),
    ] {
        let fx = seeded(true);
        let path = fx.sup().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .unwrap()
            + needle.len()
            - 1;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            refusal(&fx, Some("pod-a")),
            RefusalReason::CorruptRecord,
            "{file}/{needle}"
        );
    }
}

#[test]
fn record_replaced_by_symlink_is_tampering() {
    let fx = seeded(true);
    let copy = fx.outside.join("binding-copy.json");
    std::fs::copy(fx.sup().join("binding.json"), &copy).unwrap();
    std::fs::remove_file(fx.sup().join("binding.json")).unwrap();
    symlink(&copy, fx.sup().join("binding.json")).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
}

#[test]
fn record_replaced_by_directory_or_hardlinked_is_tampering() {
    let fx = seeded(true);
    std::fs::hard_link(fx.sup().join("seed.json"), fx.outside.join("seed-hardlink")).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
    let fx = seeded(true);
    std::fs::remove_file(fx.sup().join("binding.json")).unwrap();
    std::fs::create_dir(fx.sup().join("binding.json")).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
}

#[test]
fn record_owned_by_tenant_is_tampering() {
    if !is_root() {
        eprintln!("skipped: chown to another uid needs root");
        return;
    }
    let fx = seeded(true);
    std::os::unix::fs::chown(
        fx.sup().join("binding.json"),
        Some(OWNER.uid),
        Some(OWNER.gid),
    )
    .unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);
}

#[test]
fn record_mode_0644_is_tampering_but_fsgroup_is_fixed() {
    let fx = seeded(true);
    let path = fx.sup().join("seed.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(refusal(&fx, Some("pod-a")), RefusalReason::TamperedRecord);

    if !is_root() {
        eprintln!("skipped: the fsGroup case needs chown");
        return;
    }
    let fx = seeded(true);
    let path = fx.sup().join("seed.json");
    std::os::unix::fs::chown(&path, None, Some(4242)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert!(matches!(
        fx.vol.boot_state(Some("pod-a")),
        Ok(BootState::Bound { .. })
    ));
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.permissions().mode() & 0o7777, m.gid()), (0o600, 0));
}

#[test]
fn fsgroup_rule() {
    let own = Ownership {
        uid: 0,
        gid: 0,
        privileged: true,
    };
    assert!(records::fsgroup_loosened(0o660, 2000, &own, false));
    assert!(
        !records::fsgroup_loosened(0o660, 0, &own, false),
        "group bits with our own group"
    );
    assert!(
        !records::fsgroup_loosened(0o664, 2000, &own, false),
        "others may read"
    );
    assert!(
        !records::fsgroup_loosened(0o670, 2000, &own, false),
        "group exec on a file"
    );
    assert!(records::fsgroup_loosened(0o2770, 2000, &own, true));
    assert!(!records::fsgroup_loosened(0o4770, 2000, &own, true));
}

#[test]
fn supervisor_dir_tampering() {
    // Replaced by a symlink after open: boot_state notices.
    let fx = seeded(false);
    let moved = fx.root.join("moved");
    std::fs::rename(fx.sup(), &moved).unwrap();
    symlink(&moved, fx.sup()).unwrap();
    assert_eq!(refusal(&fx, None), RefusalReason::TamperedRecord);
    // And open refuses it outright.
    assert!(matches!(
        Volume::open(&fx.cfg()),
        Err(WorkspaceError::Tampered { .. })
    ));

    // Opened to everyone.
    let fx = seeded(false);
    std::fs::set_permissions(fx.sup(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        Volume::open(&fx.cfg()),
        Err(WorkspaceError::Tampered { .. })
    ));
    assert_eq!(
        Volume::open(&fx.cfg()).unwrap_err().into_refusal().reason,
        RefusalReason::TamperedRecord
    );
}

#[test]
fn fsgroup_on_volume_is_undone_at_open() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let fx = seeded(false);
    // What the kubelet does on a remount with fsGroup 4242.
    for (p, mode) in [(fx.root.clone(), 0o2775), (fx.sup(), 0o2770)] {
        std::os::unix::fs::chown(&p, None, Some(4242)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (vol, limits) = Volume::open(&fx.cfg()).unwrap();
    assert!(matches!(vol.boot_state(None), Ok(BootState::Seeded(_))));
    for (p, mode) in [(fx.root.clone(), 0o755), (fx.sup(), 0o700)] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (m.permissions().mode() & 0o7777, m.uid(), m.gid()),
            (mode, 0, 0),
            "{}",
            p.display()
        );
    }
    // Root made world-writable after records exist: not fsGroup's doing, refused.
    std::fs::set_permissions(&fx.root, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        Volume::open(&fx.cfg()),
        Err(WorkspaceError::Layout { .. })
    ));
    // Root owned by a tenant uid with records present: refused.
    std::fs::set_permissions(&fx.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&fx.root, Some(1000), None).unwrap();
    assert!(matches!(
        Volume::open(&fx.cfg()),
        Err(WorkspaceError::Layout { .. })
    ));
    drop(limits);
}

#[test]
fn first_boot_creates_layout_and_fixes_emptydir_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vol");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (vol, limits) = Volume::open(&config(&root)).unwrap();
    assert_eq!(
        std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let sup = std::fs::symlink_metadata(root.join(".supervisor")).unwrap();
    assert_eq!(sup.permissions().mode() & 0o7777, 0o700);
    let ws = std::fs::symlink_metadata(root.join("workspace")).unwrap();
    assert!(ws.is_dir());
    assert_eq!(ws.permissions().mode() & 0o7777, 0o750);
    if is_root() {
        assert_eq!((ws.uid(), ws.gid()), (OWNER.uid, OWNER.gid));
        assert_eq!(sup.uid(), 0);
    }
    assert_eq!(vol.workspace_dir(), root.join("workspace"));
    // Root with CAP_LINUX_IMMUTABLE gives every guarantee.
    if is_root()
        && super::super::fsutil::has_effective_cap(super::super::fsutil::CAP_LINUX_IMMUTABLE)
    {
        assert!(limits.is_empty(), "{limits:?}");
    }
}

#[test]
fn unprivileged_mode_lists_missing_guarantees() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("vol");
    std::fs::create_dir(&root).unwrap();
    let mut cfg = config(&root);
    cfg.privileged = false;
    let (vol, limits) = Volume::open(&cfg).unwrap();
    assert!(limits.iter().any(|l| l.contains("not root")), "{limits:?}");
    assert_eq!(vol.boot_state(None).unwrap(), BootState::Fresh);
}

#[test]
fn workspace_symlink_or_missing_root_is_a_layout_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = config(&tmp.path().join("nope"));
    let err = Volume::open(&missing).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let root = tmp.path().join("vol");
    std::fs::create_dir(&root).unwrap();
    symlink(tmp.path(), root.join("workspace")).unwrap();
    let err = Volume::open(&config(&root)).unwrap_err();
    assert!(
        matches!(&err, WorkspaceError::Layout { problem, .. } if problem.contains("symbolic link")),
        "{err}"
    );
}

#[test]
fn refusal_names_are_stable() {
    let names: Vec<&str> = [
        RefusalReason::Tombstone,
        RefusalReason::CorruptRecord,
        RefusalReason::TamperedRecord,
        RefusalReason::ForeignPod,
        RefusalReason::UnexpectedContent,
        RefusalReason::Layout,
    ]
    .iter()
    .map(|r| r.as_str())
    .collect();
    assert_eq!(
        names,
        [
            "tombstone",
            "corrupt_record",
            "tampered_record",
            "foreign_pod",
            "unexpected_content",
            "layout"
        ]
    );
}
