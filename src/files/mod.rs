//! File operations through the relay (`OpenFile` → a `File` stream): write, read, stat,
//! list, mkdir, remove, rename, archive upload and download. Confined to the workspace,
//! run with the sandbox user's identity. See docs/PROTOCOL.md.

use crate::proto;
use crate::relay::Opener;

/// The file service of a bound supervisor. Cloning is cheap.
#[derive(Clone, Default)]
pub struct Files {}

impl Files {
    pub fn new() -> Self {
        Files {}
    }

    /// Serves one `OpenFile` on a stream of its own. Never blocks the control loop.
    pub fn open(&self, req: proto::OpenFile, opener: Opener) {
        tokio::spawn(async move {
            opener
                .refuse(
                    &req.transfer_id,
                    proto::ErrorCode::Unavailable,
                    "file operations are not available in this build",
                )
                .await;
        });
    }

    /// Aborts every running operation (release: before the workload is killed).
    pub async fn abort_all(&self) {}
}
