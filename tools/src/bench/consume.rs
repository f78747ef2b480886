//! End-to-end latency: consumers reading what the benchmark's producers
//! write, one per stream and kind: kaelix-client's remote TCP fetch consumer
//! (`--fetch`) and its local consumer, which follows the broker's log
//! through the shared-memory mapping (`--local`).
//!
//! Every frame carries its message's intended send time (ns from the
//! benchmark's start) as its timestamp, so produce→consume latency is the
//! time the consumer got the record minus that, on the same clock. Records
//! of other producers are skipped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use kaelix_client::{Consumer, ConsumerConfig, StartOffset};
use kaelix_protocol::DurabilityLevel;

use super::load::{Plan, new_histogram};

/// Records taken per poll at most.
const POLL_RECORDS_MAX: usize = 8192;
/// How long one poll waits when caught up.
const POLL_WAIT: Duration = Duration::from_millis(20);

/// Where a consumer reads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The broker's TCP fetch port.
    Remote(SocketAddr),
    /// The broker's data directory on this host, followed through the
    /// mapped log; records are served once durable at `level`. With `spin`
    /// the consumer polls without waiting (a busy loop) instead of the
    /// client's wait (a few spins, then naps).
    Local {
        data_dir: PathBuf,
        level: DurabilityLevel,
        spin: bool,
    },
}

/// One consumer, positioned after the newest record of its stream.
#[derive(Debug)]
pub struct StreamConsumer {
    consumer: Consumer,
    wait: Duration,
}

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

/// A consumer of `stream_id` from `source`, positioned after the newest
/// record before any producer starts.
pub fn connect(source: &Source, stream_id: u32) -> anyhow::Result<StreamConsumer> {
    let config = ConsumerConfig {
        start: StartOffset::Latest,
        wait: POLL_WAIT,
        ..ConsumerConfig::new(stream_id)
    };
    let (mut consumer, wait) = match source {
        Source::Remote(fetch) => (
            Consumer::remote(*fetch, config).with_context(|| {
                format!("connecting a consumer of stream {stream_id} to {fetch}")
            })?,
            POLL_WAIT,
        ),
        Source::Local {
            data_dir,
            level,
            spin,
        } => (
            Consumer::local(
                data_dir,
                ConsumerConfig {
                    level: *level,
                    ..config
                },
            )
            .with_context(|| {
                format!(
                    "following stream {stream_id} in the broker's log under {}",
                    data_dir.display()
                )
            })?,
            if *spin { Duration::ZERO } else { POLL_WAIT },
        ),
    };
    // The first poll fixes "latest" now, not when the producers already run.
    let _ = consumer.poll_wait(1, Duration::ZERO)?.count();
    Ok(StreamConsumer { consumer, wait })
}

/// Consume until the producers are done (`producers_done`) and a poll finds
/// nothing new (caught up), or `deadline` passes.
pub fn run_consumer(
    stream: StreamConsumer,
    producer_ids: &[u32],
    plan: &Plan,
    producers_done: &AtomicBool,
    deadline: Instant,
) -> anyhow::Result<ConsumeReport> {
    let StreamConsumer { mut consumer, wait } = stream;
    let mut report = ConsumeReport {
        latency: new_histogram(),
        consumed: 0,
        consumed_in_window: 0,
    };
    // A spinning consumer's empty polls prove nothing by themselves: it has
    // caught up only once it also found nothing for this long.
    let settle = Duration::from_millis(20);
    let mut idle_since: Option<Instant> = None;
    loop {
        // Read before polling: a poll that started after the producers were
        // done and found nothing means everything was consumed.
        let done = producers_done.load(Ordering::Acquire);
        let records = consumer.poll_wait(POLL_RECORDS_MAX, wait)?;
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
        if now >= deadline {
            return Ok(report);
        }
        if done && ours == 0 {
            let since = *idle_since.get_or_insert(now);
            if wait >= settle || now.duration_since(since) >= settle {
                return Ok(report);
            }
        } else {
            idle_since = None;
        }
    }
}
