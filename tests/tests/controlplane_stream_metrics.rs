//! Per-stream counters and ACK latency histograms on the Prometheus
//! endpoint after real traffic (a duplicate, a retransmit, bad frames), a
//! stream's own retention created over the admin API, and the broker's
//! fetch source for streams created at runtime.

mod controlplane_support;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use controlplane_support as support;
use kaelix_controlplane::fetch::{FetchServer, FetchServerConfig, broker_logs};
use kaelix_controlplane::pb;
use kaelix_protocol::fetch::{FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN};
use kaelix_protocol::{
    Datagram, DatagramBuilder, FetchErrorCode, FetchRequest, FetchResponseHeader, FrameFields,
    FrameKind, HEADER_LEN, MAX_DATAGRAM_LEN, encode_frame, flags,
};
use tonic::Code;

const PAYLOAD: &[u8] = b"8 bytes!";

/// One datagram of DATA frames `(stream, producer, sequence, flags)`.
fn datagram(frames: &[(u32, u32, u64, u16)]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut builder = DatagramBuilder::new(&mut buf);
    for &(stream, producer, sequence, bits) in frames {
        let fields = FrameFields {
            flags: bits,
            ..FrameFields::data(stream, producer, sequence, sequence)
        };
        builder.push(&fields, PAYLOAD).unwrap();
    }
    builder.as_bytes().to_vec()
}

/// Send `bytes` and wait for the broker's reply datagram; its frames as
/// (kind, stream, sequence).
fn exchange(
    socket: &UdpSocket,
    broker: std::net::SocketAddr,
    bytes: &[u8],
) -> Vec<(FrameKind, u32, u64)> {
    socket.send_to(bytes, broker).unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let n = socket.recv(&mut buf).expect("a reply from the broker");
    Datagram::new(&buf[..n])
        .frames()
        .map(|frame| {
            let frame = frame.unwrap();
            (frame.kind(), frame.stream_id(), frame.sequence())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_stream_counters_and_ack_latency_histograms_are_scraped() {
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), "");
    let control = support::start(&file).await;
    let broker_addr = control.state().broker.shards()[0].data_addr;
    let metrics_addr = control.metrics_addr().unwrap();

    let replies = tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut replies = Vec::new();
        // Stream 1 (memory): three frames, then a retransmitted duplicate.
        replies.push(exchange(
            &socket,
            broker_addr,
            &datagram(&[(1, 5, 1, 0), (1, 5, 2, 0), (1, 5, 3, 0)]),
        ));
        replies.push(exchange(
            &socket,
            broker_addr,
            &datagram(&[(1, 5, 2, flags::RETRANSMIT)]),
        ));
        // Far beyond the credit window: rejected, counted for stream 1.
        replies.push(exchange(
            &socket,
            broker_addr,
            &datagram(&[(1, 5, 1_000_000, 0)]),
        ));
        // A damaged frame: its header cannot be trusted, counted per shard only.
        let mut bad = vec![0u8; HEADER_LEN + PAYLOAD.len()];
        let n = encode_frame(&mut bad, &FrameFields::data(1, 5, 4, 0), PAYLOAD).unwrap();
        bad[n - 1] ^= 0xff;
        replies.push(exchange(&socket, broker_addr, &bad[..n]));
        // Stream 2 (fsync): acknowledged once synced.
        replies.push(exchange(
            &socket,
            broker_addr,
            &datagram(&[(2, 5, 1, 0), (2, 5, 2, 0)]),
        ));
        replies
    })
    .await
    .unwrap();
    assert_eq!(replies[0], vec![(FrameKind::Ack, 1, 3)]);
    assert_eq!(
        replies[1],
        vec![(FrameKind::Ack, 1, 3)],
        "duplicate: the same ACK"
    );
    assert_eq!(replies[2], vec![(FrameKind::Error, 1, 1_000_000)]);
    assert_eq!(replies[3], vec![(FrameKind::Error, 0, 0)]);
    assert_eq!(replies[4], vec![(FrameKind::Ack, 2, 2)]);

    let stream_1 = [("stream", "1"), ("shard", "0")];
    support::eventually("the stream counts sampled", async || {
        let samples = support::parse_prometheus(&support::http_get(metrics_addr, "/metrics").await);
        support::value(&samples, "kaelix_stream_duplicates_total", &stream_1) == Some(1.0)
            && support::value(
                &samples,
                "kaelix_stream_frames_appended_total",
                &[("stream", "2")],
            ) == Some(2.0)
    })
    .await;
    let samples = support::parse_prometheus(&support::http_get(metrics_addr, "/metrics").await);
    let value = |name: &str, labels: &[(&str, &str)]| support::value(&samples, name, labels);
    assert_eq!(
        value("kaelix_stream_frames_appended_total", &stream_1),
        Some(3.0)
    );
    assert_eq!(
        value("kaelix_stream_bytes_appended_total", &stream_1),
        Some(3.0 * (HEADER_LEN + PAYLOAD.len()) as f64)
    );
    assert_eq!(
        value("kaelix_stream_retransmits_seen_total", &stream_1),
        Some(1.0)
    );
    assert_eq!(value("kaelix_stream_gaps_total", &stream_1), Some(0.0));
    assert_eq!(
        value(
            "kaelix_stream_frames_rejected_total",
            &[("stream", "1"), ("reason", "out_of_window")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "kaelix_stream_frames_rejected_total",
            &[("stream", "1"), ("reason", "crc_mismatch")]
        ),
        None,
        "a damaged frame is not attributed to a stream"
    );
    assert_eq!(
        value(
            "kaelix_shard_frames_rejected_total",
            &[("shard", "0"), ("reason", "crc_mismatch")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value("kaelix_stream_duplicates_total", &[("stream", "2")]),
        Some(0.0)
    );
    assert!(
        samples
            .iter()
            .all(|s| !(s.name.starts_with("kaelix_stream_frames_appended")
                && s.labels.iter().any(|(k, v)| k == "stream" && v == "0"))),
        "no series for the damaged frame's stream"
    );

    // ACK latency: one histogram per level, one observation per ACK of new
    // data: stream 1's first datagram (memory; the duplicate's ACK acknowledges
    // nothing new) and stream 2's (fsync).
    for (level, acks) in [("memory", 1.0), ("fsync", 1.0), ("flush", 0.0)] {
        let labels = [("shard", "0"), ("level", level)];
        let count = value("kaelix_ack_latency_seconds_count", &labels).unwrap();
        assert_eq!(count, acks, "{level}");
        let buckets: Vec<&support::Sample> = samples
            .iter()
            .filter(|s| {
                s.name == "kaelix_ack_latency_seconds_bucket"
                    && s.labels.iter().any(|(k, v)| k == "level" && v == level)
            })
            .collect();
        assert_eq!(buckets.len(), 23, "{level}: 22 bounds and +Inf");
        assert!(
            buckets.windows(2).all(|w| w[0].value <= w[1].value),
            "{level}: cumulative"
        );
        let inf = buckets
            .iter()
            .find(|s| s.labels.iter().any(|(k, v)| k == "le" && v == "+Inf"))
            .unwrap();
        assert_eq!(inf.value, count);
        let sum = value("kaelix_ack_latency_seconds_sum", &labels).unwrap();
        assert!((0.0..10.0).contains(&sum), "{level}: {sum}");
        if acks > 0.0 {
            assert!(sum > 0.0, "{level}: an ACK takes some time");
        }
    }
    support::stop(control).await;
}

/// One fetch over a blocking connection.
fn fetch(
    socket: &mut std::net::TcpStream,
    stream_id: u32,
    from_offset: u64,
) -> FetchResponseHeader {
    let request = FetchRequest {
        request_id: 1,
        stream_id,
        from_offset,
        max_bytes: 1 << 20,
        max_wait_ms: 0,
    };
    let mut bytes = [0u8; FETCH_REQUEST_LEN];
    request.encode(&mut bytes);
    socket.write_all(&bytes).unwrap();
    let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
    socket.read_exact(&mut head).unwrap();
    let header = FetchResponseHeader::decode(&head).unwrap();
    let mut body = vec![0u8; header.byte_len as usize];
    socket.read_exact(&mut body).unwrap();
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_own_retention_hides_old_offsets_and_fetch_knows_runtime_streams() {
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), "");
    let control = support::start(&file).await;
    let mut c = support::clients(&control).await;
    let broker = &control.state().broker;
    // What `kaelix serve` runs for remote consumers.
    let fetch_server = FetchServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(broker_logs(
            broker.shards().iter().map(|s| s.reader.clone()).collect(),
        )),
        FetchServerConfig::default(),
    )
    .await
    .unwrap();
    let fetch_addr = fetch_server.local_addr();

    for (field, request) in [
        (
            "retention_mib",
            pb::CreateStreamRequest {
                stream_id: 9,
                retention_mib: Some(0),
                ..Default::default()
            },
        ),
        (
            "retention_age_secs",
            pb::CreateStreamRequest {
                stream_id: 9,
                retention_age_secs: Some(u64::MAX),
                ..Default::default()
            },
        ),
    ] {
        let refused = c.streams.create(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
    }
    let created = c
        .streams
        .create(pb::CreateStreamRequest {
            stream_id: 9,
            durability: pb::Durability::Fsync.into(),
            retention_age_secs: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (created.retention_age_secs, created.retention_mib),
        (Some(1), None)
    );

    let data_addr = broker.shards()[0].data_addr;
    let producer = kaelix_client::Producer::connect(data_addr).unwrap();
    for i in 0..5u32 {
        producer.send(9, &i.to_le_bytes()).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    // Created at runtime at the fsync level: fetched once synced (the ACK
    // above waited for the fsync); unknown streams are errors.
    let mut socket = tokio::task::spawn_blocking(move || {
        let mut socket = std::net::TcpStream::connect(fetch_addr).unwrap();
        let header = fetch(&mut socket, 9, 0);
        assert_eq!((header.error, header.record_count), (None, 5));
        let header = fetch(&mut socket, 4242, 0);
        assert_eq!(header.error, Some(FetchErrorCode::UnknownStream));
        socket
    })
    .await
    .unwrap();

    // Older than a second: offsets 0..5 are no longer served.
    support::eventually("stream 9's first offset moved", async || {
        let info = c
            .streams
            .describe(pb::DescribeStreamRequest { stream_id: 9 })
            .await
            .unwrap()
            .into_inner();
        info.first_offset == 5 && info.stored_messages == 0
    })
    .await;
    let socket_back = tokio::task::spawn_blocking(move || {
        let header = fetch(&mut socket, 9, 0);
        assert_eq!(header.error, Some(FetchErrorCode::OffsetOutOfRange));
        assert_eq!(header.log_start, 5);
        socket
    })
    .await
    .unwrap();
    drop(socket_back);
    // Stream 1 has no retention of its own and keeps everything.
    for i in 0..3u32 {
        producer.send(1, &i.to_le_bytes()).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let one = c
        .streams
        .describe(pb::DescribeStreamRequest { stream_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((one.first_offset, one.next_offset), (0, 3));
    assert_eq!((one.retention_mib, one.retention_age_secs), (None, None));

    // Deleted at runtime: unknown to fetch again.
    c.streams
        .delete(pb::DeleteStreamRequest { stream_id: 9 })
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut socket = std::net::TcpStream::connect(fetch_addr).unwrap();
        assert_eq!(
            fetch(&mut socket, 9, 5).error,
            Some(FetchErrorCode::UnknownStream)
        );
    })
    .await
    .unwrap();
    fetch_server.shutdown().await;
    support::stop(control).await;
}
