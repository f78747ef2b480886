//! Generate the admin API's and the cluster RPCs' gRPC code from
//! `proto/admin.proto` and `proto/cluster.proto` (needs `protoc` on PATH, or
//! the `PROTOC` variable: Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/admin.proto", "proto/cluster.proto"], &["proto"])?;
    Ok(())
}
