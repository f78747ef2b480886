//! Facts about the network interface (MTU, RX queues) and its busy-poll knobs.
//!
//! Everything here acts on the calling thread's network namespace, except the
//! sysfs knobs, which follow the mount namespace (`ip netns exec` remounts
//! `/sys` for the namespace it enters).

use std::io;
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

use super::AfXdpError;

const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels` from `<linux/ethtool.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// What the backend needs to know about its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDev {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// MTU in bytes (IP packet size, Ethernet header not included).
    pub mtu: u32,
    /// RX queues in use (ethtool channels; 1 when the driver does not say).
    pub rx_queues: u32,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (a name array and a union of
    // integers, sockaddrs and a pointer) for which all-zero bytes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    request
}

impl NetDev {
    /// Look the interface up in the calling thread's network namespace.
    pub fn query(name: &str) -> Result<Self, AfXdpError> {
        let ifindex = kaelix_ebpf::ifindex(name).map_err(|_| AfXdpError::InterfaceNotFound {
            interface: name.to_owned(),
        })?;
        let io_error =
            |operation: &'static str| move |source: io::Error| AfXdpError::Io { operation, source };
        // Any socket will do for these ioctls; this one is never bound.
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)
            .map_err(io_error("creating a socket for interface ioctls"))?;

        let mut request = ifreq_for(name);
        // SAFETY: `request` is a valid ifreq with a NUL-terminated name
        // (validated config names are < IFNAMSIZ); SIOCGIFMTU writes only
        // its `ifru_mtu` member.
        let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut request) };
        if ret != 0 {
            return Err(io_error("reading the interface MTU")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
        let mtu = unsafe { request.ifr_ifru.ifru_mtu };

        let mut channels = EthtoolChannels {
            cmd: ETHTOOL_GCHANNELS,
            ..EthtoolChannels::default()
        };
        let mut request = ifreq_for(name);
        request.ifr_ifru.ifru_data = (&raw mut channels).cast();
        // SAFETY: `ifru_data` points at a properly sized and aligned
        // ethtool_channels that outlives the call; the kernel writes only it.
        let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
        let rx_queues = if ret == 0 {
            (channels.rx_count + channels.combined_count).max(1)
        } else {
            // Drivers without ethtool channel support (lo, some virtual
            // devices) have a single queue.
            1
        };
        Ok(Self {
            name: name.to_owned(),
            ifindex,
            mtu: u32::try_from(mtu).unwrap_or(0),
            rx_queues,
        })
    }

    /// Write a per-device sysfs knob (`napi_defer_hard_irqs`, `gro_flush_timeout`).
    pub fn write_knob(&self, knob: &'static str, value: u64) -> Result<(), AfXdpError> {
        let path = format!("/sys/class/net/{}/{knob}", self.name);
        std::fs::write(&path, value.to_string())
            .map_err(|source| AfXdpError::DeviceKnob { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_mtu_and_one_queue() {
        let lo = NetDev::query("lo").unwrap();
        assert!(lo.ifindex > 0);
        assert!(lo.mtu >= 1500, "lo mtu {}", lo.mtu);
        assert_eq!(lo.rx_queues, 1);
    }

    #[test]
    fn missing_interface() {
        assert!(matches!(
            NetDev::query("kx-missing0"),
            Err(AfXdpError::InterfaceNotFound { .. })
        ));
    }

    #[test]
    fn ethtool_channels_layout() {
        assert_eq!(size_of::<EthtoolChannels>(), 36);
    }
}
