//! The kernel UDP socket backend: batched `recvmmsg` (with GRO) through
//! quinn-udp, one `sendmsg` per reply datagram flushed once per batch.
//!
//! Used where no XDP-capable interface or privilege is available (CI,
//! laptops) and as the baseline the kernel-bypass backends are measured
//! against. With several shards each one binds its own port
//! (`data_port + shard`), so a stream's frames always reach the shard that
//! owns it.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::backend::{Backend, BackendError, BackendStats, Peer};

const NAME: &str = "socket";
/// Receive buffers per batch (quinn-udp's recvmmsg batch on Linux is 32).
const RX_BUFFERS: usize = quinn_udp::BATCH_SIZE;
/// Bytes per receive buffer: room for a full datagram, times GRO segments.
const RX_BUFFER_BYTES: usize = 64 * 1024;
/// Largest UDP payload we send.
const TX_MAX_PAYLOAD: usize = kaelix_protocol::MAX_DATAGRAM_LEN;

/// Settings of the socket backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Kernel receive buffer size in bytes (SO_RCVBUF); 0 keeps the system default.
    pub recv_buffer_bytes: usize,
    /// Kernel send buffer size in bytes (SO_SNDBUF); 0 keeps the system default.
    pub send_buffer_bytes: usize,
    /// Replies queued per batch before the oldest are dropped (and counted).
    pub tx_queue_max: usize,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            recv_buffer_bytes: 8 * 1024 * 1024,
            send_buffer_bytes: 4 * 1024 * 1024,
            tx_queue_max: 256,
        }
    }
}

/// One queued reply: destination and a slot in the transmit arena.
#[derive(Debug, Clone, Copy)]
struct TxSlot {
    peer: SocketAddr,
    start: usize,
    len: usize,
}

/// A kernel UDP socket as a [`Backend`].
pub struct SocketBackend {
    socket: UdpSocket,
    state: UdpSocketState,
    rx_buffers: Vec<u8>,
    rx_meta: Vec<RecvMeta>,
    tx_arena: Vec<u8>,
    tx_used: usize,
    tx_slots: Vec<TxSlot>,
    tx_queue_max: usize,
    stats: BackendStats,
}

impl std::fmt::Debug for SocketBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketBackend")
            .field("local_addr", &self.socket.local_addr().ok())
            .field("stats", &self.stats)
            .finish()
    }
}

fn io_error(operation: &'static str) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Io {
        backend: NAME,
        operation,
        source,
    }
}

impl SocketBackend {
    /// Bind a non-blocking UDP socket on `addr` (port 0 picks a free port).
    pub fn bind(addr: SocketAddr, config: &SocketConfig) -> Result<Self, BackendError> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(io_error("creating the UDP socket"))?;
        if config.recv_buffer_bytes > 0 {
            // Best effort: the kernel caps it at net.core.rmem_max.
            let _ = socket.set_recv_buffer_size(config.recv_buffer_bytes);
        }
        if config.send_buffer_bytes > 0 {
            let _ = socket.set_send_buffer_size(config.send_buffer_bytes);
        }
        socket
            .bind(&addr.into())
            .map_err(|source| BackendError::Io {
                backend: NAME,
                operation: "binding the data port",
                source,
            })?;
        socket
            .set_nonblocking(true)
            .map_err(io_error("setting O_NONBLOCK"))?;
        let socket: UdpSocket = socket.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket))
            .map_err(io_error("configuring the UDP socket"))?;
        let gro = state.gro_segments().max(1);
        let rx_buffer_bytes = RX_BUFFER_BYTES * gro;
        let tx_queue_max = config.tx_queue_max.max(1);
        Ok(Self {
            socket,
            state,
            rx_buffers: vec![0u8; RX_BUFFERS * rx_buffer_bytes],
            rx_meta: vec![RecvMeta::default(); RX_BUFFERS],
            // Replies are small (ACK/ERROR frames); budget 2 KiB each.
            tx_arena: vec![0u8; tx_queue_max * 2048],
            tx_used: 0,
            tx_slots: Vec::with_capacity(tx_queue_max),
            tx_queue_max,
            stats: BackendStats::default(),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, BackendError> {
        self.socket
            .local_addr()
            .map_err(io_error("reading the local address"))
    }
}

impl Backend for SocketBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn recv_batch(
        &mut self,
        on_packet: &mut dyn FnMut(&[u8], &Peer),
    ) -> Result<usize, BackendError> {
        let buffer_bytes = self.rx_buffers.len() / RX_BUFFERS;
        let received = {
            let mut slices: [IoSliceMut<'_>; RX_BUFFERS] = {
                let mut chunks = self.rx_buffers.chunks_exact_mut(buffer_bytes);
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().expect("RX_BUFFERS chunks")))
            };
            match self.state.recv(
                UdpSockRef::from(&self.socket),
                &mut slices,
                &mut self.rx_meta,
            ) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(0),
                // ICMP port unreachable from an earlier reply surfaces here; not fatal.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => return Ok(0),
                Err(source) => {
                    return Err(BackendError::Io {
                        backend: NAME,
                        operation: "recvmmsg",
                        source,
                    });
                }
            }
        };
        let mut packets = 0;
        for (index, meta) in self.rx_meta[..received].iter().enumerate() {
            let buffer = &self.rx_buffers[index * buffer_bytes..][..meta.len];
            let peer = Peer::Udp(meta.addr);
            // With GRO one buffer holds several datagrams of `stride` bytes.
            let stride = meta.stride.max(1);
            for datagram in buffer.chunks(stride) {
                self.stats.rx_bytes += datagram.len() as u64;
                packets += 1;
                on_packet(datagram, &peer);
            }
        }
        self.stats.rx_packets += packets as u64;
        Ok(packets)
    }

    fn queue_tx(
        &mut self,
        peer: &Peer,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Result<bool, BackendError> {
        let Peer::Udp(addr) = *peer else {
            return Err(BackendError::Unavailable {
                backend: NAME,
                reason: format!("cannot reply to a link-layer peer {peer:?}"),
            });
        };
        let free = &mut self.tx_arena[self.tx_used..];
        if self.tx_slots.len() >= self.tx_queue_max || free.is_empty() {
            self.stats.tx_dropped += 1;
            return Ok(false);
        }
        let len = fill(free);
        if len == 0 {
            return Ok(true);
        }
        debug_assert!(len <= free.len());
        self.tx_slots.push(TxSlot {
            peer: addr,
            start: self.tx_used,
            len,
        });
        self.tx_used += len;
        Ok(true)
    }

    fn flush_tx(&mut self) -> Result<usize, BackendError> {
        let mut sent = 0;
        for slot in &self.tx_slots {
            let transmit = Transmit {
                destination: slot.peer,
                ecn: None,
                contents: &self.tx_arena[slot.start..slot.start + slot.len],
                segment_size: None,
                src_ip: None,
            };
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Ok(()) => sent += 1,
                // A full send buffer or a vanished peer: the reply is lost and
                // counted; the producer's retransmit or a later cumulative ACK covers it.
                Err(_) => self.stats.tx_dropped += 1,
            }
        }
        self.stats.tx_packets += sent as u64;
        self.tx_slots.clear();
        self.tx_used = 0;
        Ok(sent)
    }

    fn wait_readable(&mut self, timeout: Duration) -> Result<(), BackendError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(errno) => Err(BackendError::Io {
                backend: NAME,
                operation: "poll",
                source: errno.into(),
            }),
        }
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }

    fn max_tx_payload(&self) -> usize {
        TX_MAX_PAYLOAD.min(2048)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn backend() -> SocketBackend {
        SocketBackend::bind("127.0.0.1:0".parse().unwrap(), &SocketConfig::default()).unwrap()
    }

    fn recv_all(backend: &mut SocketBackend, want: usize) -> Vec<(Vec<u8>, Peer)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            backend.wait_readable(Duration::from_millis(50)).unwrap();
            backend
                .recv_batch(&mut |bytes, peer| got.push((bytes.to_vec(), *peer)))
                .unwrap();
        }
        got
    }

    #[test]
    fn receives_batches_and_replies() {
        let mut backend = backend();
        let addr = backend.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for i in 0..100u32 {
            // Different sizes so GRO cannot hide the datagram boundaries.
            let payload = vec![i as u8; 10 + i as usize];
            client.send_to(&payload, addr).unwrap();
        }
        let got = recv_all(&mut backend, 100);
        assert_eq!(got.len(), 100);
        for (i, (bytes, peer)) in got.iter().enumerate() {
            assert_eq!(bytes.len(), 10 + i, "datagram {i}");
            assert!(bytes.iter().all(|b| *b == i as u8));
            assert_eq!(peer.socket_addr(), client.local_addr().unwrap());
        }
        let peer = got[0].1;
        assert!(
            backend
                .queue_tx(&peer, &mut |buf| {
                    buf[..5].copy_from_slice(b"hello");
                    5
                })
                .unwrap()
        );
        assert_eq!(backend.flush_tx().unwrap(), 1);
        let mut reply = [0u8; 64];
        let n = client.recv(&mut reply).unwrap();
        assert_eq!(&reply[..n], b"hello");
        assert_eq!(backend.stats().rx_packets, 100);
        assert_eq!(backend.stats().tx_packets, 1);
    }

    #[test]
    fn equal_sized_datagrams_keep_their_boundaries() {
        let mut backend = backend();
        let addr = backend.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..200u32 {
            client.send_to(&i.to_le_bytes().repeat(100), addr).unwrap();
        }
        let got = recv_all(&mut backend, 200);
        assert_eq!(got.len(), 200);
        for (i, (bytes, _)) in got.iter().enumerate() {
            assert_eq!(bytes, &(i as u32).to_le_bytes().repeat(100));
        }
    }

    #[test]
    fn full_tx_queue_drops_and_counts() {
        let config = SocketConfig {
            tx_queue_max: 2,
            ..SocketConfig::default()
        };
        let mut backend = SocketBackend::bind("127.0.0.1:0".parse().unwrap(), &config).unwrap();
        let peer = Peer::Udp("127.0.0.1:9".parse().unwrap());
        let mut fill = |buf: &mut [u8]| {
            buf[0] = 1;
            1
        };
        assert!(backend.queue_tx(&peer, &mut fill).unwrap());
        assert!(backend.queue_tx(&peer, &mut fill).unwrap());
        assert!(!backend.queue_tx(&peer, &mut fill).unwrap());
        assert_eq!(backend.stats().tx_dropped, 1);
    }

    #[test]
    fn binding_a_taken_port_names_the_problem() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err =
            SocketBackend::bind(taken.local_addr().unwrap(), &SocketConfig::default()).unwrap_err();
        assert!(err.to_string().contains("binding the data port"), "{err}");
    }

    #[test]
    fn wait_readable_returns_after_timeout() {
        let mut backend = backend();
        let start = Instant::now();
        backend.wait_readable(Duration::from_millis(20)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(15));
    }
}
