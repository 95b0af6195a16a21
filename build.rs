//! Compiles `proto/` hermetically: protox parses the schema in pure Rust, so no system
//! `protoc` is needed on a builder's machine or in CI.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["sandbox/supervisor/v1/supervisor.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The rpc `Connect` would collide with the generated `GatewayClient::connect`
        // constructor; we build our own channels (TLS, keepalive) anyway.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
