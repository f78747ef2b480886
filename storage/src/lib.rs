//! # kaelix-storage: the log every message lands in
//!
//! One interleaved, segmented log per data-plane shard ([`ShardLog`]),
//! holding many streams. The live copy of each segment is a memory mapping
//! on 2 MiB hugepages (a hugetlbfs file) where the host has pages reserved,
//! otherwise a tmpfs file or anonymous memory on normal pages (with one
//! warning in the [`RecoveryReport`]). A [`Flusher`] copies the log to a disk
//! copy in the data directory. Frames are stored exactly as they arrived
//! (each with its own CRC-32), grouped into batch records.
//!
//! Sans-IO in the project's sense: no threads, no tokio, no clock reads.
//! Callers pass `now_ns` in, drive the flusher from a thread they own, and
//! serve readers from wherever they like. The crate does not log; what an
//! operator should know comes back in reports and errors.
//!
//! What it leaves out on purpose: the replication transport (the control
//! plane ships raw records with [`RawReader`], followers write them with
//! [`ShardLog::append_replica`], see [`replica`]), deduplication of
//! producer sequences (the data plane), compression.
//!
//! ## Main types
//! - [`ShardLog`]: the writer (single owner thread, `&mut self`):
//!   [`ShardLog::open`], streams, [`ShardLog::begin_batch`] →
//!   [`BatchWriter::push`] → [`BatchWriter::commit`] → [`AppendOutcome`],
//!   [`ShardLog::enforce_retention`], [`ShardLog::durable_position`].
//! - [`Flusher`]: `Send`; [`Flusher::poll`] copies and syncs the disk copy.
//! - [`Syncer`]: `Send`, optional; runs the interval syncs on a thread of
//!   its own so the flusher's writes never wait for fdatasync.
//! - [`LogReader`]: `Send + Clone`; [`LogReader::read`] yields
//!   [`Record`]s (offset, frame bytes) borrowed from the mappings.
//! - [`Follower`]: the same reads from another process, following the
//!   shared meta page with no syscalls in the steady state.
//!
//! ## Example
//!
//! ```
//! use kaelix_protocol::{FrameFields, encode_frame};
//! use kaelix_storage::{DurabilityLevel, LiveMemory, LogConfig, ShardLog, StreamConfig};
//!
//! let dir = tempfile::tempdir()?;
//! let config = LogConfig {
//!     segment_size_bytes: 2 << 20,
//!     live_memory: LiveMemory::Anonymous,
//!     shared: false,
//!     ..LogConfig::new(dir.path())
//! };
//! let (mut log, report) = ShardLog::open(config)?;
//! assert!(report.corruptions.is_empty());
//! log.create_stream(7, StreamConfig { durability: DurabilityLevel::Flush })?;
//!
//! // Frames straight from a received datagram: validated slices, no copy before the log.
//! let mut datagram = [0u8; 2 * 45];
//! encode_frame(&mut datagram[..45], &FrameFields::data(7, 1, 1, 0), b"hello")?;
//! encode_frame(&mut datagram[45..], &FrameFields::data(7, 1, 2, 0), b"world")?;
//! let mut batch = log.begin_batch(7, /* now_ns */ 1_000)?;
//! batch.push(&datagram[..45])?;
//! batch.push(&datagram[45..])?;
//! let outcome = batch.commit()?;
//! assert_eq!((outcome.first_offset, outcome.last_offset), (0, 1));
//!
//! // The flusher runs on a thread the caller owns; here, inline.
//! let mut flusher = log.flusher().expect("first flusher");
//! flusher.poll(2_000)?;
//! assert!(log.durable_position(DurabilityLevel::Flush) >= outcome.end_position); // ack now
//!
//! let mut reader = log.reader(); // Send + Clone
//! let records: Vec<_> = reader.read(7, 0, 1 << 20, u64::MAX)?.collect::<Result<_, _>>()?;
//! assert_eq!(records[1].offset, 1);
//! assert_eq!(&records[1].bytes[40..], b"world");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Positions and durability
//!
//! A *position* is a byte address in the log: `segment_number *
//! segment_size + offset_in_segment`. Segments are all the same size, so
//! positions grow monotonically; the unused tail of a sealed segment is a gap.
//! The log publishes three positions with release stores (acquire loads on
//! the other side), in a meta page that followers map too:
//!
//! | position   | meaning                                   | level it serves |
//! |------------|-------------------------------------------|-----------------|
//! | `appended` | end of the last committed batch           | `memory`        |
//! | `written`  | the disk copy (page cache) holds it       | `flush`         |
//! | `synced`   | the disk copy is fdatasynced              | `fsync`         |
//!
//! A batch is acknowledged at level L once `durable_position(L) >=
//! outcome.end_position`. An fsync-level commit also stores its end position
//! as a sync request, which makes the next flusher poll fdatasync; otherwise
//! the flusher syncs every `flush_interval_ns`. The flusher also maps (and
//! prefaults) the next live segment ahead of time under a `.next` name, so a
//! roll on the writer thread is a rename and a swap, not a 64 MiB page-fault
//! storm.
//!
//! ## Segment layout (all integers little-endian)
//!
//! ```text
//!  byte 0                    64                                           size
//!  +-------------------------+--------+--------+-----+--------+-----------+
//!  | segment header (64 B)   | batch  | batch  | ... | END    | zero ...  |
//!  +-------------------------+--------+--------+-----+--------+-----------+
//!
//!  segment header
//!  offset  size  field        meaning
//!       0     8  magic        "KXSEG001"
//!       8     4  header_crc   CRC-32 of bytes 12..64
//!      12     4  version      1
//!      16     8  number       segment number; the segment starts at position number * size
//!      24     8  size         segment size (multiple of 2 MiB)
//!      32     8  created_ns   caller time at creation
//!      40    24  reserved     zero
//! ```
//!
//! ## Batch record layout
//!
//! ```text
//!  offset  size  field           meaning
//!       0     4  magic           "KXB1"
//!       4     4  header_crc      CRC-32 of bytes 8..40 of this header
//!       8     1  kind            1 data batch, 2 END (end of segment)
//!       9     1  flags           zero
//!      10     2  reserved        zero
//!      12     4  stream_id       stream of every frame in the batch
//!      16     4  frame_count     frames that follow (> 0; 0 in END)
//!      20     4  byte_len        bytes of frames that follow (0 in END)
//!      24     8  base_offset     stream offset of the first frame
//!      32     8  append_time_ns  caller time of the append
//!      40     -  frames          frame_count frames, exactly as received:
//!                                40-byte frame header (own CRC-32) + payload
//! ```
//!
//! Batches never span segments: a batch that no longer fits moves to a new
//! segment while it is being pushed (its frames are copied once), and an END
//! record (40 bytes, always reserved) seals the old segment. The batch header
//! is written last, at commit, so a crash mid-batch leaves zeros where the
//! header belongs. Frame CRCs are not recomputed on append (the data plane
//! has validated them); recovery and `VerifyOnOpen::Full` check every one.
//!
//! ## Files
//!
//! ```text
//!  <dir>/lock                        flock: one writer per directory
//!  <dir>/streams.reg                 stream registry (see `registry` below), atomically replaced
//!  <dir>/live.path                   live directory and meta page path, for followers
//!  <dir>/segments/<n:020>.seg        disk copy of segment n (its length is the sealed length)
//!  <dir>/segments/<n:020>.idx        index file of sealed segment n (own CRC)
//!  <live>/<n:020>.seg                live copy (hugetlbfs or tmpfs), size bytes
//!  <live>/<n:020>.next               next live segment prepared by the flusher
//!  <live>/meta or /dev/shm/...meta   meta page: positions, one AtomicU64 per 128-byte line
//! ```
//!
//! The stream registry holds, per stream, its durability, whether it is
//! deleted, its own retention limits ([`StreamRetention`]), the first offset
//! served (where its current incarnation starts, or later once its own
//! retention moved it), and a *floor*: the offsets below it are used up. It
//! is rewritten on create and delete, when a stream's retention moves its
//! first offset and before retention deletes segments, so offsets are never
//! reused, also after retention removed all of a stream's data and after a
//! restart. Readers learn of creations, deletions and first offsets through
//! a catalog the writer publishes on every registry change.
//!
//! ## Indexes
//!
//! One implementation (`LogIndex::observe`) serves the writer, the readers,
//! the followers and recovery. Per stream: a sparse list of `(offset,
//! position)` entries (the stream's first batch in every segment, then one
//! whenever `index_interval_bytes` of its data passed), so an idle stream
//! costs well under 1 KiB (the `storage` benchmark measures it at 1 M
//! streams). Per segment: a time index of `(newest append time so far,
//! position)` every `time_index_interval_bytes`. When a segment is sealed,
//! the flusher (off the writer thread) syncs it, then builds its index file
//! by walking its batch headers with the same code, and writes it;
//! recovery loads it when it matches the sealed length and its CRC,
//! otherwise it rescans the segment and rewrites it.
//!
//! ## Recovery
//!
//! Opening walks the segments in order. For each: load its index file (if
//! sealed and valid) or scan it record by record (batch header CRC, every
//! frame CRC, counts). A live copy left by a crashed writer (hugetlbfs and
//! tmpfs files survive `kill -9`) that checks out further than the disk copy
//! is used to complete it. A bad spot with nothing valid after it is a torn
//! tail: cut, and reported in `truncated_bytes`. A bad spot with valid data
//! after it (later in the segment, or a later segment) is corruption:
//! [`OpenError::Corrupt`] under [`RecoveryPolicy::Fail`] (default), or cut
//! and listed in [`RecoveryReport::corruptions`] under
//! [`RecoveryPolicy::Salvage`]. Every recovered segment is sealed with an END
//! record on disk; appends continue in a fresh segment. Nothing reported
//! durable is lost: `written`/`synced` only ever covered complete batches in
//! the disk copy, and the flusher syncs a segment before it starts the next.
//! Known limit: after a power loss, unsynced pages of the last segment may
//! reach the disk out of order; a stale valid record after a hole there
//! reads as corruption (open with `Salvage` to continue).
//!
//! ## Lifecycle choices
//!
//! - Opening always continues in a fresh segment: the recovered tail is
//!   sealed on disk with an END record. Positions keep growing; offsets too.
//! - A stream deleted and created again continues after its old offsets (the
//!   registry keeps a tombstone with the floor); reads below the new first
//!   offset get [`ReadError::OffsetRetained`].
//! - [`ShardLog::flusher`] hands out the one flusher (`None` afterwards).
//!   Dropping the log without having taken it copies the tail to the disk
//!   copy (no fsync). Live files and the meta page are deleted on drop when
//!   the disk copy has everything, and kept for recovery otherwise.
//! - Sealed segments older than `live_segments_max` move to a read-only
//!   mapping of their synced disk copy; their live file (and hugepages) are
//!   released. Retention only deletes synced, sealed segments.
//! - [`Follower`]s do not read the stream registry: they serve every batch
//!   the log holds, including those of deleted streams.
//!
//! ## Threads and allocation
//!
//! The writer's append path (`begin_batch`, `push`, `commit`) makes no
//! syscall, takes no lock and allocates only when an index vector grows
//! (amortised, per batch, never per frame). A roll (once per segment) makes
//! syscalls and takes the segment-list mutex that readers take only when
//! the list changed. The writer never waits for the flusher.
//!
//! ## Live memory limit
//!
//! Live copies take memory (hugepages, tmpfs) until the flusher has synced
//! them; a flusher that falls behind would let them grow without bound.
//! [`LogConfig::live_memory_max_bytes`] caps them (the active segment, sealed
//! ones not yet released, and the one prepared ahead, which the flusher does
//! not prepare when there is no room). A roll first releases every synced
//! live copy beyond `live_segments_max`; if one more segment still does not
//! fit, the push that needed the roll fails with
//! [`AppendError::LiveMemoryFull`] (nothing of it written, the batch can
//! still commit what was pushed before) and the log asks the flusher to
//! sync everything appended. Appends into the active segment continue; the
//! next roll after the flusher synced more succeeds. While the limit holds
//! the writer back, a rejected roll costs a few atomic loads (no lock, no
//! allocation) until the synced position moves.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod error;
mod flusher;
mod follower;
mod index;
pub mod layout;
mod live;
mod log;
mod mem;
mod reader;
mod recovery;
mod registry;
pub mod replica;

pub use config::{LiveMemory, LogConfig, RecoveryPolicy, StreamConfig, VerifyOnOpen};
pub use error::{
    AppendError, Corruption, FlushError, FollowerError, OpenError, ReadError, RetentionError,
    StreamError,
};
pub use flusher::{FlushProgress, Flusher, Syncer};
pub use follower::Follower;
pub use kaelix_protocol::DurabilityLevel;
pub use live::{LiveBacking, find_hugetlbfs_mount, free_huge_pages, meminfo_value};
pub use log::{
    AppendOutcome, BatchWriter, LiveMemoryUsage, Positions, RetentionReport, ShardLog, StreamInfo,
    StreamRetention,
};
pub use reader::{LogReader, ReadBatch, Record};
pub use recovery::RecoveryReport;
pub use replica::{
    CatchUp, CommitPositions, RawChunk, RawReader, ReplicaAppend, ReplicaError, ReplicaTail,
};

#[cfg(test)]
mod stream_retention_tests;
#[cfg(test)]
mod syncer_tests;
#[cfg(test)]
mod tests;

// The thread-crossing types must stay Send (and the reader Clone).
const _: () = {
    const fn send<T: Send>() {}
    const fn clone<T: Clone>() {}
    send::<ShardLog>();
    send::<Flusher>();
    send::<Syncer>();
    send::<LogReader>();
    send::<Follower>();
    clone::<LogReader>();
};
