//! The broker's socket backend against its AF_XDP backend (and, built with
//! `--features dpdk`, its DPDK backend on the virtual devices `net_af_packet`
//! and `net_af_xdp`): same run, same veth pair, same load.
//!
//! ```text
//! sudo cargo bench -p kaelix-benches --bench xdp_veth [--features dpdk]
//!   XDP_VETH_BACKENDS     comma-separated subset of socket, af_xdp, dpdk-af_packet,
//!                         dpdk-af_xdp (default: all that the build has)
//!   XDP_VETH_REPEATS (3)  runs per backend and load; medians and min-max are reported
//!   XDP_VETH_SECS (5)     measured seconds per run, after XDP_VETH_WARMUP (1) seconds
//!   XDP_VETH_RATES        paced loads in msgs/s, comma-separated (100000,1000000)
//!   XDP_VETH_NICE (0)     nice value of the broker and sender processes (below 0
//!                         they starve the cpus' ksoftirqd threads while spinning,
//!                         which shows as ACKs delayed by a scheduler tick)
//!   XDP_VETH_BUSY_POLL (1), XDP_VETH_NAPI_KNOBS (0)   AF_XDP preferred busy
//!                         polling, and napi_defer_hard_irqs=2 / gro_flush_timeout=200us
//!                         (off by default: on a veth the sockets are copy-mode,
//!                         which since Linux 6.13 have no NAPI id to busy-poll, so
//!                         deferral only parks packets until the 200 us timer)
//!   XDP_VETH_SPIN_CYCLES (20000)   empty polls a shard spins before yielding
//! ```
//!
//! Two network namespaces joined by a veth pair, made here and removed on
//! every exit path (`tests/tests/xdp_support`); the MTU is 3506, the largest
//! native XDP accepts on veth (checked against the kernel's `maxmtu` while
//! the program is attached), so a datagram carries 33 frames of 64-byte
//! payloads. For every repeat and load, both backends run in turn:
//!
//! - the broker: a child process under `ip netns exec` (its own /sys), one
//!   shard pinned to cpu 1 (its flusher thread unpinned), four streams at the
//!   memory durability level, the log on tmpfs in 4 GiB segments (no roll
//!   within a run); for AF_XDP `required = true` and the device's
//!   `napi_defer_hard_irqs` / `gro_flush_timeout` written as 0 (see
//!   XDP_VETH_NAPI_KNOBS);
//! - the sender: a child process in the other namespace, pinned to cpu 0,
//!   one kaelix-client `ProducerState` (4 streams, linger 0, one message in
//!   16 tracked for its latency) driven by a loop that transmits with
//!   `sendmmsg` (up to 64 datagrams per call) and polls ACKs without blocking. `max` sends as
//!   fast as the credit window allows; a paced load sends at a fixed rate.
//!
//! Ingest is messages acknowledged per second over the measured window (at
//! the memory level an ACK follows the append in the same cycle);
//! produce→ack latency is from `send()` to the ACK's arrival for messages
//! sent in the window. The veth softirq work runs on the sender's cpu (busy
//! polling cannot take it on a veth, see XDP_VETH_NAPI_KNOBS), and this is a shared 2-vCPU VM (the load average
//! at start and end is printed with the table): these are figures for veth
//! on this machine, not for a NIC.
#![allow(missing_docs)]

#[path = "../tests/tests/xdp_support/mod.rs"]
mod xdp_support;

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaelix_client::{ProducerConfig, ProducerEvent, ProducerState};
use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::{BackendKind, Config, StreamSection};
use kaelix_dataplane::af_xdp::{AfXdpConfig, Counter, HugePages};
use kaelix_dataplane::{CoreSelection, IdleStrategy};
use kaelix_protocol::DurabilityLevel;
use rustix::net::{MMsgHdr, RecvFlags, SendAncillaryBuffer, SendFlags};
use xdp_support::{NsChild, VethPair};

const DATA_PORT: u16 = 7000;
/// The largest MTU native XDP accepts on veth (4 KiB pages, a program
/// without multi-buffer support).
const MTU: u32 = 3506;
const DATAGRAM_LEN: usize = MTU as usize - 28;
const PAYLOAD: [u8; 64] = [0x6b; 64];
const STREAMS: [u32; 4] = [1, 2, 3, 4];
const BROKER_CPU: usize = 1;
const SENDER_CPU: usize = 0;
/// Datagrams per `sendmmsg`.
const SEND_BATCH: usize = 64;
/// Messages queued per loop turn at most.
const QUEUE_BURST: usize = 33 * SEND_BATCH;
/// One message in this many is tracked for its produce→ack latency (keeps
/// the sender's per-message work small).
const TRACK_EVERY: u64 = 16;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let child = args.get(1).map(String::as_str);
    if matches!(child, Some("broker-child" | "sender-child")) {
        // The machine is shared (builds, other benchmarks): ask for a larger
        // share of the two cores. Threads made afterwards inherit it.
        let nice: i32 = env_or("XDP_VETH_NICE", 0);
        rustix::process::setpriority_process(None, nice).expect("setpriority");
    }
    match child {
        Some("broker-child") => broker_child(&args[2..]),
        Some("sender-child") => sender_child(&args[2..]),
        _ => orchestrate(),
    }
}

// ---------------------------------------------------------------- broker

fn broker_config(backend: &str, interface: &str, ip: Ipv4Addr, data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.broker.data_dir = Some(data_dir.to_path_buf());
    config.broker.data_addr = SocketAddr::new(IpAddr::V4(ip), DATA_PORT);
    config.broker.shards = 1;
    config.dataplane.cores = CoreSelection::List(vec![BROKER_CPU]);
    config.dataplane.required = true;
    config.dataplane.backend = match backend {
        "socket" => BackendKind::Socket,
        "af_xdp" => BackendKind::AfXdp,
        "dpdk-af_packet" | "dpdk-af_xdp" => BackendKind::Dpdk,
        other => panic!("unknown backend {other}"),
    };
    if let Some(vdev) = dpdk_vdev(backend, interface) {
        config.dataplane.dpdk.eal_args.push(vdev);
        // One segment per packet, room for the whole MTU-sized frame (3520
        // bytes): net_af_packet wants room for its whole 4 KiB ring frame
        // (4064 bytes after its header), net_af_xdp a UMEM chunk within a
        // 4 KiB page (the mbuf's own 256 bytes included).
        config.dataplane.dpdk.mbuf_data_bytes = if backend == "dpdk-af_xdp" { 3584 } else { 4096 };
    }
    let busy_poll = env_or("XDP_VETH_BUSY_POLL", 1) != 0;
    let napi_knobs = env_or("XDP_VETH_NAPI_KNOBS", 0) != 0;
    config.dataplane.af_xdp = AfXdpConfig {
        interface: interface.to_owned(),
        hugepages: HugePages::Off,
        busy_poll,
        napi_defer_hard_irqs: Some(if napi_knobs { 2 } else { 0 }),
        gro_flush_timeout_ns: Some(if napi_knobs { 200_000 } else { 0 }),
        ..AfXdpConfig::default()
    };
    // An empty poll yields the cpu after this many spins (the softirq
    // thread of the shard's cpu must get to run; see the module docs).
    let spins: u32 = env_or("XDP_VETH_SPIN_CYCLES", 20_000);
    config.dataplane.shard.idle = IdleStrategy::Adaptive {
        spin_cycles: spins,
        yield_cycles: u32::MAX - spins,
        park_us: 1_000,
    };
    // No segment roll within a run (a fresh broker per run): at HEAD
    // f6d314e the writer can hit SIGBUS at a roll under load, when the
    // flusher re-creates the `.next` segment the writer just took.
    // 4 GiB (the largest allowed) also keeps the flusher from preparing
    // the next segment (at half) within a run: about 6 GB of tmpfs at most.
    config.storage.segment_size_mib = 4096;
    config.streams = STREAMS
        .iter()
        .map(|&id| StreamSection {
            id,
            durability: DurabilityLevel::Memory,
        })
        .collect();
    config
}

/// The DPDK virtual device of a `dpdk-*` backend on `interface`.
fn dpdk_vdev(backend: &str, interface: &str) -> Option<String> {
    match backend {
        // Frames of 4 KiB: the default 2 KiB would truncate MTU-sized packets.
        "dpdk-af_packet" => Some(format!(
            "--vdev=net_af_packet0,iface={interface},framecnt=8192,framesz=4096,blocksz=4096"
        )),
        "dpdk-af_xdp" => Some(format!("--vdev=net_af_xdp0,iface={interface}")),
        _ => None,
    }
}

/// The backends this build can run, in table order.
fn backends_built() -> Vec<&'static str> {
    let mut all = vec!["socket", "af_xdp"];
    if cfg!(feature = "dpdk") {
        all.extend(["dpdk-af_packet", "dpdk-af_xdp"]);
    }
    all
}

/// `broker-child BACKEND INTERFACE IP DATA_DIR`: start, print READY, run
/// until stdin closes, print STATS, shut down.
fn broker_child(args: &[String]) {
    let [backend, interface, ip, data_dir] = args else {
        panic!("broker-child BACKEND INTERFACE IP DATA_DIR");
    };
    let ip: Ipv4Addr = ip.parse().expect("an IPv4 address");
    let config = broker_config(backend, interface, ip, Path::new(data_dir));
    let broker = Broker::start(&config).unwrap_or_else(|err| panic!("broker: {err}"));
    let shard = &broker.shards()[0];
    let xdp = broker
        .xdp()
        .map(|info| (info.xdp.clone(), info.xdp.counters().expect("XDP counters")));
    println!(
        "READY backend={} cpu={:?} xdp={}",
        shard.backend,
        shard.cpu,
        broker.xdp().map_or("none".to_owned(), |info| format!(
            "{} copy-mode={}",
            info.xdp_mode, !info.zero_copy
        )),
    );
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let counters = &shard.counters;
    let (redirected, xdp_dropped) = match &xdp {
        Some((handle, before)) => {
            let now = handle.counters().expect("XDP counters").since(before);
            (now.get(Counter::Redirected), now.dropped())
        }
        None => (0, 0),
    };
    println!(
        "STATS frames={} datagrams={} duplicates={} gaps={} acks={} replies_dropped={} redirected={redirected} xdp_dropped={xdp_dropped}",
        load(&counters.frames_appended),
        load(&counters.datagrams),
        load(&counters.duplicates),
        load(&counters.gaps),
        load(&counters.acks_sent),
        load(&counters.replies_dropped),
    );
    std::io::stdout().flush().unwrap();
    drop(xdp);
    broker.shutdown().expect("broker shutdown");
}

// ---------------------------------------------------------------- sender

/// Latencies in nanoseconds, log-linear buckets: 128 per power of two
/// (values are kept to within 1 %).
struct Latencies {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Latencies {
    const SUB: u64 = 128;

    fn new() -> Self {
        Latencies {
            buckets: vec![0; 64 * Self::SUB as usize],
            count: 0,
            max: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < Self::SUB {
            return value as usize;
        }
        let exponent = 63 - u64::from(value.leading_zeros());
        let shift = exponent - 7;
        ((shift + 1) * Self::SUB + ((value >> shift) - Self::SUB)) as usize
    }

    /// The smallest value of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < Self::SUB {
            return index;
        }
        let shift = index / Self::SUB - 1;
        (Self::SUB + index % Self::SUB) << shift
    }

    fn record(&mut self, value: u64) {
        self.buckets[Self::index(value)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    fn quantile(&self, q: f64) -> u64 {
        let rank = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(index);
            }
        }
        self.max
    }
}

/// Send times of the tracked messages of one stream, oldest first.
#[derive(Default)]
struct SendTimes(VecDeque<(u64, Instant)>);

impl SendTimes {
    /// When message `number` was sent (events come in order per stream).
    fn take(&mut self, number: u64) -> Option<Instant> {
        while self.0.front().is_some_and(|&(n, _)| n < number) {
            self.0.pop_front();
        }
        match self.0.front() {
            Some(&(n, at)) if n == number => {
                self.0.pop_front();
                Some(at)
            }
            _ => None,
        }
    }
}

/// Send `datagrams` on the connected `socket` with as few `sendmmsg` calls as it takes.
fn send_all(socket: &UdpSocket, datagrams: &[&[u8]]) -> u64 {
    let mut calls = 0;
    let mut done = 0;
    while done < datagrams.len() {
        let iovs: Vec<[IoSlice<'_>; 1]> = datagrams[done..]
            .iter()
            .map(|d| [IoSlice::new(d)])
            .collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = iovs
            .iter()
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut msgs: Vec<MMsgHdr<'_>> = iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, control)| MMsgHdr::new(iov, control))
            .collect();
        calls += 1;
        match rustix::net::sendmmsg(socket, &mut msgs, SendFlags::empty()) {
            Ok(sent) => done += sent,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::NOBUFS) => {}
            Err(err) => panic!("sendmmsg: {err}"),
        }
    }
    calls
}

/// `sender-child BROKER LOCAL_IP LOAD WARMUP_SECS SECS`: LOAD is `max` or
/// a rate in msgs/s. Prints one RESULT line.
fn sender_child(args: &[String]) {
    let [broker, local, load, warmup, secs] = args else {
        panic!("sender-child BROKER LOCAL_IP LOAD WARMUP_SECS SECS");
    };
    let broker: SocketAddr = broker.parse().expect("broker address");
    let local: Ipv4Addr = local.parse().expect("local address");
    let rate: Option<u64> = (load != "max").then(|| load.parse().expect("a rate"));
    let warmup = Duration::from_secs(warmup.parse().expect("seconds"));
    let measured = Duration::from_secs(secs.parse().expect("seconds"));
    kaelix_dataplane::pinning::pin_current_thread(SENDER_CPU).expect("pinning the sender");

    let socket = UdpSocket::bind(SocketAddrV4::new(local, 0)).expect("bind");
    socket.connect(broker).expect("connect");
    rustix::net::sockopt::set_socket_send_buffer_size(&socket, 4 << 20).expect("SO_SNDBUF");
    rustix::net::sockopt::set_socket_recv_buffer_size(&socket, 4 << 20).expect("SO_RCVBUF");
    let mut state = ProducerState::new(ProducerConfig {
        datagram_len_max: DATAGRAM_LEN,
        linger: Duration::ZERO,
        // No deeper than the broker's credit (8192 per flow): under the max
        // load the latency is then time in flight, not time queued here.
        buffer_frames_max: 8192 * STREAMS.len(),
        ..ProducerConfig::default()
    });
    let mut times: Vec<SendTimes> = STREAMS.iter().map(|_| SendTimes::default()).collect();
    let mut bufs = vec![vec![0u8; DATAGRAM_LEN]; SEND_BATCH];
    let mut lens = [0usize; SEND_BATCH];
    let mut rbuf = vec![0u8; 65_536];
    let mut latency = Latencies::new();
    let timestamp_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);

    let start = Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + measured;
    let mut queued: u64 = 0;
    let mut next_stream = 0;
    let mut acked_at_start = None;
    let mut datagrams_at_start = 0;
    let mut sendmmsg_calls = 0u64;
    let mut failed = 0u64;
    loop {
        let now = Instant::now();
        if acked_at_start.is_none() && now >= window_start {
            acked_at_start = Some(state.stats().messages_acked);
            datagrams_at_start = state.stats().datagrams_sent;
        }
        if now >= window_end {
            break;
        }
        let due = match rate {
            None => QUEUE_BURST as u64,
            Some(rate) => {
                let target = (now - start).as_nanos() as u64 * rate / 1_000_000_000;
                target.saturating_sub(queued).min(QUEUE_BURST as u64)
            }
        };
        for _ in 0..due {
            if !state.has_room(PAYLOAD.len()) {
                break;
            }
            let stream = STREAMS[next_stream];
            let tracked = queued.is_multiple_of(TRACK_EVERY);
            let ticket = state
                .send(now, stream, &PAYLOAD, timestamp_ns, tracked)
                .expect("room was checked");
            if tracked {
                times[next_stream].0.push_back((ticket.number, now));
            }
            next_stream = (next_stream + 1) % STREAMS.len();
            queued += 1;
        }
        loop {
            let mut n = 0;
            while n < SEND_BATCH {
                match state.poll_transmit(now, &mut bufs[n]) {
                    Some(transmit) => {
                        lens[n] = transmit.len;
                        n += 1;
                    }
                    None => break,
                }
            }
            if n == 0 {
                break;
            }
            let datagrams: Vec<&[u8]> = bufs[..n]
                .iter()
                .zip(&lens[..n])
                .map(|(b, &l)| &b[..l])
                .collect();
            sendmmsg_calls += send_all(&socket, &datagrams);
            if n < SEND_BATCH {
                break;
            }
        }
        if state.poll_timeout().is_some_and(|at| at <= now) {
            state.handle_timeout(now);
        }
        let mut received = 0;
        for _ in 0..256 {
            match rustix::net::recv(&socket, &mut rbuf[..], RecvFlags::DONTWAIT) {
                Ok((len, _)) => {
                    received += 1;
                    state.handle_datagram(Instant::now(), &rbuf[..len]);
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => break,
                // ICMP port unreachable while the broker starts: ignore.
                Err(rustix::io::Errno::CONNREFUSED) => break,
                Err(err) => panic!("recv: {err}"),
            }
        }
        if due == 0 && received == 0 {
            // Nothing to do this turn: let the softirq thread of this cpu run.
            std::thread::yield_now();
        }
        let arrived = Instant::now();
        while let Some(event) = state.poll_event() {
            match event {
                ProducerEvent::Delivered { ticket, .. } => {
                    let index = STREAMS
                        .iter()
                        .position(|&s| s == ticket.stream_id)
                        .expect("one of our streams");
                    if let Some(sent) = times[index].take(ticket.number)
                        && sent >= window_start
                        && sent < window_end
                    {
                        latency.record((arrived - sent).as_nanos() as u64);
                    }
                }
                ProducerEvent::Failed { ticket, .. } => {
                    failed += 1;
                    let index = STREAMS
                        .iter()
                        .position(|&s| s == ticket.stream_id)
                        .expect("one of our streams");
                    times[index].take(ticket.number);
                }
            }
        }
    }
    let stats = state.stats();
    // Everything acknowledged since the window opened (the loop ends at its close).
    let acked = stats.messages_acked - acked_at_start.unwrap_or(0);
    let secs = measured.as_secs_f64();
    let us = |q: f64| latency.quantile(q) as f64 / 1000.0;
    println!(
        "RESULT acked_per_sec={:.0} datagrams_per_sec={:.0} frames_per_datagram={:.1} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} samples={} retransmitted={} timeouts={} failed={failed} sendmmsg_calls={sendmmsg_calls}",
        acked as f64 / secs,
        (stats.datagrams_sent - datagrams_at_start) as f64 / secs,
        stats.frames_sent as f64 / stats.datagrams_sent.max(1) as f64,
        us(0.5),
        us(0.99),
        us(0.999),
        latency.max as f64 / 1000.0,
        latency.count,
        stats.frames_retransmitted,
        stats.timeouts,
    );
}

// ---------------------------------------------------------------- orchestration

/// `key=value` from a RESULT/STATS line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

struct Run {
    result: String,
    stats: String,
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    };
    (median, values[0], values[values.len() - 1])
}

fn orchestrate() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "SKIPPED xdp_veth: needs root (network namespaces, XDP, AF_XDP); run it with sudo"
        );
        return;
    }
    let repeats: usize = env_or("XDP_VETH_REPEATS", 3);
    let warmup: u64 = env_or("XDP_VETH_WARMUP", 1);
    let secs: u64 = env_or("XDP_VETH_SECS", 5);
    let rates: String = env_or("XDP_VETH_RATES", "100000,1000000".to_owned());
    let mut loads = vec!["max".to_owned()];
    loads.extend(rates.split(',').map(|r| r.trim().to_owned()));

    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let load_at_start = loadavg();
    let pair = VethPair::create();
    pair.set_mtu(MTU);
    let data_root = tempfile::Builder::new()
        .prefix("kaelix-xdp-veth-")
        .tempdir_in("/dev/shm")
        .expect("tmpfs data directory");
    let broker_addr = SocketAddr::new(IpAddr::V4(pair.ip_b), DATA_PORT).to_string();
    let ip_b = pair.ip_b.to_string();
    let ip_a = pair.ip_a.to_string();

    let built = backends_built();
    let backends: Vec<&str> = match std::env::var("XDP_VETH_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .map(|name| {
                *built.iter().find(|b| **b == name).unwrap_or_else(|| {
                    panic!("XDP_VETH_BACKENDS: {name:?} is not one of {built:?} (dpdk-* need --features dpdk)")
                })
            })
            .collect(),
        Err(_) => built.clone(),
    };
    let napi_knobs = env_or("XDP_VETH_NAPI_KNOBS", 0) != 0;
    let mut runs: Vec<(usize, usize, Run)> = Vec::new();
    let mut run_number = 0;
    for repeat in 0..repeats {
        for (li, load) in loads.iter().enumerate() {
            for (bi, backend) in backends.iter().enumerate() {
                run_number += 1;
                // Deferral only with XDP_VETH_NAPI_KNOBS=1, on the AF_XDP runs.
                let (defer, flush) = if *backend == "af_xdp" && napi_knobs {
                    (2, 200_000)
                } else {
                    (0, 0)
                };
                pair.sh(
                    &pair.ns_b,
                    &format!(
                        "echo {defer} > /sys/class/net/{0}/napi_defer_hard_irqs && echo {flush} > /sys/class/net/{0}/gro_flush_timeout",
                        pair.if_b
                    ),
                );
                let dir = data_root.path().join(format!("run-{run_number}"));
                let dir = dir.to_str().expect("utf-8 path");
                let dpdk = backend.starts_with("dpdk");
                if dpdk {
                    pair.sh(&pair.ns_b, &format!("ip -4 addr flush dev {}", pair.if_b));
                }
                let mut broker = NsChild::spawn(
                    &pair.ns_b,
                    &["broker-child", backend, &pair.if_b, &ip_b, dir],
                    &[],
                );
                let ready = broker.line("READY", Duration::from_secs(60));
                if *backend == "af_xdp" && run_number <= backends.len() {
                    let link =
                        xdp_support::ip(&["-d", "-n", &pair.ns_a, "link", "show", &pair.if_a]);
                    let maxmtu = link
                        .split_whitespace()
                        .skip_while(|w| *w != "maxmtu")
                        .nth(1)
                        .unwrap_or("?");
                    eprintln!(
                        "xdp_veth: MTU {MTU}; with the program attached the kernel caps the peer at maxmtu {maxmtu}"
                    );
                }
                let sender = NsChild::spawn(
                    &pair.ns_a,
                    &[
                        "sender-child",
                        &broker_addr,
                        &ip_a,
                        load,
                        &warmup.to_string(),
                        &secs.to_string(),
                    ],
                    &[],
                );
                let result = sender.finish("RESULT");
                let stats = broker.finish("STATS");
                if dpdk {
                    pair.sh(
                        &pair.ns_b,
                        &format!("ip addr add {ip_b}/24 dev {}", pair.if_b),
                    );
                }
                eprintln!(
                    "xdp_veth: repeat {} {backend:>6} load {load:>8}: {ready}\n  {result}\n  {stats}",
                    repeat + 1
                );
                runs.push((bi, li, Run { result, stats }));
            }
        }
    }

    println!(
        "\nxdp_veth: medians (min-max) of {repeats} runs, {secs} s each after {warmup} s warm-up; MTU {MTU}, \
         {DATAGRAM_LEN}-byte datagrams, 64-byte payloads; broker shard on cpu {BROKER_CPU}, sender on cpu {SENDER_CPU}\n"
    );
    println!(
        "| backend | load (msgs/s) | acked msgs/s | datagrams/s | frames/datagram | p50 µs | p99 µs | p99.9 µs | retransmitted | broker drops |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut max_rate = vec![0.0f64; backends.len()];
    let mut p99s = vec![vec![0.0f64; backends.len()]; loads.len()];
    for (li, load) in loads.iter().enumerate() {
        for (bi, backend) in backends.iter().enumerate() {
            let of: Vec<&Run> = runs
                .iter()
                .filter(|(b, l, _)| *b == bi && *l == li)
                .map(|(_, _, r)| r)
                .collect();
            let stat = |key: &str| median(of.iter().map(|r| field(&r.result, key)).collect());
            let fmt = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} ({lo:.0}-{hi:.0})");
            let fmt1 = |(m, lo, hi): (f64, f64, f64)| format!("{m:.1} ({lo:.1}-{hi:.1})");
            let acked = stat("acked_per_sec");
            let p99 = stat("p99_us");
            // AF_XDP: redirected by the program but never seen by the shard
            // (ring full, fill ring empty). Socket: not visible here.
            let drops = median(
                of.iter()
                    .map(|r| {
                        (field(&r.stats, "redirected") - field(&r.stats, "datagrams")).max(0.0)
                    })
                    .collect(),
            );
            if li == 0 {
                max_rate[bi] = acked.0;
            }
            p99s[li][bi] = p99.0;
            println!(
                "| {backend} | {load} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt(acked),
                fmt(stat("datagrams_per_sec")),
                fmt1(stat("frames_per_datagram")),
                fmt1(stat("p50_us")),
                fmt1(p99),
                fmt1(stat("p999_us")),
                fmt(stat("retransmitted")),
                if *backend == "af_xdp" {
                    fmt(drops)
                } else {
                    "n/a".to_owned()
                },
            );
        }
    }
    println!(
        "\nload average (shared 2-vCPU VM): {load_at_start} at start, {} at the end; nice {}",
        loadavg(),
        env_or("XDP_VETH_NICE", 0)
    );
    // Ratios against the first backend of the run (socket by default).
    let base = backends[0];
    for (bi, backend) in backends.iter().enumerate().skip(1) {
        println!(
            "max load: {backend} / {base} = {:.2}x acked msgs/s",
            max_rate[bi] / max_rate[0].max(1.0)
        );
    }
    for (li, load) in loads.iter().enumerate() {
        let p99: Vec<String> = backends
            .iter()
            .zip(&p99s[li])
            .map(|(backend, p99)| format!("{backend} {p99:.1} µs"))
            .collect();
        println!("load {load}: p99 {}", p99.join(", "));
    }
}
