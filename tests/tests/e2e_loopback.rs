//! End to end over loopback with the socket backend: many producers and
//! streams, a lossy network between producer and broker, and garbage on the
//! data port. Every acknowledged message must be in the log exactly once and
//! in order per (producer, stream).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kaelix_client::Producer;
use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::{Config, StreamSection};
use kaelix_protocol::{DurabilityLevel, ErrorCode, FrameFields, encode_frame};

const TIMEOUT: Duration = Duration::from_secs(120);

fn config(dir: &std::path::Path, streams: &[(u32, DurabilityLevel)]) -> Config {
    let mut config = Config::default();
    config.broker.data_dir = Some(dir.to_path_buf());
    config.broker.data_addr = "127.0.0.1:0".parse().unwrap();
    config.storage.shared = false;
    config.storage.segment_size_mib = 16;
    config.streams = streams
        .iter()
        .map(|&(id, durability)| StreamSection { id, durability })
        .collect();
    config
}

fn payload(producer: u32, stream: u32, n: u64) -> Vec<u8> {
    // 64 bytes, unique per message.
    let mut payload = format!("p{producer:08}-s{stream:04}-n{n:016}-").into_bytes();
    payload.resize(64, b'.');
    payload
}

/// Every record of `stream` as (producer id, sequence, payload), in log order.
fn read_stream(broker: &Broker, stream: u32) -> Vec<(u32, u64, Vec<u8>)> {
    let mut reader = broker.shard_of(stream).reader.clone();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let batch = reader.read(stream, offset, 8 << 20, u64::MAX).unwrap();
        let before = out.len();
        for record in batch {
            let record = record.unwrap();
            assert_eq!(record.offset, offset, "offsets are dense");
            let frame = kaelix_protocol::Frame::parse(record.bytes).unwrap();
            out.push((
                frame.producer_id(),
                frame.sequence(),
                frame.payload().to_vec(),
            ));
            offset += 1;
        }
        if out.len() == before {
            return out;
        }
    }
}

/// Check that `producers` each wrote `per_stream` messages to `stream`
/// exactly once and in order, with the payloads they sent.
fn assert_exactly_once_in_order(broker: &Broker, stream: u32, producers: &[u32], per_stream: u64) {
    let records = read_stream(broker, stream);
    let mut next: BTreeMap<u32, u64> = producers.iter().map(|p| (*p, 1)).collect();
    for (producer, sequence, bytes) in &records {
        let expected = next
            .get_mut(producer)
            .unwrap_or_else(|| panic!("stream {stream}: record of unknown producer {producer}"));
        assert_eq!(
            *sequence, *expected,
            "stream {stream} producer {producer}: sequence out of order or duplicated"
        );
        assert_eq!(bytes, &payload(*producer, stream, *sequence - 1));
        *expected += 1;
    }
    for (producer, next) in next {
        assert_eq!(
            next - 1,
            per_stream,
            "stream {stream} producer {producer}: messages missing"
        );
    }
    assert_eq!(records.len() as u64, per_stream * producers.len() as u64);
}

#[test]
fn e2e_million_messages_from_several_producers_exactly_once_in_order() {
    let streams = [
        (1, DurabilityLevel::Memory),
        (2, DurabilityLevel::Flush),
        (3, DurabilityLevel::Fsync),
        (4, DurabilityLevel::Memory),
    ];
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&config(dir.path(), &streams)).unwrap();
    let addr = broker.shards()[0].data_addr;
    let producers: Vec<u32> = vec![101, 102, 103, 104];
    let total: u64 = 1_000_000;
    let per_stream = total / (producers.len() * streams.len()) as u64;
    let started = Instant::now();
    let threads: Vec<JoinHandle<()>> = producers
        .iter()
        .map(|&id| {
            std::thread::spawn(move || {
                let producer = Producer::builder(addr)
                    .producer_id(id)
                    .datagram_len_max(16 * 1024)
                    .connect()
                    .unwrap();
                for n in 0..per_stream {
                    for (stream, _) in streams {
                        producer.send(stream, &payload(id, stream, n)).unwrap();
                    }
                }
                producer.flush(TIMEOUT).expect("every message acknowledged");
                assert!(producer.take_errors().is_empty());
                for (stream, level) in streams {
                    let ack = producer.flow_ack(stream).unwrap();
                    assert_eq!(ack.sequence, per_stream, "stream {stream}");
                    assert_eq!(ack.level, level);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    eprintln!(
        "e2e: {total} messages acknowledged in {:?} (debug build, not a benchmark)",
        started.elapsed()
    );
    for (stream, _) in streams {
        assert_exactly_once_in_order(&broker, stream, &producers, per_stream);
    }
    let counters = &broker.shards()[0].counters;
    assert_eq!(counters.frames_appended.load(Ordering::Relaxed), total);
    assert_eq!(counters.total_errors(), 0);
    broker.shutdown().unwrap();
}

/// A UDP relay between producers and the broker that drops, duplicates and
/// reorders datagrams in both directions (deterministic from a seed).
struct LossyRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LossyRelay {
    fn start(broker: SocketAddr, seed: u64) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_relay = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = seed | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 1000
            };
            let mut client: Option<SocketAddr> = None;
            let mut held_up: Option<Vec<u8>> = None;
            let mut held_down: Option<Vec<u8>> = None;
            let mut buf = vec![0u8; 65_536];
            while !stop_relay.load(Ordering::Relaxed) {
                // Producer -> broker.
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    client = Some(from);
                    let datagram = buf[..n].to_vec();
                    let roll = next();
                    if roll < 50 {
                        // 5 % dropped
                    } else if roll < 80 {
                        // 3 % duplicated
                        let _ = upstream.send_to(&datagram, broker);
                        let _ = upstream.send_to(&datagram, broker);
                    } else if roll < 130 {
                        // 5 % held back and sent after the next one (reordered)
                        if let Some(old) = held_up.replace(datagram) {
                            let _ = upstream.send_to(&old, broker);
                        }
                    } else {
                        let _ = upstream.send_to(&datagram, broker);
                        if let Some(old) = held_up.take() {
                            let _ = upstream.send_to(&old, broker);
                        }
                    }
                }
                // Broker -> producer.
                while let Ok(n) = upstream.recv(&mut buf) {
                    let Some(client) = client else { continue };
                    let datagram = buf[..n].to_vec();
                    let roll = next();
                    if roll < 50 {
                    } else if roll < 80 {
                        let _ = socket.send_to(&datagram, client);
                        let _ = socket.send_to(&datagram, client);
                    } else if roll < 130 {
                        if let Some(old) = held_down.replace(datagram) {
                            let _ = socket.send_to(&old, client);
                        }
                    } else {
                        let _ = socket.send_to(&datagram, client);
                        if let Some(old) = held_down.take() {
                            let _ = socket.send_to(&old, client);
                        }
                    }
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn e2e_loss_duplication_and_reordering_still_exactly_once_in_order() {
    let streams = [(1, DurabilityLevel::Memory), (3, DurabilityLevel::Fsync)];
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&config(dir.path(), &streams)).unwrap();
    let relay = LossyRelay::start(broker.shards()[0].data_addr, 0x5eed_1234);
    let per_stream = 20_000u64;
    let producer = Producer::builder(relay.addr)
        .producer_id(55)
        .datagram_len_max(4096)
        .connect()
        .unwrap();
    for n in 0..per_stream {
        for (stream, _) in streams {
            producer.send(stream, &payload(55, stream, n)).unwrap();
        }
    }
    producer
        .flush(TIMEOUT)
        .expect("every message acknowledged through the lossy relay");
    assert!(producer.take_errors().is_empty());
    let stats = producer.stats();
    eprintln!("lossy relay: producer stats {stats:?}");
    drop(producer);
    drop(relay);
    for (stream, _) in streams {
        assert_exactly_once_in_order(&broker, stream, &[55], per_stream);
    }
    let counters = &broker.shards()[0].counters;
    assert!(
        counters.duplicates.load(Ordering::Relaxed) > 0,
        "the relay duplicated datagrams: the broker must have seen duplicates"
    );
    broker.shutdown().unwrap();
}

#[test]
fn e2e_garbage_on_the_data_port_is_counted_and_valid_traffic_unaffected() {
    let streams = [(1, DurabilityLevel::Memory)];
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&config(dir.path(), &streams)).unwrap();
    let addr = broker.shards()[0].data_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_garbage = stop.clone();
    let garbage = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sent = 0u64;
        while !stop_garbage.load(Ordering::Relaxed) {
            let mut datagram = vec![0u8; 200];
            let n = encode_frame(
                &mut datagram,
                &FrameFields::data(1, 999, sent + 1, 0),
                &[7; 64],
            )
            .unwrap();
            match sent % 4 {
                // random bytes
                0 => datagram.iter_mut().for_each(|b| *b = next() as u8),
                // truncated frame
                1 => datagram.truncate(n - 10),
                // bad crc
                2 => {
                    datagram.truncate(n);
                    datagram[n - 1] ^= 0xff;
                }
                // header only
                _ => datagram.truncate(20),
            }
            let _ = socket.send_to(&datagram, addr);
            sent += 1;
            if sent.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    });
    let per_stream = 50_000u64;
    let producer = Producer::builder(addr).producer_id(66).connect().unwrap();
    for n in 0..per_stream {
        producer.send(1, &payload(66, 1, n)).unwrap();
    }
    producer.flush(TIMEOUT).expect("valid traffic acknowledged");
    stop.store(true, Ordering::Relaxed);
    let garbage_sent = garbage.join().unwrap();
    assert!(producer.take_errors().is_empty());
    drop(producer);
    assert_exactly_once_in_order(&broker, 1, &[66], per_stream);
    let counters = &broker.shards()[0].counters;
    eprintln!(
        "garbage: {garbage_sent} bad datagrams sent, {} rejections counted",
        counters.total_errors()
    );
    assert!(garbage_sent > 0);
    assert!(counters.error_count(ErrorCode::CrcMismatch) > 0);
    assert!(
        counters.error_count(ErrorCode::LengthMismatch)
            + counters.error_count(ErrorCode::Truncated)
            > 0
    );
    // UDP may drop some under load; none may be counted twice.
    assert!(counters.total_errors() <= garbage_sent);
    broker.shutdown().unwrap();
}
