//! The reference gateway: a real server for the whole protocol (register and park,
//! activation, sandbox tokens, the control stream, session streams, release), driven
//! in-process by tests, benchmarks and the `local` command. The supervisor is always its
//! gRPC client.

mod channels;
mod control;
mod driver;
mod exec_handle;
mod files;
pub mod forward;
pub mod issuer;
pub mod link;
mod net;
pub mod pki;
mod register;
mod sandbox;
mod server;
mod sessions;
mod state;
mod stdin;
pub mod tokens;

pub use channels::Opened;
pub use driver::{
    ClaimDelivery, ClaimOptions, ExecError, GatewayConfig, ParkedPod, Push, ReferenceGateway,
};
pub use exec_handle::{Exec, ExecEvent, ExecInput, ExecOutput, ACK_EVERY};
pub use files::WriteOptions;
pub use forward::{ForwardConn, ForwardReader, ForwardWriter};
pub use sandbox::Sandbox;
pub use state::{PodStats, PresentedToken};
pub use stdin::RETAIN_LIMIT as STDIN_RETAIN_LIMIT;

#[cfg(test)]
mod tests;
