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
        // `bytes` fields as `Bytes`: output and stdin payloads move between the replay
        // buffer, prost and the HTTP/2 buffers without a copy of their own on either side.
        .bytes(".sandbox.supervisor.v1")
        .compile_fds(fds)?;
    Ok(())
}
