//! Replication support: the storage half of copying a shard log to other
//! brokers (the shard is the unit of replication; the transport lives in
//! the control plane).
//!
//! - **Commit positions.** Two more positions in the meta page,
//!   `replicated` (a quorum holds the data in memory) and
//!   `replicated_synced` (a quorum has it fsynced), serve the levels
//!   [`DurabilityLevel::Replicated`] and [`DurabilityLevel::ReplicatedFsync`]
//!   through [`crate::Positions::durable`] like the local ones. Until a
//!   replication layer attaches ([`CommitPositions::attach`]) a log is a
//!   replica set of one: `replicated` follows `appended` and
//!   `replicated_synced` follows `synced` (quorum of one). Once attached, the
//!   layer publishes the quorum positions and nothing else moves them.
//! - **Leader side.** [`RawReader::read_chunk`] hands out the log's records
//!   as they are stored (batch records and END markers, with their CRCs),
//!   from a position, never across a segment.
//! - **Follower side.** [`ShardLog::append_replica`] writes such records at
//!   exactly the leader's positions, after checking every CRC, so positions
//!   on leader and followers are the same numbers. An END marker rolls the
//!   follower to the next segment, as it did on the leader.
//! - **Catch-up.** A connecting follower describes its end
//!   ([`ShardLog::replica_tail`]); the leader answers with a
//!   [`CatchUp`] plan ([`RawReader::catch_up_plan`]): resume from the
//!   follower's position when its last record is the leader's record at that
//!   position, otherwise truncate. Truncation is by whole segments
//!   ([`truncate_segments`], on a closed log): opening a log always seals
//!   its last segment and continues in a fresh one, so a follower cannot
//!   continue inside a segment it had before a restart; it drops that
//!   segment and receives it again from its start.
//!
//! Known limits: the leader compares the follower's *last* record only (its
//! position and header CRC, which covers the leader's append time). A
//! divergent record in an earlier segment than the commit position's is not
//! detected (that needs per-batch leader epochs). A follower can catch up
//! only from data the leader still holds (no snapshot transfer).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use zerocopy::IntoBytes;

use crate::ShardLog;
use crate::error::AppendError;
use crate::layout::{
    BATCH_HEADER_LEN, BatchHeader, KIND_END, Record, SEGMENT_HEADER_LEN, check_header, check_record,
};
use crate::log::{Positions, SegmentHandle, Shared};
use crate::mem::{MetaPage, Slot};

const MODE_STANDALONE: u64 = 0;
const MODE_ATTACHED: u64 = 1;

/// The published positions, the replicated ones resolved by the mode.
pub(crate) fn load_positions(meta: &MetaPage) -> Positions {
    let appended = meta.load(Slot::Appended);
    let written = meta.load(Slot::Written);
    let synced = meta.load(Slot::Synced);
    let (replicated, replicated_synced) = if meta.load(Slot::ReplicaMode) == MODE_ATTACHED {
        (
            meta.load(Slot::Replicated),
            meta.load(Slot::ReplicatedSynced),
        )
    } else {
        (appended, synced)
    };
    Positions {
        appended,
        written,
        synced,
        replicated,
        replicated_synced,
    }
}

/// At open: no replication attached, no commit positions (a meta page file
/// may survive a crash with the previous run's values).
pub(crate) fn reset_meta(meta: &MetaPage) {
    meta.store(Slot::Replicated, 0);
    meta.store(Slot::ReplicatedSynced, 0);
    meta.store(Slot::ReplicaMode, MODE_STANDALONE);
}

/// Why a replication step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Records sent for another position than where this log ends.
    #[error("replica append at position {got}, but the log ends at {expected}")]
    PositionMismatch {
        /// Where this log ends.
        expected: u64,
        /// The position the records were sent for.
        got: u64,
    },
    /// A record that does not check out (header or frame CRC, counts).
    #[error("bad record at position {position}: {reason}")]
    BadRecord {
        /// Log position of the record.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A batch whose offsets go back below what the stream already has.
    #[error("stream {stream_id}: batch at offset {base_offset} but the stream is at {next_offset}")]
    OffsetRegression {
        /// The stream.
        stream_id: u32,
        /// The batch's first offset.
        base_offset: u64,
        /// The stream's next offset here.
        next_offset: u64,
    },
    /// A record that would not fit the segment where the leader put it.
    #[error("record of {len} bytes at position {position} does not fit its segment")]
    Overflow {
        /// Log position.
        position: u64,
        /// Record length.
        len: usize,
    },
    /// The roll after an END marker failed (live memory full, file error).
    #[error("roll after the end marker at position {position}: {source}")]
    Roll {
        /// Position of the END marker.
        position: u64,
        /// The failure.
        source: AppendError,
    },
    /// The position lies in a segment the log no longer (or not yet) has.
    #[error("position {position} is not in the log (first position {first_position})")]
    NotInLog {
        /// The position asked for.
        position: u64,
        /// The oldest position held.
        first_position: u64,
    },
    /// The directory is in use by an open log.
    #[error("log directory {path} is locked by an open log")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A file operation of a truncation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Where the replication layer publishes the quorum positions of a log
/// (`Send + Sync + Clone`; clones publish to the same log).
#[derive(Debug, Clone)]
pub struct CommitPositions {
    shared: Arc<Shared>,
}

impl CommitPositions {
    /// From now on the replicated levels follow [`CommitPositions::publish`]
    /// (starting from `replicated` and `replicated_synced`, capped like
    /// [`CommitPositions::publish`]; usually where the log was when it became leader).
    pub fn attach(&self, replicated: u64, replicated_synced: u64) {
        let meta = &self.shared.meta;
        meta.store(Slot::Replicated, replicated.min(meta.load(Slot::Appended)));
        meta.store(
            Slot::ReplicatedSynced,
            replicated_synced.min(meta.load(Slot::Synced)),
        );
        meta.store(Slot::ReplicaMode, MODE_ATTACHED);
    }

    /// Back to a replica set of one: the replicated levels follow the local
    /// `appended` and `synced` positions again.
    pub fn detach(&self) {
        self.shared.meta.store(Slot::ReplicaMode, MODE_STANDALONE);
    }

    /// True while a replication layer is attached.
    pub fn is_attached(&self) -> bool {
        self.shared.meta.load(Slot::ReplicaMode) == MODE_ATTACHED
    }

    /// Publish quorum positions (release; from any number of threads). Each
    /// only moves forward, and never beyond what the log has appended
    /// (synced for the second): a quorum counts the leader.
    pub fn publish(&self, replicated: u64, replicated_synced: u64) {
        let meta = &self.shared.meta;
        let replicated = replicated.min(meta.load(Slot::Appended));
        let replicated_synced = replicated_synced.min(meta.load(Slot::Synced));
        meta.fetch_max(Slot::Replicated, replicated);
        meta.fetch_max(Slot::ReplicatedSynced, replicated_synced);
    }

    /// The log's positions (the replicated ones as readers and acks see them).
    pub fn positions(&self) -> Positions {
        load_positions(&self.shared.meta)
    }

    /// Call `waker` (from the writer's thread, right after it published a
    /// batch) when a reader asked with [`CommitPositions::want_append_wake`];
    /// replaces the previous waker (`None`: none).
    pub fn wake_on_append(&self, waker: Option<Arc<dyn Fn() + Send + Sync>>) {
        self.shared.append_signal.set_waker(waker);
    }

    /// Wake the waker at the next append. Check the appended position
    /// after this call, before waiting: an append that came first does not
    /// wake it.
    pub fn want_append_wake(&self) {
        self.shared.append_signal.want_wake();
    }
}

/// The end of a replica's log, for the catch-up handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaTail {
    /// The appended position (where the next record goes).
    pub position: u64,
    /// The last record before it, data batch or END marker:
    /// `(position, header_crc)`; `None` for a log with no record.
    pub last_record: Option<(u64, u32)>,
}

/// What a leader answers a connecting follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// The follower's log is a prefix of the leader's: send from `from`.
    Resume {
        /// The follower's position.
        from: u64,
    },
    /// The follower must drop segments `segment..` ([`truncate_segments`])
    /// and ask again.
    Truncate {
        /// First segment to drop.
        segment: u64,
    },
    /// The leader no longer holds what the follower needs (retention).
    Unavailable {
        /// The leader's first position.
        first_position: u64,
    },
}

/// Reads a log's records as stored, for shipping to followers (`Send`).
/// Each clone keeps its own view of the segment list.
#[derive(Debug)]
pub struct RawReader {
    shared: Arc<Shared>,
    generation: u64,
    handles: Vec<Arc<SegmentHandle>>,
}

impl Clone for RawReader {
    fn clone(&self) -> Self {
        Self::new(self.shared.clone())
    }
}

/// Records read by [`RawReader::read_chunk`].
#[derive(Debug, Clone, Copy)]
pub struct RawChunk<'a> {
    /// Log position of the first byte.
    pub position: u64,
    /// Whole records (batch records, possibly ending with an END marker).
    pub bytes: &'a [u8],
    /// Position after the chunk: the next segment's first record position
    /// when the chunk ends with an END marker.
    pub next: u64,
    /// Data batches in the chunk.
    pub batches: u32,
}

impl RawReader {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            generation: u64::MAX,
            handles: Vec::new(),
        }
    }

    /// The log's published positions.
    pub fn positions(&self) -> Positions {
        load_positions(&self.shared.meta)
    }

    /// Segment size in bytes.
    pub fn segment_size(&self) -> u64 {
        self.shared.segment_size
    }

    fn refresh(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            let list = self.shared.lock_list();
            self.handles.clear();
            self.handles.extend(list.iter().cloned());
            self.generation = generation;
        }
    }

    fn handle(&self, number: u64) -> Option<&Arc<SegmentHandle>> {
        self.handles
            .binary_search_by_key(&number, |handle| handle.number)
            .ok()
            .map(|at| &self.handles[at])
    }

    /// The first position the log still holds.
    pub fn first_position(&mut self) -> u64 {
        self.refresh();
        let number = self.handles.first().map_or(0, |handle| handle.number);
        number * self.shared.segment_size + SEGMENT_HEADER_LEN as u64
    }

    /// Whole records from `from` (a record position), at most `max_bytes`
    /// of them (at least one record when one is there), within `from`'s
    /// segment and below the appended position. `Ok(None)` when nothing is
    /// appended at `from` yet. Checks batch header CRCs (not frame CRCs:
    /// the follower checks those).
    pub fn read_chunk(
        &mut self,
        from: u64,
        max_bytes: usize,
    ) -> Result<Option<RawChunk<'_>>, ReplicaError> {
        let appended = self.shared.meta.load(Slot::Appended);
        if from >= appended {
            return Ok(None);
        }
        self.refresh();
        let size = self.shared.segment_size;
        let number = from / size;
        let start = (from % size) as usize;
        let Some(handle) = self.handle(number) else {
            let first = self.handles.first().map_or(0, |handle| handle.number);
            return Err(ReplicaError::NotInLog {
                position: from,
                first_position: first * size + SEGMENT_HEADER_LEN as u64,
            });
        };
        if start < SEGMENT_HEADER_LEN {
            return Err(ReplicaError::BadRecord {
                position: from,
                reason: "not a record position (inside the segment header)".into(),
            });
        }
        let mem = &handle.mem;
        let mut at = start;
        let mut batches = 0u32;
        let mut next = None;
        while let Some(bytes) = mem.slice(at, at + BATCH_HEADER_LEN) {
            let header = check_header(bytes).map_err(|fault| ReplicaError::BadRecord {
                position: number * size + at as u64,
                reason: fault.to_string(),
            })?;
            let len = header.record_len();
            if at > start && at - start + len > max_bytes {
                break;
            }
            if mem.slice(at, at + len).is_none() {
                break;
            }
            at += len;
            if header.kind == KIND_END {
                next = Some((number + 1) * size + SEGMENT_HEADER_LEN as u64);
                break;
            }
            batches += 1;
        }
        if at == start {
            return Ok(None);
        }
        let bytes = mem
            .slice(start, at)
            .expect("checked record by record above");
        Ok(Some(RawChunk {
            position: from,
            bytes,
            next: next.unwrap_or(number * size + at as u64),
            batches,
        }))
    }

    /// The header of the record at `position`, if the log has one there.
    fn header_at(&mut self, position: u64) -> Option<BatchHeader> {
        self.refresh();
        let size = self.shared.segment_size;
        let handle = self.handle(position / size)?;
        let at = (position % size) as usize;
        let bytes = handle.mem.slice(at, at + BATCH_HEADER_LEN)?;
        check_header(bytes).ok()
    }

    /// Decide how a follower whose log ends at `tail` catches up, given the
    /// replication commit position `commit` (what a quorum has).
    pub fn catch_up_plan(&mut self, tail: &ReplicaTail, commit: u64) -> CatchUp {
        let size = self.shared.segment_size;
        let appended = self.shared.meta.load(Slot::Appended);
        let first_position = self.first_position();
        let first_segment = first_position / size;
        let segment = tail.position / size;
        let matches = tail.position <= appended
            && match tail.last_record {
                Some((position, crc)) => self.header_at(position).is_some_and(|header| {
                    // A recovery seal (an END marker of time 0) is the same
                    // bytes in every log: matching it proves nothing about
                    // what precedes it, so the follower drops its segment.
                    if header.kind == KIND_END && header.append_time_ns.get() == 0 {
                        return false;
                    }
                    let end = if header.kind == KIND_END {
                        (position / size + 1) * size + SEGMENT_HEADER_LEN as u64
                    } else {
                        position + header.record_len() as u64
                    };
                    header.header_crc.get() == crc && end == tail.position
                }),
                None => {
                    tail.position % size == SEGMENT_HEADER_LEN as u64
                        && self.handle(segment).is_some()
                }
            };
        if matches && segment >= first_segment {
            return CatchUp::Resume {
                from: tail.position,
            };
        }
        let mut truncate = tail.position.min(commit) / size;
        if let Some((position, _)) = tail.last_record {
            truncate = truncate.min(position / size);
        }
        if truncate < first_segment {
            return CatchUp::Unavailable { first_position };
        }
        CatchUp::Truncate { segment: truncate }
    }
}

/// What [`ShardLog::append_replica`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAppend {
    /// The log's appended position now.
    pub end_position: u64,
    /// Data batches written.
    pub batches: u32,
    /// The chunk ended with an END marker and the log rolled to the next segment.
    pub rolled: bool,
}

impl ShardLog {
    /// Publish the replication commit positions of this log (for the
    /// replication layer; see [`CommitPositions`]).
    pub fn commit_positions(&self) -> CommitPositions {
        CommitPositions {
            shared: self.shared.clone(),
        }
    }

    /// A reader of raw records, for shipping to followers (`Send`, for other threads).
    pub fn raw_reader(&self) -> RawReader {
        RawReader::new(self.shared.clone())
    }

    /// Where this log ends, for a follower's catch-up handshake.
    pub fn replica_tail(&self) -> ReplicaTail {
        let size = self.shared.segment_size;
        let base = self.active.number * size;
        let published = self.active.writer.published();
        let position = base + published as u64;
        if published > SEGMENT_HEADER_LEN {
            // Walk the active segment's records to its last one.
            let mut at = SEGMENT_HEADER_LEN;
            let mut last = None;
            while at < published {
                let bytes = self.active.writer.unpublished(at, BATCH_HEADER_LEN);
                let Ok(header) = check_header(bytes) else {
                    break;
                };
                last = Some((base + at as u64, header.header_crc.get()));
                at += header.record_len();
            }
            return ReplicaTail {
                position,
                last_record: last,
            };
        }
        // An empty active segment: the END marker of the one before, if any.
        let list = self.shared.lock_list();
        let previous = list
            .iter()
            .rev()
            .find(|handle| handle.number + 1 == self.active.number);
        let last_record = previous.and_then(|handle| {
            let len = handle.seal.get()?.len as usize;
            let at = len.checked_sub(BATCH_HEADER_LEN)?;
            let header = check_header(handle.mem.slice(at, len)?).ok()?;
            (header.kind == KIND_END)
                .then(|| (handle.number * size + at as u64, header.header_crc.get()))
        });
        ReplicaTail {
            position,
            last_record,
        }
    }

    /// Write records a leader read with [`RawReader::read_chunk`] at
    /// exactly `position`, which must be where this log ends. Every record
    /// is checked completely (header CRC, each frame's CRC, counts); a
    /// batch's offsets may skip ahead (the leader decides offsets) but
    /// never go back. An END marker (the chunk's last record) rolls to the
    /// next segment with the marker's time, as the leader's roll did.
    /// With `sync`, the flusher is asked to fdatasync up to the new end.
    ///
    /// On error, the records before the failing one are appended (the
    /// returned error says where); nothing of the failing one is.
    pub fn append_replica(
        &mut self,
        position: u64,
        bytes: &[u8],
        sync: bool,
    ) -> Result<ReplicaAppend, ReplicaError> {
        let size = self.shared.segment_size;
        let base = self.active.number * size;
        let expected = base + self.active.writer.published() as u64;
        if position != expected {
            return Err(ReplicaError::PositionMismatch {
                expected,
                got: position,
            });
        }
        let mut offset = self.active.writer.published();
        let mut read = 0;
        let mut batches = 0;
        let mut result = Ok(());
        let mut end_marker = None;
        while read < bytes.len() {
            let record_position = base + offset as u64;
            let header = match check_record(&bytes[read..]) {
                Ok(Record::Data(header)) => header,
                Ok(Record::End(header)) => {
                    if read + BATCH_HEADER_LEN != bytes.len() {
                        result = Err(ReplicaError::BadRecord {
                            position: record_position,
                            reason: "records after an END marker".into(),
                        });
                    } else {
                        end_marker = Some(header);
                    }
                    break;
                }
                Err(fault) => {
                    result = Err(ReplicaError::BadRecord {
                        position: record_position,
                        reason: fault.to_string(),
                    });
                    break;
                }
            };
            let len = header.record_len();
            if offset + len + BATCH_HEADER_LEN > size as usize {
                result = Err(ReplicaError::Overflow {
                    position: record_position,
                    len,
                });
                break;
            }
            let stream_id = header.stream_id.get();
            let next_offset = self
                .index
                .streams
                .get(&stream_id)
                .map_or(0, |slot| slot.index.next_offset);
            if header.base_offset.get() < next_offset {
                result = Err(ReplicaError::OffsetRegression {
                    stream_id,
                    base_offset: header.base_offset.get(),
                    next_offset,
                });
                break;
            }
            self.active.writer.write(offset, &bytes[read..read + len]);
            self.index.observe(&header, record_position);
            offset += len;
            read += len;
            batches += 1;
        }
        self.active.writer.publish(offset);
        let mut end_position = base + offset as u64;
        self.shared.meta.store(Slot::Appended, end_position);
        let mut rolled = false;
        if let (Ok(()), Some(end)) = (&result, end_marker) {
            self.roll_segment(end.append_time_ns.get())
                .map_err(|source| ReplicaError::Roll {
                    position: end_position,
                    source,
                })?;
            debug_assert_eq!(
                self.shared.lock_list().iter().rev().nth(1).map(|handle| {
                    let len = handle.seal.get().map_or(0, |seal| seal.len) as usize;
                    handle
                        .mem
                        .slice(len - BATCH_HEADER_LEN, len)
                        .map(<[u8]>::to_vec)
                }),
                Some(Some(end.as_bytes().to_vec())),
                "the roll wrote the leader's END marker"
            );
            rolled = true;
            end_position = self.shared.meta.load(Slot::Appended);
        }
        if sync && self.shared.meta.load(Slot::SyncRequest) < end_position {
            self.shared.meta.store(Slot::SyncRequest, end_position);
        }
        result.map(|()| ReplicaAppend {
            end_position,
            batches,
            rolled,
        })
    }
}

/// Drop segments `from_segment..` of the closed log in `dir` (disk copies,
/// index files, live copies left by a crash), so that opening it continues
/// with a fresh segment after the last one kept, and forget the streams'
/// offset floors, so their offsets continue from the data kept (a follower
/// receives the leader's offsets again). Fails with [`ReplicaError::Locked`]
/// while a [`ShardLog`] has the directory open. Returns the segments dropped.
pub fn truncate_segments(dir: &Path, from_segment: u64) -> Result<Vec<u64>, ReplicaError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplicaError::Io {
            action,
            path,
            source,
        }
    };
    let lock_path = dir.join("lock");
    // Held until the truncation is done (dropped at the end of the function).
    let _lock = crate::mem::lock_dir(&lock_path).map_err(|err| match err {
        crate::mem::DirLockError::Open(source) => io("opening", &lock_path)(source),
        crate::mem::DirLockError::Held => ReplicaError::Locked {
            path: lock_path.clone(),
        },
    })?;
    let segments_dir = dir.join("segments");
    let mut dropped = Vec::new();
    if segments_dir.is_dir() {
        for number in
            crate::live::list_segments(&segments_dir).map_err(io("listing", &segments_dir))?
        {
            if number < from_segment {
                continue;
            }
            let seg = crate::live::segment_file_name(&segments_dir, number);
            let idx = segments_dir.join(format!("{number:020}.idx"));
            for path in [seg, idx] {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ReplicaError::Io {
                            action: "removing",
                            path,
                            source,
                        });
                    }
                }
            }
            dropped.push(number);
        }
    }
    // Live copies a crashed writer left (recovery would use them).
    let info_path = dir.join(crate::recovery::LIVE_INFO_FILE);
    if let Some(live_dir) = fs::read_to_string(&info_path)
        .ok()
        .and_then(|text| text.lines().next().map(PathBuf::from))
        && let Ok(numbers) = crate::live::list_segments(&live_dir)
    {
        for number in numbers.into_iter().filter(|number| *number >= from_segment) {
            let path = crate::live::segment_file_name(&live_dir, number);
            fs::remove_file(&path).map_err(io("removing", &path))?;
            if !dropped.contains(&number) {
                dropped.push(number);
            }
        }
    }
    let registry_path = dir.join("streams.reg");
    match fs::read(&registry_path) {
        Ok(bytes) => {
            let (segment_size, mut entries) =
                crate::registry::decode(&bytes).map_err(|reason| ReplicaError::Io {
                    action: "decoding",
                    path: registry_path.clone(),
                    source: std::io::Error::other(reason),
                })?;
            for entry in &mut entries {
                entry.floor = 0;
            }
            crate::registry::write_atomic(
                &registry_path,
                &crate::registry::encode(segment_size, &entries),
                true,
            )
            .map_err(io("writing", &registry_path))?;
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ReplicaError::Io {
                action: "reading",
                path: registry_path,
                source,
            });
        }
    }
    dropped.sort_unstable();
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kaelix_protocol::DurabilityLevel;

    use super::*;
    use crate::tests::{config, frame};
    use crate::{LogConfig, StreamConfig, StreamError, StreamRetention};

    const STREAM: u32 = 4;

    fn open(config: LogConfig) -> ShardLog {
        let (mut log, _) = ShardLog::open(config).unwrap();
        if log.stream_info(STREAM).is_none() {
            log.create_stream(
                STREAM,
                StreamConfig {
                    durability: DurabilityLevel::Replicated,
                },
            )
            .unwrap();
        }
        log
    }

    /// Append `batches` batches of 8 frames of 4 KiB (rolls every ~60 batches).
    fn append(log: &mut ShardLog, seq: &mut u64, batches: usize, now_ns: u64) -> u64 {
        let mut end = 0;
        for _ in 0..batches {
            let frames: Vec<Vec<u8>> = (0..8)
                .map(|_| {
                    *seq += 1;
                    frame(STREAM, *seq, 4096)
                })
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            end = log.append(STREAM, &refs, now_ns).unwrap().end_position;
        }
        end
    }

    /// Ship everything from the follower's end to the leader's.
    fn replicate(leader: &mut RawReader, follower: &mut ShardLog) -> u32 {
        let mut batches = 0;
        let mut from = follower.replica_tail().position;
        while let Some(chunk) = leader.read_chunk(from, 256 * 1024).unwrap() {
            let done = follower
                .append_replica(chunk.position, chunk.bytes, false)
                .unwrap();
            assert_eq!(done.end_position, chunk.next);
            batches += done.batches;
            from = chunk.next;
        }
        batches
    }

    /// Every segment's disk copy, after both logs flushed: records, segment
    /// number and size (a segment header's creation time is its own: a
    /// follower's segment made fresh by opening the log has time 0).
    fn segment_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir.join("segments"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let mut bytes = fs::read(&path).unwrap();
                bytes[32..SEGMENT_HEADER_LEN].fill(0); // created_ns, reserved
                bytes[8..12].fill(0); // header CRC (covers created_ns)
                (name, bytes)
            })
            .collect();
        files.sort();
        files
    }

    /// A leader's and a follower's log, each in a temporary directory of
    /// its own, with their flushers.
    fn pair() -> (
        tempfile::TempDir,
        tempfile::TempDir,
        ShardLog,
        ShardLog,
        crate::Flusher,
        crate::Flusher,
    ) {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(config(a.path()));
        let follower = open(config(b.path()));
        let leader_flusher = leader.flusher().unwrap();
        let follower_flusher = follower.flusher().unwrap();
        (a, b, leader, follower, leader_flusher, follower_flusher)
    }

    /// Copy everything to the disk copy (flushers taken at open).
    fn flush(flushers: &mut [&mut crate::Flusher]) {
        for flusher in flushers {
            flusher.poll(u64::MAX / 2).unwrap();
        }
    }

    #[test]
    fn a_follower_holds_the_leaders_bytes_at_the_same_positions() {
        let (a, b, mut leader, mut follower, mut leader_flusher, mut follower_flusher) = pair();
        let mut raw = leader.raw_reader();
        let mut seq = 0;
        // Three segments and a bit: rolls travel as END markers.
        let end = append(&mut leader, &mut seq, 200, 1_000);
        assert_eq!(replicate(&mut raw, &mut follower), 200);
        assert_eq!(follower.positions().appended, end);
        assert_eq!(follower.replica_tail().position, end);
        let end = append(&mut leader, &mut seq, 5, 2_000);
        assert_eq!(replicate(&mut raw, &mut follower), 5);
        assert_eq!(follower.positions().appended, end);
        assert_eq!(
            follower.stream_info(STREAM).unwrap().next_offset,
            leader.stream_info(STREAM).unwrap().next_offset
        );
        // Readable through the follower's own reader, same offsets and bytes.
        let mut reader = follower.reader();
        let records: Vec<_> = reader
            .read(STREAM, 1000, 1 << 20, u64::MAX)
            .unwrap()
            .map(|record| record.unwrap().bytes.to_vec())
            .take(3)
            .collect();
        assert_eq!(records[0], frame(STREAM, 1001, 4096));
        flush(&mut [&mut leader_flusher, &mut follower_flusher]);
        let (left, right) = (segment_files(a.path()), segment_files(b.path()));
        assert_eq!(left.len(), 4);
        assert!(left == right, "segment files differ");
        // Without restarts even the segment headers are the same bytes.
        for (name, _) in &left {
            let path = |dir: &Path| dir.join("segments").join(name);
            assert!(fs::read(path(a.path())).unwrap() == fs::read(path(b.path())).unwrap());
        }
    }

    #[test]
    fn append_replica_checks_position_and_crcs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = open(config(a.path()));
        let mut follower = open(config(b.path()));
        let mut raw = leader.raw_reader();
        let mut seq = 0;
        append(&mut leader, &mut seq, 2, 1_000);
        let chunk = raw.read_chunk(64, 1 << 20).unwrap().unwrap();
        assert_eq!(chunk.batches, 2);
        let err = follower
            .append_replica(chunk.position + 8, chunk.bytes, false)
            .unwrap_err();
        assert!(matches!(
            err,
            ReplicaError::PositionMismatch {
                expected: 64,
                got: 72
            }
        ));
        // One flipped payload byte in the second batch: the first is kept.
        let mut damaged = chunk.bytes.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let err = follower.append_replica(64, &damaged, false).unwrap_err();
        let first_len = chunk.bytes.len() / 2;
        assert!(
            matches!(err, ReplicaError::BadRecord { position, .. } if position == 64 + first_len as u64),
            "{err}"
        );
        assert_eq!(follower.positions().appended, 64 + first_len as u64);
        // The rest, undamaged, from where the follower is.
        let rest = &chunk.bytes[first_len..];
        follower
            .append_replica(64 + first_len as u64, rest, false)
            .unwrap();
        assert_eq!(follower.positions().appended, leader.positions().appended);
        // A batch already there again goes back in offsets: refused.
        let err = follower
            .append_replica(follower.positions().appended, rest, false)
            .unwrap_err();
        assert!(
            matches!(err, ReplicaError::OffsetRegression { .. }),
            "{err}"
        );
    }

    #[test]
    fn commit_positions_serve_the_replicated_levels() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(config(dir.path()));
        let mut seq = 0;
        let end = append(&mut log, &mut seq, 3, 1);
        // A replica set of one: replicated follows appended, replicated_fsync synced.
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), end);
        let synced = log.positions().synced;
        assert_eq!(
            log.durable_position(DurabilityLevel::ReplicatedFsync),
            synced
        );
        let commit = log.commit_positions();
        commit.attach(64, 64);
        assert!(commit.is_attached());
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), 64);
        commit.publish(end - 10, 0);
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), end - 10);
        // Never backwards, never beyond what the leader appended or synced.
        commit.publish(100, u64::MAX);
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), end - 10);
        commit.publish(u64::MAX, u64::MAX);
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), end);
        assert_eq!(
            log.durable_position(DurabilityLevel::ReplicatedFsync),
            log.positions().synced
        );
        // The fetch path reads the same positions through a reader.
        let reader = log.reader();
        assert_eq!(reader.positions().durable(DurabilityLevel::Replicated), end);
        commit.detach();
        assert_eq!(log.durable_position(DurabilityLevel::Replicated), end);
        // A reopened log starts without replication attached.
        commit.attach(0, 0);
        drop(reader);
        drop(commit);
        drop(log);
        let log = open(config(dir.path()));
        assert_eq!(
            log.durable_position(DurabilityLevel::Replicated),
            log.positions().appended
        );
    }

    #[test]
    fn a_restarted_follower_drops_its_resealed_segment_and_catches_up() {
        let (a, b, mut leader, mut follower, mut leader_flusher, mut follower_flusher) = pair();
        let mut raw = leader.raw_reader();
        let mut seq = 0;
        append(&mut leader, &mut seq, 80, 1_000); // into segment 1
        replicate(&mut raw, &mut follower);
        let commit = leader.positions().appended;
        flush(&mut [&mut follower_flusher]);
        drop((follower, follower_flusher));
        // Reopened: segment 1 sealed by recovery where it ended, segment 2 fresh.
        let follower = open(config(b.path()));
        let follower_flusher = follower.flusher().unwrap();
        let tail = follower.replica_tail();
        let size = leader.segment_size();
        assert_eq!(tail.position, 2 * size + 64);
        assert_eq!(
            raw.catch_up_plan(&tail, commit),
            CatchUp::Truncate { segment: 1 }
        );
        drop((follower, follower_flusher));
        // Segment 2 was fresh and empty: never written to the disk copy.
        assert_eq!(truncate_segments(b.path(), 1).unwrap(), vec![1]);
        let mut follower = open(config(b.path()));
        let mut follower_flusher = follower.flusher().unwrap();
        let tail = follower.replica_tail();
        assert_eq!(tail.position, size + 64);
        assert_eq!(
            raw.catch_up_plan(&tail, commit),
            CatchUp::Resume { from: size + 64 }
        );
        append(&mut leader, &mut seq, 100, 2_000);
        replicate(&mut raw, &mut follower);
        assert_eq!(
            follower.stream_info(STREAM).unwrap().next_offset,
            leader.stream_info(STREAM).unwrap().next_offset
        );
        flush(&mut [&mut leader_flusher, &mut follower_flusher]);
        assert!(segment_files(a.path()) == segment_files(b.path()));
    }

    #[test]
    fn recovery_seals_at_the_same_place_do_not_make_different_logs_match() {
        let (a, b, mut leader, mut follower, mut leader_flusher, mut follower_flusher) = pair();
        // Same sizes, different records: the logs end at the same position.
        let (mut seq, mut other_seq) = (0, 1_000_000);
        append(&mut leader, &mut seq, 5, 1_000);
        append(&mut follower, &mut other_seq, 5, 9_999);
        assert_eq!(leader.positions().appended, follower.positions().appended);
        flush(&mut [&mut leader_flusher, &mut follower_flusher]);
        drop((leader, leader_flusher, follower, follower_flusher));
        // Both restart: recovery seals each at the same position with the
        // same END marker (time 0).
        let leader = open(config(a.path()));
        let follower = open(config(b.path()));
        let mut raw = leader.raw_reader();
        let tail = follower.replica_tail();
        assert_eq!(tail.position, leader.positions().appended);
        assert_eq!(
            raw.catch_up_plan(&tail, 0),
            CatchUp::Truncate { segment: 0 }
        );
    }

    #[test]
    fn a_divergent_tail_is_truncated_to_the_commit_position() {
        let (a, b, mut leader, mut follower, mut leader_flusher, mut follower_flusher) = pair();
        let mut raw = leader.raw_reader();
        let mut seq = 0;
        append(&mut leader, &mut seq, 70, 1_000); // into segment 1
        replicate(&mut raw, &mut follower);
        let commit = leader.positions().appended;
        // The follower got a tail the leader never had (another leader's).
        let mut other_seq = seq + 1_000_000;
        append(&mut follower, &mut other_seq, 3, 9_999);
        append(&mut leader, &mut seq, 3, 2_000);
        let tail = follower.replica_tail();
        assert_eq!(tail.position, leader.positions().appended);
        let plan = raw.catch_up_plan(&tail, commit);
        assert_eq!(plan, CatchUp::Truncate { segment: 1 });
        // A follower with an open log cannot be truncated.
        assert!(matches!(
            truncate_segments(b.path(), 1),
            Err(ReplicaError::Locked { .. })
        ));
        flush(&mut [&mut follower_flusher]);
        drop((follower, follower_flusher));
        truncate_segments(b.path(), 1).unwrap();
        let mut follower = open(config(b.path()));
        let mut follower_flusher = follower.flusher().unwrap();
        let tail = follower.replica_tail();
        let plan = raw.catch_up_plan(&tail, commit);
        assert_eq!(
            plan,
            CatchUp::Resume {
                from: leader.segment_size() + 64
            }
        );
        replicate(&mut raw, &mut follower);
        flush(&mut [&mut leader_flusher, &mut follower_flusher]);
        assert!(segment_files(a.path()) == segment_files(b.path()));
        // A fresh follower starts from the leader's first record.
        let c = tempfile::tempdir().unwrap();
        let fresh = open(config(c.path()));
        assert_eq!(
            raw.catch_up_plan(&fresh.replica_tail(), commit),
            CatchUp::Resume { from: 64 }
        );
    }

    /// The first offsets a reader of `log` sees for `STREAM`, from `from`.
    fn offsets_read(log: &mut ShardLog, from: u64) -> Vec<u64> {
        let mut reader = log.reader();
        let batch = reader.read(STREAM, from, 1 << 20, u64::MAX).unwrap();
        batch.map(|record| record.unwrap().offset).take(2).collect()
    }

    #[test]
    fn a_follower_that_learns_a_stream_late_keeps_what_the_leader_sent() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = open(config(a.path()));
        // The follower's log has never had the stream.
        let follower_dir = b.path();
        let (mut follower, _) = ShardLog::open(config(follower_dir)).unwrap();
        let mut follower_flusher = follower.flusher().unwrap();
        let mut raw = leader.raw_reader();
        let mut seq = 0;
        append(&mut leader, &mut seq, 3, 1_000);
        // Records of an unknown stream are stored and indexed; the fetch
        // server does not serve it (no level: `unknown_stream`).
        assert_eq!(replicate(&mut raw, &mut follower), 3);
        assert!(follower.stream_info(STREAM).is_none());
        assert_eq!(follower.reader().stream_level(STREAM), None);
        let config_of = StreamConfig {
            durability: DurabilityLevel::Replicated,
        };
        let adopted = follower
            .adopt_stream(STREAM, config_of, StreamRetention::default())
            .unwrap();
        assert_eq!((adopted.first_offset, adopted.next_offset), (0, 24));
        assert_eq!(offsets_read(&mut follower, 0), vec![0, 1]);
        assert!(matches!(
            follower.adopt_stream(STREAM, config_of, StreamRetention::default()),
            Err(StreamError::Exists { stream_id: STREAM })
        ));
        // Deleted and created again: the leader's new incarnation starts at
        // 24; a follower that deletes, receives, then adopts agrees.
        leader.delete_stream(STREAM).unwrap();
        follower.delete_stream(STREAM).unwrap();
        let recreated = leader.create_stream(STREAM, config_of).unwrap();
        assert_eq!(recreated.first_offset, 24);
        append(&mut leader, &mut seq, 2, 2_000);
        replicate(&mut raw, &mut follower);
        // ... also after a restart in between (the end is in the registry).
        flush(&mut [&mut follower_flusher]);
        drop((follower, follower_flusher));
        let (mut follower, _) = ShardLog::open(config(follower_dir)).unwrap();
        let adopted = follower
            .adopt_stream(STREAM, config_of, StreamRetention::default())
            .unwrap();
        let leader_info = leader.stream_info(STREAM).unwrap();
        assert_eq!(
            (adopted.first_offset, adopted.next_offset),
            (leader_info.first_offset, leader_info.next_offset)
        );
        assert_eq!((adopted.first_offset, adopted.next_offset), (24, 40));
        assert_eq!(offsets_read(&mut follower, 24), vec![24, 25]);
        // The old incarnation stays hidden, as on the leader.
        assert!(
            follower
                .reader()
                .read(STREAM, 0, 1 << 20, u64::MAX)
                .is_err()
        );
        assert!(leader.reader().read(STREAM, 0, 1 << 20, u64::MAX).is_err());
    }
}
