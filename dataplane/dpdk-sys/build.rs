//! Build script of kaelix-dpdk-sys.
//!
//! Without the `enabled` feature it does nothing, so the workspace builds on
//! machines without DPDK. With it:
//! 1. asks pkg-config for `libdpdk` (>= 21.11) and its full cflags
//!    (`-include rte_config.h -march=...` included);
//! 2. compiles `shim/kx_dpdk_shim.c`, out-of-line copies of DPDK's
//!    `static inline` fast-path functions, with those cflags (`cc`);
//! 3. runs bindgen over `shim/wrapper.h` with the same flags, keeping only
//!    the functions and types the backend uses;
//! 4. links the shim first, then the `librte_*` libraries from pkg-config.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "enabled")]
    enabled::build();
}

#[cfg(feature = "enabled")]
mod enabled {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    /// Oldest DPDK release whose API this crate is written against.
    const MIN_VERSION: &str = "21.11";

    /// Non-inline DPDK functions the backend calls.
    const FUNCTIONS: &[&str] = &[
        "rte_eal_init",
        "rte_eal_cleanup",
        "rte_strerror",
        "rte_version",
        "rte_socket_id",
        "rte_lcore_count",
        "rte_thread_register",
        "rte_eal_get_runtime_dir",
        "rte_pktmbuf_pool_create",
        "rte_pktmbuf_free_bulk",
        "rte_mempool_free",
        "rte_mempool_avail_count",
        "rte_mempool_in_use_count",
        "rte_eth_dev_count_avail",
        "rte_eth_dev_is_valid_port",
        "rte_eth_dev_socket_id",
        "rte_eth_dev_info_get",
        "rte_eth_dev_configure",
        "rte_eth_dev_adjust_nb_rx_tx_desc",
        "rte_eth_rx_queue_setup",
        "rte_eth_tx_queue_setup",
        "rte_eth_dev_start",
        "rte_eth_dev_stop",
        "rte_eth_dev_close",
        "rte_eth_promiscuous_enable",
        "rte_eth_macaddr_get",
        "rte_eth_stats_get",
        "rte_eth_dev_get_port_by_name",
        "rte_eth_dev_get_name_by_port",
        "rte_eth_link_get_nowait",
        "rte_eth_dev_get_mtu",
    ];

    /// Constants the backend uses.
    const VARS: &[&str] = &[
        "RTE_ETHER_ADDR_LEN",
        "RTE_ETH_NAME_MAX_LEN",
        "RTE_MAX_ETHPORTS",
        "RTE_MEMPOOL_CACHE_MAX_SIZE",
        "RTE_PKTMBUF_HEADROOM",
        "RTE_MBUF_DEFAULT_DATAROOM",
        "RTE_ETH_LINK_UP",
        "LCORE_ID_ANY",
        "SOCKET_ID_ANY",
    ];

    pub fn build() {
        for path in [
            "shim/kx_dpdk_shim.c",
            "shim/kx_dpdk_shim.h",
            "shim/wrapper.h",
        ] {
            println!("cargo:rerun-if-changed={path}");
        }
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

        // Probe without emitting link flags yet: the static shim has to come
        // before the shared librte_* libraries on the linker command line.
        let library = pkg_config::Config::new()
            .atleast_version(MIN_VERSION)
            .cargo_metadata(false)
            .probe("libdpdk")
            .unwrap_or_else(|error| {
                panic!(
                    "kaelix-dpdk-sys: libdpdk >= {MIN_VERSION} was not found by pkg-config: {error}\n\
                     Install DPDK's development files (Debian/Ubuntu: \
                     `apt-get install dpdk dpdk-dev libdpdk-dev`) or point PKG_CONFIG_PATH at \
                     the directory holding libdpdk.pc. Build without the `dpdk` feature to \
                     leave the DPDK backend out."
                )
            });
        let cflags = cflags();

        let mut shim = cc::Build::new();
        shim.file("shim/kx_dpdk_shim.c")
            .include("shim")
            .warnings(true)
            .opt_level(2);
        for flag in &cflags {
            shim.flag(flag);
        }
        shim.compile("kx_dpdk_shim");

        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
        let mut builder = bindgen::Builder::default()
            .header("shim/wrapper.h")
            .clang_args(&cflags)
            .clang_arg("-Ishim")
            .rust_edition(bindgen::RustEdition::Edition2024)
            .allowlist_function("kx_dpdk_.*")
            // Layout-dependent structs the backend never reads: keep them
            // opaque and go through the shim instead.
            .opaque_type("rte_mbuf")
            .opaque_type("rte_mempool")
            .blocklist_type("rte_mbuf__.*|rte_mempool__.*|rte_mbuf_sched")
            .derive_default(true)
            .prepend_enum_name(false)
            .wrap_unsafe_ops(true)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for function in FUNCTIONS {
            builder = builder.allowlist_function(function);
        }
        for var in VARS {
            builder = builder.allowlist_var(var);
        }
        builder
            .generate()
            .unwrap_or_else(|error| {
                panic!("kaelix-dpdk-sys: bindgen failed on shim/wrapper.h: {error}")
            })
            .write_to_file(out.join("bindings.rs"))
            .expect("writing bindings.rs into OUT_DIR");

        // Now the link flags, after the shim.
        for path in &library.link_paths {
            println!("cargo:rustc-link-search=native={}", path.display());
        }
        for lib in &library.libs {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
        println!("cargo:version={}", library.version);
    }

    /// The complete `--cflags` of libdpdk (the pkg-config crate keeps only
    /// `-I` and `-D`, but DPDK also needs `-include rte_config.h` and `-march`).
    fn cflags() -> Vec<String> {
        let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_owned());
        let output = Command::new(&pkg_config)
            .args(["--cflags", "libdpdk"])
            .output()
            .unwrap_or_else(|error| {
                panic!("kaelix-dpdk-sys: running `{pkg_config} --cflags libdpdk`: {error}")
            });
        assert!(
            output.status.success(),
            "kaelix-dpdk-sys: `{pkg_config} --cflags libdpdk` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("pkg-config prints UTF-8")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}
