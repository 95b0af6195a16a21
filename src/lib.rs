//! sandbox-supervisor: the PID-1 supervisor of Kubernetes agent sandboxes that are
//! pre-started in warm pools. See the README for the architecture; each module owns one
//! concern.

pub mod proto {
    //! The generated protocol (`proto/sandbox/supervisor/v1/supervisor.proto`).
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sandbox.supervisor.v1");
}

pub mod config;
pub mod envfile;
pub mod exec;
pub mod files;
#[cfg(feature = "reference-gateway")]
pub mod gateway;
pub mod identity;
pub mod lifecycle;
#[cfg(feature = "reference-gateway")]
pub mod local;
pub mod pid1;
pub mod platform;
pub mod ports;
pub mod relay;
pub mod telemetry;
pub mod workspace;
