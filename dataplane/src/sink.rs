//! What the shard loop needs of a log: the seam between the data plane and
//! `kaelix-storage` (implemented for its `ShardLog` in [`crate::storage_sink`]),
//! and the place a replicated log will plug in later.

use kaelix_protocol::DurabilityLevel;

/// Why an append failed. The frame concerned was not appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The stream does not exist in this shard's log.
    #[error("stream {stream_id} does not exist")]
    UnknownStream {
        /// The stream asked for.
        stream_id: u32,
    },
    /// The log has no room left (disk full, or retention cannot free space).
    #[error("log full: {detail}")]
    Full {
        /// What ran out.
        detail: String,
    },
    /// Transient: the log's live memory is at its limit until the flusher
    /// syncs more (`kaelix-storage`'s `LiveMemoryFull`); retry later.
    /// Carries numbers only: built per rejected frame, it must not allocate.
    #[error("storage behind: {live_bytes} bytes of live memory, limit {limit_bytes}")]
    Overloaded {
        /// Live memory held.
        live_bytes: u64,
        /// The limit.
        limit_bytes: u64,
    },
    /// Any other storage failure.
    #[error("storage failure: {detail}")]
    Failed {
        /// What went wrong.
        detail: String,
    },
}

/// The appending side of a shard's log, owned by the shard's thread.
///
/// Per batch: [`LogSink::begin`], [`SinkBatch::push`] one or more times,
/// [`SinkBatch::commit`]; dropping a batch discards it. No call may
/// allocate, lock or make a system call in the common case (a segment roll may).
pub trait LogSink {
    /// A batch being appended; it borrows the log until committed or dropped.
    type Batch<'a>: SinkBatch
    where
        Self: 'a;

    /// The durability level of a stream, `None` when it does not exist.
    fn stream_level(&self, stream_id: u32) -> Option<DurabilityLevel>;

    /// Open a batch for `stream_id` at broker time `now_ns`.
    fn begin(&mut self, stream_id: u32, now_ns: u64) -> Result<Self::Batch<'_>, SinkError>;

    /// The log position durable at `level`.
    fn durable_position(&self, level: DurabilityLevel) -> u64;

    /// Periodic housekeeping (retention) at broker time `now_ns`; called about once a second.
    fn housekeeping(&mut self, now_ns: u64) -> Result<(), SinkError>;
}

/// A batch of one stream's frames being appended.
pub trait SinkBatch {
    /// Append one validated frame (header and payload as received); returns
    /// the stream offset it gets. On error the frame is not in the batch;
    /// frames pushed before it still are.
    fn push(&mut self, frame: &[u8]) -> Result<u64, SinkError>;

    /// Publish the batch; returns the log position it ends at (acknowledge it
    /// at a level once `durable_position(level)` reaches that). On error the
    /// whole batch is discarded: none of its frames become visible.
    fn commit(self) -> Result<u64, SinkError>;
}
