//! The records in `.supervisor/`: what they hold, how they are written durably and how
//! they are read back without trusting the file system.
//!
//! Each record is a JSON envelope `{format, kind, record, checksum}` where `checksum` is
//! `sha256:<hex>` of the canonical serialization of `(format, kind, record)`. A flipped byte
//! either breaks the JSON or the checksum; either way the record is corrupt and boot
//! refuses. The checksum does not authenticate (anyone who can write the file can
//! recompute it): integrity against tampering comes from the root-only directory, which the
//! reader checks too (owner, mode, type, link count).

use super::boot::{Refusal, RefusalReason};
use super::fsutil::{self, Kind};
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};

pub(crate) const RECORD_FORMAT: u32 = 1;
pub(crate) const SEED_FILE: &str = "seed.json";
pub(crate) const BINDING_FILE: &str = "binding.json";
pub(crate) const TOMBSTONE_FILE: &str = "tombstone.json";
/// Space (and one inode) set aside while the volume is not full, for the tombstone: a
/// tenant who fills the volume's bytes or inodes cannot stop the release's first write.
pub(crate) const RESERVE_FILE: &str = "tombstone.reserve";
/// Far more than a tombstone needs, on any block size.
pub(crate) const RESERVE_BYTES: usize = 64 * 1024;
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Written last by a successful seed; its presence means "never seed again".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRecord {
    /// `sha256:<hex>` over the seeded tree (paths, types, modes, link targets, content
    /// hashes, in byte order of the paths); identical trees give identical digests
    /// whatever the source format.
    pub digest: String,
    /// Regular files (each hardlink counts).
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content (hardlinked content counted once).
    pub bytes: u64,
    pub duration_ms: u64,
    /// `directory:<path>`, `archive:<path>`, `url:<scheme://host/path>` (no query,
    /// no credentials) or `none`.
    pub source: String,
    /// `sha256:<hex>` of the downloaded or archive bytes, for URL and archive sources.
    pub source_sha256: Option<String>,
    /// How file content was copied: `reflink`, `copy` or `none`.
    pub method: String,
    pub supervisor_version: String,
    pub pod_uid: Option<String>,
    pub completed_at_ms: i64,
    /// The claim this seed was handed to, added when the binding is written. It makes a
    /// deleted `binding.json` visible: without it a seed record alone reads as "warm,
    /// never bound" and the previous tenant's files would go to the next claim.
    /// Absent (not `null`) until bound, so records written before the field still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_claim_uid: Option<String>,
}

/// Written when a claim binds the pod; a restart may only resume this claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingRecord {
    pub sandbox_id: String,
    pub claim_uid: String,
    pub pod_uid: String,
    pub instance_id: String,
    pub bound_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstonePhase {
    /// Workload killed, release decided; the wipe may not have finished.
    Released,
    /// The wipe finished.
    Wiped,
}

impl TombstonePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TombstonePhase::Released => "released",
            TombstonePhase::Wiped => "wiped",
        }
    }
}

/// The end of the pod's life as a sandbox: once written, boot never goes warm again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub phase: TombstonePhase,
    pub pod_uid: Option<String>,
    /// The claim that was bound when released (copied from the binding record).
    pub claim_uid: Option<String>,
    pub sandbox_id: Option<String>,
    pub released_at_ms: i64,
    pub wiped_at_ms: Option<i64>,
    pub supervisor_version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<T> {
    format: u32,
    kind: String,
    record: T,
    checksum: String,
}

fn checksum<T: Serialize>(
    format: u32,
    kind: &str,
    record: &T,
) -> Result<String, serde_json::Error> {
    let canonical = serde_json::to_vec(&(format, kind, record))?;
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(&canonical))
    ))
}

pub(crate) fn encode<T: Serialize>(kind: &str, record: &T) -> Result<Vec<u8>, serde_json::Error> {
    let env = Envelope {
        format: RECORD_FORMAT,
        kind: kind.to_owned(),
        checksum: checksum(RECORD_FORMAT, kind, record)?,
        record,
    };
    let mut out = serde_json::to_vec_pretty(&env)?;
    out.push(b'\n');
    Ok(out)
}

fn decode<T: Serialize + DeserializeOwned>(kind: &str, bytes: &[u8]) -> Result<T, String> {
    let env: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| format!("does not parse: {e}"))?;
    if env.format != RECORD_FORMAT {
        return Err(format!(
            "has format {} but this supervisor reads format {RECORD_FORMAT} (written by another version?)",
            env.format
        ));
    }
    if env.kind != kind {
        return Err(format!(
            "holds a `{}` record where a `{kind}` record belongs",
            env.kind
        ));
    }
    let want = checksum(env.format, &env.kind, &env.record).map_err(|e| e.to_string())?;
    if want != env.checksum {
        return Err(format!(
            "checksum mismatch (stored {}, computed {want})",
            env.checksum
        ));
    }
    Ok(env.record)
}

/// Who must own the records: root when privileged, else the supervisor's own uid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub privileged: bool,
}

/// Whether `perm` (with owning group `gid`) looks like what a kubelet `fsGroup` change does
/// to a private file or directory: group changed away from ours, group bits added
/// (`rw`, plus `x`/setgid on directories), nothing for others.
pub(crate) fn fsgroup_loosened(perm: u32, gid: u32, own: &Ownership, dir: bool) -> bool {
    let group_allowed = if dir { 0o070 } else { 0o060 };
    let extra_allowed = if dir { libc::S_ISGID } else { 0 };
    gid != own.gid
        && perm & 0o007 == 0
        && perm & 0o070 & !group_allowed == 0
        && perm & 0o7000 & !extra_allowed == 0
}

/// Reads `.supervisor/<name>`: `Ok(None)` when absent; a `Refusal` when it is anything but
/// a private regular file of ours holding a valid record.
pub(crate) fn read_record<T: Serialize + DeserializeOwned>(
    sup: BorrowedFd<'_>,
    name: &str,
    kind: &str,
    own: &Ownership,
    display_dir: &str,
) -> Result<Option<T>, Refusal> {
    let path = format!("{display_dir}/{name}");
    let tampered =
        |detail: String| Refusal::new(RefusalReason::TamperedRecord, format!("{path} {detail}"));
    let cname = std::ffi::CString::new(name).expect("record names have no NUL");
    let meta = match fsutil::stat_at(sup, &cname) {
        Ok(m) => m,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(tampered(format!("cannot be examined: {e}"))),
    };
    if meta.kind != Kind::File {
        return Err(tampered(format!(
            "is a {}, not a regular file",
            meta.kind.describe()
        )));
    }
    if meta.uid != own.uid {
        return Err(tampered(format!(
            "is owned by uid {}, expected uid {} ({})",
            meta.uid,
            own.uid,
            if own.privileged {
                "root"
            } else {
                "the supervisor's uid"
            }
        )));
    }
    if meta.nlink != 1 {
        return Err(tampered(format!(
            "has {} hard links, expected 1",
            meta.nlink
        )));
    }
    let fd = fcntl::openat(
        sup,
        cname.as_c_str(),
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| tampered(format!("cannot be opened: {e}")))?;
    let opened =
        fsutil::stat_fd(fd.as_fd()).map_err(|e| tampered(format!("cannot be examined: {e}")))?;
    if !opened.same_object(&meta) {
        return Err(tampered("was replaced while being read".to_owned()));
    }
    if meta.perm & 0o077 != 0 {
        if fsgroup_loosened(meta.perm, meta.gid, own, false) {
            // What fsGroup does on a PVC remount: restore 0600 and our group.
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o600))
                .and_then(|()| {
                    nix::unistd::fchown(&fd, None, Some(nix::unistd::Gid::from_raw(own.gid)))
                })
                .map_err(|e| {
                    tampered(format!(
                        "has mode {:04o} (fsGroup) and cannot be fixed: {e}",
                        meta.perm
                    ))
                })?;
            tracing::warn!(event = "layout.fixed", path = %path, mode = format!("{:04o}", meta.perm), gid = meta.gid, "restored 0600 on a record loosened by fsGroup");
        } else {
            return Err(tampered(format!(
                "has mode {:04o}: group or others may access it, expected 0600",
                meta.perm
            )));
        }
    }
    if meta.size > MAX_RECORD_BYTES {
        return Err(Refusal::new(
            RefusalReason::CorruptRecord,
            format!("{path} is {} bytes, far larger than any record", meta.size),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.size as usize);
    std::fs::File::from(fd)
        .take(MAX_RECORD_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            Refusal::new(
                RefusalReason::CorruptRecord,
                format!("{path} cannot be read: {e}"),
            )
        })?;
    decode(kind, &bytes)
        .map(Some)
        .map_err(|problem| Refusal::new(RefusalReason::CorruptRecord, format!("{path} {problem}")))
}

/// Writes a record durably (temp, fsync, rename, fsync dir), owned by us, mode 0600.
pub(crate) fn write_record<T: Serialize>(
    sup: BorrowedFd<'_>,
    name: &str,
    kind: &str,
    record: &T,
) -> Result<(), Errno> {
    let bytes = encode(kind, record).map_err(|_| Errno::EINVAL)?;
    fsutil::write_durable(sup, name, &bytes)
}
