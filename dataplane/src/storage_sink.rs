//! [`LogSink`] for `kaelix-storage`'s [`ShardLog`]: the data plane appends
//! straight into the hugepage-backed log.

use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{AppendError, BatchWriter, ShardLog};

use crate::sink::{LogSink, SinkBatch, SinkError};

fn sink_error(err: AppendError) -> SinkError {
    match err {
        AppendError::UnknownStream { stream_id } => SinkError::UnknownStream { stream_id },
        AppendError::LiveMemoryFull {
            live_bytes,
            limit_bytes,
            ..
        } => SinkError::Overloaded {
            live_bytes,
            limit_bytes,
        },
        AppendError::Roll { .. } | AppendError::BatchTooLarge { .. } => SinkError::Full {
            detail: err.to_string(),
        },
        other => SinkError::Failed {
            detail: other.to_string(),
        },
    }
}

/// A [`BatchWriter`] that counts its frames to report each one's offset.
pub struct StorageBatch<'a> {
    writer: BatchWriter<'a>,
}

impl SinkBatch for StorageBatch<'_> {
    #[inline]
    fn push(&mut self, frame: &[u8]) -> Result<u64, SinkError> {
        let offset = self.writer.base_offset() + u64::from(self.writer.frame_count());
        self.writer.push(frame).map_err(sink_error)?;
        Ok(offset)
    }

    #[inline]
    fn commit(self) -> Result<u64, SinkError> {
        self.writer
            .commit()
            .map(|outcome| outcome.end_position)
            .map_err(sink_error)
    }
}

impl LogSink for ShardLog {
    type Batch<'a> = StorageBatch<'a>;

    #[inline]
    fn stream_level(&self, stream_id: u32) -> Option<DurabilityLevel> {
        self.stream_info(stream_id).map(|info| info.durability)
    }

    #[inline]
    fn begin(&mut self, stream_id: u32, now_ns: u64) -> Result<StorageBatch<'_>, SinkError> {
        self.begin_batch(stream_id, now_ns)
            .map(|writer| StorageBatch { writer })
            .map_err(sink_error)
    }

    #[inline]
    fn durable_position(&self, level: DurabilityLevel) -> u64 {
        ShardLog::durable_position(self, level)
    }

    fn housekeeping(&mut self, now_ns: u64) -> Result<(), SinkError> {
        self.enforce_retention(now_ns)
            .map(drop)
            .map_err(|err| SinkError::Failed {
                detail: err.to_string(),
            })
    }
}
