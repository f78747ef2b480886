//! Prometheus metrics: the HTTP endpoint and the sampler that feeds it.
//!
//! The data plane keeps plain atomics ([`kaelix_dataplane::ShardCounters`])
//! and the logs publish their positions; nothing here touches a shard's hot
//! path. A sampler task reads them every `metrics.sample_interval_ms` and
//! sets the exported counters and gauges; per-stream counts, which the
//! shards keep as plain integers in their flow tables, are copied by a
//! command over each shard's bounded queue at the same interval. A second,
//! faster tick (every [`DURABILITY_TICK`]) follows each log's appended and
//! synced positions to measure how long appended data waits to become
//! durable. The shards' ACK latency histograms (fixed buckets of atomics)
//! are read at each scrape and rendered bucket for bucket.
//!
//! Per-stream series exist for every stream of a shard that received a
//! frame since the broker started (so at most the registered streams; a
//! deleted stream's counts stop moving), and per-stream rejections only for
//! reasons that occurred.
//!
//! Each [`crate::server::ControlPlane`] has its own recorder (no global
//! one), so several brokers can run in one process (tests).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `kaelix_shard_frames_appended_total`, `_bytes_appended_total`, `_datagrams_total`, `_duplicates_total`, `_gaps_total`, `_retransmits_seen_total`, `_heartbeats_total`, `_acks_sent_total`, `_errors_sent_total`, `_replies_dropped_total`, `_flow_resyncs_total`, `_idle_cycles_total` | counter | `shard` |
//! | `kaelix_shard_frames_rejected_total` | counter | `shard`, `reason` |
//! | `kaelix_storage_position_bytes` | gauge | `shard`, `position` (appended, written, synced) |
//! | `kaelix_storage_unsynced_bytes`, `kaelix_storage_unwritten_bytes` | gauge | `shard` |
//! | `kaelix_storage_segments` | gauge | `shard` |
//! | `kaelix_storage_live_memory_bytes`, `kaelix_storage_live_memory_limit_bytes` | gauge | `shard` |
//! | `kaelix_storage_sync_wait_seconds`, `kaelix_storage_write_wait_seconds` | histogram | `shard` |
//! | `kaelix_stream_messages_appended_total` | counter | `stream`, `shard` |
//! | `kaelix_stream_frames_appended_total`, `_bytes_appended_total`, `_duplicates_total`, `_gaps_total`, `_retransmits_seen_total` | counter | `stream`, `shard` |
//! | `kaelix_stream_frames_rejected_total` | counter | `stream`, `shard`, `reason` |
//! | `kaelix_ack_latency_seconds` | histogram (1 µs to 10 s) | `shard`, `level` (memory, flush, fsync) |
//! | `kaelix_stream_stored_messages`, `kaelix_stream_first_offset` | gauge | `stream`, `shard` |
//! | `kaelix_xdp_packets_total` | counter | `reason` (only with an XDP program) |
//! | `kaelix_xdp_attached` | gauge | `mode`, `interface` (1 when attached) |
//! | `kaelix_admin_requests_total` | counter | `method`, `code` |
//! | `kaelix_admin_request_seconds` | histogram | `method` |
//! | `kaelix_config_reloads_total` | counter | `result` (applied, rejected) |
//! | `kaelix_config_restart_pending` | gauge | |
//! | `kaelix_build_info` | gauge | `version` |

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kaelix_dataplane::ShardCounters;
use kaelix_dataplane::counters::{ACK_LATENCY_BUCKETS_NS, StreamCounts};
use kaelix_protocol::{DurabilityLevel, ErrorCode};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::broker::Broker;
use crate::reload::ConfigManager;

/// How often the durability wait is measured.
pub const DURABILITY_TICK: Duration = Duration::from_millis(5);

/// Histogram buckets for the `*_seconds` metrics (100 µs to 10 s).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The shards whose ACK latency histograms a scrape renders (set by the sampler).
type LatencySources = Arc<OnceLock<Vec<(u32, Arc<ShardCounters>)>>>;

/// The recorder of one control plane (absent when metrics are off).
#[derive(Clone, Default)]
pub struct Telemetry {
    recorder: Option<Arc<PrometheusRecorder>>,
    latency: LatencySources,
}

impl Telemetry {
    /// Run `f`, whose `metrics` macros record into this control plane's recorder.
    pub fn record(&self, f: impl FnOnce()) {
        if let Some(recorder) = &self.recorder {
            metrics::with_local_recorder(recorder.as_ref(), f);
        }
    }

    /// The text a scrape gets: the recorder's metrics, then the shards' ACK
    /// latency histograms read from their atomics at this moment.
    pub fn render(&self) -> Option<String> {
        let mut text = self.recorder.as_ref()?.handle().render();
        if let Some(shards) = self.latency.get() {
            render_ack_latency(&mut text, shards);
        }
        Some(text)
    }
}

/// Append `kaelix_ack_latency_seconds` (one histogram per shard and
/// durability level) in the Prometheus text format. The shards keep
/// fixed-bucket histograms of atomics ([`ShardCounters::ack_latency`]);
/// they are rendered as they are, bucket for bucket.
fn render_ack_latency(out: &mut String, shards: &[(u32, Arc<ShardCounters>)]) {
    use std::fmt::Write;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(
        "# HELP kaelix_ack_latency_seconds Time from the start of the shard cycle that \
         received a batch to its ACK being queued, once per ACK of new data, by durability level\n\
         # TYPE kaelix_ack_latency_seconds histogram\n",
    );
    for (shard, counters) in shards {
        for level in DurabilityLevel::ALL {
            let snapshot = counters.ack_latency[level as usize].snapshot();
            let labels = format!("shard=\"{shard}\",level=\"{}\"", level.name());
            let mut cumulative = 0;
            for (bound_ns, count) in ACK_LATENCY_BUCKETS_NS.iter().zip(snapshot.buckets) {
                cumulative += count;
                let le = *bound_ns as f64 / 1e9;
                let _ = writeln!(
                    out,
                    "kaelix_ack_latency_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "kaelix_ack_latency_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                snapshot.count
            );
            let _ = writeln!(
                out,
                "kaelix_ack_latency_seconds_sum{{{labels}}} {}",
                snapshot.sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "kaelix_ack_latency_seconds_count{{{labels}}} {}",
                snapshot.count
            );
        }
    }
}

/// Start the metrics endpoint on `addr` (port 0: a free port): every GET
/// is answered with [`Telemetry::render`] (HTTP/1.1, one request per
/// connection). Must run inside the tokio runtime.
pub fn start_exporter(
    addr: SocketAddr,
) -> Result<(Telemetry, SocketAddr, tokio::task::JoinHandle<()>), String> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|err| format!("metrics.addr {addr}: {err}"))?;
    let local_addr = listener
        .local_addr()
        .map_err(|err| format!("metrics.addr {addr}: {err}"))?;
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|err| format!("metrics.addr {addr}: {err}"))?
        .build_recorder();
    let telemetry = Telemetry {
        recorder: Some(Arc::new(recorder)),
        latency: LatencySources::default(),
    };
    telemetry.record(describe);
    let served = telemetry.clone();
    let server = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    tokio::spawn(serve_scrape(socket, served.clone()));
                }
                Err(err) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((telemetry, local_addr, server))
}

/// Longest request head read from a scraper.
const REQUEST_HEAD_MAX: usize = 8192;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Answer one scrape: GET (any path) gets the metrics, anything else 405.
async fn serve_scrape(mut socket: tokio::net::TcpStream, telemetry: Telemetry) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_MAX {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let response = if head.starts_with(b"GET ") {
        let body = telemetry.render().unwrap_or_default();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
            .to_string()
    };
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

fn describe() {
    describe_counter!(
        "kaelix_shard_frames_appended_total",
        "DATA frames appended to the shard's log"
    );
    describe_counter!(
        "kaelix_shard_bytes_appended_total",
        "Frame bytes (header and payload) appended"
    );
    describe_counter!(
        "kaelix_shard_duplicates_total",
        "DATA frames dropped as duplicates (already appended)"
    );
    describe_counter!(
        "kaelix_shard_retransmits_seen_total",
        "Frames that carried the RETRANSMIT flag"
    );
    describe_counter!(
        "kaelix_shard_frames_rejected_total",
        "Frames rejected, by reason (the ERROR code sent back)"
    );
    describe_gauge!(
        "kaelix_storage_position_bytes",
        "Log positions: appended, written to the disk copy, fsynced"
    );
    describe_gauge!(
        "kaelix_storage_unsynced_bytes",
        "Appended bytes not yet fsynced (durable lag of the fsync level)"
    );
    describe_gauge!(
        "kaelix_storage_unwritten_bytes",
        "Appended bytes not yet in the disk copy (durable lag of the flush level)"
    );
    describe_gauge!(
        "kaelix_storage_live_memory_bytes",
        "Live (shared-memory) segments the log holds now; at the limit appends are refused with `overloaded` until the flusher catches up"
    );
    describe_gauge!(
        "kaelix_storage_live_memory_limit_bytes",
        "The live memory limit (storage.live_memory_max_mib, in whole segments)"
    );
    describe_histogram!(
        "kaelix_storage_sync_wait_seconds",
        "Time from a position being appended to it being fsynced (measured every 5 ms)"
    );
    describe_histogram!(
        "kaelix_storage_write_wait_seconds",
        "Time from a position being appended to it being in the disk copy (measured every 5 ms)"
    );
    describe_counter!(
        "kaelix_stream_messages_appended_total",
        "Messages ever appended to the stream (its next offset)"
    );
    describe_counter!(
        "kaelix_stream_frames_appended_total",
        "DATA frames of the stream appended by its shard since the broker started"
    );
    describe_counter!(
        "kaelix_stream_bytes_appended_total",
        "Frame bytes (header and payload) of the stream appended since the broker started"
    );
    describe_counter!(
        "kaelix_stream_duplicates_total",
        "DATA frames of the stream dropped as duplicates"
    );
    describe_counter!(
        "kaelix_stream_gaps_total",
        "DATA frames of the stream dropped because an earlier sequence was missing"
    );
    describe_counter!(
        "kaelix_stream_retransmits_seen_total",
        "Frames of the stream that carried the RETRANSMIT flag"
    );
    describe_counter!(
        "kaelix_stream_frames_rejected_total",
        "Frames of the stream rejected, by reason (frames whose header does not parse are counted per shard only)"
    );
    describe_counter!(
        "kaelix_xdp_packets_total",
        "Packets seen by the XDP program, by verdict and reason"
    );
    describe_histogram!("kaelix_admin_request_seconds", "Admin API request latency");
    describe_counter!(
        "kaelix_config_reloads_total",
        "Configuration changes, applied or rejected"
    );
}

/// Appended positions waiting to become durable, per shard.
#[derive(Default)]
struct DurabilityTracker {
    /// (appended position, when first seen) not yet written / not yet synced.
    unwritten: VecDeque<(u64, Instant)>,
    unsynced: VecDeque<(u64, Instant)>,
    last_appended: u64,
}

/// Positions waiting at most (older ones are measured when they resolve;
/// more are not tracked until the queue drains).
const TRACKED_MAX: usize = 4096;

impl DurabilityTracker {
    /// Note the positions; return the waits that ended (write, sync).
    fn observe(
        &mut self,
        positions: kaelix_storage::Positions,
        now: Instant,
    ) -> (Vec<Duration>, Vec<Duration>) {
        if positions.appended > self.last_appended {
            self.last_appended = positions.appended;
            if self.unwritten.len() < TRACKED_MAX {
                self.unwritten.push_back((positions.appended, now));
            }
            if self.unsynced.len() < TRACKED_MAX {
                self.unsynced.push_back((positions.appended, now));
            }
        }
        let drain = |queue: &mut VecDeque<(u64, Instant)>, durable: u64| {
            let mut waits = Vec::new();
            while let Some(&(position, seen)) = queue.front()
                && position <= durable
            {
                waits.push(now - seen);
                queue.pop_front();
            }
            waits
        };
        (
            drain(&mut self.unwritten, positions.written),
            drain(&mut self.unsynced, positions.synced),
        )
    }
}

/// A stream's last two samples, for its append rate.
#[derive(Debug, Clone, Copy)]
pub struct StreamSample {
    /// Its next offset at the last sample.
    pub next_offset: u64,
    /// When.
    pub at: Instant,
    /// Messages per second between the last two samples.
    pub rate_per_sec: Option<f64>,
}

/// Append rates by stream, as of the last sample.
pub type StreamRates = Arc<Mutex<HashMap<u32, StreamSample>>>;

/// Run the sampler until `stop` turns true.
pub async fn run_sampler(
    broker: Arc<Broker>,
    config: Arc<ConfigManager>,
    telemetry: Telemetry,
    rates: StreamRates,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = telemetry.latency.set(
        broker
            .shards()
            .iter()
            .map(|shard| (shard.id, shard.counters.clone()))
            .collect(),
    );
    let mut trackers: Vec<DurabilityTracker> = broker
        .shards()
        .iter()
        .map(|_| DurabilityTracker::default())
        .collect();
    let mut durability_tick = tokio::time::interval(DURABILITY_TICK);
    durability_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sample_tick = tokio::time::interval(interval);
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = durability_tick.tick() => {
                let now = Instant::now();
                for (shard, tracker) in broker.shards().iter().zip(&mut trackers) {
                    let (written, synced) = tracker.observe(shard.reader.positions(), now);
                    if written.is_empty() && synced.is_empty() {
                        continue;
                    }
                    let label = shard.id.to_string();
                    telemetry.record(|| {
                        let write_wait = histogram!("kaelix_storage_write_wait_seconds", "shard" => label.clone());
                        for wait in written {
                            write_wait.record(wait.as_secs_f64());
                        }
                        let sync_wait = histogram!("kaelix_storage_sync_wait_seconds", "shard" => label.clone());
                        for wait in synced {
                            sync_wait.record(wait.as_secs_f64());
                        }
                    });
                }
            }
            _ = sample_tick.tick() => {
                sample(&broker, &config, &telemetry, &rates).await;
            }
        }
    }
}

/// Read every counter and position once and publish them.
async fn sample(
    broker: &Broker,
    config: &ConfigManager,
    telemetry: &Telemetry,
    rates: &StreamRates,
) {
    let mut streams = Vec::new();
    let mut stream_counts: Vec<(u32, u32, StreamCounts)> = Vec::new();
    for shard in broker.shards() {
        // A shard that does not answer keeps its stream metrics from the
        // last sample; everything else is still published.
        if let Ok(list) = broker.shard_streams(shard).await {
            streams.extend(list.into_iter().map(|info| (shard.id, info)));
        }
        if let Ok(counts) = broker.shard_stream_counts(shard).await {
            stream_counts.extend(
                counts
                    .into_iter()
                    .map(|(stream, counts)| (shard.id, stream, counts)),
            );
        }
    }
    let now = Instant::now();
    {
        let mut rates = rates.lock().unwrap_or_else(|p| p.into_inner());
        rates.retain(|id, _| streams.iter().any(|(_, info)| info.stream_id == *id));
        for (_, info) in &streams {
            let sample = rates.entry(info.stream_id).or_insert(StreamSample {
                next_offset: info.next_offset,
                at: now,
                rate_per_sec: None,
            });
            let elapsed = now.duration_since(sample.at).as_secs_f64();
            if elapsed > 0.0 {
                sample.rate_per_sec =
                    Some(info.next_offset.saturating_sub(sample.next_offset) as f64 / elapsed);
                sample.next_offset = info.next_offset;
                sample.at = now;
            }
        }
    }
    telemetry.record(|| {
        gauge!("kaelix_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        for shard in broker.shards() {
            publish_shard(broker, shard);
        }
        for (shard, info) in &streams {
            let labels = [
                ("stream", info.stream_id.to_string()),
                ("shard", shard.to_string()),
            ];
            counter!("kaelix_stream_messages_appended_total", &labels).absolute(info.next_offset);
            gauge!("kaelix_stream_stored_messages", &labels)
                .set(info.next_offset.saturating_sub(info.first_offset) as f64);
            gauge!("kaelix_stream_first_offset", &labels).set(info.first_offset as f64);
        }
        for (shard, stream, counts) in &stream_counts {
            publish_stream_counts(*shard, *stream, counts);
        }
        if let Some(xdp) = broker.xdp() {
            gauge!("kaelix_xdp_attached", "mode" => xdp.xdp_mode.name(), "interface" => xdp.interface.clone())
                .set(1.0);
            if let Ok(counts) = xdp.xdp.counters() {
                for reason in kaelix_dataplane::af_xdp::Counter::ALL {
                    counter!("kaelix_xdp_packets_total", "reason" => reason.name())
                        .absolute(counts.get(reason));
                }
            }
        }
        let stats = &config.stats;
        counter!("kaelix_config_reloads_total", "result" => "applied")
            .absolute(stats.applied.load(Ordering::Relaxed));
        counter!("kaelix_config_reloads_total", "result" => "rejected")
            .absolute(stats.rejected.load(Ordering::Relaxed));
        gauge!("kaelix_config_restart_pending").set(config.pending_restart().len() as f64);
    });
}

/// One stream's counts from its shard. Rejections are published per reason
/// once the reason occurred for the stream (series = streams x reasons seen).
fn publish_stream_counts(shard: u32, stream: u32, counts: &StreamCounts) {
    let labels = [("stream", stream.to_string()), ("shard", shard.to_string())];
    for (name, value) in [
        (
            "kaelix_stream_frames_appended_total",
            counts.frames_appended,
        ),
        ("kaelix_stream_bytes_appended_total", counts.bytes_appended),
        ("kaelix_stream_duplicates_total", counts.duplicates),
        ("kaelix_stream_gaps_total", counts.gaps),
        (
            "kaelix_stream_retransmits_seen_total",
            counts.retransmits_seen,
        ),
    ] {
        counter!(name, &labels).absolute(value);
    }
    for code in ErrorCode::ALL {
        let value = counts.errors[code.index()];
        if value != 0 {
            counter!(
                "kaelix_stream_frames_rejected_total",
                "stream" => stream.to_string(),
                "shard" => shard.to_string(),
                "reason" => code.name()
            )
            .absolute(value);
        }
    }
}

fn publish_shard(broker: &Broker, shard: &crate::broker::ShardHandle) {
    let id = shard.id.to_string();
    let c = &shard.counters;
    let load = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    let counters: [(&'static str, u64); 12] = [
        (
            "kaelix_shard_frames_appended_total",
            load(&c.frames_appended),
        ),
        ("kaelix_shard_bytes_appended_total", load(&c.bytes_appended)),
        ("kaelix_shard_datagrams_total", load(&c.datagrams)),
        ("kaelix_shard_duplicates_total", load(&c.duplicates)),
        ("kaelix_shard_gaps_total", load(&c.gaps)),
        (
            "kaelix_shard_retransmits_seen_total",
            load(&c.retransmits_seen),
        ),
        ("kaelix_shard_heartbeats_total", load(&c.heartbeats)),
        ("kaelix_shard_acks_sent_total", load(&c.acks_sent)),
        ("kaelix_shard_errors_sent_total", load(&c.errors_sent)),
        (
            "kaelix_shard_replies_dropped_total",
            load(&c.replies_dropped),
        ),
        ("kaelix_shard_flow_resyncs_total", load(&c.flow_resyncs)),
        ("kaelix_shard_idle_cycles_total", load(&c.idle_cycles)),
    ];
    for (name, value) in counters {
        counter!(name, "shard" => id.clone()).absolute(value);
    }
    for code in ErrorCode::ALL {
        counter!("kaelix_shard_frames_rejected_total", "shard" => id.clone(), "reason" => code.name())
            .absolute(c.error_count(code));
    }
    let positions = shard.reader.positions();
    for (name, value) in [
        ("appended", positions.appended),
        ("written", positions.written),
        ("synced", positions.synced),
    ] {
        gauge!("kaelix_storage_position_bytes", "shard" => id.clone(), "position" => name)
            .set(value as f64);
    }
    gauge!("kaelix_storage_unsynced_bytes", "shard" => id.clone())
        .set(positions.appended.saturating_sub(positions.synced) as f64);
    gauge!("kaelix_storage_unwritten_bytes", "shard" => id.clone())
        .set(positions.appended.saturating_sub(positions.written) as f64);
    let live = shard.reader.live_memory();
    gauge!("kaelix_storage_live_memory_bytes", "shard" => id.clone()).set(live.bytes as f64);
    gauge!("kaelix_storage_live_memory_limit_bytes", "shard" => id.clone())
        .set(live.limit_bytes as f64);
    let segments = segment_count(&broker.data_dir().join(format!("shard-{}", shard.id)));
    gauge!("kaelix_storage_segments", "shard" => id).set(segments as f64);
}

/// Segment files in a shard log's disk copy (`<dir>/segments/*.seg`).
fn segment_count(shard_dir: &std::path::Path) -> usize {
    std::fs::read_dir(shard_dir.join("segments")).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "seg"))
            .count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_waits_end_when_the_positions_pass() {
        let mut tracker = DurabilityTracker::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let positions = |appended, written, synced| kaelix_storage::Positions {
            appended,
            written,
            synced,
            ..kaelix_storage::Positions::default()
        };
        assert_eq!(
            tracker.observe(positions(100, 0, 0), at(0)),
            (vec![], vec![])
        );
        assert_eq!(
            tracker.observe(positions(200, 0, 0), at(5)),
            (vec![], vec![])
        );
        let (written, synced) = tracker.observe(positions(200, 150, 0), at(10));
        assert_eq!(written, vec![Duration::from_millis(10)]);
        assert!(synced.is_empty());
        let (written, synced) = tracker.observe(positions(200, 200, 200), at(20));
        assert_eq!(written, vec![Duration::from_millis(15)]);
        assert_eq!(
            synced,
            vec![Duration::from_millis(20), Duration::from_millis(15)]
        );
    }
}
