//! Per-shard counters: written by the shard's thread once per batch,
//! read by anyone (control plane, metrics) at any time.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use kaelix_protocol::ErrorCode;

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
