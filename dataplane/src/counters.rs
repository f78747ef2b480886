//! Per-shard counters and append-to-ACK latency histograms: written by the
//! shard's thread once per cycle, read by anyone (control plane, metrics) at
//! any time. Per-stream counts ([`StreamCounts`]) are plain integers in the
//! shard's [`crate::flow::FlowTable`], read through a shard command.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use kaelix_protocol::{DurabilityLevel, ErrorCode};

/// Upper bounds (inclusive, nanoseconds) of the ACK latency buckets; one
/// more bucket takes everything above the last (Prometheus `+Inf`).
pub const ACK_LATENCY_BUCKETS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets of a latency histogram, the overflow bucket included.
pub const LATENCY_BUCKETS: usize = ACK_LATENCY_BUCKETS_NS.len() + 1;

/// Latencies counted locally during one cycle (no atomics), published once.
#[derive(Debug, Default, Clone, Copy)]
pub struct LatencyCounts {
    /// Observations per bucket (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of the observations, nanoseconds.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl LatencyCounts {
    /// Count one latency of `ns` nanoseconds.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        let bucket = ACK_LATENCY_BUCKETS_NS.partition_point(|&bound| bound < ns);
        self.buckets[bucket] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }
}

/// A fixed-bucket latency histogram of relaxed atomics (lock-free, no allocation).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Add a cycle's observations.
    pub fn publish(&self, counts: &LatencyCounts) {
        if counts.count == 0 {
            return;
        }
        for (bucket, value) in self.buckets.iter().zip(counts.buckets) {
            if value != 0 {
                bucket.fetch_add(value, Ordering::Relaxed);
            }
        }
        self.sum_ns.fetch_add(counts.sum_ns, Ordering::Relaxed);
    }

    /// The observations so far; `count` is the sum of the buckets read, so
    /// the snapshot is consistent with itself even while the shard publishes.
    pub fn snapshot(&self) -> LatencyCounts {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        LatencyCounts {
            buckets,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            count: buckets.iter().sum(),
        }
    }
}

/// Counts of one stream on one shard, kept as plain integers by the shard's
/// thread (in its flow table) and read through a shard command.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamCounts {
    /// DATA frames appended.
    pub frames_appended: u64,
    /// Frame bytes (header and payload) appended.
    pub bytes_appended: u64,
    /// DATA frames dropped as duplicates.
    pub duplicates: u64,
    /// DATA frames dropped because an earlier sequence is missing.
    pub gaps: u64,
    /// Frames carrying the RETRANSMIT flag.
    pub retransmits_seen: u64,
    /// Rejected frames of this stream by reason, indexed by [`ErrorCode::index`].
    /// Frames whose header does not parse cannot be attributed to a stream
    /// and are counted per shard only.
    pub errors: [u64; ErrorCode::ALL.len()],
}

/// Counters of one shard. Each group sits on its own cache line.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// DATA frames appended.
    pub frames_appended: CachePadded<AtomicU64>,
    /// Payload + header bytes appended.
    pub bytes_appended: CachePadded<AtomicU64>,
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// DATA frames dropped as duplicates (already appended).
    pub duplicates: AtomicU64,
    /// DATA frames dropped because an earlier sequence is missing.
    pub gaps: AtomicU64,
    /// Frames carrying the RETRANSMIT flag.
    pub retransmits_seen: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// ACK frames sent.
    pub acks_sent: AtomicU64,
    /// ERROR frames sent.
    pub errors_sent: AtomicU64,
    /// Replies that could not be queued (transmit buffers full).
    pub replies_dropped: AtomicU64,
    /// Flows that skipped ahead on a heartbeat.
    pub flow_resyncs: AtomicU64,
    /// Busy-poll cycles that found nothing.
    pub idle_cycles: AtomicU64,
    /// Rejected frames by reason, indexed by [`ErrorCode::index`].
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Append-to-ACK latency per durability level, indexed by `level as usize`:
    /// from the start of the cycle that received a batch to its ACK being queued.
    pub ack_latency: [LatencyHistogram; DurabilityLevel::ALL.len()],
}

/// A shard's counters accumulated locally during one batch, published once.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchCounts {
    /// See [`ShardCounters::frames_appended`].
    pub frames_appended: u64,
    /// See [`ShardCounters::bytes_appended`].
    pub bytes_appended: u64,
    /// See [`ShardCounters::datagrams`].
    pub datagrams: u64,
    /// See [`ShardCounters::duplicates`].
    pub duplicates: u64,
    /// See [`ShardCounters::gaps`].
    pub gaps: u64,
    /// See [`ShardCounters::retransmits_seen`].
    pub retransmits_seen: u64,
    /// See [`ShardCounters::heartbeats`].
    pub heartbeats: u64,
    /// See [`ShardCounters::acks_sent`].
    pub acks_sent: u64,
    /// See [`ShardCounters::errors_sent`].
    pub errors_sent: u64,
    /// See [`ShardCounters::replies_dropped`].
    pub replies_dropped: u64,
    /// See [`ShardCounters::flow_resyncs`].
    pub flow_resyncs: u64,
    /// See [`ShardCounters::errors`].
    pub errors: [u64; ErrorCode::ALL.len()],
    /// See [`ShardCounters::ack_latency`].
    pub ack_latency: [LatencyCounts; DurabilityLevel::ALL.len()],
}

impl BatchCounts {
    /// Count one rejected frame.
    pub fn error(&mut self, code: ErrorCode) {
        self.errors[code.index()] += 1;
    }
}

impl ShardCounters {
    /// Add a batch's counts (relaxed: counters are statistics, not synchronisation).
    pub fn publish(&self, batch: &mut BatchCounts) {
        let add = |counter: &AtomicU64, value: u64| {
            if value != 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        };
        add(&self.frames_appended, batch.frames_appended);
        add(&self.bytes_appended, batch.bytes_appended);
        add(&self.datagrams, batch.datagrams);
        add(&self.duplicates, batch.duplicates);
        add(&self.gaps, batch.gaps);
        add(&self.retransmits_seen, batch.retransmits_seen);
        add(&self.heartbeats, batch.heartbeats);
        add(&self.acks_sent, batch.acks_sent);
        add(&self.errors_sent, batch.errors_sent);
        add(&self.replies_dropped, batch.replies_dropped);
        add(&self.flow_resyncs, batch.flow_resyncs);
        for (counter, value) in self.errors.iter().zip(batch.errors) {
            add(counter, value);
        }
        for (histogram, counts) in self.ack_latency.iter().zip(&batch.ack_latency) {
            histogram.publish(counts);
        }
        *batch = BatchCounts::default();
    }

    /// Rejections for one reason.
    pub fn error_count(&self, code: ErrorCode) -> u64 {
        self.errors[code.index()].load(Ordering::Relaxed)
    }

    /// Rejections for every reason.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_inclusive_buckets_and_publish_once() {
        let mut counts = LatencyCounts::default();
        for ns in [
            0,
            1_000,
            1_001,
            2_500,
            10_000_000_000,
            10_000_000_001,
            u64::MAX,
        ] {
            counts.record(ns);
        }
        assert_eq!(counts.buckets[0], 2, "0 and 1 µs are <= 1 µs");
        assert_eq!(counts.buckets[1], 2, "1.001 µs and 2.5 µs are <= 2.5 µs");
        assert_eq!(counts.buckets[LATENCY_BUCKETS - 2], 1, "10 s");
        assert_eq!(counts.buckets[LATENCY_BUCKETS - 1], 2, "above 10 s");
        assert_eq!(counts.count, 7);
        let shard = ShardCounters::default();
        let mut batch = BatchCounts {
            ack_latency: std::array::from_fn(|level| {
                if level == 0 {
                    counts
                } else {
                    LatencyCounts::default()
                }
            }),
            ..BatchCounts::default()
        };
        shard.publish(&mut batch);
        assert_eq!(batch.ack_latency[0].count, 0, "reset after publishing");
        let snapshot = shard.ack_latency[DurabilityLevel::Memory as usize].snapshot();
        assert_eq!(snapshot.buckets, counts.buckets);
        assert_eq!(snapshot.count, 7);
        assert_eq!(snapshot.sum_ns, u64::MAX, "the sum saturates");
        assert_eq!(
            shard.ack_latency[DurabilityLevel::Fsync as usize]
                .snapshot()
                .count,
            0
        );
    }
}
