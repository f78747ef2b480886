//! Reading: the walk over batch records shared by [`LogReader`] and
//! [`crate::Follower`], and the zero-copy [`ReadBatch`] iterator.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::error::ReadError;
use crate::index::{IndexEntry, LogIndex};
use crate::layout::{
    BATCH_HEADER_LEN, BatchHeader, KIND_END, SEGMENT_HEADER_LEN, check_header, frame_len,
};
use crate::log::{Positions, SegmentHandle, Shared};
use crate::mem::{SegmentMemory, Slot};

/// Segments a walk can look at.
pub(crate) trait SegmentSource {
    fn segment_size(&self) -> u64;
    /// The mapping of segment `number`, if present.
    fn memory(&self, number: u64) -> Option<&SegmentMemory>;
    /// The first present segment after `number`.
    fn next_number(&self, number: u64) -> Option<u64>;
}

/// A data batch found by [`next_batch`]: position, header, frame bytes.
pub(crate) type Found<'a> = (u64, BatchHeader, &'a [u8]);

/// The data batch at or after `position` (following end markers), with its
/// frame bytes, if it ends at or before `limit`.
pub(crate) fn next_batch<'a>(
    source: &'a dyn SegmentSource,
    mut position: u64,
    limit: u64,
) -> Result<Option<Found<'a>>, ReadError> {
    let size = source.segment_size();
    loop {
        if position + BATCH_HEADER_LEN as u64 > limit {
            return Ok(None);
        }
        let number = position / size;
        let offset = (position % size) as usize;
        let Some(mem) = source.memory(number) else {
            return Err(ReadError::Inconsistent {
                position,
                reason: format!("segment {number} is not mapped"),
            });
        };
        let Some(bytes) = mem.slice(offset, offset + BATCH_HEADER_LEN) else {
            return Err(ReadError::Inconsistent {
                position,
                reason: "batch header is not published".into(),
            });
        };
        let header = check_header(bytes).map_err(|fault| ReadError::Inconsistent {
            position,
            reason: fault.to_string(),
        })?;
        if header.kind == KIND_END {
            match source.next_number(number) {
                Some(next) => position = next * size + SEGMENT_HEADER_LEN as u64,
                None => return Ok(None),
            }
            continue;
        }
        let end = position + header.record_len() as u64;
        if end > limit {
            return Ok(None);
        }
        let frames_at = offset + BATCH_HEADER_LEN;
        let Some(frames) = mem.slice(frames_at, frames_at + header.byte_len.get() as usize) else {
            return Err(ReadError::Inconsistent {
                position,
                reason: "batch frames are not published".into(),
            });
        };
        return Ok(Some((position, header, frames)));
    }
}

/// Feed every batch in `[*followed, limit)` to `index`.
pub(crate) fn catch_up<M: Default>(
    source: &dyn SegmentSource,
    index: &mut LogIndex<M>,
    followed: &mut u64,
    limit: u64,
) -> Result<(), ReadError> {
    while let Some((position, header, _)) = next_batch(source, *followed, limit)? {
        index.observe(&header, position);
        *followed = position + header.record_len() as u64;
    }
    Ok(())
}

/// Where a read of `stream_id` from `from_offset` starts: the index of the
/// floor entry in `entries`.
pub(crate) fn start_entry(
    stream_id: u32,
    index: &crate::index::StreamIndex,
    from_offset: u64,
) -> Result<Option<usize>, ReadError> {
    if from_offset >= index.next_offset {
        return Ok(None);
    }
    let first_available = index.first_offset();
    if from_offset < first_available || index.entries.is_empty() {
        return Err(ReadError::OffsetRetained {
            stream_id,
            requested: from_offset,
            first_available,
        });
    }
    Ok(index.floor(from_offset))
}

/// One segment on its own, to index it.
struct OneSegment<'a> {
    mem: &'a SegmentMemory,
    number: u64,
    size: u64,
}

impl SegmentSource for OneSegment<'_> {
    fn segment_size(&self) -> u64 {
        self.size
    }

    fn memory(&self, number: u64) -> Option<&SegmentMemory> {
        (number == self.number).then_some(self.mem)
    }

    fn next_number(&self, _number: u64) -> Option<u64> {
        None
    }
}

/// The index file of sealed segment `number` (`sealed_len` bytes), built by
/// walking its batch headers with the one index implementation.
pub(crate) fn segment_index_file(
    mem: &SegmentMemory,
    number: u64,
    size: u64,
    sealed_len: u64,
    shared: &Shared,
) -> Result<Vec<u8>, ReadError> {
    let source = OneSegment { mem, number, size };
    let mut index: LogIndex<()> = LogIndex::new(
        size,
        shared.index_interval_bytes,
        shared.time_interval_bytes,
    );
    let base = number * size;
    let mut followed = base + SEGMENT_HEADER_LEN as u64;
    catch_up(&source, &mut index, &mut followed, base + sealed_len)?;
    Ok(index.encode_segment(number, sealed_len))
}

/// One frame read from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Stream offset of the frame.
    pub offset: u64,
    /// The frame exactly as appended (40-byte header + payload), borrowed from the mapping.
    pub bytes: &'a [u8],
}

/// Frames of one stream from an offset, zero-copy from the mappings.
///
/// Yields at least one frame when one is available, then stops before
/// `max_bytes` would be exceeded or at the position limit.
pub struct ReadBatch<'a> {
    source: &'a dyn SegmentSource,
    entries: &'a [IndexEntry],
    entry_at: usize,
    stream_id: u32,
    next_offset: u64,
    position: u64,
    limit: u64,
    budget: usize,
    used: usize,
    frames: &'a [u8],
    frame_offset: u64,
    frames_position: u64,
    done: bool,
}

impl std::fmt::Debug for ReadBatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBatch")
            .field("stream_id", &self.stream_id)
            .field("next_offset", &self.next_offset)
            .field("position", &self.position)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<'a> ReadBatch<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        source: &'a dyn SegmentSource,
        entries: &'a [IndexEntry],
        stream_id: u32,
        from_offset: u64,
        max_bytes: usize,
        limit: u64,
    ) -> Self {
        let position = entries.first().map_or(limit, |entry| entry.position);
        Self {
            source,
            entries,
            entry_at: 0,
            stream_id,
            next_offset: from_offset,
            position,
            limit,
            budget: max_bytes,
            used: 0,
            frames: &[],
            frame_offset: 0,
            frames_position: 0,
            done: entries.is_empty(),
        }
    }

    /// The offset to read from next time.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Frame bytes yielded so far.
    pub fn bytes_read(&self) -> usize {
        self.used
    }

    fn fail(&mut self, position: u64, reason: String) -> Option<Result<Record<'a>, ReadError>> {
        self.done = true;
        self.frames = &[];
        Some(Err(ReadError::Inconsistent { position, reason }))
    }
}

impl<'a> Iterator for ReadBatch<'a> {
    type Item = Result<Record<'a>, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if !self.frames.is_empty() {
                let Some(len) = frame_len(self.frames).filter(|len| *len <= self.frames.len())
                else {
                    return self.fail(self.frames_position, "frame runs past its batch".into());
                };
                let (frame, rest) = self.frames.split_at(len);
                let offset = self.frame_offset;
                if offset < self.next_offset {
                    self.frames = rest;
                    self.frame_offset += 1;
                    continue;
                }
                if self.used > 0 && self.used + len > self.budget {
                    self.done = true;
                    self.frames = &[];
                    return None;
                }
                self.frames = rest;
                self.frame_offset += 1;
                self.used += len;
                self.next_offset = offset + 1;
                return Some(Ok(Record {
                    offset,
                    bytes: frame,
                }));
            }
            if self.done || self.used >= self.budget {
                return None;
            }
            while let Some(entry) = self
                .entries
                .get(self.entry_at)
                .filter(|entry| entry.base_offset <= self.next_offset)
            {
                self.position = self.position.max(entry.position);
                self.entry_at += 1;
            }
            match next_batch(self.source, self.position, self.limit) {
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Ok(Some((position, header, frames))) => {
                    self.position = position + header.record_len() as u64;
                    if header.stream_id.get() != self.stream_id
                        || header.next_offset() <= self.next_offset
                    {
                        continue;
                    }
                    // Offsets below `base_offset` belong to a deleted incarnation or were never written.
                    self.next_offset = self.next_offset.max(header.base_offset.get());
                    self.frames = frames;
                    self.frame_offset = header.base_offset.get();
                    self.frames_position = position;
                }
            }
        }
    }
}

/// The index a reader group keeps by following the log.
#[derive(Debug)]
pub(crate) struct FollowState {
    index: LogIndex<()>,
    followed: u64,
    first_position: u64,
    /// The catalog generation whose first offsets are applied to `index`.
    catalog_generation: Option<u64>,
}

impl FollowState {
    pub fn new(index: LogIndex<()>, followed: u64) -> Self {
        Self {
            index,
            followed,
            first_position: 0,
            catalog_generation: None,
        }
    }

    /// Hide what the writer no longer serves: offsets below each stream's
    /// first offset (an older incarnation, the stream's own retention).
    /// A first offset beyond what this index has seen waits for the next call.
    fn apply_catalog(&mut self, shared: &Shared) {
        let generation = shared.catalog_generation.load(Ordering::Acquire);
        if self.catalog_generation == Some(generation) {
            return;
        }
        let catalog = shared
            .catalog
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut complete = true;
        for (stream_id, entry) in catalog.iter() {
            let Some(slot) = self.index.streams.get_mut(stream_id) else {
                continue;
            };
            if entry.first_offset > slot.index.next_offset {
                complete = false;
                continue;
            }
            slot.index.start_at(entry.first_offset);
        }
        if complete {
            self.catalog_generation = Some(generation);
        }
    }
}

/// The segments a reader sees, refreshed when the writer changes the list.
#[derive(Debug, Default)]
struct View {
    generation: u64,
    size: u64,
    handles: Vec<Arc<SegmentHandle>>,
}

impl SegmentSource for View {
    fn segment_size(&self) -> u64 {
        self.size
    }

    fn memory(&self, number: u64) -> Option<&SegmentMemory> {
        let at = self
            .handles
            .binary_search_by_key(&number, |handle| handle.number)
            .ok()?;
        Some(&self.handles[at].mem)
    }

    fn next_number(&self, number: u64) -> Option<u64> {
        let at = self
            .handles
            .partition_point(|handle| handle.number <= number);
        self.handles.get(at).map(|handle| handle.number)
    }
}

/// Reads streams by offset from another thread, zero-copy from the mappings.
///
/// `Send + Clone`. Clones share one index that follows the log (built by
/// the same code as the writer's); each clone has its own view of the
/// segments and a scratch buffer, so a clone per connection or task is the
/// intended use.
#[derive(Debug)]
pub struct LogReader {
    shared: Arc<Shared>,
    state: Arc<Mutex<FollowState>>,
    view: View,
    scratch: Vec<IndexEntry>,
}

impl Clone for LogReader {
    fn clone(&self) -> Self {
        Self::new(self.shared.clone(), self.state.clone())
    }
}

impl LogReader {
    pub(crate) fn new(shared: Arc<Shared>, state: Arc<Mutex<FollowState>>) -> Self {
        let size = shared.segment_size;
        Self {
            shared,
            state,
            view: View {
                generation: u64::MAX,
                size,
                handles: Vec::new(),
            },
            scratch: Vec::new(),
        }
    }

    /// The published positions.
    pub fn positions(&self) -> Positions {
        self.shared.positions()
    }

    /// Live memory the log holds now, and its limit.
    pub fn live_memory(&self) -> crate::LiveMemoryUsage {
        self.shared.live_memory()
    }

    /// Frames of `stream_id` from `from_offset`, at most about `max_bytes` of
    /// frames (at least one frame when any is available), never past
    /// `up_to_position` nor the appended position. Pass
    /// `durable_position(level)` or a replication commit position as the limit
    /// to serve only what is durable or committed, or `u64::MAX`.
    pub fn read(
        &mut self,
        stream_id: u32,
        from_offset: u64,
        max_bytes: usize,
        up_to_position: u64,
    ) -> Result<ReadBatch<'_>, ReadError> {
        let appended = self.shared.meta.load(Slot::Appended);
        let limit = up_to_position.min(appended);
        self.scratch.clear();
        let scratch = &mut self.scratch;
        let found = Self::with_index(
            &self.shared,
            &mut self.view,
            &self.state,
            appended,
            |index| {
                let Some(slot) = index.streams.get(&stream_id) else {
                    return Ok(());
                };
                if let Some(at) = start_entry(stream_id, &slot.index, from_offset)? {
                    let interval = index.index_interval_bytes.max(1) as usize;
                    let window = (max_bytes / interval + 4).min(4096);
                    let entries = &slot.index.entries[at..];
                    scratch.extend_from_slice(&entries[..entries.len().min(window)]);
                }
                Ok(())
            },
        );
        found?;
        Ok(ReadBatch::new(
            &self.view,
            &self.scratch,
            stream_id,
            from_offset,
            max_bytes,
            limit,
        ))
    }

    /// Refresh the view, then run `f` on the shared index once it followed
    /// the log up to `appended` (and forgot what retention deleted).
    fn with_index<T>(
        shared: &Shared,
        view: &mut View,
        state: &Mutex<FollowState>,
        appended: u64,
        f: impl FnOnce(&LogIndex<()>) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != view.generation {
            let list = shared.lock_list();
            view.handles.clear();
            view.handles.extend(list.iter().cloned());
            view.generation = generation;
        }
        let first_position = view
            .handles
            .first()
            .map_or(0, |handle| handle.number * shared.segment_size);
        let mut state = state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = &mut *state;
        if state.first_position < first_position {
            state.index.trim_before(first_position);
            state.first_position = first_position;
            state.followed = state
                .followed
                .max(first_position + SEGMENT_HEADER_LEN as u64);
        }
        catch_up(view, &mut state.index, &mut state.followed, appended)?;
        state.apply_catalog(shared);
        f(&state.index)
    }

    /// The durability level of `stream_id`, or `None` when the log has no
    /// such stream (never created, or deleted). Follows creations and
    /// deletions made after this reader was made.
    pub fn stream_level(&self, stream_id: u32) -> Option<kaelix_protocol::DurabilityLevel> {
        self.shared
            .catalog
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&stream_id)
            .map(|entry| entry.durability)
    }

    /// The first offset of `stream_id` and one past its last, as this reader knows them.
    pub fn stream_offsets(&mut self, stream_id: u32) -> Result<Option<(u64, u64)>, ReadError> {
        let appended = self.shared.meta.load(Slot::Appended);
        Self::with_index(
            &self.shared,
            &mut self.view,
            &self.state,
            appended,
            |index| {
                Ok(index
                    .streams
                    .get(&stream_id)
                    .map(|slot| (slot.index.first_offset(), slot.index.next_offset)))
            },
        )
    }

    /// The first offset of `stream_id` appended at or after `time_ns`, using
    /// the per-segment time index, or `None` if there is none yet.
    pub fn offset_for_time(
        &mut self,
        stream_id: u32,
        time_ns: u64,
    ) -> Result<Option<u64>, ReadError> {
        let appended = self.shared.meta.load(Slot::Appended);
        let start = Self::with_index(
            &self.shared,
            &mut self.view,
            &self.state,
            appended,
            |index| Ok(position_for_time(index, time_ns)),
        )?;
        let Some(mut position) = start else {
            return Ok(None);
        };
        while let Some((at, header, _)) = next_batch(&self.view, position, appended)? {
            if header.stream_id.get() == stream_id && header.append_time_ns.get() >= time_ns {
                return Ok(Some(header.base_offset.get()));
            }
            position = at + header.record_len() as u64;
        }
        Ok(None)
    }
}

/// A position from which every batch appended at or after `time_ns` lies ahead.
pub(crate) fn position_for_time<M>(index: &LogIndex<M>, time_ns: u64) -> Option<u64> {
    let segment = index
        .segments
        .iter()
        .find(|segment| segment.max_time_ns >= time_ns)?;
    let at = segment
        .time
        .partition_point(|entry| entry.time_ns < time_ns);
    // The entry before the first one at or past `time_ns` still precedes every such batch.
    let entry = segment.time.get(at.saturating_sub(1))?;
    Some(entry.position)
}
