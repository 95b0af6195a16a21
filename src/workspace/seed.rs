//! Seed once: build the tree in `.supervisor/staging-<random>/tree`, rename it over the
//! empty `workspace/`, write `seed.json` last, then remove the (empty) staging dir.
//!
//! Crash points: before the rename the workspace is untouched; between the rename and the
//! record the staging dir still exists, so boot sees an interrupted seed (`Fresh`) and the
//! next `seed` empties the workspace and the staging dir with the wipe code and starts over;
//! after the record the seed is skipped (leftover staging dirs are removed).

use super::archive::{self, ArchiveError};
use super::fsutil;
use super::layout::WORKSPACE_DIR;
use super::records::{self, SeedRecord, Tombstone, SEED_FILE, TOMBSTONE_FILE};
use super::stage::{self, StageError, StageSummary, Stager};
use super::wipe::{self, WipeOptions};
use super::{Inner, SeedError, SeedSource};
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) const STAGING_PREFIX: &str = "staging-";
const DOWNLOAD_NAME: &CStr = c"download";

struct Staging {
    name: CString,
    dir: OwnedFd,
    tree: OwnedFd,
}

enum Prepared {
    Done(SeedRecord),
    Staging(Staging),
}

fn io(op: &'static str, path: impl Into<String>, errno: Errno) -> SeedError {
    SeedError::Io {
        op,
        path: path.into(),
        errno,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SeedError> + Send + 'static,
) -> Result<T, SeedError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SeedError::Task(e.to_string()))?
}

pub(crate) async fn seed(
    inner: Arc<Inner>,
    source: SeedSource,
    pod_uid: Option<String>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<SeedRecord, SeedError> {
    // The blocking copy polls `cancel` between chunks; the async download watches `rx`.
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let work = seed_cancellable(inner, source, pod_uid, cancel.clone(), rx);
    tokio::pin!(work, stop);
    tokio::select! {
        result = &mut work => result,
        () = &mut stop => {
            cancel.store(true, Ordering::Relaxed);
            let _ = tx.send(true);
            // Not dropped: the blocking part must have stopped writing into staging
            // before the staging directory is discarded, which `work` does itself.
            work.await
        }
    }
}

async fn seed_cancellable(
    inner: Arc<Inner>,
    source: SeedSource,
    pod_uid: Option<String>,
    cancel: Arc<AtomicBool>,
    mut cancel_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<SeedRecord, SeedError> {
    let started = Instant::now();
    let prep = {
        let inner = inner.clone();
        blocking(move || inner.prepare_seed()).await?
    };
    let staging = match prep {
        Prepared::Done(rec) => {
            tracing::info!(event = "seed.skipped", digest = %rec.digest, "workspace already seeded");
            return Ok(rec);
        }
        Prepared::Staging(s) => Arc::new(s),
    };
    tracing::info!(event = "seed.started", source = %source.describe(), "seeding the workspace");
    let result = async {
        if cancel.load(Ordering::Relaxed) {
            return Err(SeedError::Cancelled);
        }
        let mut source_sha = None;
        if let SeedSource::Url {
            url,
            sha256,
            ca_file,
            timeouts,
        } = &source
        {
            let file = create_download(&staging, &inner)?;
            let download = fetch_download(url, sha256, ca_file.as_deref(), *timeouts, file);
            source_sha = Some(tokio::select! {
                r = download => r?,
                _ = cancel_rx.wait_for(|c| *c) => return Err(SeedError::Cancelled),
            });
        }
        let (inner2, staging2, source2) = (inner.clone(), staging.clone(), source.clone());
        let cancel2 = cancel.clone();
        blocking(move || {
            inner2.populate_and_commit(&staging2, &source2, source_sha, pod_uid, started, &cancel2)
        })
        .await
    }
    .await;
    // Whatever failed once the stop came (a read cut short, a chunk refused) was the stop.
    let result = match result {
        Err(_) if cancel.load(Ordering::Relaxed) => Err(SeedError::Cancelled),
        other => other,
    };
    if let Err(e) = &result {
        if matches!(e, SeedError::Cancelled) {
            tracing::info!(
                event = "seed.cancelled",
                "seeding stopped; discarding the staging directory"
            );
        } else {
            tracing::warn!(event = "seed.failed", error = %e, "seed failed; discarding the staging directory");
        }
        let (inner, staging) = (inner.clone(), staging.clone());
        let cleaned = blocking(move || {
            inner
                .discard_staging(&staging.name)
                .map_err(SeedError::Cleanup)
        })
        .await;
        if let Err(c) = cleaned {
            tracing::error!(event = "seed.cleanup_failed", error = %c, "staging directory left behind; the next boot discards it");
        }
    }
    result
}

async fn fetch_download(
    url: &str,
    sha256: &str,
    ca_file: Option<&Path>,
    timeouts: super::SeedTimeouts,
    file: std::fs::File,
) -> Result<String, SeedError> {
    super::fetch::download(url, sha256, ca_file, timeouts, file).await
}

/// A reader that fails once seeding is stopped, so the decompressors and the tar parser
/// stop at their next read.
struct Cancellable<'a, R> {
    inner: R,
    cancel: &'a AtomicBool,
}

impl<R: std::io::Read> std::io::Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
        self.inner.read(buf)
    }
}

fn create_download(staging: &Staging, inner: &Inner) -> Result<std::fs::File, SeedError> {
    let fd = fcntl::openat(
        staging.dir.as_fd(),
        DOWNLOAD_NAME,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| io("create download file in", &inner.sup_s, e))?;
    Ok(std::fs::File::from(fd))
}

pub(super) fn stage_err(e: StageError) -> SeedError {
    match e {
        StageError::Entry { entry, problem } => SeedError::Entry { entry, problem },
        StageError::Io { entry, op, errno } => SeedError::Entry {
            entry,
            problem: format!("could not be staged: {op} failed: {errno}"),
        },
    }
}

impl Inner {
    fn prepare_seed(&self) -> Result<Prepared, SeedError> {
        let sup = self.sup_fd.as_fd();
        if let Some(rec) =
            records::read_record::<SeedRecord>(sup, SEED_FILE, "seed", &self.own, &self.sup_s)?
        {
            for name in self.staging_names().unwrap_or_default() {
                if let Err(e) = self.discard_staging(&name) {
                    tracing::warn!(event = "seed.cleanup_failed", error = %e, "leftover staging directory not removed");
                }
            }
            return Ok(Prepared::Done(rec));
        }
        if let Some(t) = records::read_record::<Tombstone>(
            sup,
            TOMBSTONE_FILE,
            "tombstone",
            &self.own,
            &self.sup_s,
        )? {
            return Err(SeedError::Refused(super::Refusal::new(
                super::RefusalReason::Tombstone,
                format!(
                    "{}/{TOMBSTONE_FILE} exists (phase {}); a released pod is never seeded again",
                    self.sup_s,
                    t.phase.as_str()
                ),
            )));
        }
        let leftovers = self
            .staging_names()
            .map_err(|e| io("list", &self.sup_s, e))?;
        let ws_path = format!("{}/{WORKSPACE_DIR}", self.root_s);
        if !self.workspace_empty()? {
            if leftovers.is_empty() {
                return Err(SeedError::NotEmpty { path: ws_path });
            }
            // Crashed between the rename and the record: the content is a seed, not a tenant's.
            let report =
                wipe::wipe_contents(self.open_workspace()?, &ws_path, WipeOptions::detect())
                    .map_err(|e| SeedError::Cleanup(e.to_string()))?;
            if !report.fully_wiped {
                return Err(SeedError::Cleanup(format!(
                    "{ws_path} could not be emptied after an interrupted seed: {:?}",
                    report.skipped
                )));
            }
            tracing::info!(
                event = "seed.interrupted_discarded",
                files = report.files_removed,
                "removed the content of an interrupted seed"
            );
        }
        for name in leftovers {
            self.discard_staging(&name).map_err(SeedError::Cleanup)?;
        }
        let name = CString::new(format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>()))
            .expect("no NUL");
        let staging_path = format!("{}/{}", self.sup_s, name.to_string_lossy());
        let dir =
            stage::mkdir_open(sup, &name, 0o700).map_err(|e| io("create", &staging_path, e))?;
        let tree = stage::mkdir_open(dir.as_fd(), c"tree", 0o700)
            .map_err(|e| io("create", format!("{staging_path}/tree"), e))?;
        Ok(Prepared::Staging(Staging { name, dir, tree }))
    }

    /// Removes a staging directory with the wipe code (never `remove_dir_all`).
    pub(crate) fn discard_staging(&self, name: &CStr) -> Result<(), String> {
        let path = format!("{}/{}", self.sup_s, fsutil::escape_bytes(name.to_bytes()));
        let fd = fsutil::open_dir_beneath(self.sup_fd.as_fd(), name, fsutil::Resolve::detect())
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        let report =
            wipe::wipe_contents(fd, &path, WipeOptions::detect()).map_err(|e| e.to_string())?;
        if !report.fully_wiped {
            return Err(format!("{path} could not be emptied: {:?}", report.skipped));
        }
        unlinkat(self.sup_fd.as_fd(), name, UnlinkatFlags::RemoveDir)
            .map_err(|e| format!("cannot remove {path}: {e}"))?;
        let _ = nix::unistd::fsync(self.sup_fd.as_fd());
        Ok(())
    }

    fn populate_and_commit(
        &self,
        staging: &Staging,
        source: &SeedSource,
        download_sha: Option<String>,
        pod_uid: Option<String>,
        started: Instant,
        cancel: &AtomicBool,
    ) -> Result<SeedRecord, SeedError> {
        let chown = self.privileged.then_some((self.owner.uid, self.owner.gid));
        let tree = fsutil::dup(staging.tree.as_fd()).map_err(|e| io("dup", &self.sup_s, e))?;
        let mut stager = Stager::new(tree, chown);
        let desc = source.describe();
        let mut source_sha = download_sha;
        match source {
            SeedSource::None => {}
            SeedSource::Directory(dir) => super::copydir::copy_directory(dir, &mut stager, cancel)?,
            SeedSource::Archive(path) => {
                // Not opened blindly: a FIFO would block here, /dev/zero never end.
                let file = crate::envfile::open_regular(path, "seed archive").map_err(|e| {
                    SeedError::Source {
                        source_desc: desc.clone(),
                        problem: e.problem(),
                    }
                })?;
                let file = Cancellable {
                    inner: file,
                    cancel,
                };
                source_sha = Some(extract(file, &mut stager, &desc)?);
            }
            SeedSource::Url { .. } => {
                let fd = fcntl::openat(
                    staging.dir.as_fd(),
                    DOWNLOAD_NAME,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io("open download in", &self.sup_s, e))?;
                let file = Cancellable {
                    inner: std::fs::File::from(fd),
                    cancel,
                };
                extract(file, &mut stager, &desc)?;
                unlinkat(
                    staging.dir.as_fd(),
                    DOWNLOAD_NAME,
                    UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|e| io("remove download in", &self.sup_s, e))?;
            }
        }
        let summary: StageSummary = stager.finish().map_err(stage_err)?;
        // The last point to stop: after the rename the seed is committed.
        if cancel.load(Ordering::Relaxed) {
            return Err(SeedError::Cancelled);
        }
        self.commit(staging, summary, desc, source_sha, pod_uid, started)
    }

    fn commit(
        &self,
        staging: &Staging,
        summary: StageSummary,
        source: String,
        source_sha256: Option<String>,
        pod_uid: Option<String>,
        started: Instant,
    ) -> Result<SeedRecord, SeedError> {
        let ws_path = format!("{}/{WORKSPACE_DIR}", self.root_s);
        // Nothing may have appeared meanwhile (renaming over a non-empty dir fails anyway).
        if !self.workspace_empty()? {
            return Err(SeedError::NotEmpty { path: ws_path });
        }
        fcntl::renameat(
            staging.dir.as_fd(),
            c"tree",
            self.root_fd.as_fd(),
            c"workspace",
        )
        .map_err(|e| io("rename staging tree onto", &ws_path, e))?;
        nix::unistd::fsync(self.root_fd.as_fd()).map_err(|e| io("fsync", &self.root_s, e))?;
        let record = SeedRecord {
            digest: summary.digest,
            files: summary.files,
            dirs: summary.dirs,
            symlinks: summary.symlinks,
            bytes: summary.bytes,
            duration_ms: started.elapsed().as_millis() as u64,
            source,
            source_sha256,
            method: if summary.bytes == 0 {
                "none".to_owned()
            } else if summary.reflinked {
                "reflink".to_owned()
            } else {
                "copy".to_owned()
            },
            supervisor_version: env!("CARGO_PKG_VERSION").to_owned(),
            pod_uid,
            completed_at_ms: fsutil::now_ms(),
            bound_claim_uid: None,
        };
        records::write_record(self.sup_fd.as_fd(), SEED_FILE, "seed", &record)
            .map_err(|e| io("write", format!("{}/{SEED_FILE}", self.sup_s), e))?;
        if let Err(e) = unlinkat(
            self.sup_fd.as_fd(),
            staging.name.as_c_str(),
            UnlinkatFlags::RemoveDir,
        ) {
            tracing::warn!(event = "seed.cleanup_failed", error = %e, "empty staging directory not removed; the next seed call removes it");
        }
        let _ = nix::unistd::fsync(self.sup_fd.as_fd());
        tracing::info!(
            event = "seed.completed",
            files = record.files,
            dirs = record.dirs,
            bytes = record.bytes,
            duration_ms = record.duration_ms,
            digest = %record.digest,
            method = %record.method,
            "workspace seeded"
        );
        Ok(record)
    }
}

fn extract(file: impl std::io::Read, stager: &mut Stager, desc: &str) -> Result<String, SeedError> {
    archive::extract(file, stager).map_err(|e| match e {
        ArchiveError::Format(problem) => SeedError::Archive {
            source_desc: desc.to_owned(),
            problem,
        },
        ArchiveError::Stage(s) => stage_err(s),
    })
}
