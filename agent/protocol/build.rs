// Generates the gRPC client and server for the shim-agent protocol.
// Needs `protoc` (Debian package protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kata_like/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Consumers bring their own transport (vsock, hybrid vsock, Unix socket).
        .build_transport(false)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
