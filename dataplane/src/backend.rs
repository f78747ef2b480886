//! The one small trait every receive/transmit backend implements.
//!
//! The busy-poll loop ([`crate::shard`]) is written once against [`Backend`];
//! kernel sockets, AF_XDP and DPDK differ only here. A backend owns its
//! buffers: received packets are lent to the loop for the duration of
//! [`Backend::recv_batch`] and released (recycled into the fill ring, the
//! mbuf pool, or the socket's buffer array) when it returns. Replies are
//! written straight into the backend's transmit buffers by a `fill` callback
//! and pushed out in one go by [`Backend::flush_tx`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Where a packet came from, and so where its reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A kernel UDP socket peer (socket backend).
    Udp(SocketAddr),
    /// A raw link-layer peer (AF_XDP, DPDK): the reply is built by swapping
    /// the addresses of the request.
    Link(LinkPeer),
}

impl Peer {
    /// The peer's IP address and UDP port.
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            Self::Udp(addr) => *addr,
            Self::Link(link) => SocketAddr::new(link.remote_ip, link.remote_port),
        }
    }
}

/// Addresses of a packet received below the kernel's IP stack, seen from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkPeer {
    /// The sender's MAC address (the reply's destination).
    pub remote_mac: [u8; 6],
    /// Our MAC address (the reply's source).
    pub local_mac: [u8; 6],
    /// The sender's IP address.
    pub remote_ip: IpAddr,
    /// Our IP address the packet was sent to.
    pub local_ip: IpAddr,
    /// The sender's UDP port.
    pub remote_port: u16,
    /// Our UDP port (the data port).
    pub local_port: u16,
    /// The RX queue the packet arrived on (replies leave on the same queue).
    pub queue: u32,
}

/// A backend failure. Per-packet trouble is never an error here: the loop
/// counts it; these are failures of the backend itself.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system call on the backend failed.
    #[error("{backend}: {operation} failed: {source}")]
    Io {
        /// Backend name.
        backend: &'static str,
        /// What was being done.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backend cannot be used as configured.
    #[error("{backend}: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, in words an operator can act on.
        reason: String,
    },
}

/// Counters a backend keeps about itself (read per batch, published by the loop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Packets the backend had to drop on receive (ring full, no buffer, truncated).
    pub rx_dropped: u64,
    /// Replies the backend could not queue (no transmit buffer).
    pub tx_dropped: u64,
}

/// Receive a batch, transmit a batch, release buffers: what the loop needs of a backend.
pub trait Backend: Send {
    /// Short name for logs and metrics (`socket`, `af_xdp`, `dpdk`).
    fn name(&self) -> &'static str;

    /// Receive up to one batch of packets without blocking, calling
    /// `on_packet(udp_payload, peer)` for each one. The buffers are the
    /// backend's and are released when this returns. Returns how many packets
    /// were delivered (0 when none were waiting).
    fn recv_batch(
        &mut self,
        on_packet: &mut dyn FnMut(&[u8], &Peer),
    ) -> Result<usize, BackendError>;

    /// Queue one UDP datagram to `peer`. `fill` writes the UDP payload into
    /// the buffer it is given and returns its length (0 to cancel). Returns
    /// false when no transmit buffer is free (the reply is dropped and
    /// counted; cumulative ACKs make a later one cover it).
    fn queue_tx(
        &mut self,
        peer: &Peer,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Result<bool, BackendError>;

    /// Send everything queued by [`Backend::queue_tx`] (one system call or
    /// ring kick per batch) and recycle completed transmit buffers.
    fn flush_tx(&mut self) -> Result<usize, BackendError>;

    /// Block for at most `timeout` until packets may be waiting. Used by the
    /// idle strategy once spinning and yielding found nothing.
    fn wait_readable(&mut self, timeout: Duration) -> Result<(), BackendError>;

    /// The backend's own counters.
    fn stats(&self) -> BackendStats;

    /// Largest UDP payload this backend can transmit.
    fn max_tx_payload(&self) -> usize;
}
