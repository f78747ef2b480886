//! IPv4 and IPv6 UDP on AF_XDP frames: [`crate::packet`] handles Ethernet /
//! IPv4 (and ARP); this adds IPv6, which the XDP program also steers.
//!
//! ```text
//!  Ethernet (14)  0 dst MAC  6 src MAC  12 ethertype 0x86DD
//!  IPv6 (40)     14 version/class/flow (4)  18 payload length (2)  20 next header (1): 17 UDP
//!                21 hop limit (1)  22 src IP (16)  38 dst IP (16)
//!  UDP (8)       54 src port  56 dst port  58 length  60 checksum (mandatory over IPv6)
//!  payload       62
//! ```
//!
//! Left out on purpose: IPv6 extension headers (the XDP program passes those
//! packets to the kernel) and the UDP checksum of received packets (veth and
//! offloading NICs hand over partial checksums; every frame carries its own
//! CRC-32, which the loop checks).

use std::net::{IpAddr, Ipv6Addr};

use crate::backend::LinkPeer;
use crate::packet::{self as link, ETHERNET_HEADER_LEN, UDP_HEADER_LEN, UDP_HEADERS_LEN};

/// IPv6 fixed header length.
pub const IPV6_HEADER_LEN: usize = 40;
/// Headers in front of the UDP payload of an IPv6 datagram.
pub const IPV6_UDP_HEADERS_LEN: usize = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + UDP_HEADER_LEN;

const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
const HOP_LIMIT: u8 = 64;

/// Why a received frame is not a UDP datagram for the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not an IPv4 UDP datagram (see [`crate::packet::ParseError`]).
    #[error(transparent)]
    Ipv4(#[from] link::ParseError),
    /// An ARP request: the kernel answers those (the XDP program passes them).
    #[error("ARP request")]
    Arp,
    /// The frame ends inside the IPv6 or UDP header.
    #[error("IPv6 frame of {0} bytes ends inside a header")]
    Ipv6Truncated(usize),
    /// IPv6, but the next header is not UDP (extension headers included).
    #[error("IPv6 next header {0} is not UDP")]
    Ipv6NotUdp(u8),
    /// The IPv6 payload length or UDP length does not fit the frame.
    #[error("IPv6 UDP length {declared} does not fit the {available} bytes after the IPv6 header")]
    Ipv6BadLength {
        /// The UDP length field (or the IPv6 payload length when that is wrong).
        declared: usize,
        /// Bytes after the IPv6 header.
        available: usize,
    },
}

/// Why reply headers could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// Building the IPv4 headers failed.
    #[error(transparent)]
    Ipv4(#[from] link::BuildError),
    /// The local and remote addresses are of different IP versions.
    #[error("local and remote IP addresses are of different versions")]
    MixedIpVersions,
    /// The frame cannot hold the IPv6 headers and the payload, or the payload exceeds UDP's limit.
    #[error("{needed} bytes of IPv6 datagram do not fit {available} bytes (or exceed 65535)")]
    Ipv6TooLong {
        /// Headers plus payload.
        needed: usize,
        /// Frame length.
        available: usize,
    },
}

/// A received UDP datagram: its sender and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// Addresses seen from us (remote = sender).
    pub peer: LinkPeer,
    /// The UDP payload (bounded by the UDP length: padding is not payload).
    pub payload: &'a [u8],
}

/// Parse a received Ethernet frame carrying UDP over IPv4 or IPv6. `queue` is
/// the RX queue it arrived on (recorded in the peer for the reply).
pub fn parse(frame: &[u8], queue: u32) -> Result<Datagram<'_>, ParseError> {
    if frame.len() >= ETHERNET_HEADER_LEN
        && u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE_IPV6
    {
        return parse_ipv6(frame, queue);
    }
    match link::parse(frame, queue)? {
        link::Packet::Udp { peer, payload } => Ok(Datagram { peer, payload }),
        link::Packet::ArpRequest(_) => Err(ParseError::Arp),
    }
}

fn parse_ipv6(frame: &[u8], queue: u32) -> Result<Datagram<'_>, ParseError> {
    if frame.len() < IPV6_UDP_HEADERS_LEN {
        return Err(ParseError::Ipv6Truncated(frame.len()));
    }
    let ip = &frame[ETHERNET_HEADER_LEN..];
    if ip[6] != IPPROTO_UDP {
        return Err(ParseError::Ipv6NotUdp(ip[6]));
    }
    let after_header = ip.len() - IPV6_HEADER_LEN;
    let ip_payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip_payload > after_header {
        return Err(ParseError::Ipv6BadLength {
            declared: ip_payload,
            available: after_header,
        });
    }
    let udp = &ip[IPV6_HEADER_LEN..IPV6_HEADER_LEN + ip_payload];
    if udp.len() < UDP_HEADER_LEN {
        return Err(ParseError::Ipv6Truncated(frame.len()));
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER_LEN || udp_len > udp.len() {
        return Err(ParseError::Ipv6BadLength {
            declared: udp_len,
            available: udp.len(),
        });
    }
    let address = |at: usize| {
        let octets: [u8; 16] = ip[at..at + 16].try_into().expect("a 16-byte range");
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    let mac = |at: usize| -> [u8; 6] { frame[at..at + 6].try_into().expect("a 6-byte range") };
    Ok(Datagram {
        peer: LinkPeer {
            remote_mac: mac(6),
            local_mac: mac(0),
            remote_ip: address(8),
            local_ip: address(24),
            remote_port: u16::from_be_bytes([udp[0], udp[1]]),
            local_port: u16::from_be_bytes([udp[2], udp[3]]),
            queue,
        },
        payload: &udp[UDP_HEADER_LEN..udp_len],
    })
}

/// Bytes of headers in front of the UDP payload of a datagram to `peer`.
pub fn headers_len(peer: &LinkPeer) -> usize {
    match peer.remote_ip {
        IpAddr::V4(_) => UDP_HEADERS_LEN,
        IpAddr::V6(_) => IPV6_UDP_HEADERS_LEN,
    }
}

/// Write the headers of a datagram from `peer.local_*` to `peer.remote_*`
/// (a reply to the request `peer` was parsed from) into
/// `frame[..headers_len(peer)]`; its `payload_len` bytes of payload must
/// already follow them. IPv4 goes through [`crate::packet::write_udp_headers`];
/// IPv6 gets the mandatory UDP checksum. Returns the frame length.
pub fn write_udp_headers(
    frame: &mut [u8],
    peer: &LinkPeer,
    payload_len: usize,
    ip_id: u16,
) -> Result<usize, BuildError> {
    match (peer.local_ip, peer.remote_ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            Ok(link::write_udp_headers(frame, peer, payload_len, ip_id)?)
        }
        (IpAddr::V6(local), IpAddr::V6(remote)) => {
            write_ipv6(frame, peer, local, remote, payload_len)
        }
        _ => Err(BuildError::MixedIpVersions),
    }
}

fn write_ipv6(
    frame: &mut [u8],
    peer: &LinkPeer,
    local: Ipv6Addr,
    remote: Ipv6Addr,
    payload_len: usize,
) -> Result<usize, BuildError> {
    let udp_len = UDP_HEADER_LEN + payload_len;
    let total = IPV6_UDP_HEADERS_LEN + payload_len;
    let (Ok(udp_len16), true) = (u16::try_from(udp_len), total <= frame.len()) else {
        return Err(BuildError::Ipv6TooLong {
            needed: total,
            available: frame.len(),
        });
    };
    frame[0..6].copy_from_slice(&peer.remote_mac);
    frame[6..12].copy_from_slice(&peer.local_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    let (ip, rest) = frame[ETHERNET_HEADER_LEN..total].split_at_mut(IPV6_HEADER_LEN);
    ip[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
    ip[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    ip[6] = IPPROTO_UDP;
    ip[7] = HOP_LIMIT;
    ip[8..24].copy_from_slice(&local.octets());
    ip[24..40].copy_from_slice(&remote.octets());
    let udp = rest;
    udp[0..2].copy_from_slice(&peer.local_port.to_be_bytes());
    udp[2..4].copy_from_slice(&peer.remote_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    udp[6..8].fill(0);
    let checksum = match link::internet_checksum(udp, pseudo_header_sum(&local, &remote, udp_len16))
    {
        // RFC 8200: a computed 0 is sent as 0xFFFF (0 means "none", not allowed over IPv6).
        0 => 0xFFFF,
        checksum => checksum,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    Ok(total)
}

/// The folded one's-complement sum of the IPv6 pseudo-header for UDP.
fn pseudo_header_sum(src: &Ipv6Addr, dst: &Ipv6Addr, udp_len: u16) -> u32 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[34..36].copy_from_slice(&udp_len.to_be_bytes());
    pseudo[39] = IPPROTO_UDP;
    u32::from(!link::internet_checksum(&pseudo, 0))
}

/// The same addresses seen from the other end (local and remote swapped):
/// what the sender of a datagram would pass to [`write_udp_headers`].
pub fn swapped(peer: &LinkPeer) -> LinkPeer {
    LinkPeer {
        remote_mac: peer.local_mac,
        local_mac: peer.remote_mac,
        remote_ip: peer.local_ip,
        local_ip: peer.remote_ip,
        remote_port: peer.local_port,
        local_port: peer.remote_port,
        queue: peer.queue,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn broker_v4() -> LinkPeer {
        LinkPeer {
            remote_mac: [2, 0, 0, 0, 0, 1],
            local_mac: [2, 0, 0, 0, 0, 2],
            remote_ip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
            local_ip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
            remote_port: 40_000,
            local_port: 7000,
            queue: 0,
        }
    }

    fn broker_v6() -> LinkPeer {
        LinkPeer {
            remote_ip: IpAddr::V6("fd00::1".parse().unwrap()),
            local_ip: IpAddr::V6("fd00::2".parse().unwrap()),
            ..broker_v4()
        }
    }

    /// The datagram the producer sends to the broker whose view is `broker`.
    fn request(broker: &LinkPeer, payload: &[u8]) -> Vec<u8> {
        let producer = swapped(broker);
        let headers = headers_len(&producer);
        let mut frame = vec![0u8; headers + payload.len()];
        frame[headers..].copy_from_slice(payload);
        let len = write_udp_headers(&mut frame, &producer, payload.len(), 1).unwrap();
        assert_eq!(len, frame.len());
        frame
    }

    #[test]
    fn both_ip_versions_round_trip_with_addresses_swapped() {
        for broker in [broker_v4(), broker_v6()] {
            let frame = request(&broker, b"seven b");
            let datagram = parse(&frame, 2).unwrap();
            assert_eq!(datagram.peer, LinkPeer { queue: 2, ..broker });
            assert_eq!(datagram.payload, b"seven b");
        }
    }

    #[test]
    fn ipv6_udp_checksum_verifies() {
        for payload in [&b""[..], b"odd", b"even"] {
            let frame = request(&broker_v6(), payload);
            let producer = swapped(&broker_v6());
            let (IpAddr::V6(src), IpAddr::V6(dst)) = (producer.local_ip, producer.remote_ip) else {
                unreachable!("built as IPv6")
            };
            let udp = &frame[ETHERNET_HEADER_LEN + IPV6_HEADER_LEN..];
            let udp_len = u16::try_from(udp.len()).unwrap();
            // Over a datagram holding its own checksum the sum verifies to 0.
            assert_eq!(
                link::internet_checksum(udp, pseudo_header_sum(&src, &dst, udp_len)),
                0
            );
            assert_ne!(u16::from_be_bytes([udp[6], udp[7]]), 0);
        }
    }

    #[test]
    fn known_ipv6_udp_checksum() {
        // fe80::1 -> fe80::2, ports 1 -> 2, payload "ab": computed by hand
        // (pseudo-header 0xfe80*2 + 1 + 2 + len 10 + 17, UDP 1 + 2 + 10 + 0x6162).
        let peer = LinkPeer {
            remote_mac: [0; 6],
            local_mac: [0; 6],
            local_ip: IpAddr::V6("fe80::1".parse().unwrap()),
            remote_ip: IpAddr::V6("fe80::2".parse().unwrap()),
            local_port: 1,
            remote_port: 2,
            queue: 0,
        };
        let mut frame = [0u8; IPV6_UDP_HEADERS_LEN + 2];
        frame[IPV6_UDP_HEADERS_LEN..].copy_from_slice(b"ab");
        write_udp_headers(&mut frame, &peer, 2, 0).unwrap();
        let sum: u32 = 0xfe80 * 2 + 1 + 2 + 10 + 17 + 1 + 2 + 10 + 0x6162;
        let folded = (sum & 0xffff) + (sum >> 16);
        let expected = !(u16::try_from(folded).unwrap());
        assert_eq!(u16::from_be_bytes([frame[60], frame[61]]), expected);
    }

    #[test]
    fn ipv6_rejections() {
        let good = request(&broker_v6(), b"x");
        assert_eq!(parse(&good[..50], 0), Err(ParseError::Ipv6Truncated(50)));
        let mut tcp = good.clone();
        tcp[ETHERNET_HEADER_LEN + 6] = 6;
        assert_eq!(parse(&tcp, 0), Err(ParseError::Ipv6NotUdp(6)));
        let mut long_ip = good.clone();
        long_ip[ETHERNET_HEADER_LEN + 4..ETHERNET_HEADER_LEN + 6]
            .copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(
            parse(&long_ip, 0),
            Err(ParseError::Ipv6BadLength { declared: 100, .. })
        ));
        let mut long_udp = good.clone();
        long_udp[58..60].copy_from_slice(&50u16.to_be_bytes());
        assert!(matches!(
            parse(&long_udp, 0),
            Err(ParseError::Ipv6BadLength { declared: 50, .. })
        ));
        let mut padded = good;
        padded.resize(80, 0);
        assert_eq!(parse(&padded, 0).unwrap().payload, b"x");
    }

    #[test]
    fn ipv4_errors_come_from_the_shared_parser() {
        let mut frame = request(&broker_v4(), b"x");
        frame[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(
            parse(&frame, 0),
            Err(ParseError::Ipv4(link::ParseError::OtherEtherType(0x8100)))
        );
    }

    #[test]
    fn build_errors() {
        let mixed = LinkPeer {
            local_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
            ..broker_v4()
        };
        let mut frame = [0u8; 128];
        assert_eq!(
            write_udp_headers(&mut frame, &mixed, 0, 0),
            Err(BuildError::MixedIpVersions)
        );
        assert_eq!(
            write_udp_headers(&mut frame, &broker_v6(), 100, 0),
            Err(BuildError::Ipv6TooLong {
                needed: IPV6_UDP_HEADERS_LEN + 100,
                available: 128
            })
        );
    }
}
