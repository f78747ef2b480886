//! Requests to a shard's thread through its bounded command queue, with an
//! answer: stream create/delete/list and retention changes run between the
//! shard's batches with the log in hand, so they never race an append.

use std::time::Duration;

use kaelix_dataplane::counters::StreamCounts;
use kaelix_dataplane::flow::FlowTable;
use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{ShardLog, StreamConfig, StreamError, StreamInfo, StreamRetention};

use crate::broker::{Broker, ShardHandle};

/// How long a shard may take to run a command and answer.
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a shard did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardCallError {
    /// The queue was full or the shard is gone.
    #[error("{0}")]
    Unavailable(String),
    /// The shard took the command but did not answer in time.
    #[error("shard {shard} did not answer within {timeout:?}")]
    Timeout {
        /// Shard id.
        shard: u32,
        /// How long we waited.
        timeout: Duration,
    },
}

/// What a stream request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StreamOpError {
    /// The shard did not answer.
    #[error(transparent)]
    Shard(#[from] ShardCallError),
    /// The log refused.
    #[error(transparent)]
    Log(#[from] StreamError),
}

/// Submit `f` to `shard`'s thread; the receiver gets its result.
fn submit<T: Send + 'static>(
    shard: &ShardHandle,
    f: impl FnOnce(&mut ShardLog, &mut FlowTable) -> T + Send + 'static,
) -> Result<tokio::sync::oneshot::Receiver<T>, ShardCallError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    shard
        .submit(Box::new(move |log, flows| {
            // The caller may have given up waiting; the result is then dropped.
            let _ = tx.send(f(log, flows));
        }))
        .map_err(ShardCallError::Unavailable)?;
    Ok(rx)
}

/// Run `f` on `shard`'s thread and wait for its result (async).
pub async fn call<T: Send + 'static>(
    shard: &ShardHandle,
    f: impl FnOnce(&mut ShardLog, &mut FlowTable) -> T + Send + 'static,
) -> Result<T, ShardCallError> {
    let id = shard.id;
    let rx = submit(shard, f)?;
    match tokio::time::timeout(SHARD_ANSWER_TIMEOUT, rx).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(ShardCallError::Unavailable(format!(
            "shard {id} dropped the command (stopping?)"
        ))),
        Err(_) => Err(ShardCallError::Timeout {
            shard: id,
            timeout: SHARD_ANSWER_TIMEOUT,
        }),
    }
}

/// Run `f` on `shard`'s thread and wait for its result, blocking the
/// calling thread (not for use inside the async runtime).
pub fn call_blocking<T: Send + 'static>(
    shard: &ShardHandle,
    f: impl FnOnce(&mut ShardLog, &mut FlowTable) -> T + Send + 'static,
) -> Result<T, ShardCallError> {
    let id = shard.id;
    let (tx, rx) = crossbeam_channel::bounded(1);
    shard
        .submit(Box::new(move |log, flows| {
            let _ = tx.send(f(log, flows));
        }))
        .map_err(ShardCallError::Unavailable)?;
    match rx.recv_timeout(SHARD_ANSWER_TIMEOUT) {
        Ok(value) => Ok(value),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(ShardCallError::Timeout {
            shard: id,
            timeout: SHARD_ANSWER_TIMEOUT,
        }),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(ShardCallError::Unavailable(
            format!("shard {id} dropped the command (stopping?)"),
        )),
    }
}

/// Stream administration on a running broker, each request run on the
/// owning shard's thread.
impl Broker {
    /// Create `stream_id` on its shard.
    pub async fn create_stream(
        &self,
        stream_id: u32,
        durability: DurabilityLevel,
    ) -> Result<StreamInfo, StreamOpError> {
        self.create_stream_retained(stream_id, durability, StreamRetention::default())
            .await
    }

    /// Create `stream_id` on its shard with its own retention (see
    /// [`StreamRetention`]: it moves the stream's first offset forward).
    pub async fn create_stream_retained(
        &self,
        stream_id: u32,
        durability: DurabilityLevel,
        retention: StreamRetention,
    ) -> Result<StreamInfo, StreamOpError> {
        let shard = self.shard_of(stream_id);
        let created = call(shard, move |log, _flows| {
            log.create_stream_with_retention(stream_id, StreamConfig { durability }, retention)
        })
        .await?;
        Ok(created?)
    }

    /// Every stream's counts on one shard (plain integers the shard keeps in
    /// its flow table, copied on the shard's thread), sorted by stream id.
    pub async fn shard_stream_counts(
        &self,
        shard: &ShardHandle,
    ) -> Result<Vec<(u32, StreamCounts)>, ShardCallError> {
        call(shard, |_log, flows| {
            let mut counts: Vec<(u32, StreamCounts)> = flows
                .stream_counts()
                .map(|(id, counts)| (id, *counts))
                .collect();
            counts.sort_by_key(|(id, _)| *id);
            counts
        })
        .await
    }

    /// Delete `stream_id`: appends fail from now on and its flows are
    /// forgotten; its data goes with retention. Its offsets are never reused.
    pub async fn delete_stream(&self, stream_id: u32) -> Result<(), StreamOpError> {
        let shard = self.shard_of(stream_id);
        let deleted = call(shard, move |log, flows| {
            let result = log.delete_stream(stream_id);
            if result.is_ok() {
                flows.remove_stream(stream_id);
            }
            result
        })
        .await?;
        Ok(deleted?)
    }

    /// The streams of one shard, sorted by id.
    pub async fn shard_streams(
        &self,
        shard: &ShardHandle,
    ) -> Result<Vec<StreamInfo>, ShardCallError> {
        call(shard, |log, _flows| {
            let mut streams: Vec<StreamInfo> = log.streams().collect();
            streams.sort_by_key(|info| info.stream_id);
            streams
        })
        .await
    }

    /// One stream, or `None` when its shard has no such stream.
    pub async fn stream(&self, stream_id: u32) -> Result<Option<StreamInfo>, ShardCallError> {
        call(self.shard_of(stream_id), move |log, _flows| {
            log.stream_info(stream_id)
        })
        .await
    }

    /// Change every shard's retention limits (blocking; see [`call_blocking`]).
    pub fn set_retention_blocking(
        &self,
        retention_bytes: Option<u64>,
        retention_age_ns: Option<u64>,
    ) -> Result<(), ShardCallError> {
        for shard in self.shards() {
            call_blocking(shard, move |log, _flows| {
                log.set_retention(retention_bytes, retention_age_ns)
            })?;
        }
        Ok(())
    }
}
