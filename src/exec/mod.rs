//! Exec sessions: resolving a request, spawning it (pipes or PTY, privilege drop), its
//! I/O pumps and replay buffers, timeouts, and exit status.

mod child;
mod error;
pub mod kill;
pub mod output;
mod pumps;
mod session;
mod sessions;
pub mod spawn;
mod spawner;
pub mod spec;

pub use error::ExecError;
pub use session::{Session, SessionInputError, StdinAccepted};
pub use sessions::{ExecConfig, Sessions};
pub use spawner::Spawner;
pub use spec::{lookup_user, try_lookup_user, ExecPolicy, User, MAX_PASSWD_BYTES};
