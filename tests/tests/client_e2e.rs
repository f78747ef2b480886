//! End to end through the real broker: the client's producer over UDP into
//! `Broker`, then the client's consumers, remote (TCP fetch) and local
//! (mapped log), read it all back exactly once and in order; a restarted
//! broker continues the same producer's flows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kaelix_client::{Consumer, ConsumerConfig, Producer};
use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::{Config, StreamSection};
use kaelix_controlplane::fetch::{FetchServerConfig, FetchServerThread, ShardedLogs};
use kaelix_protocol::DurabilityLevel;

const PRODUCER_ID: u32 = 777;
const TIMEOUT: Duration = Duration::from_secs(60);
/// (stream, durability)
const STREAMS: [(u32, DurabilityLevel); 2] =
    [(1, DurabilityLevel::Memory), (2, DurabilityLevel::Fsync)];

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.broker.data_dir = Some(dir.to_path_buf());
    config.broker.data_addr = "127.0.0.1:0".parse().unwrap();
    config.storage.shared = true;
    config.streams = STREAMS
        .iter()
        .map(|&(id, durability)| StreamSection { id, durability })
        .collect();
    config
}

/// A fetch server over the broker's shards, each stream at its level.
fn fetch_server(broker: &Broker) -> FetchServerThread {
    let readers = broker
        .shards()
        .iter()
        .map(|shard| shard.reader.clone())
        .collect();
    let levels: HashMap<u32, DurabilityLevel> = STREAMS.into_iter().collect();
    let source = ShardedLogs::new(readers, move |stream| levels.get(&stream).copied());
    FetchServerThread::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(source),
        FetchServerConfig::default(),
        1,
    )
    .expect("start the fetch server")
}

fn start_producer(broker: &Broker) -> Producer {
    Producer::builder(broker.shards()[0].data_addr)
        .producer_id(PRODUCER_ID)
        .connect()
        .expect("start the producer")
}

fn payload(stream: u32, n: u64) -> Vec<u8> {
    format!("stream {stream} message {n:06}").into_bytes()
}

/// Read `stream` from offset 0 until `count` records arrived; check each.
fn consume_all(mut consumer: Consumer, stream: u32, count: u64) {
    let deadline = Instant::now() + TIMEOUT;
    let mut next = 0u64;
    while next < count {
        assert!(
            Instant::now() < deadline,
            "only {next} of {count} records of stream {stream}"
        );
        for record in consumer.poll(4096).expect("poll") {
            let record = record.expect("a valid record");
            assert_eq!(record.offset, next, "stream {stream}: offsets are dense");
            assert_eq!(record.producer_id, PRODUCER_ID);
            assert_eq!(
                record.sequence,
                next + 1,
                "stream {stream}: exactly once, in order"
            );
            assert_eq!(record.payload, payload(stream, next).as_slice());
            next += 1;
        }
    }
    assert_eq!(consumer.watermarks().unwrap(), (0, count));
}

fn consumer_config(stream: u32) -> ConsumerConfig {
    ConsumerConfig {
        wait: Duration::from_millis(100),
        ..ConsumerConfig::new(stream)
    }
}

fn produce(producer: &Producer, range: std::ops::Range<u64>) {
    for n in range {
        for (stream, _) in STREAMS {
            producer.send(stream, &payload(stream, n)).expect("send");
        }
    }
    producer.flush(TIMEOUT).expect("every message acknowledged");
    assert!(producer.take_errors().is_empty());
}

#[test]
fn client_e2e_produce_then_consume_remote_and_local_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let per_stream = 20_000u64;

    let broker = Broker::start(&config).expect("start the broker");
    let producer = start_producer(&broker);
    produce(&producer, 0..per_stream);
    for (stream, level) in STREAMS {
        let ack = producer.flow_ack(stream).expect("flow open");
        assert_eq!(ack.sequence, per_stream);
        assert_eq!(ack.level, level);
        assert_eq!(ack.offset, Some(per_stream - 1));
    }
    let delivery = producer
        .send_and_wait(1, &payload(1, per_stream), TIMEOUT)
        .expect("acknowledged");
    assert_eq!(
        (delivery.sequence, delivery.offset),
        (per_stream + 1, Some(per_stream))
    );
    drop(producer);

    let server = fetch_server(&broker);
    let fetch_addr: SocketAddr = server.local_addr();
    consume_all(
        Consumer::remote(fetch_addr, consumer_config(2)).unwrap(),
        2,
        per_stream,
    );
    consume_all(
        Consumer::local(dir.path(), consumer_config(1)).unwrap(),
        1,
        per_stream + 1,
    );
    server.shutdown();
    broker.shutdown().expect("clean shutdown");

    // Restart on the same directory: the same producer id continues after
    // the sequences the broker recovered from its log.
    let broker = Broker::start(&config).expect("restart the broker");
    let producer = start_producer(&broker);
    producer.send(1, &payload(1, per_stream + 1)).unwrap();
    producer.send(2, &payload(2, per_stream)).unwrap();
    producer
        .flush(TIMEOUT)
        .expect("acknowledged after the restart");
    assert_eq!(producer.flow_ack(1).unwrap().sequence, per_stream + 2);
    assert_eq!(producer.flow_ack(2).unwrap().sequence, per_stream + 1);
    let server = fetch_server(&broker);
    consume_all(
        Consumer::remote(server.local_addr(), consumer_config(1)).unwrap(),
        1,
        per_stream + 2,
    );
    consume_all(
        Consumer::remote(server.local_addr(), consumer_config(2)).unwrap(),
        2,
        per_stream + 1,
    );
    server.shutdown();
    broker.shutdown().unwrap();
}
