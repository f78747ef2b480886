//! Data-plane benchmarks without the network.
//!
//! - `shard_ingest`: the real shard loop ([`Shard::poll_once`]) fed by a
//!   backend that replays prebuilt datagrams (33 frames of 64-byte payloads,
//!   what a ~3.5 KB MTU carries), appending into a real [`ShardLog`] on a
//!   temporary directory (its flusher on its own thread, as in the broker)
//!   and encoding the cumulative ACKs. Throughput is frames ingested and
//!   acknowledged per second at the memory durability level.
//! - `flow_table`: duplicate-detection lookups in tables of 1 to 100,000 flows.
//! - `command_queue`: the per-cycle poll of an empty control command queue.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kaelix_dataplane::flow::{FlowKey, FlowTable};
use kaelix_dataplane::{
    Backend, BackendError, BackendStats, Peer, Shard, ShardConfig, ShardCounters, ShardLinks,
    ShardTask,
};
use kaelix_protocol::{DatagramBuilder, DurabilityLevel};
use kaelix_storage::{LogConfig, ShardLog, StreamConfig};
use std::hint::black_box;

const FRAMES_PER_DATAGRAM: usize = 33;
const PAYLOAD: [u8; 64] = [0x5A; 64];
/// Datagrams built per producer id; then a new producer (a new flow) starts.
const CHUNK_DATAGRAMS: u64 = 2048;
/// Datagrams handed out per `recv_batch` (the AF_XDP backend's default batch).
const RECV_BATCH: usize = 64;
const STREAM: u32 = 1;

/// Prebuilt datagrams waiting to be "received".
#[derive(Default)]
struct Feed {
    datagrams: Vec<Vec<u8>>,
    next: usize,
}

/// A [`Backend`] that replays the feed and discards what the shard sends.
struct Replay {
    feed: Arc<Mutex<Feed>>,
    peer: Peer,
    scratch: Vec<u8>,
    acks: u64,
}

impl Backend for Replay {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn recv_batch(
        &mut self,
        on_packet: &mut dyn FnMut(&[u8], &Peer),
    ) -> Result<usize, BackendError> {
        let mut feed = self.feed.lock().expect("the feed lock is never poisoned");
        let end = (feed.next + RECV_BATCH).min(feed.datagrams.len());
        let start = feed.next;
        for datagram in &feed.datagrams[start..end] {
            on_packet(datagram, &self.peer);
        }
        feed.next = end;
        Ok(end - start)
    }

    fn queue_tx(
        &mut self,
        _peer: &Peer,
        fill: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Result<bool, BackendError> {
        if fill(&mut self.scratch) > 0 {
            self.acks += 1;
        }
        Ok(true)
    }

    fn flush_tx(&mut self) -> Result<usize, BackendError> {
        Ok(0)
    }

    fn wait_readable(&mut self, _timeout: Duration) -> Result<(), BackendError> {
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    fn max_tx_payload(&self) -> usize {
        self.scratch.len()
    }
}

/// Refill the feed with `datagrams` datagrams of a new producer, sequences from 1.
fn refill(feed: &Mutex<Feed>, producer_id: u32, datagrams: u64) {
    let mut feed = feed.lock().expect("the feed lock is never poisoned");
    let len = FRAMES_PER_DATAGRAM * (kaelix_protocol::HEADER_LEN + PAYLOAD.len());
    feed.datagrams
        .resize_with(datagrams as usize, || vec![0; len]);
    feed.datagrams.truncate(datagrams as usize);
    let mut sequence = 0u64;
    for buf in &mut feed.datagrams {
        buf.resize(len, 0);
        let mut builder = DatagramBuilder::new(buf);
        for _ in 0..FRAMES_PER_DATAGRAM {
            sequence += 1;
            builder
                .push_data(STREAM, producer_id, sequence, sequence, &PAYLOAD)
                .expect("33 frames fit their buffer");
        }
    }
    feed.next = 0;
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn shard_ingest(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = LogConfig::new(dir.path().join("shard-0"));
    // Old segments go once written; the benchmark appends gigabytes.
    config.retention_bytes = Some(512 * 1024 * 1024);
    let (mut log, _report) = ShardLog::open(config).expect("opening the log");
    log.create_stream(
        STREAM,
        StreamConfig {
            durability: DurabilityLevel::Memory,
        },
    )
    .expect("creating the stream");
    let mut flusher = log.flusher().expect("a fresh log hands out its flusher");
    let stop = Arc::new(AtomicBool::new(false));
    let flusher_thread = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match flusher.poll(now_ns()) {
                    Ok(progress) if progress.is_idle() => {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };

    let feed = Arc::new(Mutex::new(Feed::default()));
    let backend = Replay {
        feed: Arc::clone(&feed),
        peer: Peer::Udp("127.0.0.1:40000".parse().expect("a socket address")),
        scratch: vec![0; 2048],
        acks: 0,
    };
    let (_commands, command_rx) = crossbeam_channel::bounded::<ShardTask<ShardLog>>(64);
    let counters = Arc::new(ShardCounters::default());
    let mut shard = Shard::new(
        0,
        backend,
        log,
        FlowTable::new(4096, 1 << 20),
        &ShardConfig::default(),
        ShardLinks {
            commands: command_rx,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::clone(&counters),
        },
    );

    let mut group = c.benchmark_group("shard_ingest");
    group.throughput(Throughput::Elements(FRAMES_PER_DATAGRAM as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    let mut producer_id = 1u32;
    group.bench_function("memory_33x64B_datagram", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            let mut remaining = iters;
            while remaining > 0 {
                let datagrams = remaining.min(CHUNK_DATAGRAMS);
                producer_id += 1;
                refill(&feed, producer_id, datagrams);
                let started = Instant::now();
                while shard.poll_once().expect("the replay backend never fails") {}
                measured += started.elapsed();
                remaining -= datagrams;
            }
            measured
        })
    });
    group.finish();

    let appended = counters.frames_appended.load(Ordering::Relaxed);
    let acks = counters.acks_sent.load(Ordering::Relaxed);
    assert!(appended > 0, "the shard appended nothing");
    assert!(acks > 0, "the shard acknowledged nothing");
    assert_eq!(
        counters.total_errors(),
        0,
        "the shard rejected replayed frames"
    );
    stop.store(true, Ordering::Release);
    flusher_thread.join().expect("the flusher thread");
}

fn flow_table(c: &mut Criterion) {
    let mut group = c.benchmark_group("flow_table");
    group.throughput(Throughput::Elements(1));
    let peer = Peer::Udp("127.0.0.1:40000".parse().expect("a socket address"));
    for flows in [1u32, 1_000, 100_000] {
        let mut table = FlowTable::new(flows as usize, 1 << 20);
        for producer_id in 0..flows {
            let key = FlowKey {
                producer_id,
                stream_id: STREAM,
            };
            table
                .get_or_insert(key, peer, DurabilityLevel::Memory)
                .expect("below the limit");
        }
        group.bench_with_input(BenchmarkId::new("get_mut", flows), &flows, |b, &flows| {
            let mut producer_id = 0u32;
            b.iter(|| {
                producer_id = (producer_id + 7919) % flows;
                let key = FlowKey {
                    producer_id,
                    stream_id: STREAM,
                };
                let flow = table.get_mut(black_box(key)).expect("inserted above");
                black_box(flow.admit(flow.expected, 8192))
            })
        });
    }
    group.finish();
}

fn command_queue(c: &mut Criterion) {
    let (_tx, rx) = crossbeam_channel::bounded::<ShardTask<ShardLog>>(64);
    c.bench_function("command_queue/try_recv_empty", |b| {
        b.iter(|| black_box(rx.try_recv().is_ok()))
    });
}

criterion_group!(benches, shard_ingest, flow_table, command_queue);
criterion_main!(benches);
