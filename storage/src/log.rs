//! The writer side: [`ShardLog`], batches, rolls, streams, retention.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kaelix_protocol::{DurabilityLevel, HEADER_LEN};
use zerocopy::IntoBytes;

use crate::config::{LogConfig, StreamConfig};
use crate::error::{AppendError, RetentionError, StreamError};
use crate::flusher::{Flusher, Syncer};
use crate::index::LogIndex;
use crate::layout::{BATCH_HEADER_LEN, BatchHeader, SEGMENT_HEADER_LEN, SegmentHeader, frame_len};
use crate::live::{Live, LiveSegment};
use crate::mem::{MetaPage, SegmentMemory, SegmentWriter, Slot};
use crate::reader::{FollowState, LogReader};
use crate::registry::{self, RegistryEntry};

/// The positions a log publishes (release/acquire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Positions {
    /// End of the last committed batch in the live copy.
    pub appended: u64,
    /// The disk copy holds everything below this (page cache; survives a process crash).
    pub written: u64,
    /// The disk copy is fsynced below this (survives power loss).
    pub synced: u64,
    /// A quorum of the replica set holds everything below in memory
    /// (`appended` when no replication is attached; see [`crate::replica`]).
    pub replicated: u64,
    /// A quorum of the replica set has everything below fsynced
    /// (`synced` when no replication is attached).
    pub replicated_synced: u64,
}

impl Positions {
    /// The position data must be below to count as durable at `level`.
    pub fn durable(&self, level: DurabilityLevel) -> u64 {
        match level {
            DurabilityLevel::Memory => self.appended,
            DurabilityLevel::Flush => self.written,
            DurabilityLevel::Fsync => self.synced,
            DurabilityLevel::Replicated => self.replicated,
            DurabilityLevel::ReplicatedFsync => self.replicated_synced,
        }
    }
}

/// What a committed batch got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Stream offset of the first frame.
    pub first_offset: u64,
    /// Stream offset of the last frame.
    pub last_offset: u64,
    /// Log position just past the batch: acknowledge when
    /// `durable_position(level) >= end_position`.
    pub end_position: u64,
}

/// A stream as the log knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream id.
    pub stream_id: u32,
    /// Its durability level.
    pub durability: DurabilityLevel,
    /// Oldest offset still stored (equal to `next_offset` when none is).
    pub first_offset: u64,
    /// Offset the next appended frame gets.
    pub next_offset: u64,
    /// The stream's own retention limits (none: only the shard log's apply).
    pub retention: StreamRetention,
}

/// Retention of one stream, on top of the shard log's.
///
/// The streams of a shard share one log whose segments retention deletes
/// whole, so a stream's own limits cannot free space by themselves: they
/// move the stream's first offset forward. Offsets below it are not served
/// (readers get [`crate::ReadError::OffsetRetained`]) and stay hidden after a
/// restart; the bytes go when the shard log's retention deletes their segment.
///
/// Limits are lower bounds, as in segment-based brokers: the stream keeps at
/// least its newest `bytes` of batches and everything younger than `age_ns`.
/// The first offset moves in steps taken by [`ShardLog::enforce_retention`]
/// (about once a second in the broker), so a little more may stay readable
/// for a while. Steps restart at open: what was appended before a restart
/// is hidden once `age_ns` has passed since, or once `bytes` were appended since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamRetention {
    /// Keep at least this many bytes of the stream's batches (headers included).
    pub bytes: Option<u64>,
    /// Keep at least what was appended within this many nanoseconds.
    pub age_ns: Option<u64>,
}

impl StreamRetention {
    /// True when neither limit is set.
    pub fn is_none(&self) -> bool {
        self.bytes.is_none() && self.age_ns.is_none()
    }
}

/// A point of a stream's history kept for its retention: everything below
/// `offset` was appended by `time_ns`, when the stream had `bytes_total` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetentionMark {
    pub offset: u64,
    pub bytes_total: u64,
    pub time_ns: u64,
}

/// Marks kept per stream at most; past that every other one is dropped
/// (coarser steps, never less kept).
pub(crate) const RETENTION_MARKS_MAX: usize = 1024;

/// What readers learn of the registered streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CatalogEntry {
    pub durability: DurabilityLevel,
    /// Offsets below are not served.
    pub first_offset: u64,
}

/// How much live memory a log holds (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveMemoryUsage {
    /// Live segments: the active one, sealed ones not yet released, and the
    /// one the flusher prepared ahead of the next roll.
    pub segments: u64,
    /// Their bytes (whole segments).
    pub bytes: u64,
    /// [`crate::LogConfig::live_memory_max_bytes`] in whole segments.
    pub limit_bytes: u64,
}

/// What [`ShardLog::enforce_retention`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of segment data deleted.
    pub bytes_deleted: u64,
    /// Log position of the oldest data kept.
    pub first_position: u64,
    /// Streams whose own retention moved their first offset.
    pub streams_trimmed: usize,
}

/// The writer's per-stream data.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WriterStream {
    pub registered: bool,
    pub durability: DurabilityLevel,
    /// Offsets below are not served: they belong to a deleted incarnation,
    /// or the stream's own retention hid them.
    pub first_offset: u64,
    /// The stream's own retention.
    pub retention: StreamRetention,
}

/// Seal of a segment: its final length (END record included).
#[derive(Debug)]
pub(crate) struct Seal {
    pub len: u64,
}

/// One segment: live or disk mapping, files, seal.
#[derive(Debug)]
pub(crate) struct SegmentHandle {
    pub number: u64,
    pub mem: Arc<SegmentMemory>,
    pub live_path: Option<PathBuf>,
    pub disk_path: PathBuf,
    pub index_path: PathBuf,
    pub seal: OnceLock<Seal>,
}

/// State shared by the writer, the flusher and the readers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub segments_dir: PathBuf,
    pub segment_size: u64,
    pub meta: MetaPage,
    /// Segments sorted by number.
    pub list: Mutex<VecDeque<Arc<SegmentHandle>>>,
    /// Bumped (release) after every change of `list`.
    pub generation: AtomicU64,
    pub flusher_taken: AtomicBool,
    /// A [`crate::Syncer`] runs the interval syncs (the flusher leaves them).
    pub syncer_taken: AtomicBool,
    /// Index settings, for the index files the flusher builds.
    pub index_interval_bytes: u32,
    pub time_interval_bytes: u32,
    /// How live segments are created (the flusher prepares the next one).
    pub live: Live,
    /// The next live segment, mapped (and prefaulted) ahead of the roll by the flusher.
    pub prepared: Mutex<Option<(u64, LiveSegment)>>,
    /// Registered streams as readers see them, replaced on every registry change.
    pub catalog: Mutex<HashMap<u32, CatalogEntry>>,
    /// Bumped (release) after every change of `catalog`.
    pub catalog_generation: AtomicU64,
    /// Segments in `list` with a live copy (stored by the writer only).
    pub live_segments: AtomicU64,
    /// At most this many live segments, the prepared one included.
    pub live_limit_segments: u64,
    /// Wakes a reader that waits for appends ([`crate::CommitPositions::wake_on_append`]).
    pub append_signal: AppendSignal,
}

/// What a reader waiting for the next append (the replication leader's
/// sessions) gets woken by: the writer calls the waker after publishing a
/// batch, only when a reader said it waits, so a busy writer pays one
/// atomic load per batch and the lock is taken once per wait at most.
#[derive(Default)]
pub(crate) struct AppendSignal {
    waiting: AtomicBool,
    waker: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for AppendSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendSignal")
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AppendSignal {
    /// Use `waker` from now on (replacing the previous one).
    pub fn set_waker(&self, waker: Option<Arc<dyn Fn() + Send + Sync>>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = waker;
    }

    /// A reader is about to wait: wake it at the next append. The caller
    /// checks the appended position again after this (the writer stores
    /// it before it looks here; both sides order with `SeqCst`).
    pub fn want_wake(&self) {
        self.waiting.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// After the writer published an append.
    pub fn appended(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) && self.waiting.swap(false, Ordering::SeqCst) {
            let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(waker) = waker {
                waker();
            }
        }
    }
}

impl Shared {
    pub fn positions(&self) -> Positions {
        crate::replica::load_positions(&self.meta)
    }

    pub fn disk_path(&self, number: u64) -> PathBuf {
        crate::live::segment_file_name(&self.segments_dir, number)
    }

    pub fn index_path(&self, number: u64) -> PathBuf {
        self.segments_dir.join(format!("{number:020}.idx"))
    }

    /// The prepared live segment if it is for `number`, under its final
    /// name (a stale one is dropped with its file).
    pub fn take_prepared(&self, number: u64) -> Option<LiveSegment> {
        let (prepared, (mem, path)) = self
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let Some(path) = path else {
            return (prepared == number).then_some((mem, None));
        };
        if prepared == number {
            let target = self
                .live
                .segment_path(number)
                .expect("shared backings have a dir");
            if fs::rename(&path, &target).is_ok() {
                return Some((mem, Some(target)));
            }
        }
        let _ = fs::remove_file(path);
        None
    }

    /// Live memory now: segments with a live copy and the prepared one.
    pub fn live_memory(&self) -> LiveMemoryUsage {
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let segments = self.live_segments.load(Ordering::Acquire) + u64::from(prepared);
        LiveMemoryUsage {
            segments,
            bytes: segments * self.segment_size,
            limit_bytes: self.live_limit_segments * self.segment_size,
        }
    }

    /// Map the live segment after the active one ahead of time, if not done
    /// yet and live memory has room for it (it counts against the limit).
    /// Called by the flusher, so the writer's roll only swaps mappings.
    pub fn prepare_next(&self) {
        if self.live_segments.load(Ordering::Acquire) >= self.live_limit_segments {
            // The writer's next roll releases what was synced meanwhile and
            // creates the segment itself.
            return;
        }
        let next = self.meta.load(Slot::ActiveSegment) + 1;
        {
            let prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
            if prepared.as_ref().is_some_and(|(number, _)| *number >= next) {
                return;
            }
        }
        // Errors are left for the writer's roll to report.
        if let Ok(segment) = self.live.create_segment_ahead(next, self.segment_size) {
            let stale = self
                .prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace((next, segment));
            if let Some((_, (_, Some(path)))) = stale {
                let _ = fs::remove_file(path);
            }
        }
    }

    pub fn lock_list(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<SegmentHandle>>> {
        // A panic while holding the lock leaves the list consistent (every
        // change is a single push, pop or replace), so poisoning is ignored.
        self.list
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) struct Active {
    pub number: u64,
    pub writer: SegmentWriter,
}

/// One interleaved log of many streams, owned by one data-plane thread.
///
/// Everything on `&mut self` is for the owner thread; other threads use a
/// [`LogReader`] and one [`Flusher`].
pub struct ShardLog {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: LogConfig,
    pub(crate) live: Live,
    pub(crate) index: LogIndex<WriterStream>,
    pub(crate) active: Active,
    pub(crate) registry_path: PathBuf,
    pub(crate) reader_state: Option<Arc<Mutex<FollowState>>>,
    pub(crate) shared_files: Vec<PathBuf>,
    /// History of streams with their own retention (see [`StreamRetention`]).
    pub(crate) retention_marks: HashMap<u32, VecDeque<RetentionMark>>,
    /// `(synced, next segment)` of the last release before a roll: a writer
    /// held back by the live memory limit does not rescan until either moves.
    pub(crate) live_released_at: Option<(u64, u64)>,
    pub(crate) _lock: File,
}

impl std::fmt::Debug for ShardLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLog")
            .field("dir", &self.config.dir)
            .field("backing", &self.live.backing)
            .field("active_segment", &self.active.number)
            .field("positions", &self.positions())
            .finish()
    }
}

impl ShardLog {
    /// Start a batch of frames for `stream_id`, stamped `now_ns`. Push frames,
    /// then [`BatchWriter::commit`]; dropping the batch discards it.
    #[inline]
    pub fn begin_batch(
        &mut self,
        stream_id: u32,
        now_ns: u64,
    ) -> Result<BatchWriter<'_>, AppendError> {
        let Some(slot) = self
            .index
            .streams
            .get(&stream_id)
            .filter(|slot| slot.meta.registered)
        else {
            return Err(AppendError::UnknownStream { stream_id });
        };
        let base_offset = slot.index.next_offset;
        let durability = slot.meta.durability;
        let start = self.active.writer.published();
        Ok(BatchWriter {
            log: self,
            stream_id,
            base_offset,
            durability,
            start,
            cursor: start + BATCH_HEADER_LEN,
            frames: 0,
            now_ns,
        })
    }

    /// Append `frames` (validated frames of `stream_id`) as one batch.
    pub fn append(
        &mut self,
        stream_id: u32,
        frames: &[&[u8]],
        now_ns: u64,
    ) -> Result<AppendOutcome, AppendError> {
        let mut batch = self.begin_batch(stream_id, now_ns)?;
        for frame in frames {
            batch.push(frame)?;
        }
        batch.commit()
    }

    /// The published positions.
    pub fn positions(&self) -> Positions {
        self.shared.positions()
    }

    /// The position below which data is durable at `level`.
    pub fn durable_position(&self, level: DurabilityLevel) -> u64 {
        self.positions().durable(level)
    }

    /// What backs the live segments.
    pub fn live_backing(&self) -> crate::LiveBacking {
        self.live.backing
    }

    /// Segment size in bytes.
    pub fn segment_size(&self) -> u64 {
        self.shared.segment_size
    }

    /// Live memory held now, and its limit.
    pub fn live_memory(&self) -> LiveMemoryUsage {
        self.shared.live_memory()
    }

    /// A reader for other threads (clones share one index that follows the log).
    pub fn reader(&mut self) -> LogReader {
        let state = self
            .reader_state
            .get_or_insert_with(|| {
                let index = self.index.map_meta(|_| ());
                let followed = self.shared.meta.load(Slot::Appended);
                Arc::new(Mutex::new(FollowState::new(index, followed)))
            })
            .clone();
        LogReader::new(self.shared.clone(), state)
    }

    /// The flusher, the first time (`None` after that: there is one per log).
    pub fn flusher(&self) -> Option<Flusher> {
        if self.shared.flusher_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Flusher::new(
            self.shared.clone(),
            self.config.flush_interval_ns,
            self.active.number * self.shared.segment_size,
        ))
    }

    /// The syncer, the first time (`None` after): from then on the interval
    /// syncs are its job and the [`Flusher`] only writes (see [`Syncer`]).
    /// Drive it from a thread of its own; at shutdown stop it, then call
    /// [`Flusher::sync_everything`] before the flusher's final polls.
    pub fn syncer(&self) -> Option<Syncer> {
        if self.shared.syncer_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Syncer::new(
            self.shared.clone(),
            self.config.flush_interval_ns,
        ))
    }

    /// Create a stream (persisted in the registry before this returns).
    /// A stream deleted before continues with fresh offsets, never reusing old ones.
    pub fn create_stream(
        &mut self,
        stream_id: u32,
        config: StreamConfig,
    ) -> Result<StreamInfo, StreamError> {
        self.create_streams(&[(stream_id, config)])?;
        Ok(self.stream_info(stream_id).expect("created above"))
    }

    /// Create a stream with its own retention (see [`StreamRetention`]), with
    /// one registry write.
    pub fn create_stream_with_retention(
        &mut self,
        stream_id: u32,
        config: StreamConfig,
        retention: StreamRetention,
    ) -> Result<StreamInfo, StreamError> {
        self.create_streams_retained(&[(stream_id, config, retention)])?;
        Ok(self.stream_info(stream_id).expect("created above"))
    }

    /// Create a stream on a replica of a shard whose leader decides the
    /// offsets (a replicated cluster), possibly after records of it arrived
    /// from the leader: they stay served. Its first offset is where the
    /// last incarnation of the id deleted in this log ended (0 when none
    /// was), not this log's next offset as [`ShardLog::create_stream`] does,
    /// so every replica serves the same records of it, however late it
    /// learns of the stream. Fails like `create_stream` when it exists.
    pub fn adopt_stream(
        &mut self,
        stream_id: u32,
        config: StreamConfig,
        retention: StreamRetention,
    ) -> Result<StreamInfo, StreamError> {
        self.create_streams_from(&[(stream_id, config, retention)], true)?;
        Ok(self.stream_info(stream_id).expect("created above"))
    }

    /// Create many streams with one registry write.
    pub fn create_streams(&mut self, streams: &[(u32, StreamConfig)]) -> Result<(), StreamError> {
        let streams: Vec<(u32, StreamConfig, StreamRetention)> = streams
            .iter()
            .map(|(id, config)| (*id, *config, StreamRetention::default()))
            .collect();
        self.create_streams_retained(&streams)
    }

    fn create_streams_retained(
        &mut self,
        streams: &[(u32, StreamConfig, StreamRetention)],
    ) -> Result<(), StreamError> {
        self.create_streams_from(streams, false)
    }

    /// Create streams; `adopt`: keep what the log holds of them beyond the
    /// last deleted incarnation (see [`ShardLog::adopt_stream`]).
    fn create_streams_from(
        &mut self,
        streams: &[(u32, StreamConfig, StreamRetention)],
        adopt: bool,
    ) -> Result<(), StreamError> {
        for (i, (stream_id, _, _)) in streams.iter().enumerate() {
            let registered = self
                .index
                .streams
                .get(stream_id)
                .is_some_and(|slot| slot.meta.registered);
            if registered || streams[..i].iter().any(|(other, _, _)| other == stream_id) {
                return Err(StreamError::Exists {
                    stream_id: *stream_id,
                });
            }
        }
        let mut previous = Vec::with_capacity(streams.len());
        for (stream_id, config, retention) in streams {
            let slot = self.index.streams.entry(*stream_id).or_default();
            previous.push((*stream_id, slot.meta));
            // A deleted incarnation's first offset is where it ended.
            let first_offset = if adopt {
                slot.meta.first_offset.min(slot.index.next_offset)
            } else {
                slot.index.next_offset
            };
            slot.meta = WriterStream {
                registered: true,
                durability: config.durability,
                first_offset,
                retention: *retention,
            };
            self.retention_marks.remove(stream_id);
        }
        self.save_registry().inspect_err(|_| {
            for (stream_id, meta) in previous {
                if let Some(slot) = self.index.streams.get_mut(&stream_id) {
                    slot.meta = meta;
                }
            }
        })?;
        self.publish_catalog();
        Ok(())
    }

    /// Change a stream's own retention; the next
    /// [`ShardLog::enforce_retention`] applies it.
    pub fn set_stream_retention(
        &mut self,
        stream_id: u32,
        retention: StreamRetention,
    ) -> Result<StreamInfo, StreamError> {
        let meta = self.registered_mut(stream_id)?;
        let previous = std::mem::replace(&mut meta.retention, retention);
        self.save_registry().inspect_err(|_| {
            if let Some(slot) = self.index.streams.get_mut(&stream_id) {
                slot.meta.retention = previous;
            }
        })?;
        Ok(self.stream_info(stream_id).expect("registered above"))
    }

    /// The writer's data of a registered stream.
    fn registered_mut(&mut self, stream_id: u32) -> Result<&mut WriterStream, StreamError> {
        self.index
            .streams
            .get_mut(&stream_id)
            .filter(|slot| slot.meta.registered)
            .map(|slot| &mut slot.meta)
            .ok_or(StreamError::Unknown { stream_id })
    }

    /// Publish the registered streams to readers.
    pub(crate) fn publish_catalog(&self) {
        let catalog: HashMap<u32, CatalogEntry> = self
            .index
            .streams
            .iter()
            .filter(|(_, slot)| slot.meta.registered)
            .map(|(id, slot)| {
                (
                    *id,
                    CatalogEntry {
                        durability: slot.meta.durability,
                        first_offset: slot.meta.first_offset,
                    },
                )
            })
            .collect();
        *self
            .shared
            .catalog
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = catalog;
        self.shared
            .catalog_generation
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Delete a stream: appends fail from now on, its data goes with retention.
    pub fn delete_stream(&mut self, stream_id: u32) -> Result<(), StreamError> {
        let slot = self
            .index
            .streams
            .get_mut(&stream_id)
            .filter(|slot| slot.meta.registered)
            .ok_or(StreamError::Unknown { stream_id })?;
        // Remember where this incarnation ended (see `adopt_stream`).
        let previous = slot.meta;
        slot.meta.registered = false;
        slot.meta.first_offset = slot.index.next_offset;
        self.save_registry().inspect_err(|_| {
            if let Some(slot) = self.index.streams.get_mut(&stream_id) {
                slot.meta = previous;
            }
        })?;
        self.retention_marks.remove(&stream_id);
        self.publish_catalog();
        Ok(())
    }

    /// A stream's settings and offsets.
    pub fn stream_info(&self, stream_id: u32) -> Option<StreamInfo> {
        let slot = self
            .index
            .streams
            .get(&stream_id)
            .filter(|slot| slot.meta.registered)?;
        Some(StreamInfo {
            stream_id,
            durability: slot.meta.durability,
            first_offset: slot
                .index
                .first_offset()
                .max(slot.meta.first_offset)
                .min(slot.index.next_offset),
            next_offset: slot.index.next_offset,
            retention: slot.meta.retention,
        })
    }

    /// Every registered stream, in no particular order.
    pub fn streams(&self) -> impl Iterator<Item = StreamInfo> + '_ {
        self.index
            .streams
            .iter()
            .filter(|(_, slot)| slot.meta.registered)
            .filter_map(|(id, _)| self.stream_info(*id))
    }

    /// Number of registered streams.
    pub fn stream_count(&self) -> usize {
        self.index
            .streams
            .values()
            .filter(|slot| slot.meta.registered)
            .count()
    }

    /// The registry as it should be on disk now: every stream, with its
    /// next offset as the floor below which offsets are used up.
    pub(crate) fn registry_bytes(&self) -> Vec<u8> {
        let entries: Vec<RegistryEntry> = self
            .index
            .streams
            .iter()
            .map(|(id, slot)| RegistryEntry {
                stream_id: *id,
                durability: slot.meta.durability,
                deleted: !slot.meta.registered,
                first_offset: slot.meta.first_offset,
                floor: slot.index.next_offset,
                retention: slot.meta.retention,
            })
            .collect();
        registry::encode(self.shared.segment_size, &entries)
    }

    fn save_registry(&self) -> Result<(), StreamError> {
        registry::write_atomic(&self.registry_path, &self.registry_bytes(), true).map_err(
            |source| StreamError::Registry {
                path: self.registry_path.clone(),
                source,
            },
        )
    }

    /// Seal the active segment and start a new one (also done when a batch does not fit).
    pub fn roll(&mut self, now_ns: u64) -> Result<(), AppendError> {
        self.roll_segment(now_ns).map(drop)
    }

    /// Roll; returns the old segment's writer so a batch in progress can move its frames.
    pub(crate) fn roll_segment(&mut self, now_ns: u64) -> Result<SegmentWriter, AppendError> {
        let size = self.shared.segment_size;
        let old_number = self.active.number;
        let number = old_number + 1;
        self.make_live_room(number)?;
        let prepared = self.shared.take_prepared(number);
        let (mem, live_path) = match prepared {
            Some(segment) => segment,
            None => self
                .live
                .create_segment(number, size)
                .map_err(|(path, err)| AppendError::Roll {
                    segment: number,
                    path,
                    reason: err.to_string(),
                })?,
        };
        let mut writer =
            SegmentWriter::take(mem.clone()).expect("a new writable mapping has no writer yet");
        writer.write(0, SegmentHeader::new(number, size, now_ns).as_bytes());
        writer.publish(SEGMENT_HEADER_LEN);

        let tail = self.active.writer.published();
        self.active
            .writer
            .write(tail, BatchHeader::end(now_ns).as_bytes());
        let sealed_len = tail + BATCH_HEADER_LEN;
        self.active.writer.publish(sealed_len);
        let handle = SegmentHandle {
            number,
            mem,
            live_path,
            disk_path: self.shared.disk_path(number),
            index_path: self.shared.index_path(number),
            seal: OnceLock::new(),
        };
        {
            let mut list = self.shared.lock_list();
            let old = list.back().expect("the active segment is listed");
            assert_eq!(old.number, old_number, "the active segment is the newest");
            old.seal
                .set(Seal {
                    len: sealed_len as u64,
                })
                .expect("a segment is sealed once");
            list.push_back(Arc::new(handle));
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.meta.store(Slot::ActiveSegment, number);
        self.shared
            .meta
            .store(Slot::Appended, number * size + SEGMENT_HEADER_LEN as u64);
        let live = self.shared.live_segments.load(Ordering::Relaxed);
        self.shared.live_segments.store(live + 1, Ordering::Release);
        let old = std::mem::replace(&mut self.active, Active { number, writer });
        Ok(old.writer)
    }

    /// Before a roll to segment `number`: release the live copies that may
    /// go, then check that one more live segment fits the limit. When it does
    /// not, ask the flusher to sync everything appended and fail.
    fn make_live_room(&mut self, number: u64) -> Result<(), AppendError> {
        let synced = self.shared.meta.load(Slot::Synced);
        if self.live_released_at != Some((synced, number)) {
            self.release_live_copies(number);
            self.live_released_at = Some((synced, number));
        }
        let live = self.shared.live_segments.load(Ordering::Relaxed);
        if live < self.shared.live_limit_segments {
            return Ok(());
        }
        let appended = self.shared.meta.load(Slot::Appended);
        if self.shared.meta.load(Slot::SyncRequest) < appended {
            self.shared.meta.store(Slot::SyncRequest, appended);
        }
        let size = self.shared.segment_size;
        Err(AppendError::LiveMemoryFull {
            live_bytes: live * size,
            limit_bytes: self.shared.live_limit_segments * size,
            appended,
            synced,
        })
    }

    /// Replace the live copy of old, fully synced segments by a read-only
    /// mapping of their disk copy and delete the live file. `active` is the
    /// active segment (or the one a roll is about to start): the newest
    /// `live_segments_max` up to it keep their live copy.
    fn release_live_copies(&mut self, active: u64) {
        let synced = self.shared.meta.load(Slot::Synced);
        let keep_from = (active + 1).saturating_sub(self.config.live_segments_max as u64);
        let candidates: Vec<Arc<SegmentHandle>> = self
            .shared
            .lock_list()
            .iter()
            .filter(|handle| {
                handle.number < keep_from && handle.mem.kind() != crate::mem::MapKind::ReadOnly
            })
            .filter(|handle| {
                handle.seal.get().is_some_and(|seal| {
                    synced >= handle.number * self.shared.segment_size + seal.len
                })
            })
            .cloned()
            .collect();
        let mut changed = false;
        for handle in candidates {
            let len = handle.seal.get().expect("filtered on seal").len;
            let Ok(file) = File::open(&handle.disk_path) else {
                continue;
            };
            let Ok(mem) = SegmentMemory::map_read_only(&file, len, len) else {
                continue;
            };
            let replacement = Arc::new(SegmentHandle {
                number: handle.number,
                mem: Arc::new(mem),
                live_path: None,
                disk_path: handle.disk_path.clone(),
                index_path: handle.index_path.clone(),
                seal: OnceLock::from(Seal { len }),
            });
            {
                let mut list = self.shared.lock_list();
                if let Some(slot) = list.iter_mut().find(|slot| slot.number == handle.number) {
                    *slot = replacement;
                    changed = true;
                }
            }
            if let Some(path) = &handle.live_path {
                let _ = fs::remove_file(path);
            }
        }
        if changed {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        let live = self
            .shared
            .lock_list()
            .iter()
            .filter(|handle| handle.mem.kind() != crate::mem::MapKind::ReadOnly)
            .count() as u64;
        self.shared.live_segments.store(live, Ordering::Release);
    }

    /// Change the retention limits while the log runs (the control plane's
    /// hot reload); the next [`ShardLog::enforce_retention`] applies them.
    pub fn set_retention(&mut self, retention_bytes: Option<u64>, retention_age_ns: Option<u64>) {
        self.config.retention_bytes = retention_bytes;
        self.config.retention_age_ns = retention_age_ns;
    }

    /// Move the first offset of streams with their own retention (see
    /// [`StreamRetention`]), then delete whole sealed, fully synced segments
    /// beyond the size limit or older than the age limit.
    pub fn enforce_retention(&mut self, now_ns: u64) -> Result<RetentionReport, RetentionError> {
        let streams_trimmed = self.enforce_stream_retention(now_ns)?;
        let mut report = self.enforce_log_retention(now_ns)?;
        report.streams_trimmed = streams_trimmed;
        Ok(report)
    }

    /// Streams' own retention: note where each stream is now, then move its
    /// first offset to the newest mark that is old enough or has enough
    /// bytes after it. Returns how many streams moved.
    fn enforce_stream_retention(&mut self, now_ns: u64) -> Result<usize, RetentionError> {
        let mut trimmed = 0;
        for (stream_id, slot) in self.index.streams.iter_mut() {
            let retention = slot.meta.retention;
            if !slot.meta.registered || retention.is_none() {
                continue;
            }
            let marks = self.retention_marks.entry(*stream_id).or_default();
            let next_offset = slot.index.next_offset;
            let bytes_total = slot.index.bytes_total;
            if marks.back().is_none_or(|mark| mark.offset < next_offset) {
                if marks.len() >= RETENTION_MARKS_MAX {
                    // Keep every other mark, the newest included.
                    let mut keep = marks.len().is_multiple_of(2);
                    marks.retain(|_| {
                        keep = !keep;
                        keep
                    });
                }
                marks.push_back(RetentionMark {
                    offset: next_offset,
                    bytes_total,
                    time_ns: now_ns,
                });
            }
            // The newest mark below which everything may go.
            let expendable = |mark: &RetentionMark| {
                let enough_after = retention
                    .bytes
                    .is_some_and(|keep| bytes_total - mark.bytes_total >= keep);
                let old_enough = retention
                    .age_ns
                    .is_some_and(|age| now_ns.saturating_sub(mark.time_ns) > age);
                enough_after || old_enough
            };
            let Some(at) = marks.iter().rposition(expendable) else {
                continue;
            };
            let floor = marks[at].offset;
            marks.drain(..at);
            if floor > slot.meta.first_offset {
                slot.meta.first_offset = floor;
                slot.index.start_at(floor);
                trimmed += 1;
            }
        }
        if trimmed > 0 {
            // Hidden offsets stay hidden after a restart.
            self.save_registry()
                .map_err(|err| self.registry_error(err))?;
            self.publish_catalog();
        }
        Ok(trimmed)
    }

    fn registry_error(&self, err: StreamError) -> RetentionError {
        match err {
            StreamError::Registry { path, source } => RetentionError::Registry { path, source },
            other => RetentionError::Registry {
                path: self.registry_path.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }

    /// Delete whole sealed, fully synced segments beyond the size limit or older than the age limit.
    fn enforce_log_retention(&mut self, now_ns: u64) -> Result<RetentionReport, RetentionError> {
        let size = self.shared.segment_size;
        let synced = self.shared.meta.load(Slot::Synced);
        let sealed: Vec<(u64, u64)> = self
            .shared
            .lock_list()
            .iter()
            .filter_map(|handle| handle.seal.get().map(|seal| (handle.number, seal.len)))
            .collect();
        let mut total: u64 =
            sealed.iter().map(|(_, len)| len).sum::<u64>() + self.active.writer.published() as u64;
        let mut doomed = Vec::new();
        for (number, len) in &sealed {
            if synced < number * size + len {
                break;
            }
            let over_size = self.config.retention_bytes.is_some_and(|max| total > max);
            let max_time = self
                .index
                .segments
                .iter()
                .find(|segment| segment.number == *number)
                .map_or(0, |segment| segment.max_time_ns);
            let too_old = self
                .config
                .retention_age_ns
                .is_some_and(|age| now_ns.saturating_sub(max_time) > age);
            if !(over_size || too_old) {
                break;
            }
            total -= len;
            doomed.push((*number, *len));
        }
        let Some(&(last_doomed, _)) = doomed.last() else {
            let first = self
                .shared
                .lock_list()
                .front()
                .map_or(0, |handle| handle.number);
            return Ok(RetentionReport {
                first_position: first * size + SEGMENT_HEADER_LEN as u64,
                ..RetentionReport::default()
            });
        };
        // Offsets in the doomed segments must stay used up after a restart.
        self.save_registry()
            .map_err(|err| self.registry_error(err))?;
        let first_number = last_doomed + 1;
        let removed: Vec<Arc<SegmentHandle>> = {
            let mut list = self.shared.lock_list();
            let mut removed = Vec::new();
            while list
                .front()
                .is_some_and(|handle| handle.number < first_number)
            {
                removed.extend(list.pop_front());
            }
            removed
        };
        self.shared.meta.store(Slot::FirstSegment, first_number);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let first_position = first_number * size;
        self.index.trim_before(first_position);
        let mut report = RetentionReport {
            segments_deleted: removed.len(),
            bytes_deleted: doomed.iter().map(|(_, len)| len).sum(),
            first_position: first_position + SEGMENT_HEADER_LEN as u64,
            streams_trimmed: 0,
        };
        for handle in removed {
            for path in [
                Some(&handle.disk_path),
                Some(&handle.index_path),
                handle.live_path.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(RetentionError::Delete {
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
        }
        self.release_live_copies(self.active.number);
        report.first_position = report.first_position.max(first_position);
        Ok(report)
    }
}

impl Drop for ShardLog {
    /// Closing: when no flusher was taken, copy what the disk copy lacks
    /// (best effort, no fsync). Then, if the disk copy has everything, delete
    /// the live files and the meta page; otherwise keep them for recovery
    /// (a flusher running elsewhere may still be behind).
    fn drop(&mut self) {
        self.shared
            .meta
            .store(Slot::State, crate::recovery::STATE_CLOSED);
        if let Some(mut flusher) = self.flusher() {
            let _ = flusher.poll(0);
        }
        // A prepared segment holds nothing: drop it and its file.
        let _ = self.shared.take_prepared(u64::MAX);
        let positions = self.positions();
        if positions.written < positions.appended {
            return;
        }
        for handle in self.shared.lock_list().iter() {
            if let Some(path) = &handle.live_path {
                let _ = fs::remove_file(path);
            }
        }
        for path in &self.shared_files {
            let _ = fs::remove_file(path);
        }
        if let Some(dir) = &self.live.dir {
            let _ = fs::remove_file(dir.join(crate::live::OWNER_FILE));
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A batch being appended: frames are copied straight into the live segment.
///
/// Nothing is visible to readers until [`BatchWriter::commit`]. If the
/// segment fills up, the batch moves to a new segment (a roll) on the fly.
#[derive(Debug)]
#[must_use = "a batch is discarded unless committed"]
pub struct BatchWriter<'a> {
    log: &'a mut ShardLog,
    stream_id: u32,
    base_offset: u64,
    durability: DurabilityLevel,
    start: usize,
    cursor: usize,
    frames: u32,
    now_ns: u64,
}

impl BatchWriter<'_> {
    /// Append one frame (a whole, already validated frame: header + payload).
    /// Cheap checks only: length against the header, stream id.
    #[inline]
    pub fn push(&mut self, frame: &[u8]) -> Result<(), AppendError> {
        let len = frame.len();
        let declared = frame_len(frame).unwrap_or(0);
        if len < HEADER_LEN || declared != len {
            return Err(AppendError::BadFrame { len, declared });
        }
        let stream = u32::from_le_bytes([frame[16], frame[17], frame[18], frame[19]]);
        if stream != self.stream_id {
            return Err(AppendError::StreamMismatch {
                expected: self.stream_id,
                found: stream,
            });
        }
        let size = self.log.shared.segment_size as usize;
        if self.cursor + len + BATCH_HEADER_LEN > size {
            self.move_to_new_segment(len)?;
        }
        self.log.active.writer.write(self.cursor, frame);
        self.cursor += len;
        self.frames += 1;
        Ok(())
    }

    #[cold]
    fn move_to_new_segment(&mut self, next_len: usize) -> Result<(), AppendError> {
        let size = self.log.shared.segment_size as usize;
        let pending = self.cursor - self.start - BATCH_HEADER_LEN;
        let max = size - SEGMENT_HEADER_LEN - 2 * BATCH_HEADER_LEN;
        if pending + next_len > max {
            return Err(AppendError::BatchTooLarge {
                bytes: BATCH_HEADER_LEN + pending + next_len,
                max: max + BATCH_HEADER_LEN,
            });
        }
        let old = self.log.roll_segment(self.now_ns)?;
        self.start = SEGMENT_HEADER_LEN;
        let body = SEGMENT_HEADER_LEN + BATCH_HEADER_LEN;
        if pending > 0 {
            let moved = old.unpublished(old.published(), pending);
            self.log.active.writer.write(body, moved);
        }
        self.cursor = body + pending;
        Ok(())
    }

    /// Frames pushed so far.
    pub fn frame_count(&self) -> u32 {
        self.frames
    }

    /// Stream offset the first frame gets.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Write the batch header and publish the batch (release).
    #[inline]
    pub fn commit(self) -> Result<AppendOutcome, AppendError> {
        if self.frames == 0 {
            return Err(AppendError::EmptyBatch {
                stream_id: self.stream_id,
            });
        }
        let log = self.log;
        let byte_len = (self.cursor - self.start - BATCH_HEADER_LEN) as u32;
        let header = BatchHeader::data(
            self.stream_id,
            self.frames,
            byte_len,
            self.base_offset,
            self.now_ns,
        );
        log.active.writer.write(self.start, header.as_bytes());
        debug_assert!(
            crate::layout::check_record(
                log.active
                    .writer
                    .unpublished(self.start, self.cursor - self.start)
            )
            .is_ok(),
            "a committed batch checks out"
        );
        let segment_base = log.active.number * log.shared.segment_size;
        log.index.observe(&header, segment_base + self.start as u64);
        log.active.writer.publish(self.cursor);
        let end_position = segment_base + self.cursor as u64;
        log.shared.meta.store(Slot::Appended, end_position);
        log.shared.append_signal.appended();
        if self.durability.local() == DurabilityLevel::Fsync {
            log.shared.meta.store(Slot::SyncRequest, end_position);
        }
        Ok(AppendOutcome {
            first_offset: self.base_offset,
            last_offset: self.base_offset + u64::from(self.frames) - 1,
            end_position,
        })
    }
}
