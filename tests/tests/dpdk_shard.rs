//! The broker's shard loop (`kaelix_dataplane::Shard`: validate, dedup,
//! append, cumulative ACKs with credit) on the DPDK backend, end to end on a
//! veth pair between two namespaces the test creates: 100,000 frames from a
//! producer socket in one namespace are appended exactly once, in order,
//! with their CRCs intact, and every one is acknowledged by the shard.
//!
//! The log is an in-memory sink that checks every frame it is handed; the
//! shard and the DPDK port run in a child process inside the broker's
//! namespace (the EAL starts once per process). Needs root (namespaces);
//! without it the test says SKIPPED and passes.
#![cfg(feature = "dpdk")]

mod dpdk_support;
#[path = "xdp_support/mod.rs"]
mod xdp_support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dpdk_support::{
    PRODUCER_ID, STREAM_ID, child_role, dpdk_lock, env, get, payload_of, produce_windowed, report,
    run_against_child,
};
use kaelix_dataplane::dpdk::{DpdkBackend, DpdkConfig};
use kaelix_dataplane::flow::FlowTable;
use kaelix_dataplane::{LogSink, SinkBatch, SinkError};
use kaelix_dataplane::{Shard, ShardConfig, ShardCounters, ShardLinks};
use kaelix_protocol::{DurabilityLevel, Frame};
use xdp_support::{VethPair, ip, require_root};

const TEST: &str = "dpdk_veth_shard_loop_appends_100k_frames_exactly_once";
const DATA_PORT: u16 = 7000;
const FRAMES: u64 = 100_000;
/// Producer window; the shard grants more credit than this.
const WINDOW: u64 = 256;

/// A memory-durable log of one stream that checks what the shard appends:
/// every frame parses (CRC), belongs to the test's flow, carries the payload
/// of its sequence, and follows the previous one (exactly once, in order).
#[derive(Debug, Default)]
struct CheckingSink {
    appended: u64,
    last_sequence: u64,
    out_of_order: u64,
    corrupt: u64,
    position: u64,
}

struct CheckingBatch<'a> {
    sink: &'a mut CheckingSink,
    frames: u64,
    bytes: u64,
    last_sequence: u64,
}

impl SinkBatch for CheckingBatch<'_> {
    fn push(&mut self, frame: &[u8]) -> Result<u64, SinkError> {
        match Frame::parse(frame) {
            Ok(parsed)
                if parsed.producer_id() == PRODUCER_ID
                    && parsed.payload() == payload_of(parsed.sequence()) =>
            {
                if parsed.sequence() != self.last_sequence + 1 {
                    self.sink.out_of_order += 1;
                }
                self.last_sequence = parsed.sequence();
            }
            _ => self.sink.corrupt += 1,
        }
        self.frames += 1;
        self.bytes += frame.len() as u64;
        Ok(self.sink.appended + self.frames - 1)
    }

    fn commit(self) -> Result<u64, SinkError> {
        self.sink.appended += self.frames;
        self.sink.position += self.bytes;
        self.sink.last_sequence = self.last_sequence;
        Ok(self.sink.position)
    }
}

impl LogSink for CheckingSink {
    type Batch<'a> = CheckingBatch<'a>;

    fn stream_level(&self, stream_id: u32) -> Option<DurabilityLevel> {
        (stream_id == STREAM_ID).then_some(DurabilityLevel::Memory)
    }

    fn begin(&mut self, stream_id: u32, _now_ns: u64) -> Result<CheckingBatch<'_>, SinkError> {
        if stream_id != STREAM_ID {
            return Err(SinkError::UnknownStream { stream_id });
        }
        let last_sequence = self.last_sequence;
        Ok(CheckingBatch {
            sink: self,
            frames: 0,
            bytes: 0,
            last_sequence,
        })
    }

    fn durable_position(&self, _level: DurabilityLevel) -> u64 {
        self.position
    }

    fn housekeeping(&mut self, _now_ns: u64) -> Result<(), SinkError> {
        Ok(())
    }
}

/// The broker side, in the child: DPDK port + shard loop until every frame
/// is appended (then a short linger for stragglers), or a timeout.
fn run_shard_child() {
    let local_ip: Ipv4Addr = env("KX_LOCAL_IP");
    let mut config = DpdkConfig {
        local_ipv4: Some(local_ip),
        data_port: Some(DATA_PORT),
        ..DpdkConfig::default()
    };
    config.eal_args.push(env("KX_VDEV"));
    let backend = DpdkBackend::open(&config).unwrap_or_else(|err| panic!("{err}"));
    let (_commands_tx, commands) = crossbeam_channel::bounded(8);
    let counters = Arc::new(ShardCounters::default());
    let mut shard = Shard::new(
        0,
        backend,
        CheckingSink::default(),
        FlowTable::new(16, 1024),
        &ShardConfig::default(),
        ShardLinks {
            commands,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::clone(&counters),
        },
    );
    report(&[("event", "ready".to_owned())]);
    let started = Instant::now();
    let mut complete_at: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(90) {
        shard.poll_once().expect("shard loop");
        if shard.sink().appended >= FRAMES {
            let at = *complete_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_millis(300) {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let sink = shard.sink();
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed).to_string();
    report(&[
        ("event", "appended".to_owned()),
        ("appended", sink.appended.to_string()),
        ("last_sequence", sink.last_sequence.to_string()),
        ("out_of_order", sink.out_of_order.to_string()),
        ("corrupt", sink.corrupt.to_string()),
        ("frames_appended", load(&counters.frames_appended)),
        ("duplicates", load(&counters.duplicates)),
        ("gaps", load(&counters.gaps)),
        ("acks_sent", load(&counters.acks_sent)),
        ("errors_sent", load(&counters.errors_sent)),
        ("elapsed_us", elapsed.as_micros().to_string()),
    ]);
    // Dropping the shard drops the backend: port stop/close, EAL cleanup.
    drop(shard);
}

#[test]
fn dpdk_veth_shard_loop_appends_100k_frames_exactly_once() {
    if child_role().is_some() {
        run_shard_child();
        return;
    }
    if !require_root(TEST) {
        return;
    }
    let _lock = dpdk_lock();
    let pair = VethPair::create();
    // The DPDK backend owns the broker address (and answers ARP for it).
    ip(&["-n", &pair.ns_b, "addr", "flush", "dev", &pair.if_b]);
    let envs = [
        (
            "KX_VDEV",
            format!("--vdev=net_af_packet0,iface={}", pair.if_b),
        ),
        ("KX_LOCAL_IP", pair.ip_b.to_string()),
    ];
    let to = SocketAddr::V4(SocketAddrV4::new(pair.ip_b, DATA_PORT));
    let from = SocketAddr::V4(SocketAddrV4::new(pair.ip_a, 0));
    let (sent, got) = run_against_child(TEST, "shard", &pair.ns_b, &envs, "appended", || {
        pair.in_ns(&pair.ns_a, move || {
            produce_windowed(from, to, FRAMES, WINDOW)
        })
    });
    eprintln!("shard on dpdk-af_packet: producer {sent:?}; shard {got:?}");

    assert_eq!(sent.acked, FRAMES, "the shard acknowledged every frame");
    assert_eq!(
        get::<u64>(&got, "appended"),
        FRAMES,
        "every frame appended once"
    );
    assert_eq!(get::<u64>(&got, "frames_appended"), FRAMES);
    assert_eq!(get::<u64>(&got, "last_sequence"), FRAMES);
    assert_eq!(
        get::<u64>(&got, "out_of_order"),
        0,
        "appended in sequence order"
    );
    assert_eq!(
        get::<u64>(&got, "corrupt"),
        0,
        "every appended frame passed its CRC"
    );
    assert_eq!(get::<u64>(&got, "duplicates"), 0);
    assert_eq!(get::<u64>(&got, "errors_sent"), 0);
}
