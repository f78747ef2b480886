//! The admin API end to end against a running broker: streams, broker
//! status, configuration get/set, status codes, and the Prometheus endpoint.

mod controlplane_support;

use std::time::Duration;

use controlplane_support as support;
use kaelix_controlplane::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_broker_status_and_config_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), "");
    let control = support::start(&file).await;
    let mut c = support::clients(&control).await;

    // Streams: create, list, describe, delete, and the error codes.
    let created = c
        .streams
        .create(pb::CreateStreamRequest {
            stream_id: 7,
            durability: pb::Durability::Fsync.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.stream_id, 7);
    assert_eq!(created.durability, i32::from(pb::Durability::Fsync));
    assert_eq!((created.first_offset, created.next_offset), (0, 0));
    let again = c
        .streams
        .create(pb::CreateStreamRequest {
            stream_id: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let replicated = c
        .streams
        .create(pb::CreateStreamRequest {
            stream_id: 8,
            replication_factor: Some(3),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(replicated.code(), Code::FailedPrecondition);
    assert!(
        replicated.message().contains("replication_factor"),
        "{replicated:?}"
    );
    let bad_level = c
        .streams
        .create(pb::CreateStreamRequest {
            stream_id: 8,
            durability: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_level.code(), Code::InvalidArgument);
    assert!(bad_level.message().contains("durability"), "{bad_level:?}");

    // Produce to stream 7 and see its offsets move.
    let data_addr = control.state().broker.shards()[0].data_addr;
    let producer = kaelix_client::Producer::connect(data_addr).unwrap();
    for i in 0..10u32 {
        producer.send(7, &i.to_le_bytes()).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let described = c
        .streams
        .describe(pb::DescribeStreamRequest { stream_id: 7 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.next_offset, 10);
    assert_eq!(described.stored_messages, 10);
    assert!(described.shard_log_bytes > 0);
    let listed: Vec<u32> = c
        .streams
        .list(pb::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams
        .iter()
        .map(|s| s.stream_id)
        .collect();
    assert_eq!(listed, vec![1, 2, 7]);
    c.streams
        .delete(pb::DeleteStreamRequest { stream_id: 7 })
        .await
        .unwrap();
    for (call, code) in [
        (
            c.streams
                .delete(pb::DeleteStreamRequest { stream_id: 7 })
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            c.streams
                .describe(pb::DescribeStreamRequest { stream_id: 99 })
                .await
                .map(drop),
            Code::NotFound,
        ),
    ] {
        assert_eq!(call.unwrap_err().code(), code);
    }

    // Broker status: health, shards with counters, XDP absent with a reason.
    let status = c
        .broker
        .status(pb::BrokerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.health, "serving");
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.shards.len(), 1);
    assert_eq!(status.shards[0].backend, "socket");
    assert_eq!(status.shards[0].frames_appended, 10);
    let xdp = status.xdp.unwrap();
    assert!(!xdp.present);
    assert!(xdp.absent_reason.contains("socket"), "{xdp:?}");
    assert!(status.pending_restart.is_empty());

    // Config get: values with their sources; unknown keys are NOT_FOUND.
    let entries = c
        .config
        .get(pb::ConfigGetRequest {
            key: "storage".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let segment = entries
        .iter()
        .find(|e| e.key == "storage.segment_size_mib")
        .unwrap();
    assert_eq!(segment.value, "2");
    assert_eq!(segment.source, format!("file {}", file.display()));
    assert!(!segment.hot_reloadable);
    let flush = entries
        .iter()
        .find(|e| e.key == "storage.flush_interval_ms")
        .unwrap();
    assert_eq!(flush.source, "default");
    assert!(entries.iter().all(|e| e.key.starts_with("storage.")));
    let unknown = c
        .config
        .get(pb::ConfigGetRequest { key: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // Config set: a hot key is applied; a restart key and a bad value are refused.
    let applied = c
        .config
        .set(pb::ConfigSetRequest {
            key: "dataplane.shard.credit_window".into(),
            value: "512".into(),
            cluster: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.applied.len(), 1);
    assert_eq!(applied.applied[0].old_value, "8192");
    assert_eq!(applied.applied[0].new_value, "512");
    assert_eq!(
        control.state().broker.shards()[0].tunables.credit_window(),
        512
    );
    let window = c
        .config
        .get(pb::ConfigGetRequest {
            key: "dataplane.shard.credit_window".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(
        (window[0].value.as_str(), window[0].source.as_str()),
        ("512", "admin")
    );
    let restart = c
        .config
        .set(pb::ConfigSetRequest {
            key: "broker.shards".into(),
            value: "4".into(),
            cluster: false,
        })
        .await
        .unwrap_err();
    assert_eq!(restart.code(), Code::FailedPrecondition);
    assert!(restart.message().contains("restart"), "{restart:?}");
    let out_of_range = c
        .config
        .set(pb::ConfigSetRequest {
            key: "dataplane.shard.credit_window".into(),
            value: "0".into(),
            cluster: false,
        })
        .await
        .unwrap_err();
    assert_eq!(out_of_range.code(), Code::InvalidArgument);
    assert!(
        out_of_range
            .message()
            .contains("dataplane.shard.credit_window"),
        "{out_of_range:?}"
    );
    assert_eq!(
        control.state().broker.shards()[0].tunables.credit_window(),
        512,
        "a rejected value changes nothing"
    );
    let unknown = c
        .config
        .set(pb::ConfigSetRequest {
            key: "storage.nope".into(),
            value: "1".into(),
            cluster: false,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // The Prometheus endpoint, scraped and parsed.
    let metrics_addr = control.metrics_addr().unwrap();
    support::eventually("the appends sampled", async || {
        let text = support::http_get(metrics_addr, "/metrics").await;
        let samples = support::parse_prometheus(&text);
        support::value(
            &samples,
            "kaelix_shard_frames_appended_total",
            &[("shard", "0")],
        ) == Some(10.0)
    })
    .await;
    let text = support::http_get(metrics_addr, "/metrics").await;
    let samples = support::parse_prometheus(&text);
    let shard = [("shard", "0")];
    assert_eq!(
        support::value(
            &samples,
            "kaelix_stream_messages_appended_total",
            &[("stream", "2")]
        ),
        Some(0.0)
    );
    // Retransmits of fsync-level frames (acknowledged only once synced) are
    // dropped as duplicates: the metric is the shard's counter.
    let duplicates = control.state().broker.shards()[0]
        .counters
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        support::value(&samples, "kaelix_shard_duplicates_total", &shard),
        Some(duplicates as f64)
    );
    assert_eq!(
        support::value(
            &samples,
            "kaelix_shard_frames_rejected_total",
            &[("shard", "0"), ("reason", "unknown_stream")]
        ),
        Some(0.0)
    );
    assert!(
        support::value(
            &samples,
            "kaelix_storage_position_bytes",
            &[("shard", "0"), ("position", "appended")]
        )
        .unwrap()
            > 0.0
    );
    assert!(support::value(&samples, "kaelix_storage_unsynced_bytes", &shard).is_some());
    // The active segment is live memory; the limit is 16 segments by default.
    let live = support::value(&samples, "kaelix_storage_live_memory_bytes", &shard).unwrap();
    let limit = support::value(&samples, "kaelix_storage_live_memory_limit_bytes", &shard).unwrap();
    assert!(live > 0.0 && live <= limit, "live memory {live} of {limit}");
    // Histograms come with buckets, not as summaries.
    let buckets: Vec<&support::Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "kaelix_admin_request_seconds_bucket"
                && s.labels
                    .iter()
                    .any(|(k, v)| k == "method" && v == "stream_create")
        })
        .collect();
    assert!(buckets.len() > 10, "{buckets:?}");
    let inf = buckets
        .iter()
        .find(|s| s.labels.iter().any(|(k, v)| k == "le" && v == "+Inf"))
        .unwrap();
    assert_eq!(inf.value, 4.0, "four stream_create requests");
    assert!(support::value(&samples, "kaelix_storage_sync_wait_seconds_count", &shard).is_some());
    assert_eq!(
        support::value(
            &samples,
            "kaelix_admin_requests_total",
            &[("method", "stream_create"), ("code", "AlreadyExists")]
        ),
        Some(1.0)
    );
    assert!(
        samples.iter().all(|s| !s.name.starts_with("kaelix_xdp_")),
        "no XDP metrics without an XDP program"
    );

    support::stop(control).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_hands_the_broker_back() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = support::write_config(
        dir.path(),
        &format!("\n[admin]\naddr = \"{}\"\n", taken.local_addr().unwrap()),
    );
    // [admin] appears twice: the file is invalid TOML, reported as such.
    let layers = kaelix_controlplane::layers::ConfigLayers::new(Some(file.clone()));
    assert!(layers.resolve().is_err());

    let mut layers =
        kaelix_controlplane::layers::ConfigLayers::new(Some(support::write_config(dir.path(), "")));
    layers
        .set_flag(&format!("admin.addr={}", taken.local_addr().unwrap()))
        .unwrap();
    let resolved = layers.resolve().unwrap();
    let broker = kaelix_controlplane::broker::Broker::start(&resolved.config).unwrap();
    let manager = kaelix_controlplane::reload::ConfigManager::new(layers, resolved);
    let Err(failed) = kaelix_controlplane::server::ControlPlane::start(broker, manager).await
    else {
        panic!("the admin address is taken")
    };
    let (error, broker) = *failed;
    assert!(error.to_string().contains("admin.addr"), "{error}");
    tokio::task::spawn_blocking(move || broker.shutdown().unwrap())
        .await
        .unwrap();
}

/// A credit window set over the admin API is what the running shard loop
/// enforces on its next cycle: frames beyond it are refused (OUT_OF_WINDOW)
/// and not appended; frames within it are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_window_change_reaches_the_shard_loop() {
    use kaelix_protocol::{Datagram, DatagramBuilder, ErrorCode, FrameKind, MAX_DATAGRAM_LEN};

    let dir = tempfile::tempdir().unwrap();
    let control = support::start(&support::write_config(dir.path(), "")).await;
    let mut c = support::clients(&control).await;
    c.config
        .set(pb::ConfigSetRequest {
            key: "dataplane.shard.credit_window".into(),
            value: "2".into(),
            cluster: false,
        })
        .await
        .unwrap();
    let data_addr = control.state().broker.shards()[0].data_addr;
    let replies = tokio::task::spawn_blocking(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let send = |seqs: std::ops::RangeInclusive<u64>| {
            let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
            let mut builder = DatagramBuilder::new(&mut buf);
            for seq in seqs {
                builder.push_data(1, 77, seq, seq, b"x").unwrap();
            }
            socket.send_to(builder.as_bytes(), data_addr).unwrap();
        };
        let receive = |count: usize| {
            let mut replies = Vec::new();
            let mut reply = vec![0u8; 2048];
            while replies.len() < count {
                let n = socket.recv(&mut reply).expect("replies within 5 s");
                for frame in Datagram::new(&reply[..n]).frames() {
                    let frame = frame.unwrap();
                    let code = frame.error().and_then(|(body, _)| body.error_code());
                    replies.push((frame.kind(), frame.sequence(), code));
                }
            }
            replies
        };
        // The cycle that receives frame 1 may have read the settings just
        // before the change; every cycle after it reads them after the change.
        send(1..=1);
        assert_eq!(receive(1), vec![(FrameKind::Ack, 1, None)]);
        send(2..=4);
        receive(2)
    })
    .await
    .unwrap();
    assert!(replies.contains(&(FrameKind::Ack, 3, None)), "{replies:?}");
    assert!(
        replies.contains(&(FrameKind::Error, 4, Some(ErrorCode::OutOfWindow))),
        "{replies:?}"
    );
    let described = c
        .streams
        .describe(pb::DescribeStreamRequest { stream_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        described.next_offset, 3,
        "only the frames within the window"
    );
    support::stop(control).await;
}
