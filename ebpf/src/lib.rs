//! # kaelix-ebpf: the XDP program that steers the data port, and its loader
//!
//! `src/bpf/kaelix_xdp.bpf.c` is compiled with clang at build time (libbpf-cargo
//! `SkeletonBuilder`). For every packet on the interface it parses Ethernet /
//! IPv4 or IPv6 / UDP and:
//!
//! - redirects UDP datagrams for the data port whose first frame carries the
//!   protocol magic and version into the AF_XDP socket registered for the RX
//!   queue the packet arrived on ([`XdpProgram::register_socket`]), or passes
//!   them to the kernel when that queue has no socket;
//! - drops malformed datagrams for the data port (truncated, bad UDP length,
//!   shorter than one frame header, wrong magic or version, first frame longer
//!   than the datagram);
//! - passes everything else untouched: ARP, ICMP, TCP (the control plane),
//!   other UDP ports, IPv4 fragments, IPv6 extension headers and VLAN-tagged
//!   frames (the AF_XDP reply path carries no VLAN tag, so tagged traffic is
//!   left to the kernel stack).
//!
//! Every verdict bumps one per-CPU counter, read and summed by
//! [`XdpProgram::counters`].
//!
//! The loader attaches through a BPF link ([`XdpProgram::attach`]): the kernel
//! detaches the program when the last file descriptor of the link is closed,
//! which happens on a normal exit, on a panic and on `SIGKILL` alike, so no
//! program is left behind on the interface. Attaching tries native (driver)
//! mode first and falls back to generic (SKB) mode; the mode in force is
//! returned to the caller ([`XdpAttachment::mode`]).
//!
//! What it leaves out on purpose: AF_XDP sockets and UMEM (kaelix-dataplane),
//! logging (the caller reports the mode and errors), pinning in bpffs (a pin
//! would outlive the process and defeat the crash guarantee).
//!
//! ## Main types
//! - [`XdpProgram`]: the loaded (not yet attached) program and its maps.
//! - [`XdpAttachment`]: the program attached to one interface; dropping it detaches.
//! - [`XdpCounters`] / [`Counter`]: per-verdict packet counts, summed over CPUs.
//! - [`XdpError`]: what failed, with the interface, mode or queue involved.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::ffi::CString;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

#[allow(
    missing_docs,
    unsafe_code,
    unused_imports,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/kaelix_xdp.skel.rs"));
}

/// Number of XSKMAP slots: the highest RX queue index that can be steered, plus one.
pub const MAX_QUEUES: u32 = 64;

/// XDP verdicts (`enum xdp_action`) as returned by [`XdpProgram::test_run`].
pub mod action {
    /// The program failed (never returned by this program).
    pub const ABORTED: u32 = 0;
    /// Dropped.
    pub const DROP: u32 = 1;
    /// Passed to the kernel stack.
    pub const PASS: u32 = 2;
    /// Sent back out of the interface (never returned by this program).
    pub const TX: u32 = 3;
    /// Redirected (here: into an AF_XDP socket).
    pub const REDIRECT: u32 = 4;
}

/// One per-CPU counter of the program: why a packet got its verdict.
///
/// The discriminants are the slots of `enum counter` in `kaelix_xdp.bpf.c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Counter {
    /// Redirected into the AF_XDP socket of its RX queue.
    Redirected = 0,
    /// Not for the data port (or not IP/UDP, or VLAN-tagged): passed to the kernel.
    PassedOther = 1,
    /// A valid data-port datagram on a queue with no registered socket: passed.
    PassedNoSocket = 2,
    /// An IPv4 fragment: passed to the kernel to reassemble.
    PassedFragment = 3,
    /// Data port, UDP payload shorter than one frame header: dropped.
    DroppedShort = 4,
    /// Data port, the first frame's magic is not "KX": dropped.
    DroppedBadMagic = 5,
    /// Data port, the first frame's version is not ours: dropped.
    DroppedBadVersion = 6,
    /// Data port, the UDP length or the first frame's length is inconsistent: dropped.
    DroppedBadLength = 7,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 8] = [
        Counter::Redirected,
        Counter::PassedOther,
        Counter::PassedNoSocket,
        Counter::PassedFragment,
        Counter::DroppedShort,
        Counter::DroppedBadMagic,
        Counter::DroppedBadVersion,
        Counter::DroppedBadLength,
    ];

    /// A snake_case name for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::PassedOther => "passed_other",
            Counter::PassedNoSocket => "passed_no_socket",
            Counter::PassedFragment => "passed_fragment",
            Counter::DroppedShort => "dropped_short",
            Counter::DroppedBadMagic => "dropped_bad_magic",
            Counter::DroppedBadVersion => "dropped_bad_version",
            Counter::DroppedBadLength => "dropped_bad_length",
        }
    }
}

const COUNTER_SLOTS: usize = Counter::ALL.len();

/// Packet counts by verdict reason, summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpCounters {
    counts: [u64; COUNTER_SLOTS],
}

impl XdpCounters {
    /// The count for one reason.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts[counter as usize]
    }

    /// Packets passed to the kernel, all reasons.
    pub fn passed(&self) -> u64 {
        self.get(Counter::PassedOther)
            + self.get(Counter::PassedNoSocket)
            + self.get(Counter::PassedFragment)
    }

    /// Packets dropped, all reasons.
    pub fn dropped(&self) -> u64 {
        self.get(Counter::DroppedShort)
            + self.get(Counter::DroppedBadMagic)
            + self.get(Counter::DroppedBadVersion)
            + self.get(Counter::DroppedBadLength)
    }

    /// Counts accumulated since `earlier` (saturating at zero).
    pub fn since(&self, earlier: &XdpCounters) -> XdpCounters {
        let mut counts = [0; COUNTER_SLOTS];
        for (slot, count) in counts.iter_mut().enumerate() {
            *count = self.counts[slot].saturating_sub(earlier.counts[slot]);
        }
        XdpCounters { counts }
    }
}

impl fmt::Display for XdpCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, counter) in Counter::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={}", counter.name(), self.get(*counter))?;
        }
        Ok(())
    }
}

/// How to attach: the operator's choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic mode when the driver has no XDP support.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

/// The mode the program actually runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachedMode {
    /// In the driver, before an skb is allocated.
    Native,
    /// In the kernel's generic receive path, after the skb is allocated.
    Generic,
}

impl AttachedMode {
    /// `native` or `generic`.
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }

    fn flags(self) -> u32 {
        match self {
            AttachedMode::Native => libbpf_rs::libbpf_sys::XDP_FLAGS_DRV_MODE,
            AttachedMode::Generic => libbpf_rs::libbpf_sys::XDP_FLAGS_SKB_MODE,
        }
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What went wrong loading, attaching or driving the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The process may not load BPF programs.
    #[error(
        "loading the XDP program was refused ({source}): run as root or grant CAP_BPF and CAP_NET_ADMIN"
    )]
    PermissionDenied {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Opening or loading the BPF object failed (verifier, kernel support).
    #[error("loading the XDP program failed: {source}")]
    Load {
        /// libbpf's error.
        #[source]
        source: libbpf_rs::Error,
    },
    /// No interface by that name in this network namespace.
    #[error("network interface {interface:?} not found in this network namespace")]
    InterfaceNotFound {
        /// The name asked for.
        interface: String,
    },
    /// Another XDP program is already attached to the interface.
    #[error(
        "interface index {ifindex} already has an XDP program (id {prog_id}); remove it (e.g. `ip link set dev <if> xdp off`) or stop its owner"
    )]
    AlreadyAttached {
        /// The interface.
        ifindex: u32,
        /// The program found there.
        prog_id: u32,
    },
    /// The kernel refused to attach in the requested mode.
    #[error(
        "attaching the XDP program to interface index {ifindex} in {mode} mode failed: {source}"
    )]
    Attach {
        /// The interface.
        ifindex: u32,
        /// The mode tried last.
        mode: AttachedMode,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The queue index does not fit the XSKMAP.
    #[error("RX queue {queue} cannot be steered: the XSKMAP has {max} slots")]
    QueueOutOfRange {
        /// The queue asked for.
        queue: u32,
        /// Slots in the map.
        max: u32,
    },
    /// A map operation failed.
    #[error("XDP map operation {operation} failed: {source}")]
    Map {
        /// What was being done.
        operation: &'static str,
        /// libbpf's error.
        #[source]
        source: libbpf_rs::Error,
    },
    /// Asking the kernel about the interface's XDP state failed.
    #[error("querying the XDP state of interface index {ifindex} failed: {source}")]
    Query {
        /// The interface.
        ifindex: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// BPF_PROG_TEST_RUN failed.
    #[error("BPF_PROG_TEST_RUN failed: {source}")]
    TestRun {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// The index of a network interface in the calling thread's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, XdpError> {
    let not_found = || XdpError::InterfaceNotFound {
        interface: interface.to_owned(),
    };
    let name = CString::new(interface).map_err(|_| not_found())?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    #[allow(unsafe_code)]
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(not_found())
    } else {
        Ok(index)
    }
}

fn xdp_query(ifindex: u32) -> Result<libbpf_rs::libbpf_sys::bpf_xdp_query_opts, XdpError> {
    let mut opts = libbpf_rs::libbpf_sys::bpf_xdp_query_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_xdp_query_opts>() as _,
        ..Default::default()
    };
    // SAFETY: `opts` is a properly sized and initialised bpf_xdp_query_opts
    // that lives for the whole call; libbpf writes only inside it.
    #[allow(unsafe_code)]
    let ret = unsafe { libbpf_rs::libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut opts) };
    if ret < 0 {
        return Err(XdpError::Query {
            ifindex,
            source: io::Error::from_raw_os_error(-ret),
        });
    }
    Ok(opts)
}

/// The id of the XDP program attached to `ifindex` in any mode, if there is one.
///
/// Used to check that no program is left behind after a shutdown or a crash.
pub fn attached_program_id(ifindex: u32) -> Result<Option<u32>, XdpError> {
    let opts = xdp_query(ifindex)?;
    Ok((opts.prog_id != 0).then_some(opts.prog_id))
}

/// `NETDEV_XDP_ACT_XSK_ZEROCOPY`: the driver supports zero-copy AF_XDP sockets.
pub const XDP_FEATURE_XSK_ZEROCOPY: u64 = 1 << 3;

/// The XDP features (`NETDEV_XDP_ACT_*` bits) the driver of `ifindex`
/// advertises; 0 on kernels older than 6.3, which do not report them.
pub fn xdp_features(ifindex: u32) -> Result<u64, XdpError> {
    Ok(xdp_query(ifindex)?.feature_flags)
}

/// The XDP program, loaded into the kernel but not attached anywhere yet.
///
/// Holds file descriptors of the program and its maps only; the libbpf object
/// they came from is gone. Cheap to keep for the life of the broker.
#[derive(Debug)]
pub struct XdpProgram {
    prog: OwnedFd,
    xsks: MapHandle,
    counters: MapHandle,
    data_port: u16,
}

impl XdpProgram {
    /// Load the program for UDP data port `data_port` (host byte order).
    pub fn load(data_port: u16) -> Result<Self, XdpError> {
        let mut storage = MaybeUninit::uninit();
        let mut open = skel::KaelixXdpSkelBuilder::default()
            .open(&mut storage)
            .map_err(load_error)?;
        open.maps
            .rodata_data
            .as_deref_mut()
            .expect("the program declares `const volatile data_port`, so it has a .rodata map")
            .data_port = data_port;
        let loaded = open.load().map_err(load_error)?;

        let prog = loaded
            .progs
            .kaelix_xdp
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| XdpError::Load {
                source: source.into(),
            })?;
        let map_handle = |map: &libbpf_rs::MapMut<'_>| {
            MapHandle::try_from(map).map_err(|source| XdpError::Map {
                operation: "duplicate map fd",
                source,
            })
        };
        let xsks = map_handle(&loaded.maps.xsks_map)?;
        let counters = map_handle(&loaded.maps.counters)?;
        // Dropping `loaded` closes libbpf's descriptors; ours keep the
        // program and maps alive in the kernel.
        drop(loaded);
        Ok(Self {
            prog,
            xsks,
            counters,
            data_port,
        })
    }

    /// The UDP port the program steers.
    pub fn data_port(&self) -> u16 {
        self.data_port
    }

    /// Attach to interface `ifindex` through a BPF link.
    ///
    /// [`XdpMode::Auto`] tries native mode and falls back to generic mode;
    /// the mode in force is [`XdpAttachment::mode`]. The program stays
    /// attached until the returned attachment is dropped or the process
    /// exits, however it exits.
    pub fn attach(&self, ifindex: u32, mode: XdpMode) -> Result<XdpAttachment, XdpError> {
        if let Some(prog_id) = attached_program_id(ifindex)? {
            return Err(XdpError::AlreadyAttached { ifindex, prog_id });
        }
        let attempts: &[AttachedMode] = match mode {
            XdpMode::Auto => &[AttachedMode::Native, AttachedMode::Generic],
            XdpMode::Native => &[AttachedMode::Native],
            XdpMode::Generic => &[AttachedMode::Generic],
        };
        let mut last_error = None;
        for &attempt in attempts {
            match self.link_create(ifindex, attempt) {
                Ok(link) => {
                    return Ok(XdpAttachment {
                        link,
                        ifindex,
                        mode: attempt,
                    });
                }
                Err(source) => last_error = Some((attempt, source)),
            }
        }
        let (mode, source) = last_error.expect("at least one attach mode is always tried");
        Err(XdpError::Attach {
            ifindex,
            mode,
            source,
        })
    }

    fn link_create(&self, ifindex: u32, mode: AttachedMode) -> io::Result<OwnedFd> {
        let opts = libbpf_rs::libbpf_sys::bpf_link_create_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_link_create_opts>() as _,
            flags: mode.flags(),
            ..Default::default()
        };
        // SAFETY: the program fd is open for the whole call, `opts` is a
        // properly sized bpf_link_create_opts living on the stack for the
        // whole call, and libbpf only reads it.
        #[allow(unsafe_code)]
        let fd = unsafe {
            libbpf_rs::libbpf_sys::bpf_link_create(
                self.prog.as_raw_fd(),
                ifindex as i32,
                libbpf_rs::libbpf_sys::BPF_XDP,
                &opts,
            )
        };
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(-fd));
        }
        // SAFETY: bpf_link_create returned a new file descriptor that nothing
        // else owns; the OwnedFd closes it exactly once.
        #[allow(unsafe_code)]
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Steer packets arriving on RX queue `queue` into the AF_XDP socket `socket`.
    ///
    /// The socket must be bound to that queue of the interface the program
    /// is attached to, with its fill ring set up.
    pub fn register_socket(&self, queue: u32, socket: BorrowedFd<'_>) -> Result<(), XdpError> {
        check_queue(queue)?;
        let fd =
            u32::try_from(socket.as_raw_fd()).expect("open file descriptors are never negative");
        self.xsks
            .update(&queue.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| XdpError::Map {
                operation: "insert socket into XSKMAP",
                source,
            })
    }

    /// Stop steering RX queue `queue`; its data-port packets go to the kernel again.
    pub fn unregister_socket(&self, queue: u32) -> Result<(), XdpError> {
        check_queue(queue)?;
        match self.xsks.delete(&queue.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(XdpError::Map {
                operation: "remove socket from XSKMAP",
                source,
            }),
        }
    }

    /// The per-reason packet counters, summed over all CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        let per_cpu = self
            .counters
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| XdpError::Map {
                operation: "read counters",
                source,
            })?
            .expect("slot 0 of a BPF array always exists");
        let mut counts = [0u64; COUNTER_SLOTS];
        for cpu in &per_cpu {
            for (slot, count) in counts.iter_mut().enumerate() {
                let bytes = &cpu[slot * 8..slot * 8 + 8];
                *count += u64::from_ne_bytes(bytes.try_into().expect("8-byte slice"));
            }
        }
        Ok(XdpCounters { counts })
    }

    /// Run the program once on `packet` with BPF_PROG_TEST_RUN and return its
    /// verdict (see [`action`]).
    ///
    /// With `rx` set, the packet is presented as arriving on that interface
    /// index and RX queue (the interface must exist in the calling thread's
    /// network namespace); otherwise on queue 0 of no interface. Redirects
    /// are not carried out, only reported. Counters are updated as for a
    /// real packet.
    pub fn test_run(&self, packet: &[u8], rx: Option<TestRx>) -> Result<u32, XdpError> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let mut ctx = [0u32; 6];
        let use_ctx = rx.is_some();
        if let Some(rx) = rx {
            ctx[1] = u32::try_from(packet.len()).expect("test packets are far below 4 GiB");
            ctx[3] = rx.ifindex;
            ctx[4] = rx.queue;
        }
        let mut opts = libbpf_rs::libbpf_sys::bpf_test_run_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_test_run_opts>() as _,
            data_in: packet.as_ptr().cast(),
            data_size_in: u32::try_from(packet.len()).expect("test packets are far below 4 GiB"),
            repeat: 1,
            ..Default::default()
        };
        if use_ctx {
            opts.ctx_in = ctx.as_ptr().cast();
            opts.ctx_size_in = size_of_val(&ctx) as u32;
        }
        // SAFETY: `packet` and `ctx` outlive the call and their pointers and
        // sizes in `opts` describe them exactly; no output buffers are given,
        // so the kernel only reads our memory and writes `opts` itself.
        #[allow(unsafe_code)]
        let ret = unsafe {
            libbpf_rs::libbpf_sys::bpf_prog_test_run_opts(self.prog.as_raw_fd(), &mut opts)
        };
        if ret < 0 {
            return Err(XdpError::TestRun {
                source: io::Error::from_raw_os_error(-ret),
            });
        }
        Ok(opts.retval)
    }
}

/// Where a [`XdpProgram::test_run`] packet pretends to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRx {
    /// Interface index (in the calling thread's network namespace).
    pub ifindex: u32,
    /// RX queue index.
    pub queue: u32,
}

fn check_queue(queue: u32) -> Result<(), XdpError> {
    if queue < MAX_QUEUES {
        Ok(())
    } else {
        Err(XdpError::QueueOutOfRange {
            queue,
            max: MAX_QUEUES,
        })
    }
}

fn load_error(source: libbpf_rs::Error) -> XdpError {
    if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
        XdpError::PermissionDenied {
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        }
    } else {
        XdpError::Load { source }
    }
}

/// The program attached to one interface through a BPF link.
///
/// Dropping it closes the link and the kernel detaches the program. The same
/// happens when the process dies, since the link lives only as long as its
/// file descriptor.
#[derive(Debug)]
pub struct XdpAttachment {
    link: OwnedFd,
    ifindex: u32,
    mode: AttachedMode,
}

impl XdpAttachment {
    /// The mode the program runs in.
    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    /// The interface it is attached to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Detach now (the same as dropping it).
    pub fn detach(self) {
        drop(self);
    }
}

impl AsFd for XdpAttachment {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_and_difference() {
        let mut later = XdpCounters::default();
        later.counts[Counter::Redirected as usize] = 10;
        later.counts[Counter::PassedOther as usize] = 3;
        later.counts[Counter::PassedNoSocket as usize] = 2;
        later.counts[Counter::DroppedBadMagic as usize] = 4;
        later.counts[Counter::DroppedShort as usize] = 1;
        let mut earlier = XdpCounters::default();
        earlier.counts[Counter::Redirected as usize] = 7;
        assert_eq!(later.passed(), 5);
        assert_eq!(later.dropped(), 5);
        let delta = later.since(&earlier);
        assert_eq!(delta.get(Counter::Redirected), 3);
        assert_eq!(earlier.since(&later).get(Counter::Redirected), 0);
        assert!(
            later
                .to_string()
                .starts_with("redirected=10 passed_other=3")
        );
    }

    #[test]
    fn counter_slots_match_their_order() {
        for (slot, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, slot);
        }
    }

    #[test]
    fn queue_range_is_checked() {
        assert!(check_queue(MAX_QUEUES - 1).is_ok());
        assert!(matches!(
            check_queue(MAX_QUEUES),
            Err(XdpError::QueueOutOfRange { queue: 64, max: 64 })
        ));
    }

    #[test]
    fn missing_interface_is_reported_by_name() {
        let err = ifindex("kx-no-such-if").unwrap_err();
        assert!(
            matches!(err, XdpError::InterfaceNotFound { ref interface } if interface == "kx-no-such-if")
        );
    }
}
