//! The producer's UDP driver against the reference model broker over
//! loopback: batching, exactly-once in order under injected loss,
//! duplication and reordering, send-and-wait offsets, rejections, timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kaelix_client::testing::{Faults, ModelBroker, UdpModelBroker};
use kaelix_client::{ProduceError, Producer, SendError};
use kaelix_protocol::ErrorCode;

const PRODUCER_ID: u32 = 4242;
const FLUSH: Duration = Duration::from_secs(30);

fn broker(streams: &[u32], faults: Faults) -> UdpModelBroker {
    let mut model = ModelBroker::new(256);
    for &stream in streams {
        model.add_stream(stream);
    }
    UdpModelBroker::spawn(model, faults).expect("bind the model broker")
}

fn producer(broker: &UdpModelBroker) -> Producer {
    Producer::builder(broker.addr())
        .producer_id(PRODUCER_ID)
        .connect()
        .expect("start the producer")
}

/// Every message of every stream is stored exactly once, in send order.
fn assert_stored_in_order(broker: &UdpModelBroker, stream: u32, expected: &[Vec<u8>]) {
    let model = broker.model();
    let stored: Vec<&[u8]> = model
        .records(stream)
        .iter()
        .filter(|record| record.producer_id == PRODUCER_ID)
        .map(|record| record.payload.as_slice())
        .collect();
    assert_eq!(stored.len(), expected.len(), "stream {stream}: count");
    for (i, (got, want)) in stored.iter().zip(expected).enumerate() {
        assert_eq!(got, want, "stream {stream}: message {i}");
    }
}

fn send_many(producer: &Producer, streams: &[u32], per_stream: usize) -> Vec<Vec<Vec<u8>>> {
    let mut sent = vec![Vec::new(); streams.len()];
    for i in 0..per_stream {
        for (index, &stream) in streams.iter().enumerate() {
            let payload =
                format!("stream {stream} message {i} {}", "x".repeat(i % 64)).into_bytes();
            producer.send(stream, &payload).expect("send");
            sent[index].push(payload);
        }
    }
    sent
}

#[test]
fn client_produce_batches_and_delivers_in_order() {
    let broker = broker(&[1, 2, 3], Faults::default());
    let producer = producer(&broker);
    let streams = [1, 2, 3];
    let sent = send_many(&producer, &streams, 5_000);
    producer.flush(FLUSH).expect("everything acknowledged");
    for (index, &stream) in streams.iter().enumerate() {
        assert_stored_in_order(&broker, stream, &sent[index]);
    }
    let stats = producer.stats();
    assert_eq!(stats.messages_acked, 15_000);
    assert!(
        stats.datagrams_sent < 15_000 / 4,
        "frames share datagrams: {stats:?}"
    );
    assert!(producer.take_errors().is_empty());
}

#[test]
fn client_produce_small_buffer_blocks_and_resumes_quickly() {
    let broker = broker(&[1], Faults::default());
    let producer = Producer::builder(broker.addr())
        .config(kaelix_client::ProducerConfig {
            buffer_frames_max: 32,
            ..kaelix_client::ProducerConfig::default()
        })
        .block_timeout(Duration::from_secs(30))
        .producer_id(PRODUCER_ID)
        .connect()
        .unwrap();
    let started = std::time::Instant::now();
    let sent = send_many(&producer, &[1], 5_000);
    producer.flush(FLUSH).unwrap();
    // Blocked senders wake on each acknowledgement, not at the block timeout.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_stored_in_order(&broker, 1, &sent[0]);
}

#[test]
fn client_produce_exactly_once_under_loss_duplication_and_reordering() {
    let faults = Faults {
        drop_in_permille: 50,
        drop_out_permille: 50,
        duplicate_permille: 20,
        reorder_permille: 20,
        seed: 0x5eed,
    };
    let broker = broker(&[7, 8], faults);
    let producer = producer(&broker);
    let streams = [7, 8];
    let sent = send_many(&producer, &streams, 3_000);
    producer
        .flush(FLUSH)
        .expect("everything acknowledged despite faults");
    for (index, &stream) in streams.iter().enumerate() {
        assert_stored_in_order(&broker, stream, &sent[index]);
    }
    let stats = producer.stats();
    assert!(
        stats.frames_retransmitted > 0,
        "faults were injected: {stats:?}"
    );
    assert_eq!(stats.messages_acked, 6_000);
}

#[test]
fn client_produce_send_and_wait_returns_each_offset() {
    let broker = broker(&[1], Faults::default());
    let producer = producer(&broker);
    for i in 0..200u64 {
        let delivery = producer
            .send_and_wait(1, format!("{i}").as_bytes(), FLUSH)
            .expect("acknowledged");
        assert_eq!(delivery.sequence, i + 1);
        assert_eq!(
            delivery.offset,
            Some(i),
            "the stream holds only our messages"
        );
    }
    let ack = producer.flow_ack(1).expect("flow open");
    assert_eq!((ack.sequence, ack.offset), (200, Some(199)));
}

#[test]
fn client_produce_reports_rejections_both_ways() {
    let broker = broker(&[1], Faults::default());
    broker
        .model()
        .reject_payloads(b"poison", ErrorCode::PayloadTooLarge);
    let seen = Arc::new(AtomicUsize::new(0));
    let producer = {
        let seen = Arc::clone(&seen);
        Producer::builder(broker.addr())
            .producer_id(PRODUCER_ID)
            .on_error(move |_| {
                seen.fetch_add(1, Ordering::Relaxed);
            })
            .connect()
            .unwrap()
    };
    // Send and wait: the error comes back to the caller.
    let err = producer
        .send_and_wait(1, b"poison pill", FLUSH)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProduceError::Rejected {
                code: ErrorCode::PayloadTooLarge,
                ..
            }
        ),
        "{err}"
    );
    // Fire and forget: recorded, the flow goes on.
    producer.send(1, b"fine 1").unwrap();
    producer.send(1, b"poison again").unwrap();
    producer.send(1, b"fine 2").unwrap();
    producer.flush(FLUSH).unwrap();
    let errors = producer.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].code, ErrorCode::PayloadTooLarge);
    assert_eq!(seen.load(Ordering::Relaxed), 2, "the callback saw both");
    assert_stored_in_order(&broker, 1, &[b"fine 1".to_vec(), b"fine 2".to_vec()]);

    // A stream the broker does not have.
    producer.send(99, b"lost").unwrap();
    producer.flush(FLUSH).unwrap();
    let errors = producer.take_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].code, ErrorCode::UnknownStream);
}

#[test]
fn client_produce_without_broker_times_out_clearly() {
    // A bound socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let producer = Producer::builder(silent.local_addr().unwrap())
        .block_timeout(Duration::from_millis(200))
        .config(kaelix_client::ProducerConfig {
            buffer_frames_max: 4,
            ..kaelix_client::ProducerConfig::default()
        })
        .connect()
        .unwrap();
    for _ in 0..4 {
        producer.send(1, b"into the void").unwrap();
    }
    let err = producer.send(1, b"one too many").unwrap_err();
    assert!(
        matches!(
            err,
            ProduceError::Send(SendError::BufferFull { frames: 4, .. })
        ),
        "{err}"
    );
    let err = producer.flush(Duration::from_millis(300)).unwrap_err();
    let ProduceError::Timeout { unacked, .. } = err else {
        panic!("expected a timeout, got {err}");
    };
    assert_eq!(unacked, 4);
    assert!(err.to_string().contains("is the broker at"), "{err}");
}
