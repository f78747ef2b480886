//! The DPDK backend (cargo feature `dpdk`): a DPDK ethdev port as a [`Backend`].
//!
//! [`DpdkBackend::open`] starts DPDK's EAL with arguments derived from a
//! [`DpdkConfig`], creates one mbuf pool (on hugepages when enough are
//! reserved, else on ordinary memory with `--no-huge`), configures and
//! starts the port with one RX/TX queue pair per data-plane thread, and hands
//! out one backend per queue. Each backend receives bursts of mbufs
//! ([`Backend::recv_batch`]), parses Ethernet/IPv4/UDP with
//! [`crate::packet`], hands the UDP payload and a [`Peer::Link`] to the loop,
//! and frees the burst in one call; replies are written straight into fresh
//! mbufs by swapping the request's addresses and sent in bursts
//! ([`Backend::flush_tx`]). ARP requests for [`DpdkConfig::local_ipv4`] are
//! answered, since no kernel sees the port's traffic.
//!
//! Lifetime: the EAL can start once per process (DPDK cannot re-initialise
//! it after `rte_eal_cleanup`). When the last backend of the port is dropped
//! or closed ([`DpdkBackend::close`]), the port is stopped and closed, the
//! pool freed, `rte_eal_cleanup` runs and the EAL runtime directory
//! (`/var/run/dpdk/<file-prefix>`) is removed. Memory is always
//! `--in-memory` (hugepages) or `--no-huge`, so no hugepage files are left.
//!
//! What it leaves out on purpose: multi-segment (jumbo) packets, VLANs, IPv6,
//! hardware offloads and RSS configuration, DPDK multi-process. See
//! `docs/dpdk.md` for operating it and for binding a real NIC.
//!
//! Without the cargo feature `dpdk` only the configuration and error types
//! are compiled (so a broker's config file parses on every build); the
//! backend itself needs the feature (and libdpdk-dev).
//!
//! `unsafe` in this crate is confined to this module (FFI with
//! `kaelix-dpdk-sys`); each block states the invariant it relies on.
#![allow(unsafe_code)]

#[cfg(feature = "dpdk")]
mod backend;
#[cfg(feature = "dpdk")]
mod eal;
#[cfg(feature = "dpdk")]
mod port;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

#[cfg(feature = "dpdk")]
pub use backend::{DpdkBackend, DpdkCounters, PortStats};

use crate::backend::BackendError;

/// Name of this backend in logs and metrics.
pub const NAME: &str = "dpdk";

/// Whether the mbuf pool lives on hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HugepageMode {
    /// Hugepages (`--in-memory`) when enough free ones are reserved for the
    /// pool, otherwise ordinary memory (`--no-huge`).
    #[default]
    Auto,
    /// Hugepages only; opening fails with [`DpdkError::NoHugepages`] when not enough are free.
    On,
    /// Never: `--no-huge` (slower: 4 KiB pages, IOVA as VA).
    Off,
}

/// Settings of the DPDK backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpdkConfig {
    /// EAL arguments passed as they are, after the ones derived from the
    /// fields below: devices (`--vdev=net_af_packet0,iface=eth1`,
    /// `-a 0000:03:00.0`), `--no-pci`, log levels. Memory options
    /// (`--no-huge`, `--in-memory`, `-m`, `--socket-mem`) here replace the
    /// derived ones; `-l`/`--lcores`/`-c` replace [`DpdkConfig::lcores`].
    /// `--file-prefix` belongs in [`DpdkConfig::file_prefix`].
    pub eal_args: Vec<String>,
    /// Hugepages for the mbuf pool.
    pub hugepages: HugepageMode,
    /// Memory for `--no-huge` mode in MiB (`-m`); derived from `mbuf_count` when unset.
    pub memory_mb: Option<u32>,
    /// `--file-prefix`; unset means `kaelix-<pid>`, unique per process.
    pub file_prefix: Option<String>,
    /// `--lcores` value; unset maps lcore 0 to the CPUs the opening thread may
    /// run on, so the EAL does not re-pin it (pinning is the data plane's job).
    pub lcores: Option<String>,
    /// Port by device name (`net_af_packet0`, `0000:03:00.0`); overrides `port_id`.
    pub port_name: Option<String>,
    /// Port by id (0 is the first device probed).
    pub port_id: u16,
    /// RX/TX queue pairs, one backend (data-plane thread) each.
    pub queues: u16,
    /// RX descriptors per queue (the driver may round or cap it). The
    /// default, 4096, rides out the data-plane thread being descheduled for a
    /// few milliseconds at several hundred thousand packets per second.
    pub rx_ring_size: u16,
    /// TX descriptors per queue (the driver may round it).
    pub tx_ring_size: u16,
    /// Mbufs in the pool (2^n - 1 is the most efficient size).
    pub mbuf_count: u32,
    /// Per-lcore mbuf cache (at most 512).
    pub mbuf_cache_size: u32,
    /// Packet bytes one mbuf holds (its data room after DPDK's headroom).
    /// Packets are received in one segment only (a longer one is counted
    /// and dropped), so this bounds the largest frame: raise it with the
    /// port's MTU (2048 covers 1500; with `net_af_xdp` at most 3840, a 4 KiB page per mbuf).
    pub mbuf_data_bytes: u16,
    /// Packets per RX burst and most replies per TX burst (1..=512).
    pub burst_size: u16,
    /// Only UDP datagrams to this port are delivered; unset delivers all.
    pub data_port: Option<u16>,
    /// Our IPv4 address: ARP requests for it are answered and only UDP
    /// datagrams to it are delivered. Unset: no ARP, any destination.
    pub local_ipv4: Option<Ipv4Addr>,
    /// Put the port in promiscuous mode.
    pub promiscuous: bool,
}

/// DPDK's default data room per mbuf (`RTE_MBUF_DEFAULT_DATAROOM`; checked
/// against the headers in builds with the `dpdk` feature).
pub const DEFAULT_MBUF_DATA_BYTES: u16 = 2048;
/// DPDK's `RTE_PKTMBUF_HEADROOM` (checked likewise).
const MBUF_HEADROOM: u32 = 128;
/// The smallest data room allowed: a minimum Ethernet frame plus our headers with room to spare.
const MIN_MBUF_DATA_BYTES: u32 = 256;
/// The largest: a mempool element's data room is a u16 that includes the headroom.
const MAX_MBUF_DATA_BYTES: u32 = u16::MAX as u32 - MBUF_HEADROOM;
#[cfg(feature = "dpdk")]
const _: () = assert!(
    DEFAULT_MBUF_DATA_BYTES as u32 == kaelix_dpdk_sys::RTE_MBUF_DEFAULT_DATAROOM
        && MBUF_HEADROOM == kaelix_dpdk_sys::RTE_PKTMBUF_HEADROOM
);

impl Default for DpdkConfig {
    fn default() -> Self {
        Self {
            eal_args: vec![
                "--no-pci".to_owned(),
                "--no-telemetry".to_owned(),
                "--log-level=notice".to_owned(),
            ],
            hugepages: HugepageMode::Auto,
            memory_mb: None,
            file_prefix: None,
            lcores: None,
            port_name: None,
            port_id: 0,
            queues: 1,
            rx_ring_size: 4096,
            tx_ring_size: 1024,
            mbuf_count: 16383,
            mbuf_cache_size: 256,
            mbuf_data_bytes: DEFAULT_MBUF_DATA_BYTES,
            burst_size: 32,
            data_port: None,
            local_ipv4: None,
            promiscuous: false,
        }
    }
}

impl DpdkConfig {
    /// Check the fields against each other; errors name the key and the allowed range.
    pub fn validate(&self) -> Result<(), DpdkError> {
        let invalid =
            |key: &'static str, reason: String| Err(DpdkError::InvalidConfig { key, reason });
        if self.queues == 0 {
            return invalid("queues", "must be at least 1".to_owned());
        }
        if self.burst_size == 0 || self.burst_size > 512 {
            return invalid(
                "burst_size",
                format!("{} is outside 1..=512", self.burst_size),
            );
        }
        if self.rx_ring_size == 0 || self.tx_ring_size == 0 {
            return invalid("rx_ring_size", "ring sizes must be at least 1".to_owned());
        }
        if self.mbuf_cache_size > 512 {
            return invalid(
                "mbuf_cache_size",
                format!("{} is above 512", self.mbuf_cache_size),
            );
        }
        let data_bytes = u32::from(self.mbuf_data_bytes);
        if !(MIN_MBUF_DATA_BYTES..=MAX_MBUF_DATA_BYTES).contains(&data_bytes) {
            return invalid(
                "mbuf_data_bytes",
                format!("{data_bytes} is outside {MIN_MBUF_DATA_BYTES}..={MAX_MBUF_DATA_BYTES}"),
            );
        }
        let needed = self.mbufs_needed();
        if u64::from(self.mbuf_count) < needed {
            return invalid(
                "mbuf_count",
                format!(
                    "{} cannot fill {} queue(s) of {} RX + {} TX descriptors plus bursts and caches: at least {needed}",
                    self.mbuf_count, self.queues, self.rx_ring_size, self.tx_ring_size
                ),
            );
        }
        if let Some(prefix) = &self.file_prefix
            && (prefix.is_empty() || prefix.contains(['/', '\0']))
        {
            return invalid(
                "file_prefix",
                format!("{prefix:?} must be a non-empty file name"),
            );
        }
        if let Some(arg) = self
            .eal_args
            .iter()
            .find(|arg| arg.starts_with("--file-prefix"))
        {
            return invalid("eal_args", format!("{arg:?}: set `file_prefix` instead"));
        }
        if let Some(arg) = self.eal_args.iter().find(|arg| arg.contains('\0')) {
            return invalid("eal_args", format!("{arg:?} contains a NUL byte"));
        }
        Ok(())
    }

    /// Mbufs the port can hold at once: full RX and TX rings on every queue,
    /// one burst in flight each way, and the per-lcore caches.
    fn mbufs_needed(&self) -> u64 {
        let queues = u64::from(self.queues);
        let rings = u64::from(self.rx_ring_size) + u64::from(self.tx_ring_size);
        let bursts = 2 * u64::from(self.burst_size);
        queues * (rings + bursts) + (queues + 1) * u64::from(self.mbuf_cache_size)
    }
}

/// Why the DPDK backend could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum DpdkError {
    /// A configuration value is out of range.
    #[error("dpdk config: {key}: {reason}")]
    InvalidConfig {
        /// The key.
        key: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The EAL was already started in this process.
    #[error(
        "DPDK's EAL was already started in this process; it can start only once per process \
         (open every queue with one DpdkBackend::open_queues call)"
    )]
    EalAlreadyStarted,
    /// `hugepages = "on"` but not enough free hugepages.
    #[error(
        "hugepages = \"on\" but only {free_bytes} bytes of hugepages are free and the mbuf pool needs \
         about {needed_bytes}: reserve more (echo N > /proc/sys/vm/nr_hugepages) or use hugepages = \"auto\""
    )]
    NoHugepages {
        /// Free hugepage bytes (HugePages_Free x Hugepagesize).
        free_bytes: u64,
        /// Estimated bytes for the pool and the EAL.
        needed_bytes: u64,
    },
    /// `rte_eal_init` failed.
    #[error(
        "DPDK EAL failed to start: {message} (rte_errno {errno}); {hint}. EAL arguments: {args:?}"
    )]
    EalInit {
        /// `rte_errno` after the call.
        errno: i32,
        /// `rte_strerror(errno)`.
        message: String,
        /// What usually causes this errno.
        hint: &'static str,
        /// The arguments the EAL was given.
        args: Vec<String>,
    },
    /// The EAL started but the requested port does not exist.
    #[error(
        "no DPDK port {wanted}: the EAL found {available} port(s) {names:?} for the devices {devices:?}; \
         a device that failed to probe is logged above (`vdev_probe(): failed to initialize ...`: \
         check iface=<name> exists in this network namespace); add devices to eal_args with \
         --vdev=net_af_packet0,iface=<if> or -a <PCI address of a NIC bound to vfio-pci>"
    )]
    NoPort {
        /// The port asked for (name or id).
        wanted: String,
        /// Ports the EAL probed.
        available: u16,
        /// Their device names.
        names: Vec<String>,
        /// The device arguments given to the EAL (`--vdev`, `-a`).
        devices: Vec<String>,
    },
    /// An ethdev call on the port failed.
    #[error("dpdk port {port_id}: {operation} failed: {message} ({code})")]
    Port {
        /// The port.
        port_id: u16,
        /// What was being done.
        operation: &'static str,
        /// The negative errno DPDK returned.
        code: i32,
        /// Its text.
        message: String,
    },
    /// The mbuf pool could not be created.
    #[error("creating the pool of {count} mbufs failed: {message} (rte_errno {errno})")]
    MbufPool {
        /// Mbufs asked for.
        count: u32,
        /// `rte_errno`.
        errno: i32,
        /// Its text.
        message: String,
    },
    /// Stopping the port or cleaning up the EAL failed (resources may be left).
    #[error("dpdk shutdown: {operation} failed: {message} ({code})")]
    Shutdown {
        /// What was being done.
        operation: &'static str,
        /// The code DPDK or the OS returned.
        code: i32,
        /// Its text.
        message: String,
    },
}

impl From<DpdkError> for BackendError {
    fn from(error: DpdkError) -> Self {
        BackendError::Unavailable {
            backend: NAME,
            reason: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let config = DpdkConfig::default();
        config.validate().unwrap();
        assert!(config.mbufs_needed() <= u64::from(config.mbuf_count));
    }

    #[test]
    fn invalid_configs_name_their_key() {
        let cases: [(&str, DpdkConfig); 7] = [
            (
                "queues",
                DpdkConfig {
                    queues: 0,
                    ..DpdkConfig::default()
                },
            ),
            (
                "burst_size",
                DpdkConfig {
                    burst_size: 1000,
                    ..DpdkConfig::default()
                },
            ),
            (
                "mbuf_count",
                DpdkConfig {
                    mbuf_count: 100,
                    ..DpdkConfig::default()
                },
            ),
            (
                "mbuf_data_bytes",
                DpdkConfig {
                    mbuf_data_bytes: 100,
                    ..DpdkConfig::default()
                },
            ),
            (
                "mbuf_data_bytes",
                DpdkConfig {
                    mbuf_data_bytes: u16::MAX,
                    ..DpdkConfig::default()
                },
            ),
            (
                "file_prefix",
                DpdkConfig {
                    file_prefix: Some("a/b".to_owned()),
                    ..DpdkConfig::default()
                },
            ),
            (
                "eal_args",
                DpdkConfig {
                    eal_args: vec!["--file-prefix=x".to_owned()],
                    ..DpdkConfig::default()
                },
            ),
        ];
        for (key, config) in cases {
            match config.validate() {
                Err(DpdkError::InvalidConfig { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
