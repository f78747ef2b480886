//! Compiles `src/bpf/kaelix_xdp.bpf.c` with clang and generates its libbpf-rs
//! skeleton into `$OUT_DIR/kaelix_xdp.skel.rs`.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "src/bpf/kaelix_xdp.bpf.c";

fn main() {
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    // Debian's clang finds <asm/types.h> only in the multiarch include directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => {
            panic!("kaelix-ebpf: no multiarch include directory known for target arch {other}")
        }
    };
    let multiarch_include = format!("/usr/include/{multiarch}");

    SkeletonBuilder::new()
        .source(SOURCE)
        .obj(out_dir.join("kaelix_xdp.bpf.o"))
        .clang_args([
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-I",
            multiarch_include.as_str(),
        ])
        .build_and_generate(out_dir.join("kaelix_xdp.skel.rs"))
        .unwrap_or_else(|err| panic!("kaelix-ebpf: building {SOURCE} failed: {err:#}"));
    println!("cargo:rerun-if-changed={SOURCE}");
}
