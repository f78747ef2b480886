//! The one index implementation, used by the writer, the in-process readers,
//! the followers and recovery: per-stream sparse offset index, per-segment
//! time index, and the per-segment index files written when a segment is sealed.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::layout::BatchHeader;

/// A cheap hasher for `u32` stream ids (a multiply and a fold).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.0 = (self.0 ^ u64::from(value)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// Map keyed by stream id.
pub(crate) type StreamMap<V> = HashMap<u32, V, BuildHasherDefault<StreamIdHasher>>;

/// Stream offset -> log position of the batch that starts there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub base_offset: u64,
    pub position: u64,
}

/// The sparse offset index of one stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamIndex {
    /// Sorted by offset and by position.
    pub entries: Vec<IndexEntry>,
    /// One past the last offset seen.
    pub next_offset: u64,
    /// Position of the last batch seen (0: none; no batch sits at position 0).
    pub last_position: u64,
    /// Bytes of this stream since its last index entry.
    pub bytes_since_entry: u32,
    /// Bytes of this stream's batches (headers included) seen by this index.
    pub bytes_total: u64,
}

impl StreamIndex {
    /// The oldest offset still indexed, or `next_offset` when nothing is.
    pub fn first_offset(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.next_offset, |entry| entry.base_offset)
    }

    /// Hide offsets below `first_offset` (a deleted incarnation): drop their
    /// entries, keeping the last dropped position as the walk start for
    /// `first_offset` (walks skip batches below the offset they look for).
    pub fn start_at(&mut self, first_offset: u64) {
        let dropped = self
            .entries
            .partition_point(|entry| entry.base_offset < first_offset);
        if dropped == 0 {
            return;
        }
        let position = self.entries[dropped - 1].position;
        self.entries.drain(..dropped - 1);
        self.entries[0] = IndexEntry {
            base_offset: first_offset,
            position,
        };
    }

    /// Index of the last entry whose offset is `<= offset`.
    pub fn floor(&self, offset: u64) -> Option<usize> {
        self.entries
            .partition_point(|entry| entry.base_offset <= offset)
            .checked_sub(1)
    }
}

/// One stream: the owner's data `M` and its index.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamSlot<M> {
    pub meta: M,
    pub index: StreamIndex,
}

/// Time index entry: newest append time up to a batch -> that batch's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub time_ns: u64,
    pub position: u64,
}

/// What the index knows of one segment.
#[derive(Debug, Clone, Default)]
pub(crate) struct SegmentIndex {
    pub number: u64,
    /// Streams with at least one batch in this segment, in order of first appearance.
    pub streams: Vec<u32>,
    /// Sorted by position; `time_ns` never decreases.
    pub time: Vec<TimeEntry>,
    /// Newest append time in the segment.
    pub max_time_ns: u64,
    /// Batches in the segment.
    pub batches: u64,
}

/// Sparse offset and time indexes of a log.
#[derive(Debug, Clone)]
pub(crate) struct LogIndex<M> {
    pub segment_size: u64,
    pub index_interval_bytes: u32,
    pub time_interval_bytes: u32,
    pub streams: StreamMap<StreamSlot<M>>,
    /// Segments with batches, oldest first.
    pub segments: VecDeque<SegmentIndex>,
}

impl<M: Default> LogIndex<M> {
    pub fn new(segment_size: u64, index_interval_bytes: u32, time_interval_bytes: u32) -> Self {
        Self {
            segment_size,
            index_interval_bytes,
            time_interval_bytes,
            streams: StreamMap::default(),
            segments: VecDeque::new(),
        }
    }

    /// The same index with other owner data (readers start from the writer's).
    pub fn map_meta<N>(&self, mut f: impl FnMut(&M) -> N) -> LogIndex<N> {
        LogIndex {
            segment_size: self.segment_size,
            index_interval_bytes: self.index_interval_bytes,
            time_interval_bytes: self.time_interval_bytes,
            streams: self
                .streams
                .iter()
                .map(|(id, slot)| {
                    (
                        *id,
                        StreamSlot {
                            meta: f(&slot.meta),
                            index: slot.index.clone(),
                        },
                    )
                })
                .collect(),
            segments: self.segments.clone(),
        }
    }

    /// Record a data batch that starts at log `position`. Batches arrive in position order.
    pub fn observe(&mut self, header: &BatchHeader, position: u64) {
        let stream_id = header.stream_id.get();
        let time_ns = header.append_time_ns.get();
        let number = position / self.segment_size;
        let segment_base = number * self.segment_size;
        if self
            .segments
            .back()
            .is_none_or(|segment| segment.number != number)
        {
            debug_assert!(
                self.segments
                    .back()
                    .is_none_or(|segment| segment.number < number)
            );
            self.segments.push_back(SegmentIndex {
                number,
                ..SegmentIndex::default()
            });
        }
        let segment = self.segments.back_mut().expect("pushed above");
        let slot = self.streams.entry(stream_id).or_default();
        let index = &mut slot.index;
        let first_in_segment = index.last_position == 0 || index.last_position < segment_base;
        if first_in_segment {
            segment.streams.push(stream_id);
        }
        if first_in_segment || index.bytes_since_entry >= self.index_interval_bytes {
            index.entries.push(IndexEntry {
                base_offset: header.base_offset.get(),
                position,
            });
            index.bytes_since_entry = 0;
        }
        index.bytes_since_entry = index
            .bytes_since_entry
            .saturating_add(header.record_len() as u32);
        index.bytes_total += header.record_len() as u64;
        index.next_offset = index.next_offset.max(header.next_offset());
        index.last_position = position;
        segment.batches += 1;
        segment.max_time_ns = segment.max_time_ns.max(time_ns);
        let due = segment
            .time
            .last()
            .is_none_or(|last| position - last.position >= u64::from(self.time_interval_bytes));
        if due {
            segment.time.push(TimeEntry {
                time_ns: segment.max_time_ns,
                position,
            });
        }
    }

    /// Forget everything before log position `first_position` (retention).
    pub fn trim_before(&mut self, first_position: u64) {
        let first_number = first_position / self.segment_size;
        while self
            .segments
            .front()
            .is_some_and(|segment| segment.number < first_number)
        {
            self.segments.pop_front();
        }
        for slot in self.streams.values_mut() {
            let entries = &mut slot.index.entries;
            let keep = entries.partition_point(|entry| entry.position < first_position);
            if keep > 0 {
                entries.drain(..keep);
                entries.shrink_to_fit();
            }
        }
    }

    /// Encode the index file of segment `number`, sealed at `sealed_len`
    /// bytes. Call when `number` is the newest segment this index has seen
    /// (so each stream's `next_offset` is its end inside this segment): the
    /// flusher indexes each sealed segment on its own, recovery in order.
    pub fn encode_segment(&self, number: u64, sealed_len: u64) -> Vec<u8> {
        let base = number * self.segment_size;
        let end = base + self.segment_size;
        let empty = SegmentIndex {
            number,
            ..SegmentIndex::default()
        };
        let segment = self
            .segments
            .iter()
            .rev()
            .find(|segment| segment.number == number)
            .unwrap_or(&empty);
        let mut streams = Vec::with_capacity(segment.streams.len());
        let mut entries = Vec::new();
        for stream_id in &segment.streams {
            let Some(slot) = self.streams.get(stream_id) else {
                continue;
            };
            let all = &slot.index.entries;
            let from = all.partition_point(|entry| entry.position < base);
            let to = all.partition_point(|entry| entry.position < end);
            streams.push((
                *stream_id,
                (to - from) as u32,
                slot.index.next_offset,
                slot.index.last_position,
            ));
            entries.extend_from_slice(&all[from..to]);
        }
        let mut out = Vec::with_capacity(
            INDEX_HEADER_LEN + streams.len() * 24 + (entries.len() + segment.time.len()) * 16,
        );
        out.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // crc, filled below
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&number.to_le_bytes());
        out.extend_from_slice(&sealed_len.to_le_bytes());
        out.extend_from_slice(&(streams.len() as u32).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(segment.time.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&segment.max_time_ns.to_le_bytes());
        out.extend_from_slice(&segment.batches.to_le_bytes());
        debug_assert_eq!(out.len(), INDEX_HEADER_LEN);
        for (stream_id, count, next_offset, last_position) in streams {
            out.extend_from_slice(&stream_id.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&next_offset.to_le_bytes());
            out.extend_from_slice(&last_position.to_le_bytes());
        }
        for entry in entries {
            out.extend_from_slice(&entry.base_offset.to_le_bytes());
            out.extend_from_slice(&entry.position.to_le_bytes());
        }
        for entry in &segment.time {
            out.extend_from_slice(&entry.time_ns.to_le_bytes());
            out.extend_from_slice(&entry.position.to_le_bytes());
        }
        let crc = crc32fast::hash(&out[12..]);
        out[8..12].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Apply the index file of segment `number` (which must come after every
    /// segment applied so far). Checks everything before changing anything.
    pub fn apply_segment(
        &mut self,
        bytes: &[u8],
        number: u64,
        sealed_len: u64,
    ) -> Result<(), String> {
        let parsed = parse_segment_file(bytes, number, sealed_len, self.segment_size)?;
        let mut segment = SegmentIndex {
            number,
            streams: Vec::with_capacity(parsed.streams.len()),
            time: parsed.time,
            max_time_ns: parsed.max_time_ns,
            batches: parsed.batches,
        };
        let mut at = 0;
        for (stream_id, count, next_offset, last_position) in parsed.streams {
            let slot = self.streams.entry(stream_id).or_default();
            let entries = &parsed.entries[at..at + count as usize];
            at += count as usize;
            slot.index.entries.extend_from_slice(entries);
            slot.index.next_offset = slot.index.next_offset.max(next_offset);
            slot.index.last_position = last_position;
            slot.index.bytes_since_entry = 0;
            segment.streams.push(stream_id);
        }
        self.segments.push_back(segment);
        Ok(())
    }
}

const INDEX_MAGIC: u64 = u64::from_le_bytes(*b"KXIDX001");
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 64;

struct ParsedSegmentFile {
    streams: Vec<(u32, u32, u64, u64)>,
    entries: Vec<IndexEntry>,
    time: Vec<TimeEntry>,
    max_time_ns: u64,
    batches: u64,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn parse_segment_file(
    bytes: &[u8],
    number: u64,
    sealed_len: u64,
    segment_size: u64,
) -> Result<ParsedSegmentFile, String> {
    if bytes.len() < INDEX_HEADER_LEN {
        return Err(format!(
            "index file is {} bytes, header needs {INDEX_HEADER_LEN}",
            bytes.len()
        ));
    }
    if u64_at(bytes, 0) != INDEX_MAGIC {
        return Err("bad index magic".into());
    }
    let crc = crc32fast::hash(&bytes[12..]);
    if crc != u32_at(bytes, 8) {
        return Err(format!(
            "index crc mismatch: stored 0x{:08x}, computed 0x{crc:08x}",
            u32_at(bytes, 8)
        ));
    }
    if u32_at(bytes, 12) != INDEX_VERSION {
        return Err(format!("unsupported index version {}", u32_at(bytes, 12)));
    }
    if u64_at(bytes, 16) != number || u64_at(bytes, 24) != sealed_len {
        return Err(format!(
            "index is for segment {} sealed at {}, the segment is {number} sealed at {sealed_len}",
            u64_at(bytes, 16),
            u64_at(bytes, 24)
        ));
    }
    let stream_count = u32_at(bytes, 32) as usize;
    let entry_count = u32_at(bytes, 36) as usize;
    let time_count = u32_at(bytes, 40) as usize;
    let expected = INDEX_HEADER_LEN + stream_count * 24 + (entry_count + time_count) * 16;
    if bytes.len() != expected {
        return Err(format!(
            "index file is {} bytes, its counts need {expected}",
            bytes.len()
        ));
    }
    let base = number * segment_size;
    let in_segment = |position: u64| position >= base && position < base + sealed_len;
    let mut at = INDEX_HEADER_LEN;
    let mut streams = Vec::with_capacity(stream_count);
    let mut total = 0usize;
    for _ in 0..stream_count {
        let stream = (
            u32_at(bytes, at),
            u32_at(bytes, at + 4),
            u64_at(bytes, at + 8),
            u64_at(bytes, at + 16),
        );
        if stream.1 == 0 || !in_segment(stream.3) {
            return Err(format!(
                "index stream {} has no entries or a position outside the segment",
                stream.0
            ));
        }
        total += stream.1 as usize;
        streams.push(stream);
        at += 24;
    }
    if total != entry_count {
        return Err(format!(
            "index streams hold {total} entries, header says {entry_count}"
        ));
    }
    let mut entries = Vec::with_capacity(entry_count);
    for _ in 0..entry_count {
        let entry = IndexEntry {
            base_offset: u64_at(bytes, at),
            position: u64_at(bytes, at + 8),
        };
        if !in_segment(entry.position) {
            return Err(format!(
                "index entry position {} outside the segment",
                entry.position
            ));
        }
        entries.push(entry);
        at += 16;
    }
    let mut time = Vec::with_capacity(time_count);
    for _ in 0..time_count {
        let entry = TimeEntry {
            time_ns: u64_at(bytes, at),
            position: u64_at(bytes, at + 8),
        };
        if !in_segment(entry.position) {
            return Err(format!(
                "time entry position {} outside the segment",
                entry.position
            ));
        }
        time.push(entry);
        at += 16;
    }
    Ok(ParsedSegmentFile {
        streams,
        entries,
        time,
        max_time_ns: u64_at(bytes, 48),
        batches: u64_at(bytes, 56),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 2 * 1024 * 1024;

    fn batch(stream: u32, base: u64, count: u32, len: u32, time: u64) -> BatchHeader {
        BatchHeader::data(stream, count, len, base, time)
    }

    #[test]
    fn sparse_entries_first_in_segment_and_by_bytes() {
        let mut index: LogIndex<()> = LogIndex::new(SIZE, 1000, 1 << 20);
        index.observe(&batch(1, 0, 2, 400, 10), 64);
        index.observe(&batch(1, 2, 2, 400, 11), 504);
        index.observe(&batch(1, 4, 2, 400, 12), 944); // 880 bytes since entry: no entry
        index.observe(&batch(1, 6, 2, 400, 13), 1384); // 1320 >= 1000: entry
        index.observe(&batch(1, 8, 1, 40, 14), SIZE + 64); // new segment: entry
        let entries: Vec<u64> = index.streams[&1]
            .index
            .entries
            .iter()
            .map(|e| e.base_offset)
            .collect();
        assert_eq!(entries, [0, 6, 8]);
        assert_eq!(index.streams[&1].index.next_offset, 9);
        assert_eq!(index.streams[&1].index.floor(5), Some(0));
        assert_eq!(index.streams[&1].index.floor(7), Some(1));
        assert_eq!(index.segments.len(), 2);
        index.trim_before(SIZE);
        assert_eq!(index.streams[&1].index.first_offset(), 8);
        assert_eq!(index.segments.len(), 1);
    }

    #[test]
    fn segment_file_round_trip_and_rejects_damage() {
        let mut index: LogIndex<()> = LogIndex::new(SIZE, 0, 100);
        for i in 0..50u64 {
            index.observe(
                &batch((i % 3) as u32, i / 3 * 2, 2, 100, 1000 + i),
                64 + i * 140,
            );
        }
        let sealed = 64 + 50 * 140 + 40;
        let bytes = index.encode_segment(0, sealed);
        let mut loaded: LogIndex<()> = LogIndex::new(SIZE, 0, 100);
        loaded.apply_segment(&bytes, 0, sealed).unwrap();
        for stream in 0..3 {
            assert_eq!(
                loaded.streams[&stream].index.entries,
                index.streams[&stream].index.entries
            );
            assert_eq!(
                loaded.streams[&stream].index.next_offset,
                index.streams[&stream].index.next_offset
            );
        }
        assert_eq!(loaded.segments[0].time, index.segments[0].time);
        assert_eq!(loaded.segments[0].max_time_ns, 1049);
        assert!(loaded.apply_segment(&bytes, 0, sealed + 1).is_err());
        for at in [0, 9, 30, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                LogIndex::<()>::new(SIZE, 0, 100)
                    .apply_segment(&bad, 0, sealed)
                    .is_err(),
                "flip at {at}"
            );
        }
        assert!(
            LogIndex::<()>::new(SIZE, 0, 100)
                .apply_segment(&bytes[..bytes.len() - 16], 0, sealed)
                .is_err()
        );
    }
}
