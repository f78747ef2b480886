//! The AF_XDP sender: the data plane's own AF_XDP backend
//! ([`kaelix_dataplane::af_xdp::AfXdpBackend`]) used from the client side.
//!
//! The backend attaches the XDP program to the sender's interface, steering
//! packets for our local UDP port (the broker's ACKs) into the socket, and
//! builds Ethernet/IPv4/UDP headers in UMEM frames for what we transmit: a
//! "reply" to a [`LinkPeer`] whose remote side is the broker. One socket
//! (queue 0), so one producer thread.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kaelix_client::ProducerState;
use kaelix_dataplane::af_xdp::{AfXdpBackend, AfXdpConfig, AfXdpInfo};
use kaelix_dataplane::{Backend, LinkPeer, Peer};

use super::load::Link;

/// IPv4 + UDP header bytes in front of a datagram inside the MTU.
pub const IPV4_UDP_HEADERS_LEN: usize = 28;

/// What the AF_XDP sender needs to know.
#[derive(Debug, Clone)]
pub struct XdpOptions {
    /// Interface to send on (in this network namespace).
    pub interface: String,
    /// The broker's data address.
    pub broker: SocketAddr,
    /// The broker's MAC address; resolved through the kernel's ARP table when absent.
    pub broker_mac: Option<[u8; 6]>,
    /// Our UDP source port (the XDP program steers the ACKs sent to it).
    pub local_port: u16,
}

/// The AF_XDP socket of queue 0 as a [`Link`].
pub struct XdpLink {
    backend: AfXdpBackend,
    peer: Peer,
    info: AfXdpInfo,
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn mac_from_str(text: &str) -> Result<[u8; 6], String> {
    parse_mac(text).ok_or_else(|| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
}

/// The source address the kernel would use towards `broker`.
fn local_ip_towards(broker: SocketAddr) -> io::Result<IpAddr> {
    let probe = UdpSocket::bind(("0.0.0.0", 0))?;
    probe.connect(broker)?;
    Ok(probe.local_addr()?.ip())
}

/// The broker's MAC from the ARP table, after a datagram to its discard port
/// made the kernel resolve it.
fn resolve_mac(interface: &str, broker: SocketAddr) -> anyhow::Result<[u8; 6]> {
    let probe = UdpSocket::bind(("0.0.0.0", 0)).context("binding the ARP probe socket")?;
    for _ in 0..50 {
        let _ = probe.send_to(b"", SocketAddr::new(broker.ip(), 9));
        std::thread::sleep(Duration::from_millis(20));
        let table = std::fs::read_to_string("/proc/net/arp").context("reading /proc/net/arp")?;
        // IP address, HW type, Flags, HW address, Mask, Device
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 6
                && fields[0] == broker.ip().to_string()
                && fields[5] == interface
                && let Some(mac) = parse_mac(fields[3])
                && mac != [0; 6]
            {
                return Ok(mac);
            }
        }
    }
    bail!(
        "no ARP entry for {} on {interface} after 1 s; pass --xdp-broker-mac",
        broker.ip()
    )
}

impl XdpLink {
    /// Attach to `options.interface` and prepare the headers towards the broker.
    pub fn open(options: &XdpOptions) -> anyhow::Result<Self> {
        let IpAddr::V4(_) = options.broker.ip() else {
            bail!("the AF_XDP sender speaks IPv4 only");
        };
        let local_mac_text =
            std::fs::read_to_string(format!("/sys/class/net/{}/address", options.interface))
                .with_context(|| format!("reading the MAC address of {}", options.interface))?;
        let local_mac = mac_from_str(&local_mac_text).map_err(anyhow::Error::msg)?;
        let broker_mac = match options.broker_mac {
            Some(mac) => mac,
            None => resolve_mac(&options.interface, options.broker)?,
        };
        let local_ip = local_ip_towards(options.broker)
            .with_context(|| format!("finding our address towards {}", options.broker))?;
        let config = AfXdpConfig {
            interface: options.interface.clone(),
            queues: Some(vec![0]),
            data_port: options.local_port,
            ..AfXdpConfig::default()
        };
        let (mut backends, info) = AfXdpBackend::open(&config).with_context(|| {
            format!("opening an AF_XDP socket on {} queue 0", options.interface)
        })?;
        let backend = backends.remove(0);
        let peer = Peer::Link(LinkPeer {
            remote_mac: broker_mac,
            local_mac,
            remote_ip: options.broker.ip(),
            local_ip,
            remote_port: options.broker.port(),
            local_port: options.local_port,
            queue: 0,
        });
        Ok(Self {
            backend,
            peer,
            info,
        })
    }

    /// Largest datagram this link can carry (interface MTU minus IPv4/UDP headers).
    pub fn datagram_len_max(&self) -> usize {
        self.info.mtu as usize - IPV4_UDP_HEADERS_LEN
    }

    /// One line about the socket: mode, bind, MTU.
    pub fn describe(&self) -> String {
        format!(
            "af_xdp on {} (MTU {}, XDP {}, {} bind)",
            self.info.interface,
            self.info.mtu,
            self.info.xdp_mode,
            if self.info.zero_copy {
                "zero-copy"
            } else {
                "copy"
            }
        )
    }
}

impl Link for XdpLink {
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.backend
            .wait_readable(timeout)
            .map_err(io::Error::other)
    }

    fn recv(
        &mut self,
        on_datagram: &mut dyn FnMut(Option<std::net::SocketAddr>, &[u8]),
    ) -> io::Result<usize> {
        self.backend
            .recv_batch(&mut |payload, _peer| on_datagram(None, payload))
            .map_err(io::Error::other)
    }

    fn transmit(&mut self, core: &mut ProducerState, now: Instant) -> io::Result<usize> {
        let mut sent = 0;
        loop {
            let mut produced = false;
            let queued = self
                .backend
                .queue_tx(&self.peer, &mut |buf| match core.poll_transmit(now, buf) {
                    Some(transmit) => {
                        produced = true;
                        transmit.len
                    }
                    None => 0,
                })
                .map_err(io::Error::other)?;
            if !produced {
                break;
            }
            sent += 1;
            if !queued {
                break;
            }
        }
        // Also when nothing was queued: it recycles completed TX frames.
        self.backend.flush_tx().map_err(io::Error::other)?;
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_are_named() {
        assert_eq!(
            mac_from_str("02:00:0a:c8:00:02\n"),
            Ok([2, 0, 0x0a, 0xc8, 0, 2])
        );
        assert!(mac_from_str("02:00:0a:c8:00").is_err());
        assert!(mac_from_str("02:00:0a:c8:00:02:03").is_err());
        assert!(
            mac_from_str("zz:00:0a:c8:00:02")
                .unwrap_err()
                .contains("zz")
        );
    }
}
