//! Settings of the AF_XDP backend.

use serde::{Deserialize, Serialize};

use super::AfXdpError;

/// Where the XDP program runs ([`kaelix_ebpf::XdpMode`] as configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeConfig {
    /// Native (driver) mode, generic mode when the driver has no XDP support.
    #[default]
    Auto,
    /// Native mode only; fail otherwise.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

impl From<XdpModeConfig> for kaelix_ebpf::XdpMode {
    fn from(mode: XdpModeConfig) -> Self {
        match mode {
            XdpModeConfig::Auto => kaelix_ebpf::XdpMode::Auto,
            XdpModeConfig::Native => kaelix_ebpf::XdpMode::Native,
            XdpModeConfig::Generic => kaelix_ebpf::XdpMode::Generic,
        }
    }
}

/// How the sockets share packet memory with the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindMode {
    /// Zero-copy where the driver advertises it (its XDP features, kernel
    /// 6.3 and later), copy mode otherwise.
    #[default]
    Auto,
    /// Copy mode (the only mode veth supports).
    Copy,
    /// Zero-copy only; fail where the driver does not support it.
    Zerocopy,
}

/// Whether the UMEM lives on 2 MiB hugepages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// Hugepages when reserved (and the UMEM is a whole number of them), normal pages otherwise.
    #[default]
    Auto,
    /// Hugepages or fail.
    On,
    /// Normal pages.
    Off,
}

/// Settings of the AF_XDP backend (`[dataplane.af_xdp]`).
///
/// Every RX queue gets its own socket and UMEM of `frames` frames of
/// `frame_size` bytes: `fill_ring` of them are kept in the fill ring, the rest
/// are transmit buffers. The defaults (8192 × 4 KiB = 32 MiB per queue, a
/// 4096-entry fill ring above a 2048-entry RX ring) keep the fill ring from
/// running dry when the data-plane core is descheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AfXdpConfig {
    /// Network interface to attach to (required).
    pub interface: String,
    /// RX queues to serve; `None` (the default) serves all of them.
    pub queues: Option<Vec<u32>>,
    /// Where the XDP program runs.
    pub xdp_mode: XdpModeConfig,
    /// Copy or zero-copy sockets.
    pub bind: BindMode,
    /// UDP port of the data plane (the XDP program steers only this port).
    pub data_port: u16,
    /// Preferred busy polling on the sockets (SO_PREFER_BUSY_POLL): the
    /// data-plane core runs the device's NAPI loop itself.
    pub busy_poll: bool,
    /// SO_BUSY_POLL, microseconds.
    pub busy_poll_us: u32,
    /// SO_BUSY_POLL_BUDGET, packets per busy-poll round.
    pub busy_poll_budget: u16,
    /// Written to `/sys/class/net/<interface>/napi_defer_hard_irqs` when set
    /// (2 with `gro_flush_timeout_ns` = 200000 let busy polling take over).
    pub napi_defer_hard_irqs: Option<u32>,
    /// Written to `/sys/class/net/<interface>/gro_flush_timeout` when set, nanoseconds.
    pub gro_flush_timeout_ns: Option<u64>,
    /// UMEM on hugepages.
    pub hugepages: HugePages,
    /// UMEM frames per queue.
    pub frames: u32,
    /// Bytes per UMEM frame (a power of two, 2048 or more).
    pub frame_size: u32,
    /// Fill ring entries (power of two); this many frames are kept in it.
    pub fill_ring: u32,
    /// Completion ring entries (power of two).
    pub comp_ring: u32,
    /// RX ring entries (power of two).
    pub rx_ring: u32,
    /// TX ring entries (power of two).
    pub tx_ring: u32,
    /// Packets taken from the RX ring per `recv_batch`.
    pub batch_size: u32,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        Self {
            interface: String::new(),
            queues: None,
            xdp_mode: XdpModeConfig::Auto,
            bind: BindMode::Auto,
            data_port: 7000,
            busy_poll: true,
            busy_poll_us: 20,
            busy_poll_budget: 64,
            napi_defer_hard_irqs: None,
            gro_flush_timeout_ns: None,
            hugepages: HugePages::Auto,
            frames: 8192,
            frame_size: 4096,
            fill_ring: 4096,
            comp_ring: 2048,
            rx_ring: 2048,
            tx_ring: 2048,
            batch_size: 64,
        }
    }
}

/// Bytes in a 2 MiB hugepage.
pub const HUGEPAGE_BYTES: u64 = 2 * 1024 * 1024;

impl AfXdpConfig {
    /// Check the settings as a whole; errors name the key and the allowed values.
    pub fn validate(&self) -> Result<(), AfXdpError> {
        let invalid = |key: &'static str, reason: String| AfXdpError::Config { key, reason };
        if self.interface.is_empty() {
            return Err(invalid("interface", "must name a network interface".into()));
        }
        if self.interface.len() >= 16 || self.interface.contains(['/', '\0', ' ']) {
            return Err(invalid(
                "interface",
                format!("{:?} is not a valid interface name", self.interface),
            ));
        }
        if let Some(queues) = &self.queues {
            if queues.is_empty() {
                return Err(invalid(
                    "queues",
                    "must list at least one queue (or be left out for all)".into(),
                ));
            }
            if let Some(&queue) = queues.iter().find(|&&q| q >= kaelix_ebpf::MAX_QUEUES) {
                return Err(invalid(
                    "queues",
                    format!(
                        "queue {queue} is out of range 0..{}",
                        kaelix_ebpf::MAX_QUEUES
                    ),
                ));
            }
        }
        if self.data_port == 0 {
            return Err(invalid("data_port", "must be 1..=65535".into()));
        }
        if !self.frame_size.is_power_of_two() || !(2048..=65536).contains(&self.frame_size) {
            return Err(invalid(
                "frame_size",
                format!("{} must be a power of two in 2048..=65536", self.frame_size),
            ));
        }
        for (key, value) in [
            ("fill_ring", self.fill_ring),
            ("comp_ring", self.comp_ring),
            ("rx_ring", self.rx_ring),
            ("tx_ring", self.tx_ring),
        ] {
            if !value.is_power_of_two() || !(64..=32768).contains(&value) {
                return Err(invalid(
                    key,
                    format!("{value} must be a power of two in 64..=32768"),
                ));
            }
        }
        if self.frames <= self.fill_ring {
            return Err(invalid(
                "frames",
                format!(
                    "{} must exceed fill_ring ({}): the frames beyond the fill ring are the transmit buffers",
                    self.frames, self.fill_ring
                ),
            ));
        }
        if self.batch_size == 0 || self.batch_size > self.rx_ring {
            return Err(invalid(
                "batch_size",
                format!(
                    "{} must be in 1..=rx_ring ({})",
                    self.batch_size, self.rx_ring
                ),
            ));
        }
        if self.busy_poll && (self.busy_poll_budget == 0 || self.busy_poll_us == 0) {
            return Err(invalid(
                "busy_poll_budget",
                "busy_poll_us and busy_poll_budget must be at least 1 when busy_poll is on".into(),
            ));
        }
        if self.hugepages == HugePages::On && !self.umem_bytes().is_multiple_of(HUGEPAGE_BYTES) {
            return Err(invalid(
                "hugepages",
                format!(
                    "on needs frames × frame_size ({} bytes) to be a multiple of 2 MiB",
                    self.umem_bytes()
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of UMEM per queue.
    pub fn umem_bytes(&self) -> u64 {
        u64::from(self.frames) * u64::from(self.frame_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AfXdpConfig {
        AfXdpConfig {
            interface: "eth0".into(),
            ..AfXdpConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_once_an_interface_is_named() {
        assert!(matches!(
            AfXdpConfig::default().validate(),
            Err(AfXdpError::Config {
                key: "interface",
                ..
            })
        ));
        valid().validate().unwrap();
        assert!(valid().umem_bytes().is_multiple_of(HUGEPAGE_BYTES));
    }

    #[test]
    fn each_bad_key_is_named() {
        let cases: Vec<(&str, AfXdpConfig)> = vec![
            (
                "interface",
                AfXdpConfig {
                    interface: "a/b".into(),
                    ..valid()
                },
            ),
            (
                "queues",
                AfXdpConfig {
                    queues: Some(vec![]),
                    ..valid()
                },
            ),
            (
                "queues",
                AfXdpConfig {
                    queues: Some(vec![0, 64]),
                    ..valid()
                },
            ),
            (
                "data_port",
                AfXdpConfig {
                    data_port: 0,
                    ..valid()
                },
            ),
            (
                "frame_size",
                AfXdpConfig {
                    frame_size: 3000,
                    ..valid()
                },
            ),
            (
                "rx_ring",
                AfXdpConfig {
                    rx_ring: 1000,
                    ..valid()
                },
            ),
            (
                "frames",
                AfXdpConfig {
                    frames: 4096,
                    ..valid()
                },
            ),
            (
                "batch_size",
                AfXdpConfig {
                    batch_size: 0,
                    ..valid()
                },
            ),
            (
                "busy_poll_budget",
                AfXdpConfig {
                    busy_poll_budget: 0,
                    ..valid()
                },
            ),
            (
                "hugepages",
                AfXdpConfig {
                    hugepages: HugePages::On,
                    frames: 4100,
                    ..valid()
                },
            ),
        ];
        for (expected, config) in cases {
            match config.validate() {
                Err(AfXdpError::Config { key, .. }) => assert_eq!(key, expected),
                other => panic!("{expected}: expected a config error, got {other:?}"),
            }
        }
    }
}
