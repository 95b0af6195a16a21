//! `local --upload SRC:DST` (before the command) and `--download SRC:DST` (after it):
//! files and directories moved through the relay's File streams, the way a gateway
//! would. A directory travels as a tar archive (extracted in the sandbox with the seed's
//! hygiene); a file as an atomic write or a read checked against its SHA-256.

use anyhow::{bail, Context};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::LocalTransfer;
use crate::gateway::{Sandbox, WriteOptions};
use crate::proto;

/// Sends `t.local` (this machine) to `t.remote` (the workspace).
pub(super) async fn upload(sandbox: &Sandbox, t: &LocalTransfer) -> anyhow::Result<()> {
    let what = format!("--upload {}:{}", t.local.display(), t.remote);
    let meta = std::fs::symlink_metadata(&t.local)
        .with_context(|| format!("{what}: cannot read {}", t.local.display()))?;
    if meta.is_dir() {
        let archive = tar_dir(&t.local).with_context(|| format!("{what}: archiving"))?;
        let r = sandbox
            .upload_tar(&t.remote, archive, true)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        eprintln!(
            "local: uploaded {} -> {} ({} entries, {} bytes)",
            t.local.display(),
            t.remote,
            r.entry_count,
            r.bytes
        );
    } else if meta.is_file() {
        let data = std::fs::read(&t.local).with_context(|| format!("{what}: reading"))?;
        let opts = WriteOptions {
            mode: meta.permissions().mode() & 0o7777,
            create_parents: true,
            replace: true,
            expect_sha256: None,
        };
        let r = sandbox
            .write_file(&t.remote, data, opts)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        eprintln!(
            "local: uploaded {} -> {} ({} bytes)",
            t.local.display(),
            t.remote,
            r.bytes
        );
    } else {
        bail!("{what}: only a regular file or a directory can be uploaded");
    }
    Ok(())
}

/// Fetches `t.remote` (the workspace) into `t.local` (this machine).
pub(super) async fn download(sandbox: &Sandbox, t: &LocalTransfer) -> anyhow::Result<()> {
    let what = format!("--download {}:{}", t.remote, t.local.display());
    let info = sandbox
        .stat(&t.remote)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    match proto::FileType::try_from(info.r#type).unwrap_or(proto::FileType::Unspecified) {
        proto::FileType::Directory => {
            let tar = sandbox
                .download_tar(&t.remote)
                .await
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            std::fs::create_dir_all(&t.local)
                .with_context(|| format!("{what}: creating {}", t.local.display()))?;
            // The archive comes from the tenant: `unpack` refuses entries that would
            // land outside `t.local` (absolute, `..`, through a link it just made).
            let mut archive = tar::Archive::new(&tar[..]);
            archive.set_preserve_permissions(true);
            archive
                .unpack(&t.local)
                .with_context(|| format!("{what}: unpacking into {}", t.local.display()))?;
            eprintln!(
                "local: downloaded {} -> {} ({} bytes of tar)",
                t.remote,
                t.local.display(),
                tar.len()
            );
        }
        proto::FileType::File => {
            if let Some(parent) = t.local.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("{what}: creating {}", parent.display()))?;
            }
            // Streamed into a temporary file beside the destination and renamed into
            // place once verified: no size is held in memory, and a failed download
            // leaves no partial file where the real one should be.
            let mut part = t.local.clone().into_os_string();
            part.push(".part");
            let part = std::path::PathBuf::from(part);
            let mut file = std::fs::File::create(&part)
                .with_context(|| format!("{what}: creating {}", part.display()))?;
            let result = sandbox.read_file_to(&t.remote, &mut file).await;
            drop(file);
            let written = match result {
                Ok(n) => n,
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    bail!("{what}: {e}");
                }
            };
            let mode = info.mode & 0o777;
            std::fs::set_permissions(&part, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&part, &t.local)
                .with_context(|| format!("{what}: renaming into {}", t.local.display()))?;
            eprintln!(
                "local: downloaded {} -> {} ({written} bytes)",
                t.remote,
                t.local.display(),
            );
        }
        _ => bail!("{what}: only a regular file or a directory can be downloaded"),
    }
    Ok(())
}

/// The contents of `dir` (not `dir` itself) as a plain tar; links stay links.
fn tar_dir(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut names: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            builder.append_dir_all(&name, &path)?;
        } else {
            builder.append_path_with_name(&path, &name)?;
        }
    }
    Ok(builder.into_inner()?)
}
