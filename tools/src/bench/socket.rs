//! The kernel-socket sender: one UDP socket per producer, datagrams batched
//! into UDP GSO sends (one `sendmsg` carries up to 64 equal-sized datagrams;
//! the kernel splits them) and ACKs taken with `recvmmsg` (and GRO), both
//! through quinn-udp. Without GSO support (or with `--gso off`) each datagram
//! is its own `sendmsg`.
//!
//! With routes (`--brokers`, a cluster) each datagram goes to its stream's
//! current destination in the producer ([`ProducerState::destination`]:
//! the shard leader after a `not_leader` redirect) and replies are handed
//! in with their sender, so stale redirects are told apart.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kaelix_client::ProducerState;
use kaelix_protocol::MAX_DATAGRAM_LEN;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use super::load::Link;

/// Receive buffers per `recvmmsg` (quinn-udp's batch).
const RX_BUFFERS: usize = quinn_udp::BATCH_SIZE;
/// Largest UDP payload of one GSO send (all segments together).
const GSO_BYTES_MAX: usize = MAX_DATAGRAM_LEN;

/// A kernel UDP socket as a [`Link`].
pub struct SocketLink {
    socket: UdpSocket,
    state: UdpSocketState,
    broker: SocketAddr,
    shards: u16,
    rx_buffers: Vec<u8>,
    rx_buffer_len: usize,
    rx_meta: Vec<RecvMeta>,
    tx_buffer: Vec<u8>,
    datagram_len_max: usize,
    max_segments: usize,
    /// The producer routes: destinations come from it, replies go in with their sender.
    routed: bool,
}

impl SocketLink {
    /// Bind an ephemeral port on the unspecified address of `broker`'s family.
    /// `routed`: the producer has routes (see the module docs).
    pub fn bind(
        broker: SocketAddr,
        shards: u16,
        datagram_len_max: usize,
        gso: bool,
        routed: bool,
    ) -> io::Result<Self> {
        let bind: SocketAddr = if broker.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        let rx_buffer_len = 2048 * state.gro_segments().max(1);
        let max_segments = if gso && datagram_len_max * 2 <= GSO_BYTES_MAX {
            state.max_gso_segments().max(1)
        } else {
            1
        };
        Ok(Self {
            rx_buffers: vec![0; RX_BUFFERS * rx_buffer_len],
            rx_buffer_len,
            rx_meta: vec![RecvMeta::default(); RX_BUFFERS],
            tx_buffer: vec![0; GSO_BYTES_MAX + datagram_len_max],
            datagram_len_max,
            max_segments,
            socket,
            state,
            broker,
            shards: shards.max(1),
            routed,
        })
    }

    /// Datagrams per `sendmsg` at most (1 without GSO).
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    fn destination(&self, stream_id: u32) -> SocketAddr {
        let mut addr = self.broker;
        if self.shards > 1 {
            let shard = (stream_id % u32::from(self.shards)) as u16;
            addr.set_port(addr.port().wrapping_add(shard));
        }
        addr
    }

    /// Send `tx_buffer[..len]` as datagrams of `segment` bytes (the last may
    /// be shorter); retries while the socket buffer is full.
    fn send(&mut self, to: SocketAddr, len: usize, segment: usize) {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &self.tx_buffer[..len],
            segment_size: (len > segment).then_some(segment),
            src_ip: None,
        };
        loop {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Ok(()) => return,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    std::hint::spin_loop();
                }
                // Counted as lost: the producer retransmits them.
                Err(_) => return,
            }
        }
    }
}

impl Link for SocketLink {
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(errno) => Err(errno.into()),
        }
    }

    fn recv(
        &mut self,
        on_datagram: &mut dyn FnMut(Option<SocketAddr>, &[u8]),
    ) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let count = {
                let mut slices: [IoSliceMut<'_>; RX_BUFFERS] = {
                    let mut chunks = self.rx_buffers.chunks_mut(self.rx_buffer_len);
                    std::array::from_fn(|_| {
                        IoSliceMut::new(chunks.next().expect("RX_BUFFERS chunks exist"))
                    })
                };
                match self.state.recv(
                    UdpSockRef::from(&self.socket),
                    &mut slices,
                    &mut self.rx_meta,
                ) {
                    Ok(count) => count,
                    Err(err)
                        if matches!(
                            err.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        0
                    }
                    Err(err) => return Err(err),
                }
            };
            for (index, meta) in self.rx_meta[..count].iter().enumerate() {
                let start = index * self.rx_buffer_len;
                let buffer = &self.rx_buffers[start..start + meta.len];
                let stride = meta.stride.max(1);
                let from = self.routed.then_some(meta.addr);
                for datagram in buffer.chunks(stride) {
                    on_datagram(from, datagram);
                    total += 1;
                }
            }
            if count < RX_BUFFERS {
                return Ok(total);
            }
        }
    }

    fn transmit(&mut self, core: &mut ProducerState, now: Instant) -> io::Result<usize> {
        let mut sent = 0;
        let mut used = 0;
        let mut segment = 0;
        let mut segments = 0;
        let mut to = self.broker;
        while let Some(transmit) = core.poll_transmit(now, &mut self.tx_buffer[used..]) {
            sent += 1;
            let destination = match core.destination(transmit.stream_id) {
                Some(routed) if self.routed => routed,
                _ => self.destination(transmit.stream_id),
            };
            if segments > 0 && (destination != to || transmit.len > segment) {
                // Cannot join the pending GSO send: send that, move this one to the front.
                self.send(to, used, segment);
                self.tx_buffer.copy_within(used..used + transmit.len, 0);
                used = 0;
                segments = 0;
            }
            if segments == 0 {
                segment = transmit.len;
                to = destination;
            }
            used += transmit.len;
            segments += 1;
            if transmit.len < segment
                || segments >= self.max_segments
                || used + self.datagram_len_max > GSO_BYTES_MAX
            {
                self.send(to, used, segment);
                used = 0;
                segments = 0;
            }
        }
        if segments > 0 {
            self.send(to, used, segment);
        }
        Ok(sent)
    }
}
