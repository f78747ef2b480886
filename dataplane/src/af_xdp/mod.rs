//! The AF_XDP backend: frames go from the NIC's RX ring into UMEM and are
//! handed to the loop without the kernel network stack.
//!
//! [`AfXdpBackend::open`] loads the XDP program ([`kaelix_ebpf`]), attaches it
//! to the configured interface (native mode, generic as the fallback; the mode
//! in force is in [`AfXdpInfo`]) and creates **one backend per RX queue**, each
//! with its own AF_XDP socket and UMEM; the broker runs one shard loop per
//! backend (packets can arrive on any queue, and the XSKMAP is keyed by the
//! queue). Each backend:
//!
//! - keeps `fill_ring` frames in the fill ring and the rest of its UMEM as
//!   transmit buffers; received frames go straight back to the fill ring once
//!   [`Backend::recv_batch`] has handed their payloads to the loop;
//! - binds zero-copy where the driver allows it and copy mode otherwise
//!   (veth supports only copy mode), always with `XDP_USE_NEED_WAKEUP`;
//! - turns on preferred busy polling (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`,
//!   `SO_BUSY_POLL_BUDGET`) and, when configured, the device's
//!   `napi_defer_hard_irqs` / `gro_flush_timeout`, so the data-plane core runs
//!   the device's NAPI loop instead of a softirq on another core;
//! - builds replies in UMEM frames: Ethernet/IPv4 or IPv6/UDP headers with the
//!   request's addresses swapped, in front of the payload the loop writes;
//!   completed transmit frames are recycled in batches.
//!
//! The XDP program stays attached while any backend of the set is alive and is
//! detached by the kernel when the last one is dropped or the process dies.
//!
//! Left out on purpose: shared UMEM between queues, multi-buffer (jumbo)
//! frames, VLAN-tagged traffic (passed to the kernel by the program).
#![allow(unsafe_code)]

mod config;
mod netdev;
pub mod packet;
mod xsk;

use std::io;

pub use config::{AfXdpConfig, BindMode, HUGEPAGE_BYTES, HugePages, XdpModeConfig};
pub use kaelix_ebpf::{AttachedMode, Counter, XdpCounters, XdpError};
pub use netdev::NetDev;
pub use xsk::{AfXdpBackend, AfXdpInfo, KernelRingStats, XdpHandle};

use crate::backend::BackendError;

/// Backend name in logs and metrics.
pub const NAME: &str = "af_xdp";

/// Why the AF_XDP backend could not be set up.
///
/// [`AfXdpError::is_unavailable`] tells the broker whether to fall back to
/// the socket backend (missing interface or privilege) or to stop (a
/// configuration or system failure).
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    /// A setting is out of range.
    #[error("dataplane.af_xdp.{key}: {reason}")]
    Config {
        /// The offending key.
        key: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The interface does not exist in this network namespace.
    #[error("af_xdp: network interface {interface:?} not found")]
    InterfaceNotFound {
        /// The configured name.
        interface: String,
    },
    /// The process lacks the privilege (root, or CAP_NET_ADMIN + CAP_BPF + CAP_NET_RAW).
    #[error(
        "af_xdp: {operation} was refused: run as root or grant CAP_NET_ADMIN, CAP_BPF and CAP_NET_RAW ({source})"
    )]
    PermissionDenied {
        /// What was refused.
        operation: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The configured queue does not exist on the interface.
    #[error(
        "af_xdp: interface {interface} has {available} RX queues, queue {queue} was configured"
    )]
    NoSuchQueue {
        /// The interface.
        interface: String,
        /// The configured queue.
        queue: u32,
        /// Queues the interface has.
        available: u32,
    },
    /// Loading or attaching the XDP program failed.
    #[error("af_xdp: {0}")]
    Xdp(#[from] XdpError),
    /// Mapping or registering the UMEM failed.
    #[error(
        "af_xdp: creating the UMEM for queue {queue} ({bytes} bytes, hugepages: {hugepages}) failed: {source}"
    )]
    Umem {
        /// The queue.
        queue: u32,
        /// UMEM bytes.
        bytes: u64,
        /// Whether hugepages were asked for.
        hugepages: bool,
        /// The OS error (ENOMEM: no hugepages reserved).
        #[source]
        source: io::Error,
    },
    /// Creating or binding the AF_XDP socket failed.
    #[error(
        "af_xdp: binding the AF_XDP socket to {interface} queue {queue} in {mode} mode failed: {source}"
    )]
    Socket {
        /// The interface.
        interface: String,
        /// The queue.
        queue: u32,
        /// `copy` or `zero-copy`.
        mode: &'static str,
        /// The OS error (EOPNOTSUPP: no zero-copy support in the driver).
        #[source]
        source: io::Error,
    },
    /// Writing a device knob failed.
    #[error("af_xdp: writing {path} failed: {source}")]
    DeviceKnob {
        /// The sysfs path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another system call failed.
    #[error("af_xdp: {operation} failed: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl AfXdpError {
    /// True when AF_XDP cannot be used here at all (no such interface, no
    /// privilege): the broker falls back to the socket backend with a warning
    /// unless the configuration requires AF_XDP. False for errors an operator
    /// must fix (bad settings, a busy interface, out of memory).
    pub fn is_unavailable(&self) -> bool {
        match self {
            AfXdpError::InterfaceNotFound { .. } | AfXdpError::PermissionDenied { .. } => true,
            AfXdpError::Xdp(XdpError::PermissionDenied { .. })
            | AfXdpError::Xdp(XdpError::InterfaceNotFound { .. }) => true,
            AfXdpError::Socket { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }
}

impl From<AfXdpError> for BackendError {
    fn from(error: AfXdpError) -> Self {
        match error {
            AfXdpError::Io { operation, source } => BackendError::Io {
                backend: NAME,
                operation,
                source,
            },
            other => BackendError::Unavailable {
                backend: NAME,
                reason: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_and_privilege_mean_fall_back() {
        assert!(
            AfXdpError::InterfaceNotFound {
                interface: "x".into()
            }
            .is_unavailable()
        );
        assert!(
            AfXdpError::PermissionDenied {
                operation: "loading",
                source: io::Error::from(io::ErrorKind::PermissionDenied)
            }
            .is_unavailable()
        );
        assert!(
            !AfXdpError::Config {
                key: "frames",
                reason: "no".into()
            }
            .is_unavailable()
        );
        let backend: BackendError = AfXdpError::InterfaceNotFound {
            interface: "vb0".into(),
        }
        .into();
        assert!(backend.to_string().contains("vb0"));
    }
}
