//! Workspace: the volume layout, the one-time seed, the records that make reuse impossible
//! (seed, binding, tombstone) and the wipe that never leaves the workspace (DESIGN §4).
//!
//! The supervisor opens the volume once at boot ([`Volume::open`]), asks what the records
//! allow ([`Volume::boot_state`]), seeds if fresh ([`Volume::seed`]), writes the binding
//! when a claim binds ([`Volume::write_binding`]) and, on release, the `released` tombstone,
//! the wipe ([`Volume::wipe`]) and the `wiped` tombstone ([`Volume::write_tombstone`]).
//!
//! Everything below the volume root is reached through directory fds (`openat2` with
//! `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV` where the kernel has it), never
//! through a path a tenant could have re-pointed.

pub(crate) mod archive;
mod boot;
mod copydir;
mod fetch;
mod flags;
pub(crate) mod fsutil;
mod layout;
mod records;
mod seed;
pub(crate) mod stage;
pub(crate) mod wipe;

#[cfg(test)]
mod tests;

pub use boot::{BootState, Refusal, RefusalReason};
pub use records::{BindingRecord, SeedRecord, Tombstone, TombstonePhase};
pub use wipe::{WipeError, WipeReport};

use fsutil::Meta;
use nix::errno::Errno;
use records::{Ownership, BINDING_FILE, RESERVE_BYTES, RESERVE_FILE, SEED_FILE, TOMBSTONE_FILE};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The sandbox user that owns `workspace/` and everything seeded into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The volume root (default `/sandbox`).
    pub root: PathBuf,
    /// Owner of `workspace/` and seeded files.
    pub owner: Owner,
    /// The supervisor runs as root (euid 0): records must be root-owned and seeded files
    /// are chowned to `owner`. Unprivileged, records must be owned by our own uid and
    /// [`Volume::open`] lists the guarantees it cannot give.
    pub privileged: bool,
}

/// Where the seed comes from.
#[derive(Clone)]
pub enum SeedSource {
    /// A directory baked into the image.
    Directory(PathBuf),
    /// A tar archive, plain, gzip or zstd (recognised by magic bytes).
    Archive(PathBuf),
    /// A tar archive (plain/gzip/zstd) over https, pinned by SHA-256 (`<hex>` or
    /// `sha256:<hex>`). `ca_file`: PEM roots to trust instead of the built-in web PKI roots.
    /// Plain `http://` is accepted for loopback hosts only (tests).
    Url {
        url: String,
        sha256: String,
        ca_file: Option<PathBuf>,
        timeouts: SeedTimeouts,
    },
    /// Nothing: the workspace starts empty (a seed record is still written).
    None,
}

/// Bounds of a seed download, so a stalled or slow server cannot hold boot forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedTimeouts {
    /// TCP connect (and TLS handshake) to the server.
    pub connect: std::time::Duration,
    /// Longest wait for the next bytes of the answer (headers or body).
    pub idle: std::time::Duration,
    /// The whole download, from the request to the last byte.
    pub total: std::time::Duration,
}

impl Default for SeedTimeouts {
    fn default() -> Self {
        SeedTimeouts {
            connect: std::time::Duration::from_secs(10),
            idle: std::time::Duration::from_secs(30),
            total: std::time::Duration::from_secs(600),
        }
    }
}

impl SeedSource {
    /// For logs and the seed record: URLs lose their query and credentials.
    pub fn describe(&self) -> String {
        match self {
            SeedSource::Directory(p) => format!("directory:{}", p.display()),
            SeedSource::Archive(p) => format!("archive:{}", p.display()),
            SeedSource::Url { url, .. } => match reqwest::Url::parse(url) {
                Ok(u) => format!("url:{}", fetch::redact(&u)),
                Err(_) => "url:<unparseable>".to_owned(),
            },
            SeedSource::None => "none".to_owned(),
        }
    }
}

impl fmt::Debug for SeedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("volume layout: {path} {problem}")]
    Layout { path: String, problem: String },
    #[error("{path} {problem}; the records directory is not trustworthy: investigate, then give the pod a fresh volume")]
    Tampered { path: String, problem: String },
    #[error("{op} {path} failed: {errno}")]
    Io {
        op: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("workspace configuration: {0}")]
    Config(String),
    #[error("refusing to bind claim {requested}: {path} already binds claim {existing}; a pod serves exactly one claim")]
    AlreadyBound {
        path: String,
        existing: String,
        requested: String,
    },
    #[error("refusing to bind claim {claim}: {path} exists (phase {phase}); a released pod is never bound again")]
    Tombstoned {
        path: String,
        claim: String,
        phase: &'static str,
    },
    #[error("refusing to bind claim {claim}: {path} is missing; seed the workspace (Volume::seed) before binding")]
    NotSeeded { path: String, claim: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl WorkspaceError {
    /// The refusal this error means at boot (every problem with the volume refuses reuse).
    pub fn into_refusal(self) -> Refusal {
        match self {
            WorkspaceError::Refused(r) => r,
            WorkspaceError::Tampered { path, problem } => {
                Refusal::new(RefusalReason::TamperedRecord, format!("{path} {problem}"))
            }
            WorkspaceError::Layout { path, problem } => {
                Refusal::new(RefusalReason::Layout, format!("{path} {problem}"))
            }
            other => Refusal::new(RefusalReason::Layout, other.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seed configuration: {0}")]
    Config(String),
    #[error("seed source {source_desc}: {problem}")]
    Source {
        source_desc: String,
        problem: String,
    },
    #[error("seed entry `{entry}` {problem}; fix the seed source (nothing was written to the workspace)")]
    Entry { entry: String, problem: String },
    #[error("seed archive {source_desc}: {problem}; nothing was written to the workspace")]
    Archive {
        source_desc: String,
        problem: String,
    },
    #[error("seed download {url}: {problem}; nothing was written to the workspace")]
    Download { url: String, problem: String },
    #[error("seed download {url}: SHA-256 mismatch, expected {expected}, got {actual}; refusing the content (nothing was written to the workspace): check --seed-sha256 and the URL")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{path} is not empty and no seed record or interrupted seed explains its content; refusing to seed over it")]
    NotEmpty { path: String },
    #[error("seeding: {op} {path} failed: {errno}")]
    Io {
        op: &'static str,
        path: String,
        errno: Errno,
    },
    #[error("seeding: cleaning up an interrupted seed did not finish: {0}")]
    Cleanup(String),
    #[error("seeding: the blocking task failed: {0}")]
    Task(String),
    #[error(
        "seeding was stopped before it finished (the half-built staging directory is discarded)"
    )]
    Cancelled,
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
}

/// An opened, checked volume. Works fd-relative from the root directory fd it holds.
pub struct Volume {
    inner: Arc<Inner>,
    pod_uid: Option<String>,
}

pub(crate) struct Inner {
    root: PathBuf,
    root_s: String,
    sup_s: String,
    root_fd: OwnedFd,
    root_meta: Meta,
    sup_fd: OwnedFd,
    sup_meta: Meta,
    own: Ownership,
    owner: Owner,
    privileged: bool,
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("root", &self.inner.root)
            .field("owner", &self.inner.owner)
            .field("privileged", &self.inner.privileged)
            .finish()
    }
}

impl Volume {
    /// Opens the volume: creates missing directories on first boot, undoes what the
    /// kubelet's fsGroup loosens, verifies types, owners and modes (no symlinks, no
    /// mounts). Anything unexpected is an error naming the path and the problem. The
    /// returned list names the guarantees this configuration cannot give (log it loudly).
    pub fn open(cfg: &VolumeConfig) -> Result<(Volume, Vec<String>), WorkspaceError> {
        let opened = layout::open(cfg)?;
        let root_s = cfg.root.display().to_string();
        let inner = Inner {
            root: cfg.root.clone(),
            sup_s: format!("{root_s}/{}", layout::SUPERVISOR_DIR),
            root_s,
            root_fd: opened.root_fd,
            root_meta: opened.root_meta,
            sup_fd: opened.sup_fd,
            sup_meta: opened.sup_meta,
            own: opened.own,
            owner: cfg.owner,
            privileged: cfg.privileged,
        };
        for limit in &opened.limits {
            tracing::warn!(event = "workspace.guarantee_missing", limit = %limit, "workspace guarantee not available");
        }
        Ok((
            Volume {
                inner: Arc::new(inner),
                pod_uid: None,
            },
            opened.limits,
        ))
    }

    /// Records this pod's UID in the seed record (informational).
    pub fn set_pod_uid(&mut self, pod_uid: Option<String>) {
        self.pod_uid = pod_uid;
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn workspace_dir(&self) -> PathBuf {
        self.inner.root.join(layout::WORKSPACE_DIR)
    }

    pub fn supervisor_dir(&self) -> PathBuf {
        self.inner.root.join(layout::SUPERVISOR_DIR)
    }

    /// Reads and verifies the records and decides what this boot may do.
    pub fn boot_state(&self, pod_uid: Option<&str>) -> Result<BootState, Refusal> {
        let inner = &self.inner;
        inner
            .recheck_supervisor()
            .map_err(WorkspaceError::into_refusal)?;
        let sup = inner.sup_fd.as_fd();
        let tombstone = records::read_record::<Tombstone>(
            sup,
            TOMBSTONE_FILE,
            "tombstone",
            &inner.own,
            &inner.sup_s,
        )?;
        let binding = records::read_record::<BindingRecord>(
            sup,
            BINDING_FILE,
            "binding",
            &inner.own,
            &inner.sup_s,
        )?;
        let seed =
            records::read_record::<SeedRecord>(sup, SEED_FILE, "seed", &inner.own, &inner.sup_s)?;
        let staging_present = !inner
            .staging_names()
            .map_err(|e| {
                Refusal::new(
                    RefusalReason::Layout,
                    format!("cannot list {}: {e}", inner.sup_s),
                )
            })?
            .is_empty();
        let workspace_empty = inner
            .workspace_empty()
            .map_err(WorkspaceError::into_refusal)?;
        let state = boot::decide(
            boot::Found {
                tombstone,
                binding,
                seed,
                staging_present,
                workspace_empty,
            },
            pod_uid,
            &inner.sup_s,
        )?;
        if !matches!(state, BootState::ReleasedNotWiped(_)) {
            // While no tenant can have filled the volume (or, resuming a binding, in case
            // an older version bound it): the room the tombstone will need. Here rather
            // than in `write_binding`, which must stay fast.
            inner.ensure_reserve();
        }
        tracing::info!(
            event = "workspace.boot_state",
            state = state_name(&state),
            "records read"
        );
        Ok(state)
    }

    /// Seeds the workspace once (see `seed.rs`). Skips and returns the record if seeded.
    pub async fn seed(&self, source: &SeedSource) -> Result<SeedRecord, SeedError> {
        self.seed_until(source, std::future::pending()).await
    }

    /// As [`Volume::seed`], stopped when `stop` completes first (a SIGTERM): the download
    /// is dropped, the copy stops at its next chunk, the staging directory is discarded
    /// and the result is [`SeedError::Cancelled`]. A seed that committed meanwhile is
    /// returned as done.
    pub async fn seed_until(
        &self,
        source: &SeedSource,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<SeedRecord, SeedError> {
        seed::seed(
            self.inner.clone(),
            source.clone(),
            self.pod_uid.clone(),
            stop,
        )
        .await
    }

    /// Writes `binding.json` durably. Refuses when a tombstone exists, when another claim
    /// is already bound, or when there is no seed record.
    pub fn write_binding(&self, rec: &BindingRecord) -> Result<(), WorkspaceError> {
        let inner = &self.inner;
        let sup = inner.sup_fd.as_fd();
        if let Some(t) = records::read_record::<Tombstone>(
            sup,
            TOMBSTONE_FILE,
            "tombstone",
            &inner.own,
            &inner.sup_s,
        )? {
            return Err(WorkspaceError::Tombstoned {
                path: format!("{}/{TOMBSTONE_FILE}", inner.sup_s),
                claim: rec.claim_uid.clone(),
                phase: t.phase.as_str(),
            });
        }
        if let Some(b) = records::read_record::<BindingRecord>(
            sup,
            BINDING_FILE,
            "binding",
            &inner.own,
            &inner.sup_s,
        )? {
            if b.claim_uid != rec.claim_uid {
                return Err(WorkspaceError::AlreadyBound {
                    path: format!("{}/{BINDING_FILE}", inner.sup_s),
                    existing: b.claim_uid,
                    requested: rec.claim_uid.clone(),
                });
            }
        }
        let Some(mut seed) =
            records::read_record::<SeedRecord>(sup, SEED_FILE, "seed", &inner.own, &inner.sup_s)?
        else {
            return Err(WorkspaceError::NotSeeded {
                path: format!("{}/{SEED_FILE}", inner.sup_s),
                claim: rec.claim_uid.clone(),
            });
        };
        if let Some(bound) = seed
            .bound_claim_uid
            .as_ref()
            .filter(|c| **c != rec.claim_uid)
        {
            return Err(WorkspaceError::AlreadyBound {
                path: format!("{}/{SEED_FILE}", inner.sup_s),
                existing: bound.clone(),
                requested: rec.claim_uid.clone(),
            });
        }
        // Normally already set aside at boot (then this is one statx).
        inner.ensure_reserve();
        records::write_record(sup, BINDING_FILE, "binding", rec).map_err(|errno| {
            WorkspaceError::Io {
                op: "write",
                path: format!("{}/{BINDING_FILE}", inner.sup_s),
                errno,
            }
        })?;
        // Second, after the binding is durable: a crash in between leaves a binding with an
        // unmarked seed, which boot reads as bound (correct).
        if seed.bound_claim_uid.is_none() {
            seed.bound_claim_uid = Some(rec.claim_uid.clone());
            records::write_record(sup, SEED_FILE, "seed", &seed).map_err(|errno| {
                WorkspaceError::Io {
                    op: "write",
                    path: format!("{}/{SEED_FILE}", inner.sup_s),
                    errno,
                }
            })?;
        }
        tracing::info!(event = "binding.written", claim_uid = %rec.claim_uid, sandbox_id = %rec.sandbox_id, "binding record written");
        Ok(())
    }

    /// Writes the tombstone durably: `Released` before the wipe, `Wiped` after it. Never
    /// moves back from `Wiped`. Unreadable earlier records do not stop it: writing the
    /// tombstone is always the safe direction.
    pub fn write_tombstone(
        &self,
        phase: TombstonePhase,
        pod_uid: Option<&str>,
    ) -> Result<(), WorkspaceError> {
        let inner = &self.inner;
        let sup = inner.sup_fd.as_fd();
        let existing = records::read_record::<Tombstone>(
            sup,
            TOMBSTONE_FILE,
            "tombstone",
            &inner.own,
            &inner.sup_s,
        )
        .ok()
        .flatten();
        let binding = records::read_record::<BindingRecord>(
            sup,
            BINDING_FILE,
            "binding",
            &inner.own,
            &inner.sup_s,
        )
        .ok()
        .flatten();
        if matches!(&existing, Some(t) if t.phase == TombstonePhase::Wiped) {
            return Ok(());
        }
        let now = fsutil::now_ms();
        let tomb = Tombstone {
            phase,
            pod_uid: pod_uid
                .map(str::to_owned)
                .or_else(|| existing.as_ref().and_then(|t| t.pod_uid.clone())),
            claim_uid: binding.as_ref().map(|b| b.claim_uid.clone()),
            sandbox_id: binding.as_ref().map(|b| b.sandbox_id.clone()),
            released_at_ms: existing.as_ref().map_or(now, |t| t.released_at_ms),
            wiped_at_ms: (phase == TombstonePhase::Wiped).then_some(now),
            supervisor_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let mut written = records::write_record(sup, TOMBSTONE_FILE, "tombstone", &tomb);
        if matches!(written, Err(Errno::ENOSPC | Errno::EDQUOT)) && inner.release_reserve() {
            // The tenant filled the volume: spend the room set aside at binding time.
            written = records::write_record(sup, TOMBSTONE_FILE, "tombstone", &tomb);
        }
        written.map_err(|errno| WorkspaceError::Io {
            op: "write",
            path: format!("{}/{TOMBSTONE_FILE}", inner.sup_s),
            errno,
        })?;
        tracing::info!(
            event = "tombstone.written",
            phase = phase.as_str(),
            "tombstone written"
        );
        Ok(())
    }

    /// Removes the contents of `workspace/` (keeps the directory). Blocking.
    pub fn wipe(&self) -> Result<WipeReport, WipeError> {
        let inner = &self.inner;
        let path = format!("{}/{}", inner.root_s, layout::WORKSPACE_DIR);
        let fd = layout::open_workspace(inner.root_fd.as_fd(), &inner.root_meta, &inner.root_s)
            .map_err(|e| WipeError::Open {
                path: path.clone(),
                errno: match e {
                    WorkspaceError::Io { errno, .. } => errno,
                    _ => Errno::EXDEV,
                },
            })?;
        wipe::wipe_contents(fd, &path, wipe::WipeOptions::detect())
    }
}

fn state_name(s: &BootState) -> &'static str {
    match s {
        BootState::Fresh => "fresh",
        BootState::Seeded(_) => "seeded",
        BootState::Bound { .. } => "bound",
        BootState::ReleasedNotWiped(_) => "released_not_wiped",
    }
}

impl Inner {
    /// Creates the tombstone's reserve if it is missing (allocated bytes, durable). A
    /// failure is logged, not fatal: the release then falls back to wiping under the
    /// binding record's fence before it writes the tombstone.
    fn ensure_reserve(&self) {
        let sup = self.sup_fd.as_fd();
        let cname = c"tombstone.reserve";
        if fsutil::stat_at(sup, cname).is_ok_and(|m| m.kind == fsutil::Kind::File) {
            return;
        }
        if let Err(errno) = fsutil::write_durable(sup, RESERVE_FILE, &[0u8; RESERVE_BYTES]) {
            tracing::warn!(event = "workspace.reserve_failed", path = %format!("{}/{RESERVE_FILE}", self.sup_s), error = %errno, "cannot set space aside for the tombstone; a full volume will delay the tombstone until after the wipe");
        }
    }

    /// Frees the reserve (its blocks and its inode); `false` if there was none.
    fn release_reserve(&self) -> bool {
        let freed = nix::unistd::unlinkat(
            self.sup_fd.as_fd(),
            RESERVE_FILE,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .is_ok();
        if freed {
            tracing::warn!(
                event = "tombstone.reserve_used",
                "the volume is full; writing the tombstone into the space set aside for it"
            );
        }
        freed
    }

    /// `.supervisor/` must still be the directory opened at boot, ours and private.
    fn recheck_supervisor(&self) -> Result<(), WorkspaceError> {
        let fd = fsutil::open_dir_beneath(
            self.root_fd.as_fd(),
            c".supervisor",
            fsutil::Resolve::detect(),
        )
        .map_err(|e| WorkspaceError::Tampered {
            path: self.sup_s.clone(),
            problem: format!("cannot be reopened ({e}): replaced by a symlink, a file or a mount?"),
        })?;
        let mut meta = fsutil::stat_fd(fd.as_fd()).map_err(|errno| WorkspaceError::Io {
            op: "stat",
            path: self.sup_s.clone(),
            errno,
        })?;
        if !meta.same_object(&self.sup_meta) {
            return Err(WorkspaceError::Tampered {
                path: self.sup_s.clone(),
                problem: "was replaced by another directory since the volume was opened".to_owned(),
            });
        }
        layout::check_supervisor_dir(fd.as_fd(), &mut meta, &self.own, &self.sup_s)
    }

    fn staging_names(&self) -> Result<Vec<std::ffi::CString>, Errno> {
        let fd = fsutil::dup(self.sup_fd.as_fd())?;
        let mut dir = nix::dir::Dir::from_fd(fd)?;
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e?;
            if e.file_name()
                .to_bytes()
                .starts_with(seed::STAGING_PREFIX.as_bytes())
            {
                out.push(e.file_name().to_owned());
            }
        }
        Ok(out)
    }

    fn open_workspace(&self) -> Result<OwnedFd, WorkspaceError> {
        layout::open_workspace(self.root_fd.as_fd(), &self.root_meta, &self.root_s)
    }

    fn workspace_empty(&self) -> Result<bool, WorkspaceError> {
        let fd = self.open_workspace()?;
        layout::dir_is_empty(fd).map_err(|errno| WorkspaceError::Io {
            op: "read",
            path: format!("{}/{}", self.root_s, layout::WORKSPACE_DIR),
            errno,
        })
    }
}
