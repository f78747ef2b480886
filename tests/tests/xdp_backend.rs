//! The AF_XDP backend on a veth pair between two network namespaces the test
//! creates: the backend in one, a plain kernel UDP producer in the other.
//! Frames arrive intact and in order, replies come back through the TX ring,
//! garbage is dropped and counted by the XDP program, ICMP and TCP still
//! reach the namespace, and no XDP program is left after a drop or a SIGKILL.
//! Needs root (skips loudly otherwise).

mod xdp_support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kaelix_dataplane::af_xdp::{
    AfXdpBackend, AfXdpConfig, AfXdpInfo, AttachedMode, BindMode, Counter, HugePages,
    KernelRingStats, XdpModeConfig,
};
use kaelix_dataplane::{Backend, BackendStats, Peer};
use kaelix_ebpf::{TestRx, action, attached_program_id};
use kaelix_protocol::{AckBody, Datagram, DatagramBuilder, DurabilityLevel, FrameKind};
use xdp_support::{
    NsChild, VethPair, assert_no_program_left, data_datagram, panic_text, ping, require_root,
    tcp_round_trip,
};

const DATA_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;

fn config(pair: &VethPair, mode: XdpModeConfig) -> AfXdpConfig {
    AfXdpConfig {
        interface: pair.if_b.clone(),
        data_port: DATA_PORT,
        xdp_mode: mode,
        // Only the hugepage test takes hugepages (tests run concurrently).
        hugepages: HugePages::Off,
        ..AfXdpConfig::default()
    }
}

/// What the echo loop saw.
#[derive(Debug, Default)]
struct EchoReport {
    /// (stream, producer, sequence) of every valid frame, in arrival order.
    frames: Vec<(u32, u32, u64)>,
    /// Frame payload bytes that did not match the pattern the producer writes.
    corrupt_payloads: usize,
    /// Frames that failed to decode (CRC, length, ...).
    bad_frames: usize,
    /// Datagrams received.
    datagrams: usize,
    /// Replies the backend could not queue.
    replies_dropped: usize,
    stats: BackendStats,
    kernel: KernelRingStats,
}

/// Run `backend` until `stop`: record every frame and answer every datagram
/// with one ACK for its last frame.
fn echo_loop(mut backend: AfXdpBackend, stop: Arc<AtomicBool>) -> EchoReport {
    let mut report = EchoReport::default();
    let mut to_ack: Vec<(Peer, u32, u32, u64, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let received = backend
            .recv_batch(&mut |payload, peer| {
                report.datagrams += 1;
                let mut last = None;
                for frame in Datagram::new(payload).frames() {
                    match frame {
                        Ok(frame) => {
                            let sequence = frame.sequence();
                            let expected =
                                (0..frame.payload().len()).map(|b| (sequence as usize + b) as u8);
                            if !frame.payload().iter().copied().eq(expected) {
                                report.corrupt_payloads += 1;
                            }
                            report
                                .frames
                                .push((frame.stream_id(), frame.producer_id(), sequence));
                            last = Some((
                                frame.stream_id(),
                                frame.producer_id(),
                                sequence,
                                frame.timestamp_ns(),
                            ));
                        }
                        Err(_) => report.bad_frames += 1,
                    }
                }
                if let Some((stream, producer, sequence, timestamp)) = last {
                    to_ack.push((*peer, stream, producer, sequence, timestamp));
                }
            })
            .expect("recv_batch");
        for (peer, stream, producer, sequence, timestamp) in to_ack.drain(..) {
            let queued = backend
                .queue_tx(&peer, &mut |buf| {
                    let mut builder = DatagramBuilder::new(buf);
                    let body = AckBody::new(64, DurabilityLevel::Memory, sequence);
                    builder
                        .push_ack(stream, producer, sequence, timestamp, &body)
                        .expect("an ACK fits");
                    builder.len()
                })
                .expect("queue_tx");
            if !queued {
                report.replies_dropped += 1;
            }
        }
        backend.flush_tx().expect("flush_tx");
        if received == 0 {
            backend
                .wait_readable(Duration::from_millis(1))
                .expect("wait_readable");
        }
    }
    // Let the last replies complete before the socket closes.
    for _ in 0..10 {
        backend.flush_tx().expect("flush_tx");
    }
    report.stats = backend.stats();
    report.kernel = backend.kernel_stats().expect("XDP_STATISTICS");
    report
}

/// The broker side: open the backend in `ns_b`, check the redirect verdict
/// with BPF_PROG_TEST_RUN, then echo until stopped.
struct Broker {
    info: AfXdpInfo,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<EchoReport>,
}

impl Broker {
    fn start(pair: &VethPair, config: AfXdpConfig) -> Broker {
        let (info_tx, info_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_loop = Arc::clone(&stop);
        let thread = pair.spawn_in(&pair.ns_b, move || {
            let (mut backends, info) =
                AfXdpBackend::open(&config).expect("opening the AF_XDP backend");
            assert_eq!(backends.len(), 1, "a fresh veth has one RX queue");
            // The socket is in the XSKMAP now: a valid datagram on queue 0 is redirected.
            let frame =
                xdp_support::udp_frame(&xdp_support::producer_v4(), &data_datagram(1, 1, 1, 1, 8));
            let verdict = info
                .xdp
                .program()
                .test_run(
                    &frame,
                    Some(TestRx {
                        ifindex: info.ifindex,
                        queue: 0,
                    }),
                )
                .expect("BPF_PROG_TEST_RUN with an rx queue");
            assert_eq!(
                verdict,
                action::REDIRECT,
                "valid datagram on a steered queue"
            );
            info_tx.send(info).expect("test thread waits for the info");
            echo_loop(backends.pop().expect("one backend"), stop_loop)
        });
        let info = match info_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(info) => info,
            Err(_) => panic!(
                "the backend did not start: {:?}",
                thread.join().err().map(panic_text)
            ),
        };
        Broker { info, stop, thread }
    }

    fn finish(self) -> (AfXdpInfo, EchoReport) {
        self.stop.store(true, Ordering::Relaxed);
        let report = self.thread.join().expect("echo loop panicked");
        (self.info, report)
    }
}

/// The producer side, run in `ns_a`: `rounds` windows of `window` datagrams
/// of `frames` frames each; every datagram must be answered by one ACK of its
/// last sequence before the next window goes out. Returns the ACKed sequences.
fn produce(
    broker: SocketAddrV4,
    local: Ipv4Addr,
    rounds: usize,
    window: usize,
    frames: usize,
    payload_len: usize,
) -> Vec<u64> {
    let socket = UdpSocket::bind(SocketAddrV4::new(local, 0)).expect("binding the producer socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut acked = Vec::with_capacity(rounds * window);
    let mut next_sequence = 1u64;
    let mut buf = vec![0u8; 65_536];
    for round in 0..rounds {
        let mut expected = Vec::with_capacity(window);
        for _ in 0..window {
            let datagram = data_datagram(5, 77, next_sequence, frames, payload_len);
            next_sequence += frames as u64;
            expected.push(next_sequence - 1);
            socket.send_to(&datagram, broker).expect("send_to");
        }
        let mut got = Vec::with_capacity(window);
        while got.len() < window {
            let (len, from) = socket.recv_from(&mut buf).unwrap_or_else(|err| {
                panic!("round {round}: {} of {window} ACKs, then {err}", got.len())
            });
            assert_eq!(from, SocketAddr::V4(broker), "reply source");
            for frame in Datagram::new(&buf[..len]).frames() {
                let frame = frame.expect("replies decode");
                assert_eq!(frame.kind(), FrameKind::Ack);
                assert_eq!((frame.stream_id(), frame.producer_id()), (5, 77));
                got.push(frame.sequence());
            }
        }
        assert_eq!(
            got, expected,
            "round {round}: ACKs in order, one per datagram"
        );
        acked.extend(got);
    }
    acked
}

fn live_round_trip(mode: XdpModeConfig, expected_mode: AttachedMode, test: &str) {
    if !require_root(test) {
        return;
    }
    let pair = VethPair::create();
    // Let busy polling take the NAPI work (written inside the namespace's /sys).
    pair.sh(
        &pair.ns_b,
        &format!(
            "echo 2 > /sys/class/net/{0}/napi_defer_hard_irqs && echo 200000 > /sys/class/net/{0}/gro_flush_timeout",
            pair.if_b
        ),
    );
    let broker = Broker::start(&pair, config(&pair, mode));
    assert_eq!(broker.info.xdp_mode, expected_mode);
    assert!(
        !broker.info.zero_copy,
        "veth has no zero-copy: auto must fall back to copy mode"
    );
    assert_eq!(broker.info.queues, vec![0]);
    assert!(
        pair.link_b().contains("prog/xdp"),
        "ip link shows the program: {}",
        pair.link_b()
    );
    let before = broker.info.xdp.counters().unwrap();

    const ROUNDS: usize = 40;
    const WINDOW: usize = 32;
    const FRAMES: usize = 8;
    let target = SocketAddrV4::new(pair.ip_b, DATA_PORT);
    let ip_a = pair.ip_a;
    let acked = pair.in_ns(&pair.ns_a, move || {
        produce(target, ip_a, ROUNDS, WINDOW, FRAMES, 24)
    });
    assert_eq!(acked.len(), ROUNDS * WINDOW);

    // Garbage to the data port: dropped by the program, never seen by the backend.
    pair.in_ns(&pair.ns_a, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(ip_a, 0)).unwrap();
        let good = data_datagram(5, 77, 1, 1, 8);
        let mut bad_magic = good.clone();
        bad_magic[1] = b'Y';
        let mut bad_version = good.clone();
        bad_version[2] = 9;
        for _ in 0..10 {
            socket.send_to(&good[..20], target).unwrap();
            socket.send_to(&bad_magic, target).unwrap();
            socket.send_to(&bad_version, target).unwrap();
            socket.send_to(&[], target).unwrap();
        }
    });
    // Kernel traffic still flows while the program is attached.
    let ip_b = pair.ip_b;
    pair.in_ns(&pair.ns_a, move || ping(ip_b));
    tcp_round_trip(&pair, TCP_PORT);

    let deadline = Instant::now() + Duration::from_secs(5);
    let counters = loop {
        let counters = broker.info.xdp.counters().unwrap().since(&before);
        if counters.dropped() >= 40 || Instant::now() > deadline {
            break counters;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (info, report) = broker.finish();

    let sent = (ROUNDS * WINDOW * FRAMES) as u64;
    let expected: Vec<(u32, u32, u64)> = (1..=sent).map(|s| (5, 77, s)).collect();
    assert_eq!(report.bad_frames, 0, "every frame decoded (CRC, lengths)");
    assert_eq!(report.corrupt_payloads, 0, "every payload byte intact");
    assert!(
        report.frames == expected,
        "frames exactly once and in order: got {} frames",
        report.frames.len()
    );
    assert_eq!(
        report.datagrams,
        ROUNDS * WINDOW,
        "only valid datagrams reached the backend"
    );
    assert_eq!(report.replies_dropped, 0);
    assert_eq!(report.stats.rx_packets, (ROUNDS * WINDOW) as u64);
    assert_eq!(report.stats.tx_packets, (ROUNDS * WINDOW) as u64);
    assert_eq!(report.stats.rx_dropped, 0);
    assert_eq!(
        counters.get(Counter::Redirected),
        (ROUNDS * WINDOW) as u64,
        "{counters}"
    );
    assert_eq!(counters.get(Counter::DroppedShort), 20, "{counters}");
    assert_eq!(counters.get(Counter::DroppedBadMagic), 10, "{counters}");
    assert_eq!(counters.get(Counter::DroppedBadVersion), 10, "{counters}");
    assert!(
        counters.get(Counter::PassedOther) > 0,
        "ARP, ICMP and TCP were passed: {counters}"
    );
    eprintln!(
        "{test}: {counters}; backend {:?}; kernel {:?}",
        report.stats, report.kernel
    );

    // The backend is gone; the last handle on the program goes now.
    let ifindex = info.ifindex;
    drop(info);
    assert_no_program_left(&pair, ifindex);
}

#[test]
fn xdp_backend_native_mode_round_trip_over_veth() {
    live_round_trip(
        XdpModeConfig::Native,
        AttachedMode::Native,
        "xdp_backend_native_mode_round_trip_over_veth",
    );
}

#[test]
fn xdp_backend_generic_mode_round_trip_over_veth() {
    live_round_trip(
        XdpModeConfig::Generic,
        AttachedMode::Generic,
        "xdp_backend_generic_mode_round_trip_over_veth",
    );
}

#[test]
fn xdp_backend_auto_mode_picks_native_on_veth_and_carries_3500_byte_datagrams() {
    let test = "xdp_backend_auto_mode_picks_native_on_veth_and_carries_3500_byte_datagrams";
    if !require_root(test) {
        return;
    }
    let pair = VethPair::create();
    // The largest MTU native XDP allows on veth with 4 KiB pages is 3506.
    pair.set_mtu(3500);
    let broker = Broker::start(
        &pair,
        AfXdpConfig {
            bind: BindMode::Copy,
            ..config(&pair, XdpModeConfig::Auto)
        },
    );
    assert_eq!(broker.info.xdp_mode, AttachedMode::Native);
    assert_eq!(broker.info.mtu, 3500);
    // 33 frames of 64-byte payloads: 33 * 104 = 3432 bytes of UDP payload.
    let target = SocketAddrV4::new(pair.ip_b, DATA_PORT);
    let ip_a = pair.ip_a;
    let acked = pair.in_ns(&pair.ns_a, move || produce(target, ip_a, 10, 16, 33, 64));
    assert_eq!(acked.len(), 160);
    let (info, report) = broker.finish();
    assert_eq!(report.bad_frames + report.corrupt_payloads, 0);
    assert_eq!(report.frames.len(), 160 * 33);
    assert!(
        report.frames.iter().map(|f| f.2).eq(1..=160 * 33),
        "in order, exactly once"
    );
    let ifindex = info.ifindex;
    drop(info);
    assert_no_program_left(&pair, ifindex);
}

/// Hugepages reserved for the test and given back afterwards.
struct HugePageReservation {
    previous: String,
}

impl HugePageReservation {
    const PATH: &str = "/proc/sys/vm/nr_hugepages";

    fn reserve_at_least(pages: u64) -> Self {
        let previous = std::fs::read_to_string(Self::PATH).expect("reading nr_hugepages");
        let current: u64 = previous.trim().parse().expect("a number");
        std::fs::write(Self::PATH, (current + pages).to_string()).expect("writing nr_hugepages");
        HugePageReservation { previous }
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.previous.trim());
    }
}

#[test]
fn xdp_backend_umem_on_hugepages_when_reserved_and_normal_pages_when_off() {
    let test = "xdp_backend_umem_on_hugepages_when_reserved_and_normal_pages_when_off";
    if !require_root(test) {
        return;
    }
    let pair = VethPair::create();
    let base = config(&pair, XdpModeConfig::Auto);
    // 32 MiB UMEM = 16 pages of 2 MiB.
    let _reservation = HugePageReservation::reserve_at_least(base.umem_bytes() / 2 / 1024 / 1024);
    let on = AfXdpConfig {
        hugepages: HugePages::On,
        ..base.clone()
    };
    let off = AfXdpConfig {
        hugepages: HugePages::Off,
        ..base
    };
    let (with, without) = pair.in_ns(&pair.ns_b, move || {
        let (backends, info) = AfXdpBackend::open(&on).expect("UMEM on reserved hugepages");
        assert!(backends.iter().all(|b| b.hugepages()));
        let with = info.hugepages;
        drop((backends, info));
        let (backends, info) = AfXdpBackend::open(&off).expect("UMEM on normal pages");
        assert!(backends.iter().all(|b| !b.hugepages()));
        (with, info.hugepages)
    });
    assert!(with);
    assert!(!without);
}

#[test]
fn xdp_backend_missing_interface_is_reported_as_unavailable() {
    let config = AfXdpConfig {
        interface: "kxmissing0".into(),
        ..AfXdpConfig::default()
    };
    let err = AfXdpBackend::open(&config).expect_err("no such interface");
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("kxmissing0"), "{err}");
}

#[test]
fn xdp_backend_queue_beyond_the_interface_is_an_error() {
    if !require_root("xdp_backend_queue_beyond_the_interface_is_an_error") {
        return;
    }
    let pair = VethPair::create();
    let config = AfXdpConfig {
        queues: Some(vec![0, 1]),
        ..config(&pair, XdpModeConfig::Auto)
    };
    let err = pair.in_ns(&pair.ns_b, move || {
        AfXdpBackend::open(&config)
            .expect_err("veth has one queue")
            .to_string()
    });
    assert!(err.contains("queue 1"), "{err}");
    assert!(
        !pair.link_b().contains("prog/xdp"),
        "nothing attached after a failed open"
    );
}

#[test]
fn xdp_backend_config_from_json() {
    let config: AfXdpConfig = serde_json::from_str(
        r#"{"interface":"vb1","xdp_mode":"generic","bind":"copy","hugepages":"off","queues":[0],"busy_poll":false}"#,
    )
    .unwrap();
    assert_eq!(config.xdp_mode, XdpModeConfig::Generic);
    assert_eq!(config.bind, BindMode::Copy);
    assert_eq!(config.hugepages, HugePages::Off);
    assert_eq!(config.queues, Some(vec![0]));
    assert!(!config.busy_poll);
    assert_eq!(config.frames, AfXdpConfig::default().frames);
    config.validate().unwrap();
    let err = serde_json::from_str::<AfXdpConfig>(r#"{"interfaces":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("interfaces"), "{err}");
}

const CHILD_ENV: &str = "KAELIX_XDP_CHILD_INTERFACE";

/// Helper for `xdp_backend_no_program_left_after_sigkill`, run in a child
/// process inside the broker namespace: attach, say so, wait to be killed.
#[test]
#[ignore = "helper: started in a child process by xdp_backend_no_program_left_after_sigkill"]
fn xdp_backend_child_holds_the_program() {
    let interface =
        std::env::var(CHILD_ENV).expect("run only by xdp_backend_no_program_left_after_sigkill");
    let config = AfXdpConfig {
        interface,
        data_port: DATA_PORT,
        hugepages: HugePages::Off,
        // `ip netns exec` remounted /sys for the namespace, so the backend
        // can set the device's busy-poll knobs itself.
        napi_defer_hard_irqs: Some(2),
        gro_flush_timeout_ns: Some(200_000),
        ..AfXdpConfig::default()
    };
    let (_backends, info) = AfXdpBackend::open(&config).expect("child: opening the backend");
    println!("ATTACHED {}", info.xdp_mode);
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    panic!("child: not killed within 120 s");
}

#[test]
fn xdp_backend_no_program_left_after_sigkill() {
    if !require_root("xdp_backend_no_program_left_after_sigkill") {
        return;
    }
    let pair = VethPair::create();
    let mut child = NsChild::spawn_test(
        &pair.ns_b,
        "xdp_backend_child_holds_the_program",
        &[(CHILD_ENV, &pair.if_b)],
    );
    let line = child.line("ATTACHED ", Duration::from_secs(60));
    assert_eq!(line, "ATTACHED native");
    let if_b = pair.if_b.clone();
    let ifindex = pair.in_ns(&pair.ns_b, move || kaelix_ebpf::ifindex(&if_b).unwrap());
    let attached = pair.in_ns(&pair.ns_b, move || attached_program_id(ifindex).unwrap());
    let knobs = pair.sh(
        &pair.ns_b,
        &format!(
            "cat /sys/class/net/{0}/napi_defer_hard_irqs /sys/class/net/{0}/gro_flush_timeout",
            pair.if_b
        ),
    );
    assert_eq!(
        knobs.split_whitespace().collect::<Vec<_>>(),
        ["2", "200000"],
        "device knobs written by the backend"
    );
    assert!(
        attached.is_some(),
        "the child's program is attached: {}",
        pair.link_b()
    );

    let status = child.kill();
    assert!(!status.success(), "killed, not exited: {status:?}");
    assert_no_program_left(&pair, ifindex);
}

const UNPRIVILEGED_ENV: &str = "KAELIX_XDP_UNPRIVILEGED_CHILD";

/// Helper for `xdp_backend_without_privilege_is_reported_as_unavailable`, run
/// in a child process with no capabilities: opening must fail as unavailable.
#[test]
#[ignore = "helper: started without privileges by xdp_backend_without_privilege_is_reported_as_unavailable"]
fn xdp_backend_unprivileged_child_open() {
    assert!(
        std::env::var(UNPRIVILEGED_ENV).is_ok(),
        "run only by xdp_backend_without_privilege_is_reported_as_unavailable"
    );
    let config = AfXdpConfig {
        interface: "lo".into(),
        ..AfXdpConfig::default()
    };
    let err = AfXdpBackend::open(&config).expect_err("no privilege, no XDP");
    assert!(err.is_unavailable(), "{err}");
    println!("UNAVAILABLE {err}");
}

#[test]
fn xdp_backend_without_privilege_is_reported_as_unavailable() {
    if !require_root("xdp_backend_without_privilege_is_reported_as_unavailable") {
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(exe)
        .args([
            "--exact",
            "xdp_backend_unprivileged_child_open",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(UNPRIVILEGED_ENV, "1")
        .output()
        .expect("running setpriv");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "unprivileged child failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("UNAVAILABLE"), "{stdout}");
    assert!(
        stdout.contains("CAP_BPF"),
        "the error says what to grant: {stdout}"
    );
}
