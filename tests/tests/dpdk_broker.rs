//! The whole broker (`kaelix_controlplane::broker::Broker`) with
//! `dataplane.backend = "dpdk"`, end to end on a veth pair between two
//! namespaces the test creates: 100,000 frames from a producer socket in one
//! namespace are acknowledged by the broker and read back from its log
//! (kaelix-storage) exactly once, in order, with their CRCs intact.
//!
//! The broker runs in a child process inside its namespace (the EAL starts
//! once per process), on `net_af_packet` over its veth end, which has no
//! kernel address: the broker's DPDK backend answers ARP for
//! `broker.data_addr`. Needs root; without it the test says SKIPPED and passes.
#![cfg(feature = "dpdk")]

mod dpdk_support;
#[path = "xdp_support/mod.rs"]
mod xdp_support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use dpdk_support::{
    PRODUCER_ID, STREAM_ID, child_role, dpdk_lock, env, get, payload_of, produce_windowed, report,
    run_against_child,
};
use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::{BackendKind, Config, StreamSection};
use kaelix_protocol::{DurabilityLevel, Frame};
use xdp_support::{VethPair, ip, require_root};

const TEST: &str = "dpdk_veth_broker_acknowledges_and_stores_100k_frames_exactly_once";
const DATA_PORT: u16 = 7000;
const FRAMES: u64 = 100_000;
const WINDOW: u64 = 256;

/// What the broker's log holds for the test stream.
#[derive(Debug, Default)]
struct Stored {
    records: u64,
    in_order: u64,
    corrupt: u64,
    last_sequence: u64,
}

fn read_back(reader: &mut kaelix_storage::LogReader) -> Stored {
    let mut stored = Stored::default();
    let mut offset = 0;
    loop {
        let batch = reader
            .read(STREAM_ID, offset, 4 << 20, u64::MAX)
            .expect("reading the stream");
        let before = stored.records;
        for record in batch {
            let record = record.expect("a record");
            offset = record.offset + 1;
            stored.records += 1;
            match Frame::parse(record.bytes) {
                Ok(frame)
                    if frame.producer_id() == PRODUCER_ID
                        && frame.payload() == payload_of(frame.sequence()) =>
                {
                    if frame.sequence() == stored.last_sequence + 1 {
                        stored.in_order += 1;
                    }
                    stored.last_sequence = frame.sequence();
                }
                _ => stored.corrupt += 1,
            }
        }
        if stored.records == before {
            return stored;
        }
    }
}

/// The broker, in the child.
fn run_broker_child() {
    let local_ip: Ipv4Addr = env("KX_LOCAL_IP");
    let data_dir = tempfile::tempdir().expect("data dir");
    let mut config = Config::default();
    config.broker.data_dir = Some(data_dir.path().to_path_buf());
    config.broker.data_addr = SocketAddr::V4(SocketAddrV4::new(local_ip, DATA_PORT));
    config.broker.shards = 1;
    config.streams = vec![StreamSection {
        id: STREAM_ID,
        durability: DurabilityLevel::Memory,
    }];
    config.dataplane.backend = BackendKind::Dpdk;
    config.dataplane.required = true;
    config.dataplane.dpdk.eal_args.push(env("KX_VDEV"));
    let broker = Broker::start(&config).unwrap_or_else(|err| panic!("broker start: {err}"));
    let shard = &broker.shards()[0];
    assert_eq!(shard.backend, "dpdk", "warnings: {:?}", broker.warnings());
    report(&[("event", "ready".to_owned())]);

    let mut reader = shard.reader.clone();
    let started = Instant::now();
    let mut stored = read_back(&mut reader);
    while stored.records < FRAMES && started.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(100));
        stored = read_back(&mut reader);
    }
    // A little longer, to catch anything appended twice.
    std::thread::sleep(Duration::from_millis(300));
    let stored = read_back(&mut reader);
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    report(&[
        ("event", "stored".to_owned()),
        ("records", stored.records.to_string()),
        ("in_order", stored.in_order.to_string()),
        ("corrupt", stored.corrupt.to_string()),
        ("last_sequence", stored.last_sequence.to_string()),
        ("duplicates", load(&shard.counters.duplicates).to_string()),
        ("errors_sent", load(&shard.counters.errors_sent).to_string()),
    ]);
    broker.shutdown().expect("broker shutdown");
}

#[test]
fn dpdk_veth_broker_acknowledges_and_stores_100k_frames_exactly_once() {
    if child_role().is_some() {
        run_broker_child();
        return;
    }
    if !require_root(TEST) {
        return;
    }
    let _lock = dpdk_lock();
    let pair = VethPair::create();
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
    let (sent, stored) = run_against_child(TEST, "broker", &pair.ns_b, &envs, "stored", || {
        pair.in_ns(&pair.ns_a, move || {
            produce_windowed(from, to, FRAMES, WINDOW)
        })
    });
    eprintln!("broker on dpdk-af_packet: producer {sent:?}; log {stored:?}");

    assert_eq!(sent.acked, FRAMES, "the broker acknowledged every frame");
    assert_eq!(
        get::<u64>(&stored, "records"),
        FRAMES,
        "every frame stored once"
    );
    assert_eq!(get::<u64>(&stored, "in_order"), FRAMES, "in sequence order");
    assert_eq!(
        get::<u64>(&stored, "corrupt"),
        0,
        "every stored frame passed its CRC"
    );
    assert_eq!(get::<u64>(&stored, "last_sequence"), FRAMES);
    assert_eq!(get::<u64>(&stored, "duplicates"), 0);
    assert_eq!(get::<u64>(&stored, "errors_sent"), 0);
}
