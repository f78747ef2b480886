//! Consumers against a real log: remote over the TCP fetch server, local
//! through the storage follower, with the same API and the same answers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kaelix_client::{ConsumeError, Consumer, ConsumerConfig, StartOffset};
use kaelix_controlplane::fetch::{FetchServerConfig, FetchServerThread};
use kaelix_protocol::{DurabilityLevel, FrameFields, HEADER_LEN, encode_frame};
use kaelix_storage::{LogConfig, ShardLog, StreamConfig};

const STREAM: u32 = 3;

fn open_log(dir: &Path) -> ShardLog {
    let mut config = LogConfig::new(dir);
    config.segment_size_bytes = 2 * 1024 * 1024;
    config.shared = true;
    let (mut log, _) = ShardLog::open(config).expect("open the log");
    for stream in [STREAM, STREAM + 1] {
        log.create_stream(
            stream,
            StreamConfig {
                durability: DurabilityLevel::Memory,
            },
        )
        .expect("create the stream");
    }
    log
}

/// Append `count` messages "m{n}" numbered from `first`, a batch of up to 10 at a time.
fn append(log: &mut ShardLog, stream: u32, first: u64, count: u64) {
    let frames: Vec<Vec<u8>> = (first..first + count)
        .map(|n| {
            let payload = format!("m{n}");
            let mut frame = vec![0u8; HEADER_LEN + payload.len()];
            encode_frame(
                &mut frame,
                &FrameFields::data(stream, 9, n + 1, n),
                payload.as_bytes(),
            )
            .unwrap();
            frame
        })
        .collect();
    for chunk in frames.chunks(10) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        log.append(stream, &refs, 0).expect("append");
    }
}

/// Poll until `want` records arrived (or 10 s passed); returns (offset, payload).
fn read(consumer: &mut Consumer, want: usize) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        for record in consumer.poll(want - got.len()).expect("poll") {
            let record = record.expect("valid record");
            assert_eq!(record.stream_id, STREAM);
            assert_eq!(record.sequence, record.offset + 1);
            got.push((
                record.offset,
                String::from_utf8(record.payload.to_vec()).unwrap(),
            ));
        }
    }
    got
}

fn expected(range: std::ops::Range<u64>) -> Vec<(u64, String)> {
    range.map(|n| (n, format!("m{n}"))).collect()
}

fn config(start: StartOffset) -> ConsumerConfig {
    ConsumerConfig {
        start,
        wait: Duration::from_millis(200),
        fetch_bytes_max: 4096,
        ..ConsumerConfig::new(STREAM)
    }
}

/// The same scenario for either kind of consumer.
fn scenario(log: &mut ShardLog, mut make: impl FnMut(StartOffset) -> Consumer) {
    append(log, STREAM, 0, 250);
    append(log, STREAM + 1, 0, 5);

    // Earliest: everything in order, across several fetches (4 KiB each).
    let mut consumer = make(StartOffset::Earliest);
    assert_eq!(consumer.watermarks().unwrap(), (0, 250));
    assert_eq!(read(&mut consumer, 250), expected(0..250));
    assert_eq!(consumer.position(), 250);

    // Caught up: an empty poll after the wait.
    let started = Instant::now();
    assert_eq!(consumer.poll(10).unwrap().count(), 0);
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Follow: records appended while waiting arrive.
    let waiting = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read(&mut consumer, 20));
        std::thread::sleep(Duration::from_millis(50));
        append(log, STREAM, 250, 20);
        reader.join().unwrap()
    });
    assert_eq!(waiting, expected(250..270));

    // Stopping early keeps the rest for the next poll.
    consumer.seek(100);
    let first: Vec<u64> = consumer
        .poll(3)
        .unwrap()
        .map(|record| record.unwrap().offset)
        .collect();
    assert_eq!(first, [100, 101, 102]);
    assert_eq!(read(&mut consumer, 2), expected(103..105));

    // An explicit offset and the latest position.
    let mut at = make(StartOffset::At(260));
    assert_eq!(read(&mut at, 10), expected(260..270));
    let mut latest = make(StartOffset::Latest);
    assert_eq!(latest.poll(10).unwrap().count(), 0);
    assert_eq!(latest.position(), 270);

    // Beyond the end is an error naming the end.
    let mut beyond = make(StartOffset::At(1000));
    match beyond.poll(1).map(|records| records.count()) {
        Err(ConsumeError::BeyondEnd { high_watermark, .. }) => assert_eq!(high_watermark, 270),
        other => panic!("expected BeyondEnd, got {other:?}"),
    }
}

#[test]
fn client_consume_remote_over_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path());
    let server = FetchServerThread::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(log.reader()),
        FetchServerConfig::default(),
        1,
    )
    .unwrap();
    let addr = server.local_addr();
    scenario(&mut log, |start| {
        Consumer::remote(addr, config(start)).expect("connect")
    });
    server.shutdown();
}

#[test]
fn client_consume_local_follower() {
    let dir = tempfile::tempdir().unwrap();
    // A broker data directory: the stream's shard log under shard-N.
    let shard = dir.path().join("shard-0");
    let mut log = open_log(&shard);
    let data_dir = dir.path().to_path_buf();
    scenario(&mut log, |start| {
        Consumer::local(&data_dir, config(start)).expect("attach")
    });
}

#[test]
fn client_consume_reports_unreachable_and_missing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let err = Consumer::remote(addr, ConsumerConfig::new(STREAM)).unwrap_err();
    assert!(matches!(err, ConsumeError::Io { .. }), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = Consumer::local(empty.path(), ConsumerConfig::new(STREAM)).unwrap_err();
    assert!(err.to_string().contains("shard-0"), "{err}");
}
