//! Decode and encode errors. Each variant carries the facts needed to act on it.

use crate::ErrorCode;

/// Why a frame (or the rest of a datagram) could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header remain.
    #[error("truncated frame header at byte {offset}: need {needed} bytes, {available} available")]
    Truncated {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// Bytes a header needs.
        needed: usize,
        /// Bytes left in the buffer.
        available: usize,
    },
    /// The first two bytes are not [`crate::MAGIC`].
    #[error("bad magic 0x{found:04x} at byte {offset} (expected 0x{expected:04x})", expected = crate::MAGIC)]
    BadMagic {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// The value found.
        found: u16,
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {found} at byte {offset} (supported: {supported})", supported = crate::PROTOCOL_VERSION)]
    UnsupportedVersion {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// The version byte found.
        found: u8,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {found} at byte {offset}")]
    UnknownKind {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// The kind byte found.
        found: u8,
    },
    /// Reserved bits or bytes are set.
    #[error(
        "reserved header bits set at byte {offset}: flags 0x{flags:04x}, reserved 0x{reserved:04x}"
    )]
    ReservedBitsSet {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// The flags field.
        flags: u16,
        /// The reserved field.
        reserved: u16,
    },
    /// The declared payload is larger than [`crate::MAX_PAYLOAD_LEN`].
    #[error("payload of {len} bytes at byte {offset} exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// Declared payload length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The declared payload runs past the end of the buffer.
    #[error("frame at byte {offset} declares {declared} payload bytes but only {available} remain")]
    LengthMismatch {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// Declared payload length.
        declared: usize,
        /// Bytes left after the header.
        available: usize,
    },
    /// The CRC in the header does not match the bytes.
    #[error(
        "crc mismatch at byte {offset}: header says 0x{expected:08x}, bytes give 0x{computed:08x}"
    )]
    CrcMismatch {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// An ACK or ERROR frame whose body has the wrong size.
    #[error("{kind} body at byte {offset} is {found} bytes, expected at least {expected}")]
    BadBody {
        /// Offset of the frame inside the datagram.
        offset: usize,
        /// Frame kind name.
        kind: &'static str,
        /// Bytes the body needs.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
}

impl FrameError {
    /// The reason code the broker sends back in an ERROR frame for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Truncated { .. } => ErrorCode::Truncated,
            Self::BadMagic { .. } => ErrorCode::BadMagic,
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::UnknownKind { .. } => ErrorCode::UnknownKind,
            Self::ReservedBitsSet { .. } => ErrorCode::ReservedBitsSet,
            Self::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Self::LengthMismatch { .. } => ErrorCode::LengthMismatch,
            Self::CrcMismatch { .. } => ErrorCode::CrcMismatch,
            Self::BadBody { .. } => ErrorCode::BadBody,
        }
    }

    /// Offset inside the datagram of the frame that failed.
    pub fn offset(&self) -> usize {
        match *self {
            Self::Truncated { offset, .. }
            | Self::BadMagic { offset, .. }
            | Self::UnsupportedVersion { offset, .. }
            | Self::UnknownKind { offset, .. }
            | Self::ReservedBitsSet { offset, .. }
            | Self::PayloadTooLarge { offset, .. }
            | Self::LengthMismatch { offset, .. }
            | Self::CrcMismatch { offset, .. }
            | Self::BadBody { offset, .. } => offset,
        }
    }
}

/// Why a frame could not be written into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload exceeds [`crate::MAX_PAYLOAD_LEN`].
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Payload length given.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The buffer has no room for the frame.
    #[error("buffer full: frame needs {needed} bytes, {available} left")]
    BufferFull {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes left in the buffer.
        available: usize,
    },
    /// Flags outside [`crate::flags::ALL`].
    #[error("unknown flag bits 0x{flags:04x}")]
    UnknownFlags {
        /// The flags given.
        flags: u16,
    },
}
