//! One AF_XDP socket and its UMEM per RX queue, as a [`Backend`].
//!
//! Frame accounting (every UMEM frame is in exactly one place, which is what
//! makes the `unsafe` calls into xsk-rs sound):
//!
//! ```text
//!  fill ring + RX ring + to_refill       = fill_ring frames (constant)
//!  tx_free + tx_pending + TX ring + completion ring = frames - fill_ring
//! ```
//!
//! Received frames go back to the fill ring at the end of each `recv_batch`.
//! The ring can look full then although the kernel has taken those frames
//! out of it: the kernel publishes the fill ring's consumer index lazily (on
//! its next peek), so a frame can reach the RX ring before the fill ring
//! shows its slot free. What does not fit waits in `to_refill` (capacity
//! `fill_ring`, so it never grows) and goes back on a later call.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use kaelix_ebpf::{AttachedMode, XdpAttachment, XdpCounters, XdpError, XdpProgram};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::config::{AfXdpConfig, BindMode, HUGEPAGE_BYTES, HugePages};
use super::netdev::NetDev;
use super::packet::{self, IPV6_UDP_HEADERS_LEN};
use super::{AfXdpError, NAME};
use crate::backend::{Backend, BackendError, BackendStats, Peer};
use crate::packet::ETHERNET_HEADER_LEN;

/// setsockopt names from `<asm-generic/socket.h>` (the same on x86_64 and aarch64).
const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
/// `SO_INCOMING_NAPI_ID`: the NAPI instance busy polling on this socket would run.
const SO_INCOMING_NAPI_ID: libc::c_int = 56;
/// `XDP_PACKET_HEADROOM`: the kernel keeps this much in front of every frame.
const XDP_PACKET_HEADROOM: u32 = 256;
/// Packets the kernel transmits per `sendto` in copy mode (TX_BATCH_SIZE).
const COPY_MODE_TX_BUDGET: usize = 32;
/// Completions taken per pass over the completion ring.
const COMPLETION_BATCH: usize = 256;

/// The attached XDP program, shared by the backends of one interface.
///
/// The program stays attached while any backend (or a clone of the
/// [`AfXdpInfo::xdp`] handle) is alive.
#[derive(Debug)]
pub struct XdpHandle {
    program: XdpProgram,
    attachment: XdpAttachment,
    interface: String,
}

impl XdpHandle {
    /// The per-reason packet counters of the program, summed over CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        self.program.counters()
    }

    /// The mode the program runs in.
    pub fn mode(&self) -> AttachedMode {
        self.attachment.mode()
    }

    /// The interface it is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Its index.
    pub fn ifindex(&self) -> u32 {
        self.attachment.ifindex()
    }

    /// The loaded program (for BPF_PROG_TEST_RUN in tests).
    pub fn program(&self) -> &XdpProgram {
        &self.program
    }
}

/// What [`AfXdpBackend::open`] set up, for the one log line and the metrics.
#[derive(Debug, Clone)]
pub struct AfXdpInfo {
    /// The interface.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// Its MTU.
    pub mtu: u32,
    /// The queues served, one backend each, in the order returned.
    pub queues: Vec<u32>,
    /// Where the XDP program runs.
    pub xdp_mode: AttachedMode,
    /// Whether the sockets are zero-copy (false: copy mode).
    pub zero_copy: bool,
    /// Whether the UMEMs are on hugepages.
    pub hugepages: bool,
    /// Whether preferred busy polling is in force on every socket: asked
    /// for (`busy_poll`) and possible (the kernel gave the socket a NAPI
    /// instance to poll; see [`AfXdpBackend::busy_poll`]).
    pub busy_poll: bool,
    /// The program, its counters and its attachment.
    pub xdp: Arc<XdpHandle>,
}

/// The kernel's own counters for one socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelRingStats {
    /// Packets dropped for other reasons.
    pub rx_dropped: u64,
    /// Packets dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when a packet arrived.
    pub rx_fill_ring_empty: u64,
    /// Invalid RX descriptors.
    pub rx_invalid_descs: u64,
    /// Invalid TX descriptors.
    pub tx_invalid_descs: u64,
}

/// The AF_XDP socket of one RX queue as a [`Backend`].
pub struct AfXdpBackend {
    // The rings hold the socket; declared before the UMEM so they go first.
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    umem: Umem,
    xdp: Arc<XdpHandle>,
    queue: u32,
    data_port: u16,
    /// Preferred busy polling is in force (asked for, and the socket has a NAPI id).
    busy_poll: bool,
    zero_copy: bool,
    hugepages: bool,
    /// Received descriptors of the current batch (`batch_size` long).
    rx_descs: Vec<FrameDesc>,
    /// Received frames done with that the fill ring had no room for yet.
    to_refill: Vec<FrameDesc>,
    /// Times the fill ring could not take every received frame back at once.
    refill_deferred: u64,
    /// Transmit frames nobody is using.
    tx_free: Vec<FrameDesc>,
    /// Transmit frames written by `queue_tx`, not yet on the TX ring.
    tx_pending: Vec<FrameDesc>,
    /// Frames on the TX or completion ring.
    tx_in_flight: usize,
    /// Entries of the TX ring.
    tx_ring_len: u32,
    /// Scratch for draining the completion ring.
    comp_descs: Vec<FrameDesc>,
    /// Longest frame we send: the UMEM frame's room, capped at MTU + Ethernet header.
    max_frame_len: usize,
    ip_id: u16,
    stats: BackendStats,
}

impl std::fmt::Debug for AfXdpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfXdpBackend")
            .field("interface", &self.xdp.interface)
            .field("queue", &self.queue)
            .field("zero_copy", &self.zero_copy)
            .field("hugepages", &self.hugepages)
            .field("stats", &self.stats)
            .finish()
    }
}

/// The OS error inside an xsk-rs error (kept as a raw errno, so callers can
/// match on it), or the error's text when it carries none.
fn os_error_of(error: &(dyn std::error::Error + 'static)) -> io::Error {
    match error
        .source()
        .and_then(|source| source.downcast_ref::<io::Error>())
    {
        Some(source) => match source.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(source.kind(), format!("{error}: {source}")),
        },
        None => io::Error::other(error.to_string()),
    }
}

fn set_socket_option(fd: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its exact size is passed; the
    // kernel only reads it. `fd` is open for the duration of the call.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_socket_option(fd: libc::c_int, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes passed; the
    // kernel writes at most `len` bytes into `value`. `fd` is open.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if ret == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this kernel gives an AF_XDP socket its NAPI id when it is bound
/// (Linux 6.13 and later) rather than with its first packet (before): only
/// then does an id of 0 right after bind mean busy polling cannot work.
fn napi_id_bound_at_bind() -> bool {
    // SAFETY: utsname is plain C data for which all-zero bytes are valid;
    // uname only writes into it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a live, writable utsname.
    if unsafe { libc::uname(&raw mut name) } != 0 {
        return true;
    }
    let release: String = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    kernel_at_least(&release, 6, 13)
}

/// Whether a kernel release string (`6.18.44-...`) is `major.minor` or later;
/// true when it cannot be read (assume a current kernel).
fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(have_major)), Some(Ok(have_minor))) => (have_major, have_minor) >= (major, minor),
        _ => true,
    }
}

/// `recvfrom(fd, NULL, 0, MSG_DONTWAIT)`: runs the device's NAPI loop on this
/// core under preferred busy polling, and wakes the kernel for the fill ring.
/// Its result carries no information (EAGAIN when nothing was waiting).
fn poke_rx(fd: libc::c_int) {
    // SAFETY: a zero-length receive into a null buffer with null address
    // arguments is valid for any socket; nothing is written to our memory.
    let _ = unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
}

impl AfXdpBackend {
    /// Load and attach the XDP program on `config.interface` and open one
    /// backend per configured RX queue (all queues by default).
    ///
    /// Logs one line saying which XDP mode, bind mode and memory are in
    /// force. Errors say what is missing; [`AfXdpError::is_unavailable`]
    /// tells a missing interface or privilege from a real failure.
    pub fn open(config: &AfXdpConfig) -> Result<(Vec<AfXdpBackend>, AfXdpInfo), AfXdpError> {
        config.validate()?;
        let netdev = NetDev::query(&config.interface)?;
        // Before any other check: without privilege this is the step that
        // says so, and the broker falls back to sockets on that answer.
        let program = XdpProgram::load(config.data_port)?;
        let queues: Vec<u32> = match &config.queues {
            Some(queues) => {
                if let Some(&queue) = queues.iter().find(|&&q| q >= netdev.rx_queues) {
                    return Err(AfXdpError::NoSuchQueue {
                        interface: netdev.name.clone(),
                        queue,
                        available: netdev.rx_queues,
                    });
                }
                queues.clone()
            }
            None => (0..netdev.rx_queues.min(kaelix_ebpf::MAX_QUEUES)).collect(),
        };
        let frame_room = config.frame_size - XDP_PACKET_HEADROOM;
        let mtu_frame = netdev.mtu as usize + ETHERNET_HEADER_LEN;
        if mtu_frame > frame_room as usize {
            return Err(AfXdpError::Config {
                key: "frame_size",
                reason: format!(
                    "{} leaves {frame_room} bytes per packet, but {} has MTU {} ({mtu_frame}-byte frames); use a larger frame_size or a smaller MTU",
                    config.frame_size, netdev.name, netdev.mtu
                ),
            });
        }
        if let Some(value) = config.napi_defer_hard_irqs {
            netdev.write_knob("napi_defer_hard_irqs", u64::from(value))?;
        }
        if let Some(value) = config.gro_flush_timeout_ns {
            netdev.write_knob("gro_flush_timeout", value)?;
        }
        let attachment = program.attach(netdev.ifindex, config.xdp_mode.into())?;
        let xdp = Arc::new(XdpHandle {
            program,
            attachment,
            interface: netdev.name.clone(),
        });

        let mut backends = Vec::with_capacity(queues.len());
        for &queue in &queues {
            backends.push(Self::open_queue(config, &netdev, queue, &xdp)?);
        }
        let info = AfXdpInfo {
            interface: netdev.name.clone(),
            ifindex: netdev.ifindex,
            mtu: netdev.mtu,
            queues,
            xdp_mode: xdp.mode(),
            zero_copy: backends.iter().all(|b| b.zero_copy),
            hugepages: backends.iter().all(|b| b.hugepages),
            busy_poll: backends.iter().all(|b| b.busy_poll),
            xdp,
        };
        if config.busy_poll && !info.busy_poll {
            let deferring = config.napi_defer_hard_irqs.is_some_and(|v| v > 0)
                && config.gro_flush_timeout_ns.is_some_and(|v| v > 0);
            if deferring {
                tracing::warn!(
                    interface = %info.interface,
                    "af_xdp: busy polling cannot take effect (the kernel gives {} AF_XDP sockets no NAPI instance to poll), \
                     yet napi_defer_hard_irqs and gro_flush_timeout are set: nothing polls the device early, so every packet \
                     that arrives while its NAPI is deferred waits for the gro_flush_timeout timer; leave them unset (0) here",
                    if info.zero_copy { "these" } else { "copy-mode" }
                );
            } else {
                tracing::info!(
                    interface = %info.interface,
                    "af_xdp: busy polling asked for but not possible (no NAPI id on the {} sockets); the device's NAPI runs in softirq",
                    if info.zero_copy { "zero-copy" } else { "copy-mode" }
                );
            }
        }
        if info.xdp_mode == AttachedMode::Generic && config.xdp_mode == super::XdpModeConfig::Auto {
            tracing::warn!(
                interface = %info.interface,
                "af_xdp: the driver refused native XDP; running the XDP program in generic (SKB) mode"
            );
        }
        tracing::info!(
            interface = %info.interface,
            queues = ?info.queues,
            xdp_mode = %info.xdp_mode,
            bind = if info.zero_copy { "zero-copy" } else { "copy" },
            hugepages = info.hugepages,
            busy_poll = info.busy_poll,
            "af_xdp: XDP program attached, sockets bound"
        );
        Ok((backends, info))
    }

    fn create_umem(
        config: &AfXdpConfig,
        queue: u32,
    ) -> Result<(Umem, Vec<FrameDesc>, bool), AfXdpError> {
        let invalid = |key: &'static str| {
            move |error: &dyn std::fmt::Display| AfXdpError::Config {
                key,
                reason: error.to_string(),
            }
        };
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(config.frame_size).map_err(|e| invalid("frame_size")(&e))?)
            .fill_queue_size(
                QueueSize::new(config.fill_ring).map_err(|e| invalid("fill_ring")(&e))?,
            )
            .comp_queue_size(
                QueueSize::new(config.comp_ring).map_err(|e| invalid("comp_ring")(&e))?,
            )
            .frame_headroom(0)
            .build()
            .map_err(|e| invalid("frame_size")(&e))?;
        let frames = NonZeroU32::new(config.frames).expect("validated: frames > fill_ring > 0");
        let whole_hugepages = config.umem_bytes().is_multiple_of(HUGEPAGE_BYTES);
        let huge = match config.hugepages {
            HugePages::On => true,
            HugePages::Off => false,
            // A partial hugepage would make munmap fail and leak the pages.
            HugePages::Auto => whole_hugepages,
        };
        match Umem::new(umem_config, frames, huge) {
            Ok((umem, descs)) => Ok((umem, descs, huge)),
            Err(_) if huge && config.hugepages == HugePages::Auto => {
                // No (or too few) hugepages reserved: normal pages.
                let (umem, descs) =
                    Umem::new(umem_config, frames, false).map_err(|error| AfXdpError::Umem {
                        queue,
                        bytes: config.umem_bytes(),
                        hugepages: false,
                        source: os_error_of(&error),
                    })?;
                Ok((umem, descs, false))
            }
            Err(error) => Err(AfXdpError::Umem {
                queue,
                bytes: config.umem_bytes(),
                hugepages: huge,
                source: os_error_of(&error),
            }),
        }
    }

    fn open_queue(
        config: &AfXdpConfig,
        netdev: &NetDev,
        queue: u32,
        xdp: &Arc<XdpHandle>,
    ) -> Result<Self, AfXdpError> {
        // Decided up front from the driver's advertised features: a failed
        // bind leaves the UMEM's rings registered, so a retry would need a
        // second UMEM (and, on hugepages, twice the reserved pages).
        let zero_copy = match config.bind {
            BindMode::Copy => false,
            BindMode::Zerocopy => true,
            BindMode::Auto => {
                kaelix_ebpf::xdp_features(netdev.ifindex)? & kaelix_ebpf::XDP_FEATURE_XSK_ZEROCOPY
                    != 0
            }
        };
        let interface: Interface = netdev
            .name
            .parse()
            .expect("validated interface names contain no NUL byte");
        let invalid_ring = |key: &'static str| {
            move |error: xsk_rs::config::QueueSizeError| AfXdpError::Config {
                key,
                reason: error.to_string(),
            }
        };
        let (umem, descs, hugepages) = Self::create_umem(config, queue)?;
        let bind_mode = if zero_copy {
            BindFlags::XDP_ZEROCOPY
        } else {
            BindFlags::XDP_COPY
        };
        let socket_config = SocketConfig::builder()
            .rx_queue_size(QueueSize::new(config.rx_ring).map_err(invalid_ring("rx_ring"))?)
            .tx_queue_size(QueueSize::new(config.tx_ring).map_err(invalid_ring("tx_ring"))?)
            // Our own program owns the interface; libxdp must not load its default one.
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind_mode | BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        // SAFETY: the UMEM was created just above for this socket alone (no
        // sharing), and the libxdp program load is inhibited, which is what
        // `Socket::new` requires.
        let created = unsafe { Socket::new(socket_config, &umem, &interface, queue) };
        match created {
            Ok((tx, rx, Some((fill, comp)))) => Self::start(
                config,
                netdev,
                queue,
                xdp,
                umem,
                descs,
                hugepages,
                zero_copy,
                (tx, rx, fill, comp),
            ),
            Ok((_, _, None)) => unreachable!(
                "a UMEM used by no other socket always yields its fill and completion rings"
            ),
            Err(error) => {
                let source = os_error_of(&error);
                Err(if source.kind() == io::ErrorKind::PermissionDenied {
                    AfXdpError::PermissionDenied {
                        operation: "creating an AF_XDP socket",
                        source,
                    }
                } else {
                    AfXdpError::Socket {
                        interface: netdev.name.clone(),
                        queue,
                        mode: if zero_copy { "zero-copy" } else { "copy" },
                        source,
                    }
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        config: &AfXdpConfig,
        netdev: &NetDev,
        queue: u32,
        xdp: &Arc<XdpHandle>,
        umem: Umem,
        mut descs: Vec<FrameDesc>,
        hugepages: bool,
        zero_copy: bool,
        (tx, rx, mut fill, comp): (TxQueue, RxQueue, FillQueue, CompQueue),
    ) -> Result<Self, AfXdpError> {
        let fd = rx.fd().as_raw_fd();
        if config.busy_poll {
            let permission = |source: io::Error| {
                if source.kind() == io::ErrorKind::PermissionDenied {
                    AfXdpError::PermissionDenied {
                        operation: "setting the busy-poll socket options",
                        source,
                    }
                } else {
                    AfXdpError::Io {
                        operation: "setting the busy-poll socket options",
                        source,
                    }
                }
            };
            set_socket_option(fd, SO_PREFER_BUSY_POLL, 1).map_err(permission)?;
            set_socket_option(
                fd,
                SO_BUSY_POLL,
                libc::c_int::try_from(config.busy_poll_us).unwrap_or(libc::c_int::MAX),
            )
            .map_err(permission)?;
            set_socket_option(
                fd,
                SO_BUSY_POLL_BUDGET,
                libc::c_int::from(config.busy_poll_budget),
            )
            .map_err(permission)?;
        }

        // Busy polling runs the NAPI instance the kernel recorded for the
        // socket. Since Linux 6.13 an AF_XDP socket gets one only at bind
        // time, and only when bound zero-copy to a driver that registers its
        // queues' NAPI (`netif_queue_set_napi`); a copy-mode socket (veth,
        // any driver without zero-copy) has none, so SO_PREFER_BUSY_POLL
        // does nothing and every poll of an empty ring would be a wasted
        // system call. Older kernels set the id with the first packet.
        let napi_id = if config.busy_poll {
            get_socket_option(fd, SO_INCOMING_NAPI_ID).unwrap_or(0)
        } else {
            0
        };
        let busy_poll = config.busy_poll && (napi_id != 0 || !napi_id_bound_at_bind());

        let fill_frames = config.fill_ring as usize;
        let tx_free = descs.split_off(fill_frames);
        // SAFETY: these frames come fresh from this UMEM and are nowhere else
        // (the rest went to `tx_free`, which is only used for transmit).
        let filled = unsafe { fill.produce(&descs) };
        assert_eq!(
            filled, fill_frames,
            "a new fill ring of {fill_frames} entries takes {fill_frames} frames"
        );
        if fill.needs_wakeup() {
            poke_rx(fd);
        }

        // SAFETY: the socket's descriptor stays open for as long as `rx`
        // lives, and the map takes its own reference to the socket.
        let socket_fd = unsafe { BorrowedFd::borrow_raw(fd) };
        xdp.program.register_socket(queue, socket_fd)?;

        let frame_room = (config.frame_size - XDP_PACKET_HEADROOM) as usize;
        let max_frame_len = frame_room.min(netdev.mtu as usize + ETHERNET_HEADER_LEN);
        let batch = config.batch_size as usize;
        Ok(Self {
            rx,
            tx,
            fill,
            comp,
            umem,
            xdp: Arc::clone(xdp),
            queue,
            data_port: config.data_port,
            busy_poll,
            zero_copy,
            hugepages,
            rx_descs: vec![FrameDesc::default(); batch],
            to_refill: Vec::with_capacity(fill_frames),
            refill_deferred: 0,
            tx_pending: Vec::with_capacity(tx_free.len()),
            tx_free,
            tx_in_flight: 0,
            tx_ring_len: config.tx_ring,
            comp_descs: vec![FrameDesc::default(); COMPLETION_BATCH],
            max_frame_len,
            ip_id: 0,
            stats: BackendStats::default(),
        })
    }

    /// The RX queue this backend serves.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Whether the socket is zero-copy.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Whether preferred busy polling is in force: configured, and the
    /// kernel gave the socket a NAPI instance to poll. False for copy-mode
    /// sockets on Linux 6.13 and later (veth included): there the device's
    /// NAPI runs in softirq wherever the kernel schedules it, and the
    /// backend does not poke the socket when its RX ring is empty.
    pub fn busy_poll(&self) -> bool {
        self.busy_poll
    }

    /// Times received frames had to wait for room on the fill ring (see the
    /// module docs); they went back on a later call.
    pub fn refill_deferred(&self) -> u64 {
        self.refill_deferred
    }

    /// Whether the UMEM is on hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// The shared XDP program handle.
    pub fn xdp(&self) -> &Arc<XdpHandle> {
        &self.xdp
    }

    /// The kernel's counters for this socket (one system call; not per batch).
    pub fn kernel_stats(&self) -> Result<KernelRingStats, BackendError> {
        let stats = self
            .rx
            .fd()
            .xdp_statistics()
            .map_err(|source| BackendError::Io {
                backend: NAME,
                operation: "reading XDP_STATISTICS",
                source,
            })?;
        Ok(KernelRingStats {
            rx_dropped: stats.rx_dropped(),
            rx_ring_full: stats.rx_ring_full(),
            rx_fill_ring_empty: stats.rx_fill_ring_empty_descs(),
            rx_invalid_descs: stats.rx_invalid_descs(),
            tx_invalid_descs: stats.tx_invalid_descs(),
        })
    }

    /// Put received frames back on the fill ring, as many as it has room for.
    fn refill(&mut self) {
        let waiting = self.to_refill.len();
        if waiting == 0 {
            return;
        }
        let room = (self
            .fill
            .nb_free(u32::try_from(waiting).unwrap_or(u32::MAX)) as usize)
            .min(waiting);
        if room == 0 {
            self.refill_deferred += 1;
            return;
        }
        let keep = waiting - room;
        // SAFETY: the frames in `to_refill` are UMEM frames the kernel handed
        // us on the RX ring and that nothing uses any more; `room` slots are
        // free, so all of them are produced and none stays referenced here.
        let produced = unsafe { self.fill.produce(&self.to_refill[keep..]) };
        debug_assert_eq!(produced, room, "nb_free promised the room");
        self.to_refill.truncate(waiting - produced);
        if keep > 0 {
            self.refill_deferred += 1;
        }
    }

    /// Move completed transmit frames back to the free list.
    fn reclaim_completions(&mut self) {
        while self.tx_in_flight > 0 {
            // SAFETY: the descriptors written are frames of this UMEM that
            // the kernel has finished sending; they were ours before.
            let done = unsafe { self.comp.consume(&mut self.comp_descs) };
            self.tx_free.extend_from_slice(&self.comp_descs[..done]);
            self.tx_in_flight -= done;
            if done < self.comp_descs.len() {
                break;
            }
        }
    }

    fn socket_fd(&self) -> libc::c_int {
        self.rx.fd().as_raw_fd()
    }
}

impl Drop for AfXdpBackend {
    fn drop(&mut self) {
        // Stop steering before the socket closes (closing would remove it
        // from the map too; doing it first keeps the order obvious).
        let _ = self.xdp.program.unregister_socket(self.queue);
    }
}

impl Backend for AfXdpBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn recv_batch(
        &mut self,
        on_packet: &mut dyn FnMut(&[u8], &Peer),
    ) -> Result<usize, BackendError> {
        // Frames an earlier call could not put back: the kernel may be
        // short of them.
        self.refill();
        // SAFETY: `rx_descs` is scratch space the ring overwrites with frames
        // of this UMEM; none of those frames is used anywhere else until it
        // is handed back to the fill ring below.
        let mut received = unsafe { self.rx.consume(&mut self.rx_descs) };
        if received == 0 {
            if self.busy_poll || self.fill.needs_wakeup() {
                poke_rx(self.socket_fd());
                // SAFETY: as above.
                received = unsafe { self.rx.consume(&mut self.rx_descs) };
            }
            if received == 0 {
                return Ok(0);
            }
        }
        let mut delivered = 0;
        for desc in &self.rx_descs[..received] {
            // SAFETY: `desc` came from this socket's RX ring, so it is a frame
            // of this UMEM that the kernel has finished writing and will not
            // touch until we put it back on the fill ring.
            let data = unsafe { self.umem.data(desc) };
            let frame = data.contents();
            self.stats.rx_bytes += frame.len() as u64;
            match packet::parse(frame, self.queue) {
                Ok(datagram) if datagram.peer.local_port == self.data_port => {
                    delivered += 1;
                    on_packet(datagram.payload, &Peer::Link(datagram.peer));
                }
                // The program only steers the data port, so this is rare:
                // counted, never fatal.
                _ => self.stats.rx_dropped += 1,
            }
        }
        self.stats.rx_packets += delivered as u64;
        // The frames just received are done with: the payload slices handed
        // out above do not outlive `on_packet`. At most `fill_ring` frames
        // are ever outside the fill ring, so this never reallocates.
        self.to_refill.extend_from_slice(&self.rx_descs[..received]);
        self.refill();
        if !self.busy_poll && self.fill.needs_wakeup() {
            poke_rx(self.socket_fd());
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
                reason: format!("cannot reply to a kernel-socket peer {peer:?}"),
            });
        };
        if self.tx_free.is_empty() {
            self.reclaim_completions();
        }
        let Some(mut desc) = self.tx_free.pop() else {
            self.stats.tx_dropped += 1;
            return Ok(false);
        };
        let headers = packet::headers_len(link);
        let max_frame_len = self.max_frame_len;
        let ip_id = self.ip_id;
        let built = {
            // SAFETY: `desc` was taken from `tx_free`, so it is a frame of
            // this UMEM that neither the kernel nor any other descriptor uses.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            let room = {
                let mut cursor = data.cursor();
                let room = cursor.buf_len().min(max_frame_len);
                cursor.set_pos(room);
                room
            };
            let frame = data.contents_mut();
            let payload_room = room.saturating_sub(headers);
            let written = fill(&mut frame[headers..headers + payload_room]);
            debug_assert!(written <= payload_room, "fill wrote past its buffer");
            let result = if written == 0 {
                Ok(0)
            } else {
                packet::write_udp_headers(frame, link, written.min(payload_room), ip_id)
            };
            data.cursor().set_pos(*result.as_ref().unwrap_or(&0));
            result
        };
        match built {
            Ok(0) => {
                self.tx_free.push(desc);
                Ok(true)
            }
            Ok(_) => {
                self.ip_id = self.ip_id.wrapping_add(1);
                self.tx_pending.push(desc);
                Ok(true)
            }
            Err(error) => {
                self.tx_free.push(desc);
                self.stats.tx_dropped += 1;
                Err(BackendError::Unavailable {
                    backend: NAME,
                    reason: format!("cannot build a reply to {link:?}: {error}"),
                })
            }
        }
    }

    fn flush_tx(&mut self) -> Result<usize, BackendError> {
        let mut sent = 0;
        if !self.tx_pending.is_empty() {
            let pending = u32::try_from(self.tx_pending.len()).unwrap_or(u32::MAX);
            let room = (self.tx.nb_free(pending) as usize).min(self.tx_pending.len());
            // SAFETY: pending frames were written by `queue_tx` and are on no
            // ring; once produced they stay untouched until the completion
            // ring returns them.
            sent = unsafe { self.tx.produce(&self.tx_pending[..room]) };
            self.tx_pending.drain(..sent);
            self.tx_in_flight += sent;
            self.stats.tx_packets += sent as u64;
        }
        // Kick only for descriptors still on the TX ring: frames the kernel
        // already took are merely waiting for their completion (in copy mode
        // until the receiver frees the packet), and a `sendto` per cycle
        // for them would be a system call that sends nothing.
        let on_ring = if self.tx_in_flight > 0 {
            (self.tx_ring_len - self.tx.nb_free_exact().min(self.tx_ring_len)) as usize
        } else {
            0
        };
        if on_ring > 0 && self.tx.needs_wakeup() {
            // Copy mode sends at most COPY_MODE_TX_BUDGET frames per call.
            let kicks = on_ring.div_ceil(COPY_MODE_TX_BUDGET);
            for _ in 0..kicks {
                self.tx.wakeup().map_err(|source| BackendError::Io {
                    backend: NAME,
                    operation: "sendto (TX wakeup)",
                    source,
                })?;
            }
        }
        self.reclaim_completions();
        Ok(sent)
    }

    fn wait_readable(&mut self, timeout: Duration) -> Result<(), BackendError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let fd = self.rx.fd().as_raw_fd();
        // SAFETY: the socket's descriptor is open while `self.rx` lives,
        // which outlasts this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(&borrowed, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
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
        // IPv6 headers are the longer ones; every peer fits this much.
        self.max_frame_len - IPV6_UDP_HEADERS_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_at_least;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v657", 6, 13));
        assert!(kernel_at_least("6.13.0", 6, 13));
        assert!(kernel_at_least("7.0.1", 6, 13));
        assert!(!kernel_at_least("6.12.9-amd64", 6, 13));
        assert!(!kernel_at_least("5.15.0-91-generic", 6, 13));
        // Unreadable: assume a current kernel.
        assert!(kernel_at_least("", 6, 13));
        assert!(kernel_at_least("weird", 6, 13));
    }
}
