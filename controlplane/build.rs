//! Generate the admin API's gRPC code from `proto/admin.proto` (needs
//! `protoc` on PATH, or the `PROTOC` variable: Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    tonic_prost_build::configure().compile_protos(&["proto/admin.proto"], &["proto"])?;
    Ok(())
}
