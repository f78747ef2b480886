//! Fixed bodies of ACK and ERROR frames, and the shared enums they carry.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// How durable a stream's data is before the broker acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum DurabilityLevel {
    /// Acknowledged once appended to the in-memory log.
    #[default]
    Memory = 0,
    /// Acknowledged once written to the disk copy (page cache); fsync on an interval.
    Flush = 1,
    /// Acknowledged after fsync/fdatasync of the disk copy.
    Fsync = 2,
    /// Acknowledged once a quorum of the shard's replica set holds the batch
    /// in memory (the replication commit position). On a shard without
    /// replication (a replica set of one) the same as [`Self::Memory`].
    Replicated = 3,
    /// Acknowledged once a quorum of the shard's replica set has the batch
    /// fsynced. On a shard without replication the same as [`Self::Fsync`].
    ReplicatedFsync = 4,
}

impl DurabilityLevel {
    /// Decode the byte form; `None` for an unknown value.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Memory),
            1 => Some(Self::Flush),
            2 => Some(Self::Fsync),
            3 => Some(Self::Replicated),
            4 => Some(Self::ReplicatedFsync),
            _ => None,
        }
    }

    /// The lower-case name used in config files and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Flush => "flush",
            Self::Fsync => "fsync",
            Self::Replicated => "replicated",
            Self::ReplicatedFsync => "replicated_fsync",
        }
    }

    /// Every level, in numeric order (local levels first, then replicated).
    pub const ALL: [Self; 5] = [
        Self::Memory,
        Self::Flush,
        Self::Fsync,
        Self::Replicated,
        Self::ReplicatedFsync,
    ];

    /// True for the levels that wait for a quorum of replicas.
    pub const fn is_replicated(self) -> bool {
        matches!(self, Self::Replicated | Self::ReplicatedFsync)
    }

    /// What each replica must have done locally for this level: `Memory`
    /// for `Replicated`, `Fsync` for `ReplicatedFsync`, the level itself otherwise.
    pub const fn local(self) -> Self {
        match self {
            Self::Replicated => Self::Memory,
            Self::ReplicatedFsync => Self::Fsync,
            other => other,
        }
    }
}

impl core::str::FromStr for DurabilityLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "replicated+fsync" {
            return Ok(Self::ReplicatedFsync);
        }
        Self::ALL
            .into_iter()
            .find(|level| level.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown durability level {s:?} \
                     (allowed: memory, flush, fsync, replicated, replicated_fsync)"
                )
            })
    }
}

impl core::fmt::Display for DurabilityLevel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Body of an ACK frame (16 bytes).
///
/// The ACK header's `stream_id`/`producer_id` name the flow and its
/// `sequence` is the highest contiguous sequence now durable at `level`;
/// `timestamp_ns` echoes the newest acknowledged frame's timestamp.
///
/// ```text
///  offset  size  field        meaning
///       0     4  credit       frames the producer may send beyond `sequence`
///       4     1  level        DurabilityLevel the ack was given at
///       5     3  reserved     zero
///       8     8  last_offset  stream offset of the record holding `sequence`
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AckBody {
    /// Flow-control window in frames beyond the acknowledged sequence.
    pub credit: U32,
    /// [`DurabilityLevel`] as a byte.
    pub level: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// Stream offset of the record holding the acknowledged sequence
    /// (`u64::MAX` when nothing was appended yet).
    pub last_offset: U64,
}

impl AckBody {
    /// An ACK body granting `credit` frames at `level`; `last_offset` is the
    /// stream offset of the acknowledged record.
    pub fn new(credit: u32, level: DurabilityLevel, last_offset: u64) -> Self {
        Self {
            credit: U32::new(credit),
            level: level as u8,
            reserved: [0; 3],
            last_offset: U64::new(last_offset),
        }
    }
}

const _: () = {
    assert!(size_of::<AckBody>() == 16);
    assert!(offset_of!(AckBody, credit) == 0);
    assert!(offset_of!(AckBody, level) == 4);
    assert!(offset_of!(AckBody, last_offset) == 8);
};

/// Reason codes carried by ERROR frames (and used as counter labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ErrorCode {
    /// Frame shorter than a header.
    Truncated = 1,
    /// Wrong magic bytes.
    BadMagic = 2,
    /// Unsupported protocol version.
    UnsupportedVersion = 3,
    /// Unknown frame kind.
    UnknownKind = 4,
    /// Reserved header bits set.
    ReservedBitsSet = 5,
    /// Payload larger than allowed.
    PayloadTooLarge = 6,
    /// Declared length runs past the datagram.
    LengthMismatch = 7,
    /// CRC does not match.
    CrcMismatch = 8,
    /// ACK/ERROR body of the wrong size.
    BadBody = 9,
    /// The stream does not exist on this broker.
    UnknownStream = 10,
    /// The sequence is beyond the credit window (too far ahead of the acknowledged one).
    OutOfWindow = 11,
    /// The log has no room (disk full, retention cannot free space).
    StorageFull = 12,
    /// Another storage failure; the frame was not appended.
    StorageError = 13,
    /// This broker does not lead the stream.
    NotLeader = 14,
    /// A frame kind the receiver does not accept in this direction.
    UnexpectedKind = 15,
    /// Transient: the broker's storage is behind (its flusher has not synced
    /// enough to free live memory); the frame was not appended. Retry from
    /// this sequence after a backoff.
    Overloaded = 16,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [Self; 16] = [
        Self::Truncated,
        Self::BadMagic,
        Self::UnsupportedVersion,
        Self::UnknownKind,
        Self::ReservedBitsSet,
        Self::PayloadTooLarge,
        Self::LengthMismatch,
        Self::CrcMismatch,
        Self::BadBody,
        Self::UnknownStream,
        Self::OutOfWindow,
        Self::StorageFull,
        Self::StorageError,
        Self::NotLeader,
        Self::UnexpectedKind,
        Self::Overloaded,
    ];

    /// Decode the wire value; `None` for an unknown code.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as u16 == value)
    }

    /// A stable snake_case name, for counters and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadMagic => "bad_magic",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownKind => "unknown_kind",
            Self::ReservedBitsSet => "reserved_bits_set",
            Self::PayloadTooLarge => "payload_too_large",
            Self::LengthMismatch => "length_mismatch",
            Self::CrcMismatch => "crc_mismatch",
            Self::BadBody => "bad_body",
            Self::UnknownStream => "unknown_stream",
            Self::OutOfWindow => "out_of_window",
            Self::StorageFull => "storage_full",
            Self::StorageError => "storage_error",
            Self::NotLeader => "not_leader",
            Self::UnexpectedKind => "unexpected_kind",
            Self::Overloaded => "overloaded",
        }
    }

    /// Index of this code in [`ErrorCode::ALL`] (for per-code counter arrays).
    pub const fn index(self) -> usize {
        self as usize - 1
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Body of an ERROR frame (8 bytes, optionally followed by a UTF-8 message).
///
/// The ERROR header's `stream_id`, `producer_id` and `sequence` repeat the
/// rejected frame's (zero when it could not be parsed).
///
/// ```text
///  offset  size  field     meaning
///       0     2  code      ErrorCode
///       2     2  reserved  zero
///       4     4  detail    code-specific fact (e.g. the credit window)
///       8     -  message   optional UTF-8 text
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ErrorBody {
    /// [`ErrorCode`] as a number.
    pub code: U16,
    /// Zero.
    pub reserved: U16,
    /// Code-specific detail.
    pub detail: U32,
}

impl ErrorBody {
    /// An ERROR body with a reason and a code-specific detail.
    pub fn new(code: ErrorCode, detail: u32) -> Self {
        Self {
            code: U16::new(code as u16),
            reserved: U16::ZERO,
            detail: U32::new(detail),
        }
    }

    /// The reason code, if known.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code.get())
    }
}

const _: () = {
    assert!(size_of::<ErrorBody>() == 8);
    assert!(offset_of!(ErrorBody, code) == 0);
    assert!(offset_of!(ErrorBody, detail) == 4);
};

#[cfg(test)]
mod durability_tests {
    use super::DurabilityLevel;

    #[test]
    fn levels_round_trip_through_byte_and_name() {
        for level in DurabilityLevel::ALL {
            assert_eq!(DurabilityLevel::from_u8(level as u8), Some(level));
            assert_eq!(level.name().parse::<DurabilityLevel>(), Ok(level));
        }
        assert_eq!(DurabilityLevel::from_u8(5), None);
        assert_eq!(
            "replicated+fsync".parse::<DurabilityLevel>(),
            Ok(DurabilityLevel::ReplicatedFsync)
        );
        assert!("quorum".parse::<DurabilityLevel>().is_err());
        assert_eq!(DurabilityLevel::Replicated.local(), DurabilityLevel::Memory);
        assert_eq!(
            DurabilityLevel::ReplicatedFsync.local(),
            DurabilityLevel::Fsync
        );
        assert!(DurabilityLevel::Replicated.is_replicated());
        assert!(!DurabilityLevel::Fsync.is_replicated());
    }
}
