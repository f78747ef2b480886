//! Hot reload under load: while a producer streams messages, the
//! configuration file is edited (retention and log level: applied), edited
//! badly (rejected, the old configuration keeps running), and reloaded over
//! SIGHUP's path (the admin call). No message is lost or appended twice.

mod controlplane_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use controlplane_support as support;
use kaelix_controlplane::config::LogFormat;
use kaelix_controlplane::pb;

const PAYLOAD_LEN: usize = 100;
/// Enough 140-byte frames for several 2 MiB segments.
const MESSAGES_MIN: u64 = 80_000;

fn payload(index: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PAYLOAD_LEN];
    bytes[..8].copy_from_slice(&index.to_le_bytes());
    bytes
}

/// Replace the file the way editors do: write a temporary file, rename it over.
fn save(path: &std::path::Path, text: &str) {
    let temporary = path.with_extension("toml.swp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

async fn config_value(c: &mut support::Clients, key: &str) -> (String, String) {
    let entry = c
        .config
        .get(pb::ConfigGetRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner()
        .entries
        .remove(0);
    (entry.value, entry.source)
}

async fn status(c: &mut support::Clients) -> pb::BrokerStatus {
    c.broker
        .status(pb::BrokerStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_log_level_change_under_load_without_loss_or_duplicates() {
    kaelix_controlplane::logging::init("info", LogFormat::Human);
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_config(dir.path(), "");
    let original = std::fs::read_to_string(&file).unwrap();
    let control = support::start(&file).await;
    let mut c = support::clients(&control).await;
    let data_addr = control.state().broker.shards()[0].data_addr;

    // The producer: stream 1, payload = its index, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let producer = kaelix_client::Producer::connect(data_addr).unwrap();
            let mut index = 0u64;
            while !stop.load(Ordering::Relaxed) {
                producer.send(1, &payload(index)).unwrap();
                index += 1;
                sent.store(index, Ordering::Relaxed);
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            let errors = producer.take_errors();
            assert!(errors.is_empty(), "rejected: {errors:?}");
            index
        })
    };
    support::eventually("the producer started", async || {
        sent.load(Ordering::Relaxed) > 1000
    })
    .await;

    // A valid edit: retention down to two segments, log level up.
    let edited = original.replace(
        "segment_size_mib = 2\n",
        "segment_size_mib = 2\nretention_mib = 4\n[log]\nlevel = \"info,kaelix_controlplane=debug\"\n",
    );
    save(&file, &edited);
    support::eventually("retention applied", async || {
        config_value(&mut c, "storage.retention_mib").await
            == ("4".into(), format!("file {}", file.display()))
    })
    .await;
    assert_eq!(
        config_value(&mut c, "log.level").await.0,
        "\"info,kaelix_controlplane=debug\""
    );
    assert_eq!(
        kaelix_controlplane::logging::current_level().as_deref(),
        Some("info,kaelix_controlplane=debug")
    );

    // An invalid edit: rejected with its key, the running configuration kept.
    let sent_before_bad_edit = sent.load(Ordering::Relaxed);
    std::fs::write(
        &file,
        edited.replace("retention_mib = 4", "retention_mib = 1"),
    )
    .unwrap();
    let mut last_error = None;
    support::eventually("the bad edit rejected", async || {
        last_error = status(&mut c).await.last_reload_error;
        last_error.is_some()
    })
    .await;
    let last_error = last_error.unwrap();
    assert!(
        last_error.contains("storage.retention_mib") && last_error.contains("below two segments"),
        "{last_error}"
    );
    assert_eq!(config_value(&mut c, "storage.retention_mib").await.0, "4");
    let reload = c
        .config
        .reload(pb::ConfigReloadRequest {})
        .await
        .unwrap_err();
    assert_eq!(reload.code(), tonic::Code::InvalidArgument);
    support::eventually("traffic keeps flowing after the rejection", async || {
        sent.load(Ordering::Relaxed) > sent_before_bad_edit + 1000
    })
    .await;

    // A restart-only change is reported, not applied.
    save(
        &file,
        &edited.replace(
            "segment_size_mib = 2\n",
            "segment_size_mib = 2\nflush_interval_ms = 50\n",
        ),
    );
    support::eventually("the restart key reported", async || {
        let status = status(&mut c).await;
        status.last_reload_error.is_none()
            && status
                .pending_restart
                .iter()
                .any(|change| change.key == "storage.flush_interval_ms" && change.new_value == "50")
    })
    .await;
    assert_eq!(
        config_value(&mut c, "storage.flush_interval_ms").await,
        ("100".into(), "default".into())
    );

    // Enough data for retention to delete whole segments under the new limit.
    support::eventually("enough messages", async || {
        sent.load(Ordering::Relaxed) >= MESSAGES_MIN
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let total = tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();

    let mut first_offset = 0;
    support::eventually("retention deleted old segments", async || {
        let info = c
            .streams
            .describe(pb::DescribeStreamRequest { stream_id: 1 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info.next_offset, total,
            "every message appended exactly once"
        );
        first_offset = info.first_offset;
        first_offset > 0
    })
    .await;

    // What is left is the newest messages, each once, in order.
    let mut reader = control.state().broker.shards()[0].reader.clone();
    let mut offset = first_offset;
    while offset < total {
        let batch = match reader.read(1, offset, 1 << 20, u64::MAX) {
            Ok(batch) => batch,
            // Retention keeps running; skip what it deleted meanwhile.
            Err(kaelix_storage::ReadError::OffsetRetained {
                first_available, ..
            }) => {
                assert!(first_available > offset);
                offset = first_available;
                continue;
            }
            Err(err) => panic!("reading offset {offset}: {err}"),
        };
        let mut read = 0;
        for record in batch {
            let record = record.unwrap();
            assert_eq!(record.offset, offset);
            let frame = kaelix_protocol::Frame::parse(record.bytes).unwrap();
            let index = u64::from_le_bytes(frame.payload()[..8].try_into().unwrap());
            assert_eq!(index, offset, "payload {index} at offset {offset}");
            offset += 1;
            read += 1;
        }
        assert!(read > 0, "nothing readable at offset {offset} of {total}");
    }
    assert_eq!(offset, total);
    support::stop(control).await;
}
