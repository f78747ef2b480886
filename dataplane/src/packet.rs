//! Ethernet II / IPv4 / UDP (and ARP) for the link-layer backends (AF_XDP, DPDK).
//!
//! [`parse`] reads a received Ethernet frame in place and returns either the
//! UDP payload with the addresses it came with ([`LinkPeer`]) or an ARP
//! request; [`write_udp_headers`] writes the 42 bytes of headers in front of a
//! reply whose payload is already in place, by swapping the request's
//! addresses; [`write_arp_reply`] answers an ARP request for our address
//! (a DPDK port has no kernel to do it).
//!
//! Layouts (all fields big-endian, no VLAN tag, no IPv4 options on replies):
//!
//! ```text
//!  Ethernet (14)   0  dst MAC (6)   6  src MAC (6)   12  ethertype (2): 0x0800 IPv4, 0x0806 ARP
//!  IPv4 (20..60)  14  ver/ihl (1)  15  tos (1)  16  total length (2)  18  id (2)
//!                 20  flags/fragment offset (2)  22  ttl (1)  23  protocol (1): 17 UDP
//!                 24  header checksum (2)  26  src IP (4)  30  dst IP (4)  [options]
//!  UDP (8)      14+ihl*4: src port (2), dst port (2), length (2), checksum (2), then payload
//!  ARP (28)       14  htype 1 (2)  16  ptype 0x0800 (2)  18  hlen 6  19  plen 4  20  oper (2)
//!                 22  sender MAC (6)  28  sender IP (4)  32  target MAC (6)  38  target IP (4)
//! ```
//!
//! What it leaves out on purpose: VLAN tags, IPv6, IP fragments (dropped: a
//! frame datagram never needs them at the sizes producers send), and the UDP
//! checksum of received packets (veth and offloading NICs hand over partial
//! checksums; every frame carries its own CRC-32, which the loop checks).
//! Malformed input is a [`ParseError`], never a panic.

use std::net::{IpAddr, Ipv4Addr};

use crate::backend::LinkPeer;

/// Ethernet II header length.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// IPv4 header length without options (what replies use).
pub const IPV4_HEADER_LEN: usize = 20;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;
/// Bytes of headers in front of the payload of a UDP reply.
pub const UDP_HEADERS_LEN: usize = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
/// Length of an ARP reply frame, padded to the Ethernet minimum (60 bytes without FCS).
pub const ARP_FRAME_LEN: usize = 60;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IPPROTO_UDP: u8 = 17;
const ARP_LEN: usize = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const REPLY_TTL: u8 = 64;
/// IPv4 "don't fragment" flag in the flags/fragment-offset field.
const IPV4_DONT_FRAGMENT: u16 = 0x4000;

/// What a received frame turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A UDP datagram over IPv4: its payload and where it came from.
    Udp {
        /// Addresses of the datagram, seen from us.
        peer: LinkPeer,
        /// The UDP payload (bounded by the UDP length, not the frame length,
        /// so Ethernet padding is never part of it).
        payload: &'a [u8],
    },
    /// An ARP request ("who has `target_ip`?").
    ArpRequest(ArpRequest),
}

/// The facts of an ARP request needed to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRequest {
    /// MAC address of the asking host.
    pub sender_mac: [u8; 6],
    /// IPv4 address of the asking host.
    pub sender_ip: Ipv4Addr,
    /// The address being asked about.
    pub target_ip: Ipv4Addr,
}

/// Why a received frame was not a UDP datagram or an ARP request we take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The frame ends inside a header.
    #[error("{layer} header truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// `ethernet`, `ipv4`, `udp` or `arp`.
        layer: &'static str,
        /// Bytes the header needs (from the start of the frame).
        needed: usize,
        /// Bytes in the frame.
        available: usize,
    },
    /// Neither IPv4 nor ARP (IPv6, VLAN-tagged, LLDP, ...).
    #[error("ethertype {0:#06x} is not IPv4 or ARP")]
    OtherEtherType(u16),
    /// The IPv4 header is inconsistent (version, header length, total length).
    #[error(
        "bad IPv4 header: version {version}, header {header_len} bytes, total {total_len} bytes, frame {frame_len} bytes"
    )]
    BadIpv4Header {
        /// Version nibble.
        version: u8,
        /// Header length from the IHL field.
        header_len: usize,
        /// Total length field.
        total_len: usize,
        /// Bytes of the frame after the Ethernet header.
        frame_len: usize,
    },
    /// The IPv4 header checksum does not verify.
    #[error("IPv4 header checksum mismatch")]
    BadIpv4Checksum,
    /// An IPv4 fragment (more-fragments flag or a non-zero offset).
    #[error("IPv4 fragment (flags/offset {0:#06x}); fragments are not reassembled")]
    Fragment(u16),
    /// IPv4, but not UDP.
    #[error("IP protocol {0} is not UDP")]
    NotUdp(u8),
    /// The UDP length field disagrees with the IPv4 payload length.
    #[error("bad UDP length {declared} (IPv4 payload {available} bytes)")]
    BadUdpLength {
        /// The UDP length field.
        declared: usize,
        /// IPv4 payload bytes.
        available: usize,
    },
    /// ARP, but not an Ethernet/IPv4 request.
    #[error("ARP packet that is not an Ethernet/IPv4 request (operation {0})")]
    OtherArp(u16),
}

/// Why reply headers could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The peer has IPv6 addresses; only IPv4 replies are built here.
    #[error("IPv6 peers are not supported by the link-layer backends")]
    NotIpv4,
    /// The buffer cannot hold the headers and the payload.
    #[error("buffer of {available} bytes cannot hold {needed} bytes of reply")]
    BufferTooSmall {
        /// Headers plus payload.
        needed: usize,
        /// Buffer length.
        available: usize,
    },
    /// The payload does not fit in one IPv4 datagram.
    #[error("payload of {0} bytes does not fit in one IPv4 datagram")]
    PayloadTooLarge(usize),
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn mac(bytes: &[u8], at: usize) -> [u8; 6] {
    let mut out = [0u8; 6];
    out.copy_from_slice(&bytes[at..at + 6]);
    out
}

fn ipv4(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

/// Parse a received Ethernet frame (without FCS). `queue` is the RX queue it
/// arrived on, recorded in the returned [`LinkPeer`].
pub fn parse(frame: &[u8], queue: u32) -> Result<Packet<'_>, ParseError> {
    if frame.len() < ETHERNET_HEADER_LEN {
        return Err(ParseError::Truncated {
            layer: "ethernet",
            needed: ETHERNET_HEADER_LEN,
            available: frame.len(),
        });
    }
    match be16(frame, 12) {
        ETHERTYPE_IPV4 => parse_ipv4_udp(frame, queue),
        ETHERTYPE_ARP => parse_arp(frame).map(Packet::ArpRequest),
        other => Err(ParseError::OtherEtherType(other)),
    }
}

fn parse_ipv4_udp(frame: &[u8], queue: u32) -> Result<Packet<'_>, ParseError> {
    let ip = &frame[ETHERNET_HEADER_LEN..];
    if ip.len() < IPV4_HEADER_LEN {
        return Err(ParseError::Truncated {
            layer: "ipv4",
            needed: ETHERNET_HEADER_LEN + IPV4_HEADER_LEN,
            available: frame.len(),
        });
    }
    let version = ip[0] >> 4;
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(be16(ip, 2));
    if version != 4
        || header_len < IPV4_HEADER_LEN
        || total_len < header_len
        || total_len > ip.len()
    {
        return Err(ParseError::BadIpv4Header {
            version,
            header_len,
            total_len,
            frame_len: ip.len(),
        });
    }
    if internet_checksum(&ip[..header_len], 0) != 0 {
        return Err(ParseError::BadIpv4Checksum);
    }
    let fragment = be16(ip, 6);
    if fragment & 0x3fff != 0 {
        return Err(ParseError::Fragment(fragment));
    }
    if ip[9] != IPPROTO_UDP {
        return Err(ParseError::NotUdp(ip[9]));
    }
    // Bounded by the IPv4 total length: Ethernet padding is not payload.
    let udp = &ip[header_len..total_len];
    if udp.len() < UDP_HEADER_LEN {
        return Err(ParseError::Truncated {
            layer: "udp",
            needed: ETHERNET_HEADER_LEN + header_len + UDP_HEADER_LEN,
            available: ETHERNET_HEADER_LEN + total_len,
        });
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len < UDP_HEADER_LEN || udp_len > udp.len() {
        return Err(ParseError::BadUdpLength {
            declared: udp_len,
            available: udp.len(),
        });
    }
    let peer = LinkPeer {
        remote_mac: mac(frame, 6),
        local_mac: mac(frame, 0),
        remote_ip: IpAddr::V4(ipv4(ip, 12)),
        local_ip: IpAddr::V4(ipv4(ip, 16)),
        remote_port: be16(udp, 0),
        local_port: be16(udp, 2),
        queue,
    };
    Ok(Packet::Udp {
        peer,
        payload: &udp[UDP_HEADER_LEN..udp_len],
    })
}

fn parse_arp(frame: &[u8]) -> Result<ArpRequest, ParseError> {
    let arp = &frame[ETHERNET_HEADER_LEN..];
    if arp.len() < ARP_LEN {
        return Err(ParseError::Truncated {
            layer: "arp",
            needed: ETHERNET_HEADER_LEN + ARP_LEN,
            available: frame.len(),
        });
    }
    let operation = be16(arp, 6);
    let ethernet_ipv4 =
        be16(arp, 0) == 1 && be16(arp, 2) == ETHERTYPE_IPV4 && arp[4] == 6 && arp[5] == 4;
    if !ethernet_ipv4 || operation != ARP_REQUEST {
        return Err(ParseError::OtherArp(operation));
    }
    Ok(ArpRequest {
        sender_mac: mac(arp, 8),
        sender_ip: ipv4(arp, 14),
        target_ip: ipv4(arp, 24),
    })
}

/// Write Ethernet, IPv4 and UDP headers into `frame[..UDP_HEADERS_LEN]` for a
/// reply to `peer` (the request's addresses swapped) whose `payload_len`
/// bytes are already at `frame[UDP_HEADERS_LEN..]`. Computes the IPv4 header
/// checksum and the UDP checksum. `ip_id` is the IPv4 identification field.
/// Returns the frame length (headers plus payload).
pub fn write_udp_headers(
    frame: &mut [u8],
    peer: &LinkPeer,
    payload_len: usize,
    ip_id: u16,
) -> Result<usize, BuildError> {
    let (IpAddr::V4(local_ip), IpAddr::V4(remote_ip)) = (peer.local_ip, peer.remote_ip) else {
        return Err(BuildError::NotIpv4);
    };
    let udp_len = UDP_HEADER_LEN + payload_len;
    let total_len = IPV4_HEADER_LEN + udp_len;
    let (Ok(udp_len16), Ok(total_len16)) = (u16::try_from(udp_len), u16::try_from(total_len))
    else {
        return Err(BuildError::PayloadTooLarge(payload_len));
    };
    let frame_len = UDP_HEADERS_LEN + payload_len;
    if frame.len() < frame_len {
        return Err(BuildError::BufferTooSmall {
            needed: frame_len,
            available: frame.len(),
        });
    }
    let frame = &mut frame[..frame_len];
    frame[0..6].copy_from_slice(&peer.remote_mac);
    frame[6..12].copy_from_slice(&peer.local_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

    let (ip, udp) = frame[ETHERNET_HEADER_LEN..].split_at_mut(IPV4_HEADER_LEN);
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&total_len16.to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&IPV4_DONT_FRAGMENT.to_be_bytes());
    ip[8] = REPLY_TTL;
    ip[9] = IPPROTO_UDP;
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&local_ip.octets());
    ip[16..20].copy_from_slice(&remote_ip.octets());
    let ip_checksum = internet_checksum(ip, 0);
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

    udp[0..2].copy_from_slice(&peer.local_port.to_be_bytes());
    udp[2..4].copy_from_slice(&peer.remote_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    udp[6..8].fill(0);
    // Pseudo-header: source, destination, protocol, UDP length.
    let mut pseudo = 0u32;
    for word in local_ip
        .octets()
        .chunks_exact(2)
        .chain(remote_ip.octets().chunks_exact(2))
    {
        pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    pseudo += u32::from(IPPROTO_UDP) + u32::from(udp_len16);
    let udp_checksum = match internet_checksum(udp, pseudo) {
        // 0 means "no checksum" in UDP over IPv4; the all-ones form is sent instead.
        0 => 0xffff,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&udp_checksum.to_be_bytes());
    Ok(frame_len)
}

/// Write the ARP reply to `request` saying `our_ip` is at `our_mac` into
/// `frame[..ARP_FRAME_LEN]` (zero-padded to the Ethernet minimum). Returns
/// [`ARP_FRAME_LEN`].
pub fn write_arp_reply(
    frame: &mut [u8],
    request: &ArpRequest,
    our_mac: [u8; 6],
    our_ip: Ipv4Addr,
) -> Result<usize, BuildError> {
    if frame.len() < ARP_FRAME_LEN {
        return Err(BuildError::BufferTooSmall {
            needed: ARP_FRAME_LEN,
            available: frame.len(),
        });
    }
    let frame = &mut frame[..ARP_FRAME_LEN];
    frame.fill(0);
    frame[0..6].copy_from_slice(&request.sender_mac);
    frame[6..12].copy_from_slice(&our_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let arp = &mut frame[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + ARP_LEN];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes());
    arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&ARP_REPLY.to_be_bytes());
    arp[8..14].copy_from_slice(&our_mac);
    arp[14..18].copy_from_slice(&our_ip.octets());
    arp[18..24].copy_from_slice(&request.sender_mac);
    arp[24..28].copy_from_slice(&request.sender_ip.octets());
    Ok(ARP_FRAME_LEN)
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from the partial
/// sum `initial` (for a pseudo-header). Over a header that holds its own
/// correct checksum it is 0.
pub fn internet_checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded `sum` into 16 bits.
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> LinkPeer {
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

    /// The request `peer` sent us: a reply to the reversed peer.
    fn request(payload: &[u8]) -> Vec<u8> {
        let theirs = peer();
        let reversed = LinkPeer {
            remote_mac: theirs.local_mac,
            local_mac: theirs.remote_mac,
            remote_ip: theirs.local_ip,
            local_ip: theirs.remote_ip,
            remote_port: theirs.local_port,
            local_port: theirs.remote_port,
            queue: 0,
        };
        let mut frame = vec![0u8; UDP_HEADERS_LEN + payload.len()];
        frame[UDP_HEADERS_LEN..].copy_from_slice(payload);
        let len = write_udp_headers(&mut frame, &reversed, payload.len(), 7).unwrap();
        assert_eq!(len, frame.len());
        frame
    }

    #[test]
    fn udp_round_trips_with_addresses_swapped() {
        let frame = request(b"hello frames");
        let Packet::Udp { peer: got, payload } = parse(&frame, 0).unwrap() else {
            panic!("not UDP");
        };
        assert_eq!(got, peer());
        assert_eq!(payload, b"hello frames");
    }

    #[test]
    fn checksums_verify() {
        let frame = request(b"odd length payload!");
        let ip = &frame[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + IPV4_HEADER_LEN];
        assert_eq!(internet_checksum(ip, 0), 0);
        // UDP checksum over pseudo-header + UDP header + payload folds to 0.
        let udp = &frame[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN..];
        let mut pseudo = 0u32;
        for word in ip[12..20].chunks_exact(2) {
            pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
        }
        pseudo += 17 + udp.len() as u32;
        assert_eq!(internet_checksum(udp, pseudo), 0);
    }

    #[test]
    fn known_ipv4_checksum() {
        // The example header of RFC 1071 / Wikipedia: checksum 0xb861.
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header, 0), 0xb861);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut frame = request(b"ab");
        frame.resize(60, 0xee);
        let Packet::Udp { payload, .. } = parse(&frame, 3).unwrap() else {
            panic!("not UDP");
        };
        assert_eq!(payload, b"ab");
    }

    #[test]
    fn ip_options_are_skipped() {
        let plain = request(b"xyz");
        // Rebuild with a 24-byte IPv4 header (one NOP-padded option word).
        let mut frame = plain[..ETHERNET_HEADER_LEN + IPV4_HEADER_LEN].to_vec();
        frame.extend_from_slice(&[1, 1, 1, 0]);
        frame.extend_from_slice(&plain[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN..]);
        let ip = &mut frame[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + 24];
        ip[0] = 0x46;
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[10..12].fill(0);
        let sum = internet_checksum(ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let Packet::Udp { payload, peer: got } = parse(&frame, 0).unwrap() else {
            panic!("not UDP");
        };
        assert_eq!(payload, b"xyz");
        assert_eq!(got.local_port, 7000);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let frame = request(b"payload");
        for len in 0..UDP_HEADERS_LEN {
            assert!(
                parse(&frame[..len], 0).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        let mut bad = frame.clone();
        bad[ETHERNET_HEADER_LEN + 8] ^= 1; // ttl: breaks the header checksum
        assert_eq!(parse(&bad, 0), Err(ParseError::BadIpv4Checksum));

        let mut ipv6 = frame.clone();
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse(&ipv6, 0), Err(ParseError::OtherEtherType(0x86dd)));

        let mut long_udp = frame.clone();
        let at = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + 4;
        long_udp[at..at + 2].copy_from_slice(&1000u16.to_be_bytes());
        assert!(matches!(
            parse(&long_udp, 0),
            Err(ParseError::BadUdpLength { declared: 1000, .. })
        ));
    }

    #[test]
    fn fragments_and_other_protocols_are_refused() {
        let reseal = |frame: &mut Vec<u8>| {
            let ip = &mut frame[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + IPV4_HEADER_LEN];
            ip[10..12].fill(0);
            let sum = internet_checksum(ip, 0);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        };
        let mut fragment = request(b"p");
        fragment[ETHERNET_HEADER_LEN + 6] = 0x20; // more fragments
        reseal(&mut fragment);
        assert_eq!(parse(&fragment, 0), Err(ParseError::Fragment(0x2000)));

        let mut tcp = request(b"p");
        tcp[ETHERNET_HEADER_LEN + 9] = 6;
        reseal(&mut tcp);
        assert_eq!(parse(&tcp, 0), Err(ParseError::NotUdp(6)));
    }

    #[test]
    fn arp_request_is_answered() {
        let mut request_frame = [0u8; 42];
        request_frame[0..6].fill(0xff);
        request_frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        request_frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        let arp = &mut request_frame[14..];
        arp[0..2].copy_from_slice(&1u16.to_be_bytes());
        arp[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        arp[4] = 6;
        arp[5] = 4;
        arp[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
        arp[8..14].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        arp[14..18].copy_from_slice(&[10, 200, 0, 1]);
        arp[24..28].copy_from_slice(&[10, 200, 0, 2]);
        let Packet::ArpRequest(request) = parse(&request_frame, 0).unwrap() else {
            panic!("not ARP");
        };
        assert_eq!(request.target_ip, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(request.sender_ip, Ipv4Addr::new(10, 200, 0, 1));

        let mut reply = [0u8; ARP_FRAME_LEN];
        let our_mac = [2, 0, 0, 0, 0, 2];
        write_arp_reply(&mut reply, &request, our_mac, request.target_ip).unwrap();
        assert_eq!(&reply[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(be16(&reply, 20), ARP_REPLY);
        assert_eq!(&reply[22..28], &our_mac);
        assert_eq!(&reply[28..32], &[10, 200, 0, 2]);
        assert_eq!(&reply[38..42], &[10, 200, 0, 1]);
        // A reply is not a request.
        assert_eq!(parse(&reply, 0), Err(ParseError::OtherArp(ARP_REPLY)));
    }

    #[test]
    fn ipv6_peer_and_small_buffer_are_build_errors() {
        let mut v6 = peer();
        v6.local_ip = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
        let mut buf = [0u8; 64];
        assert_eq!(
            write_udp_headers(&mut buf, &v6, 4, 0),
            Err(BuildError::NotIpv4)
        );
        assert_eq!(
            write_udp_headers(&mut buf, &peer(), 40, 0),
            Err(BuildError::BufferTooSmall {
                needed: 82,
                available: 64
            })
        );
        assert_eq!(
            write_udp_headers(&mut buf, &peer(), 70_000, 0),
            Err(BuildError::PayloadTooLarge(70_000))
        );
    }
}
