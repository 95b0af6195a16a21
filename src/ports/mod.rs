//! TCP port forwards through the relay (`OpenForward` → a `Forward` stream): the
//! supervisor connects inside the pod (loopback unless allowed) and relays both ways
//! with half-close. See docs/PROTOCOL.md.

use crate::proto;
use crate::relay::Opener;

/// The forwards of a bound supervisor. Cloning is cheap.
#[derive(Clone, Default)]
pub struct Forwards {}

impl Forwards {
    pub fn new() -> Self {
        Forwards {}
    }

    /// Serves one `OpenForward` on a stream of its own. Never blocks the control loop.
    pub fn open(&self, req: proto::OpenForward, opener: Opener) {
        tokio::spawn(async move {
            opener
                .refuse(
                    &req.forward_id,
                    proto::ErrorCode::Unavailable,
                    "port forwards are not available in this build",
                )
                .await;
        });
    }

    /// Closes every forward (release: before the workload is killed).
    pub async fn close_all(&self) {}
}
