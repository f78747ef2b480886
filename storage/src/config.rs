//! Configuration of a log and of its streams.

use std::path::PathBuf;

use kaelix_protocol::DurabilityLevel;

use crate::error::OpenError;
use crate::layout::HUGE_PAGE_BYTES;

/// Where the live (in-memory) copy of each segment lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LiveMemory {
    /// A hugetlbfs mount with enough free 2 MiB pages if one is found, else
    /// files in `/dev/shm` (when [`LogConfig::shared`]) or anonymous memory,
    /// on normal pages, with one warning in the [`crate::RecoveryReport`].
    #[default]
    Auto,
    /// Files in this directory on a hugetlbfs mount (2 MiB pages); opening
    /// fails if it cannot be used.
    Hugetlbfs(PathBuf),
    /// Files in this directory (normally on tmpfs such as `/dev/shm`).
    Shm(PathBuf),
    /// Private anonymous memory (MAP_HUGETLB when pages are reserved). Followers cannot attach.
    Anonymous,
}

/// What opening does when it finds damage with valid data after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryPolicy {
    /// Refuse to open ([`OpenError::Corrupt`]).
    #[default]
    Fail,
    /// Cut the damaged segment at the bad spot, keep the segments after it,
    /// and list every damage in [`crate::RecoveryReport::corruptions`].
    Salvage,
}

/// How much of the log opening checks record by record (every frame CRC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyOnOpen {
    /// Segments with a valid index file are trusted (their length and index
    /// CRC are checked); the others are scanned.
    #[default]
    Tail,
    /// Scan every segment.
    Full,
}

/// Configuration of one [`crate::ShardLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Directory of the disk copy: segments, index files, the stream registry.
    pub dir: PathBuf,
    /// Segment size in bytes, a multiple of 2 MiB (fixed when the log is created;
    /// an existing log keeps its own).
    pub segment_size_bytes: u64,
    /// Where the live copy of segments lives.
    pub live_memory: LiveMemory,
    /// Make live segments shareable with [`crate::Follower`]s in other processes
    /// (files on hugetlbfs or tmpfs, and a shared meta page).
    pub shared: bool,
    /// Prefault new segment mappings at roll (MAP_POPULATE) instead of on first touch.
    pub populate: bool,
    /// Flush level: the flusher fdatasyncs at least this often while data is unsynced.
    pub flush_interval_ns: u64,
    /// Retention by size: drop the oldest sealed segments while the log is larger.
    pub retention_bytes: Option<u64>,
    /// Retention by age: drop sealed segments whose newest append is older.
    pub retention_age_ns: Option<u64>,
    /// A stream gets an offset index entry for its first batch in each segment
    /// and then whenever this many of its bytes were appended since its last entry
    /// (0: every batch).
    pub index_interval_bytes: u32,
    /// A time index entry at most every this many bytes of a segment.
    pub time_index_interval_bytes: u32,
    /// Sealed, fully synced segments beyond this many keep no live copy:
    /// readers map the disk copy instead.
    pub live_segments_max: usize,
    /// Hard limit on the live memory of this log: the live segments (the
    /// active one, sealed ones not yet synced or within `live_segments_max`,
    /// and the one prepared ahead) take at most this many bytes, rounded down
    /// to whole segments. A roll that would go beyond first releases synced
    /// live copies; if that is not enough the append fails with
    /// [`crate::AppendError::LiveMemoryFull`] until the flusher catches up.
    /// At least `(live_segments_max + 1) * segment_size_bytes`.
    pub live_memory_max_bytes: u64,
    /// What to do with damage in the middle of the log.
    pub recovery: RecoveryPolicy,
    /// How much of the log is verified on open.
    pub verify: VerifyOnOpen,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, automatic live memory, shared, 100 ms flush
    /// interval, 4 live segments kept, at most 1 GiB (16 segments) of live memory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_size_bytes: 64 * 1024 * 1024,
            live_memory: LiveMemory::Auto,
            shared: true,
            populate: true,
            flush_interval_ns: 100_000_000,
            retention_bytes: None,
            retention_age_ns: None,
            index_interval_bytes: 4096,
            time_index_interval_bytes: 1024 * 1024,
            live_segments_max: 4,
            live_memory_max_bytes: 1 << 30,
            recovery: RecoveryPolicy::Fail,
            verify: VerifyOnOpen::Tail,
        }
    }

    /// Check the whole configuration; errors name the key and the allowed range.
    pub fn validate(&self) -> Result<(), OpenError> {
        let size = self.segment_size_bytes;
        if size == 0 || !size.is_multiple_of(HUGE_PAGE_BYTES) || size > (1 << 32) {
            return Err(OpenError::Config {
                key: "segment_size_bytes",
                message: format!("{size} is not a multiple of 2 MiB between 2 MiB and 4 GiB"),
            });
        }
        if self.flush_interval_ns == 0 {
            return Err(OpenError::Config {
                key: "flush_interval_ns",
                message: "must be at least 1".into(),
            });
        }
        if self.live_segments_max == 0 {
            return Err(OpenError::Config {
                key: "live_segments_max",
                message: "must be at least 1 (the active segment)".into(),
            });
        }
        let live_min = (self.live_segments_max as u64)
            .saturating_add(1)
            .saturating_mul(size);
        if self.live_memory_max_bytes < live_min {
            return Err(OpenError::Config {
                key: "live_memory_max_bytes",
                message: format!(
                    "{} is below {live_min}: live_segments_max ({}) + 1 segments of {size} bytes",
                    self.live_memory_max_bytes, self.live_segments_max
                ),
            });
        }
        if self.shared && self.live_memory == LiveMemory::Anonymous {
            return Err(OpenError::Config {
                key: "live_memory",
                message: "anonymous memory cannot be shared with followers; set shared = false"
                    .into(),
            });
        }
        Ok(())
    }
}

/// Per-stream settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamConfig {
    /// When appends to this stream may be acknowledged.
    pub durability: DurabilityLevel,
}
