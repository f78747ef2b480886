//! [`DpdkBackend`]: one RX/TX queue pair of a DPDK port as a [`Backend`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use kaelix_dpdk_sys as sys;

use super::eal::register_thread;
use super::port::Port;
use super::{DpdkConfig, DpdkError, NAME};
use crate::backend::{Backend, BackendError, BackendStats, LinkPeer, Peer};
use crate::packet::{
    self, ARP_FRAME_LEN, ArpRequest, IPV4_HEADER_LEN, Packet, UDP_HEADER_LEN, UDP_HEADERS_LEN,
};

/// Full TX bursts retried before the rest of a flush is dropped.
const TX_RETRIES: u32 = 64;
/// Longest sleep of [`Backend::wait_readable`]: poll-mode ports have no
/// file descriptor to block on, so idling is a short sleep.
const WAIT_SLICE: Duration = Duration::from_micros(100);

/// What the backend saw besides delivered datagrams (all monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DpdkCounters {
    /// Frames taken from the RX queue, whatever they were.
    pub rx_frames: u64,
    /// Frames that were not IPv4/UDP or ARP (IPv6, LLDP, ...).
    pub rx_other: u64,
    /// IPv4/UDP or ARP frames that did not parse (bad lengths, checksum, fragments).
    pub rx_malformed: u64,
    /// UDP datagrams to another port or address than ours.
    pub rx_not_ours: u64,
    /// Frames spread over several mbufs (jumbo frames; not supported).
    pub rx_multi_segment: u64,
    /// ARP requests for our address answered.
    pub arp_replies: u64,
}

/// Counters of the port itself (`rte_eth_stats_get`), all queues together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received by the port.
    pub rx_packets: u64,
    /// Packets sent by the port.
    pub tx_packets: u64,
    /// Packets the port dropped because its RX ring was full.
    pub rx_missed: u64,
    /// Erroneous received packets.
    pub rx_errors: u64,
    /// Failed transmissions.
    pub tx_errors: u64,
    /// RX mbuf allocation failures.
    pub rx_no_mbuf: u64,
}

/// One queue pair of a started DPDK port. Created by [`DpdkBackend::open`]
/// or [`DpdkBackend::open_queues`]; the port and the EAL shut down when the
/// last backend of the port is dropped or closed.
#[derive(Debug)]
pub struct DpdkBackend {
    port: Arc<Port>,
    queue: u16,
    burst: u16,
    /// RX burst array, `burst` entries; valid mbufs only between rx_burst and free_bulk.
    rx: Vec<*mut sys::rte_mbuf>,
    /// Replies queued by queue_tx, owned until flush_tx hands them to the driver.
    tx: Vec<*mut sys::rte_mbuf>,
    data_port: Option<u16>,
    local_ipv4: Option<Ipv4Addr>,
    max_payload: usize,
    ip_id: u16,
    stats: BackendStats,
    counters: DpdkCounters,
}

// SAFETY: the raw pointers are mbufs this backend owns exclusively (queued
// replies) or holds only inside recv_batch, and the port/pool behind
// Arc<Port>, which is Send + Sync. DPDK lets any thread use a queue as long as
// no two use it at once; a DpdkBackend is the only user of its queue and is
// not Sync, so moving it to another thread is sound.
unsafe impl Send for DpdkBackend {}

impl DpdkBackend {
    /// Start the EAL and a port with one queue pair, and return its backend.
    /// Fails with [`DpdkError::InvalidConfig`] when `config.queues` is not 1
    /// (use [`DpdkBackend::open_queues`]).
    pub fn open(config: &DpdkConfig) -> Result<Self, DpdkError> {
        if config.queues != 1 {
            return Err(DpdkError::InvalidConfig {
                key: "queues",
                reason: format!("{} queues: use DpdkBackend::open_queues", config.queues),
            });
        }
        let mut backends = Self::open_queues(config)?;
        Ok(backends
            .pop()
            .expect("open_queues returns one backend per queue"))
    }

    /// Start the EAL and a port with `config.queues` queue pairs, and return
    /// one backend per queue (index = queue id), for one data-plane thread each.
    pub fn open_queues(config: &DpdkConfig) -> Result<Vec<Self>, DpdkError> {
        let port = Arc::new(Port::open(config)?);
        // An IPv4 datagram within the MTU, in one mbuf, after our headers.
        let max_payload = (usize::from(port.mtu) - IPV4_HEADER_LEN - UDP_HEADER_LEN)
            .min(usize::from(port.mbuf_data_bytes) - UDP_HEADERS_LEN);
        let burst = config.burst_size;
        Ok((0..port.queues)
            .map(|queue| Self {
                port: Arc::clone(&port),
                queue,
                burst,
                rx: vec![std::ptr::null_mut(); usize::from(burst)],
                tx: Vec::with_capacity(usize::from(burst)),
                data_port: config.data_port,
                local_ipv4: config.local_ipv4,
                max_payload,
                ip_id: 0,
                stats: BackendStats::default(),
                counters: DpdkCounters::default(),
            })
            .collect())
    }

    /// The port's MAC address.
    pub fn mac_address(&self) -> [u8; 6] {
        self.port.mac
    }

    /// The port id.
    pub fn port_id(&self) -> u16 {
        self.port.port_id
    }

    /// This backend's queue.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Whether the mbuf pool is on hugepages.
    pub fn hugepages(&self) -> bool {
        self.port.hugepages
    }

    /// Counters beyond [`BackendStats`].
    pub fn counters(&self) -> DpdkCounters {
        self.counters
    }

    /// Mbufs of the pool currently free and in use (rings, caches, in flight).
    pub fn pool_usage(&self) -> (u32, u32) {
        (self.port.pool_available(), self.port.pool_in_use())
    }

    /// The port's own counters (all queues).
    pub fn port_stats(&self) -> Result<PortStats, DpdkError> {
        let mut stats = sys::rte_eth_stats::default();
        // SAFETY: the port is started while self holds it; stats is writable.
        let code = unsafe { sys::rte_eth_stats_get(self.port.port_id, &mut stats) };
        if code < 0 {
            return Err(DpdkError::Port {
                port_id: self.port.port_id,
                operation: "rte_eth_stats_get",
                code,
                message: super::eal::strerror(-code),
            });
        }
        Ok(PortStats {
            rx_packets: stats.ipackets,
            tx_packets: stats.opackets,
            rx_missed: stats.imissed,
            rx_errors: stats.ierrors,
            tx_errors: stats.oerrors,
            rx_no_mbuf: stats.rx_nombuf,
        })
    }

    /// Send what is queued, then release this backend. When it was the
    /// port's last backend, stop and close the port, free the pool and clean
    /// up the EAL (leaving no runtime directory), reporting failures.
    pub fn close(mut self) -> Result<(), DpdkError> {
        if let Err(error) = self.flush_tx() {
            tracing::warn!(%error, "flushing replies while closing the DPDK backend");
        }
        self.free_tx();
        let port = Arc::clone(&self.port);
        drop(self);
        match Arc::into_inner(port) {
            Some(port) => port.close(),
            None => Ok(()),
        }
    }

    fn free_tx(&mut self) {
        if !self.tx.is_empty() {
            let count = u32::try_from(self.tx.len()).expect("tx queue holds at most a burst");
            // SAFETY: every pointer in tx is an mbuf this backend allocated
            // and still owns; they are freed once and forgotten.
            unsafe { sys::rte_pktmbuf_free_bulk(self.tx.as_mut_ptr(), count) };
            self.tx.clear();
        }
    }

    /// Whether a datagram with these addresses is for us.
    fn accepts(&self, peer: &LinkPeer) -> bool {
        self.data_port.is_none_or(|port| port == peer.local_port)
            && self
                .local_ipv4
                .is_none_or(|ip| IpAddr::V4(ip) == peer.local_ip)
    }

    /// Allocate an mbuf holding `len` bytes of data, or count a TX drop.
    /// Returns the mbuf and a pointer to its `len` writable bytes.
    fn alloc_tx(&mut self, len: usize) -> Option<(*mut sys::rte_mbuf, *mut u8)> {
        if self.tx.len() >= usize::from(self.burst) && self.flush_tx().is_err() {
            self.stats.tx_dropped += 1;
            return None;
        }
        // SAFETY: the pool is live while self holds the port.
        let mbuf = unsafe { sys::kx_dpdk_pktmbuf_alloc(self.port.pool) };
        if mbuf.is_null() {
            self.stats.tx_dropped += 1;
            return None;
        }
        let len16 = u16::try_from(len).expect("replies fit one mbuf (len <= mbuf_data_bytes)");
        // SAFETY: mbuf is a fresh one-segment mbuf we own; append returns
        // NULL or a pointer to `len` writable bytes inside it.
        let data = unsafe { sys::kx_dpdk_pktmbuf_append(mbuf, len16) };
        if data.is_null() {
            // SAFETY: mbuf is ours and not queued anywhere.
            unsafe { sys::kx_dpdk_pktmbuf_free(mbuf) };
            self.stats.tx_dropped += 1;
            return None;
        }
        Some((mbuf, data.cast::<u8>()))
    }

    /// Shrink a queued mbuf from `allocated` to `len` bytes and queue it.
    fn push_tx(&mut self, mbuf: *mut sys::rte_mbuf, allocated: usize, len: usize) {
        debug_assert!(len <= allocated);
        let excess = u16::try_from(allocated - len).expect("replies fit one mbuf");
        // SAFETY: mbuf is ours with `allocated` bytes of data in one segment,
        // so trimming `excess <= allocated` bytes succeeds.
        let trimmed = unsafe { sys::kx_dpdk_pktmbuf_trim(mbuf, excess) };
        debug_assert_eq!(trimmed, 0);
        self.tx.push(mbuf);
    }

    fn answer_arp(&mut self, request: &ArpRequest, our_ip: Ipv4Addr) {
        let mac = self.port.mac;
        let Some((mbuf, data)) = self.alloc_tx(ARP_FRAME_LEN) else {
            return;
        };
        // SAFETY: data points to ARP_FRAME_LEN bytes of the mbuf we own; the
        // slice ends before the mbuf is queued (push_tx).
        let bytes = unsafe { std::slice::from_raw_parts_mut(data, ARP_FRAME_LEN) };
        let len = packet::write_arp_reply(bytes, request, mac, our_ip)
            .expect("ARP_FRAME_LEN bytes were allocated");
        self.push_tx(mbuf, ARP_FRAME_LEN, len);
        self.counters.arp_replies += 1;
    }
}

impl Drop for DpdkBackend {
    fn drop(&mut self) {
        self.free_tx();
    }
}

/// The data of a received one-segment mbuf.
///
/// # Safety
/// `mbuf` must be a live mbuf that stays unmodified and unfreed for `'a`.
unsafe fn mbuf_bytes<'a>(mbuf: *mut sys::rte_mbuf) -> &'a [u8] {
    // SAFETY: per the contract mbuf is live; mtod points at data_len bytes
    // of its first segment.
    unsafe {
        let data = sys::kx_dpdk_pktmbuf_mtod(mbuf).cast::<u8>();
        let len = usize::from(sys::kx_dpdk_pktmbuf_data_len(mbuf));
        std::slice::from_raw_parts(data, len)
    }
}

impl Backend for DpdkBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn recv_batch(
        &mut self,
        on_packet: &mut dyn FnMut(&[u8], &Peer),
    ) -> Result<usize, BackendError> {
        register_thread();
        // SAFETY: started port, our own queue (one backend per queue, and
        // &mut self excludes concurrent use); rx has room for `burst` pointers.
        let received = unsafe {
            sys::kx_dpdk_rx_burst(
                self.port.port_id,
                self.queue,
                self.rx.as_mut_ptr(),
                self.burst,
            )
        };
        let received = usize::from(received);
        if received == 0 {
            return Ok(0);
        }
        self.counters.rx_frames += received as u64;
        let mut delivered = 0;
        let mut arp_answered = false;
        for index in 0..received {
            let mbuf = self.rx[index];
            // SAFETY: mbuf came from rx_burst and is freed only after this loop.
            if unsafe { sys::kx_dpdk_pktmbuf_nb_segs(mbuf) } != 1 {
                self.counters.rx_multi_segment += 1;
                self.stats.rx_dropped += 1;
                continue;
            }
            // SAFETY: as above; `frame` is not used after this iteration.
            let frame = unsafe { mbuf_bytes(mbuf) };
            match packet::parse(frame, u32::from(self.queue)) {
                Ok(Packet::Udp { peer, payload }) if self.accepts(&peer) => {
                    on_packet(payload, &Peer::Link(peer));
                    delivered += 1;
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += payload.len() as u64;
                }
                Ok(Packet::Udp { .. }) => {
                    self.counters.rx_not_ours += 1;
                    self.stats.rx_dropped += 1;
                }
                Ok(Packet::ArpRequest(request)) => match self.local_ipv4 {
                    Some(ours) if request.target_ip == ours => {
                        self.answer_arp(&request, ours);
                        arp_answered = true;
                    }
                    _ => self.counters.rx_not_ours += 1,
                },
                Err(packet::ParseError::OtherEtherType(_) | packet::ParseError::OtherArp(_)) => {
                    self.counters.rx_other += 1;
                }
                Err(_) => {
                    self.counters.rx_malformed += 1;
                    self.stats.rx_dropped += 1;
                }
            }
        }
        let count = u32::try_from(received).expect("a burst is at most 512");
        // SAFETY: rx[..received] are the mbufs rx_burst gave us; no slice into
        // them survives the loop; each is freed exactly once here.
        unsafe { sys::rte_pktmbuf_free_bulk(self.rx.as_mut_ptr(), count) };
        if arp_answered {
            // Answer ARP now rather than with the next batch of replies.
            self.flush_tx()?;
        }
        Ok(delivered)
    }

    fn queue_tx(
        &mut self,
        peer: &Peer,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Result<bool, BackendError> {
        let Peer::Link(link) = peer else {
            return Err(BackendError::Unavailable {
                backend: NAME,
                reason: format!(
                    "cannot reply to {peer:?}: the DPDK backend only replies to link-layer peers"
                ),
            });
        };
        let allocated = UDP_HEADERS_LEN + self.max_payload;
        let Some((mbuf, data)) = self.alloc_tx(allocated) else {
            return Ok(false);
        };
        // SAFETY: data points to `allocated` bytes of the mbuf we own; the
        // slice is last used before the mbuf is queued (push_tx) or freed.
        let bytes = unsafe { std::slice::from_raw_parts_mut(data, allocated) };
        let payload_len = fill(&mut bytes[UDP_HEADERS_LEN..]);
        debug_assert!(
            payload_len <= self.max_payload,
            "fill wrote past its buffer"
        );
        if payload_len == 0 || payload_len > self.max_payload {
            // SAFETY: mbuf is ours and not queued anywhere.
            unsafe { sys::kx_dpdk_pktmbuf_free(mbuf) };
            return Ok(payload_len == 0);
        }
        self.ip_id = self.ip_id.wrapping_add(1);
        match packet::write_udp_headers(bytes, link, payload_len, self.ip_id) {
            Ok(frame_len) => {
                self.push_tx(mbuf, allocated, frame_len);
                Ok(true)
            }
            Err(error) => {
                // SAFETY: mbuf is ours and not queued anywhere.
                unsafe { sys::kx_dpdk_pktmbuf_free(mbuf) };
                self.stats.tx_dropped += 1;
                tracing::debug!(%error, "dropping a reply the DPDK backend cannot address");
                Ok(false)
            }
        }
    }

    fn flush_tx(&mut self) -> Result<usize, BackendError> {
        if self.tx.is_empty() {
            return Ok(0);
        }
        register_thread();
        let queued = self.tx.len();
        let mut sent = 0;
        let mut stalls = 0;
        while sent < queued && stalls < TX_RETRIES {
            let remaining = u16::try_from(queued - sent).expect("tx queue holds at most a burst");
            // SAFETY: started port, our own queue; tx[sent..] are mbufs we own.
            // The driver takes ownership of the first `n` it reports sent.
            let n = unsafe {
                sys::kx_dpdk_tx_burst(
                    self.port.port_id,
                    self.queue,
                    self.tx.as_mut_ptr().add(sent),
                    remaining,
                )
            };
            sent += usize::from(n);
            if n == 0 {
                stalls += 1;
                std::hint::spin_loop();
            }
        }
        // The driver owns tx[..sent] now; drop our pointers to them before
        // freeing what it would not take.
        self.tx.drain(..sent);
        let unsent = self.tx.len();
        self.free_tx();
        self.stats.tx_packets += sent as u64;
        self.stats.tx_dropped += unsent as u64;
        Ok(sent)
    }

    fn wait_readable(&mut self, timeout: Duration) -> Result<(), BackendError> {
        std::thread::sleep(timeout.min(WAIT_SLICE));
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }

    fn max_tx_payload(&self) -> usize {
        self.max_payload
    }
}
