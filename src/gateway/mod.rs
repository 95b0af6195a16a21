//! The reference gateway: a real server for the whole protocol (register and park,
//! activation, sandbox tokens, the control stream, session streams, release), driven
//! in-process by tests, benchmarks and the `local` command. The supervisor is always its
//! gRPC client.

pub mod issuer;
pub mod pki;
pub mod tokens;
