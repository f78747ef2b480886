//! End-to-end latency: one remote consumer (kaelix-client's TCP fetch
//! consumer) per stream, reading what the benchmark's producers write.
//!
//! Every frame carries its message's intended send time (ns from the
//! benchmark's start) as its timestamp, so produce→consume latency is the
//! time the consumer got the record minus that, on the same clock. Records
//! of other producers are skipped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use kaelix_client::{Consumer, ConsumerConfig, StartOffset};

use super::load::{Plan, new_histogram};

/// Records taken per poll at most.
const POLL_RECORDS_MAX: usize = 8192;
/// How long one poll waits when caught up.
const POLL_WAIT: Duration = Duration::from_millis(20);

/// What one consumer measured.
#[derive(Debug)]
pub struct ConsumeReport {
    /// produce→consume latency (ns) of messages intended inside the window.
    pub latency: Histogram<u64>,
    /// Records of our producers consumed.
    pub consumed: u64,
    /// Of those, consumed inside the measurement window.
    pub consumed_in_window: u64,
}

/// A consumer positioned after the newest record of `stream_id`, before any
/// producer starts.
pub fn connect(fetch: SocketAddr, stream_id: u32) -> anyhow::Result<Consumer> {
    let config = ConsumerConfig {
        start: StartOffset::Latest,
        wait: POLL_WAIT,
        ..ConsumerConfig::new(stream_id)
    };
    let mut consumer = Consumer::remote(fetch, config)
        .with_context(|| format!("connecting a consumer of stream {stream_id} to {fetch}"))?;
    // The first poll fixes "latest" now, not when the producers already run.
    let _ = consumer.poll_wait(1, Duration::ZERO)?.count();
    Ok(consumer)
}

/// Consume until the producers are done (`producers_done`) and a poll finds
/// nothing new (caught up), or `deadline` passes.
pub fn run_consumer(
    mut consumer: Consumer,
    producer_ids: &[u32],
    plan: &Plan,
    producers_done: &AtomicBool,
    deadline: Instant,
) -> anyhow::Result<ConsumeReport> {
    let mut report = ConsumeReport {
        latency: new_histogram(),
        consumed: 0,
        consumed_in_window: 0,
    };
    loop {
        // Read before polling: a poll that started after the producers were
        // done and found nothing means everything was consumed.
        let done = producers_done.load(Ordering::Acquire);
        let records = consumer.poll(POLL_RECORDS_MAX)?;
        let mut ours = 0u64;
        let now = Instant::now();
        let now_ns = now.saturating_duration_since(plan.start).as_nanos() as u64;
        let in_window = now_ns >= plan.warmup_ns && now_ns < plan.end_ns;
        for record in records {
            let record = record?;
            if !producer_ids.contains(&record.producer_id) {
                continue;
            }
            ours += 1;
            report.consumed += 1;
            if in_window {
                report.consumed_in_window += 1;
            }
            let intended = record.timestamp_ns;
            if intended >= plan.warmup_ns && intended < plan.end_ns {
                report
                    .latency
                    .saturating_record(now_ns.saturating_sub(intended).max(1));
            }
        }
        if (done && ours == 0) || now >= deadline {
            return Ok(report);
        }
    }
}
