//! Errors, one enum per operation. Variants carry the facts: paths, offsets, bytes.

use std::io;
use std::path::PathBuf;

/// Damage found in the log: where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "corrupt record in {path} (segment {segment}) at byte {offset} (log position {position}): {reason}"
)]
pub struct Corruption {
    /// The file (disk copy or live copy).
    pub path: PathBuf,
    /// Segment number.
    pub segment: u64,
    /// Byte offset inside the segment.
    pub offset: u64,
    /// Log position of the bad spot.
    pub position: u64,
    /// What was wrong.
    pub reason: String,
}

/// Why [`crate::ShardLog::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration is invalid.
    #[error("invalid log config {key}: {message}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process has the log open.
    #[error("log {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The live memory could not be set up (mount, pages, mapping).
    #[error("live memory {path:?}: cannot map {bytes} bytes: {reason}")]
    LiveMemory {
        /// The directory or file (none for anonymous memory).
        path: Option<PathBuf>,
        /// Bytes asked for.
        bytes: u64,
        /// What failed.
        reason: String,
    },
    /// Damage in the middle of the log (valid data follows it) under [`crate::RecoveryPolicy::Fail`].
    #[error("{0}; valid data follows, refusing to open (RecoveryPolicy::Salvage cuts it)")]
    Corrupt(Corruption),
    /// The stream registry or an index file could not be read.
    #[error("bad file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why an append failed. Nothing of the failed batch became visible.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream does not exist.
    #[error("unknown stream {stream_id}")]
    UnknownStream {
        /// The stream.
        stream_id: u32,
    },
    /// A frame shorter than its header or than its declared payload.
    #[error("frame of {len} bytes does not match its header (declares {declared} bytes)")]
    BadFrame {
        /// Bytes given.
        len: usize,
        /// Bytes the header declares (0 when the header does not fit).
        declared: usize,
    },
    /// A frame of another stream pushed into a batch.
    #[error("frame of stream {found} pushed into a batch of stream {expected}")]
    StreamMismatch {
        /// The batch's stream.
        expected: u32,
        /// The frame's stream.
        found: u32,
    },
    /// The batch would not fit into an empty segment; commit what was pushed and start another.
    #[error("batch of {bytes} bytes does not fit a segment (at most {max})")]
    BatchTooLarge {
        /// Bytes the batch would have.
        bytes: usize,
        /// The most a batch can hold.
        max: usize,
    },
    /// Commit of a batch without frames.
    #[error("empty batch for stream {stream_id}")]
    EmptyBatch {
        /// The stream.
        stream_id: u32,
    },
    /// Live memory is at [`crate::LogConfig::live_memory_max_bytes`] and
    /// the roll this batch needs would go beyond it: the flusher is behind.
    /// Nothing of the batch was written past the last commit (commit what
    /// was pushed before, or drop the batch); retry once the flusher has
    /// synced more (`synced` grows), which lets the next roll release live copies.
    #[error(
        "live memory full: {live_bytes} bytes of live segments, limit {limit_bytes}; \
         synced {synced} of {appended} appended, retry when the flusher catches up"
    )]
    LiveMemoryFull {
        /// Bytes of live segments in the log now (active, unsynced and kept ones).
        live_bytes: u64,
        /// The limit, in bytes of whole segments.
        limit_bytes: u64,
        /// The appended position.
        appended: u64,
        /// The synced position (segments below it can be released).
        synced: u64,
    },
    /// Rolling to a new segment failed (live memory exhausted, file error).
    #[error("segment roll to segment {segment} failed: {reason}")]
    Roll {
        /// The segment that could not be created.
        segment: u64,
        /// Path involved, if any.
        path: Option<PathBuf>,
        /// What failed.
        reason: String,
    },
}

/// Why a stream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream exists already.
    #[error("stream {stream_id} exists already")]
    Exists {
        /// The stream.
        stream_id: u32,
    },
    /// The stream does not exist.
    #[error("unknown stream {stream_id}")]
    Unknown {
        /// The stream.
        stream_id: u32,
    },
    /// The registry could not be written; the change was not made.
    #[error("writing stream registry {path}: {source}")]
    Registry {
        /// The registry file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The offset was deleted by retention.
    #[error(
        "stream {stream_id} offset {requested} was deleted by retention; first available is {first_available}"
    )]
    OffsetRetained {
        /// The stream.
        stream_id: u32,
        /// Offset asked for.
        requested: u64,
        /// The oldest offset still stored.
        first_available: u64,
    },
    /// The log does not hold what the index says (a bug or foreign tampering).
    #[error("inconsistent log at position {position}: {reason}")]
    Inconsistent {
        /// Log position.
        position: u64,
        /// What was found.
        reason: String,
    },
    /// A follower could not map a segment.
    #[error("mapping segment {path}: {reason}")]
    Map {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Why a flusher poll failed. The flusher keeps its place; the next poll retries.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Writing the disk copy failed (ENOSPC: disk full).
    #[error("writing {bytes} bytes at byte {offset} of {path}: {source}")]
    Write {
        /// The disk copy.
        path: PathBuf,
        /// Offset in the file.
        offset: u64,
        /// Bytes being written.
        bytes: usize,
        /// The OS error.
        source: io::Error,
    },
    /// fdatasync or a directory sync failed.
    #[error("syncing {path}: {source}")]
    Sync {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating a disk copy or an index file failed.
    #[error("creating {path}: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl FlushError {
    /// True when the disk is full: free space or shrink retention, then poll again.
    pub fn is_disk_full(&self) -> bool {
        let source = match self {
            Self::Write { source, .. }
            | Self::Sync { source, .. }
            | Self::Create { source, .. } => source,
        };
        source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT)
    }
}

/// Why retention failed (what was deleted before the error stays deleted).
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// Saving stream offsets before deleting failed; nothing was deleted.
    #[error("saving stream registry {path}: {source}")]
    Registry {
        /// The registry file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Deleting a file failed.
    #[error("deleting {path}: {source}")]
    Delete {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a [`crate::Follower`] could not attach.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// A file could not be read or mapped.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log is not shared (anonymous live memory) or was never opened.
    #[error("log {path} is not shared with followers: {reason}")]
    NotShared {
        /// The data directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}
