//! The 40-byte frame header.

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::HEADER_LEN;

/// Frame flag bits (header offset 4).
pub mod flags {
    /// The producer is sending this frame again (it was not acknowledged in time).
    pub const RETRANSMIT: u16 = 1 << 0;
    /// The producer asks for an ACK right away instead of at the end of the batch.
    pub const ACK_NOW: u16 = 1 << 1;
    /// Every flag this version understands; other bits must be zero.
    pub const ALL: u16 = RETRANSMIT | ACK_NOW;
}

/// What a frame is. Stored in header byte 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Producer data to append to a stream.
    Data = 1,
    /// Broker to producer: cumulative acknowledgement with a credit window ([`crate::AckBody`]).
    Ack = 2,
    /// Broker to producer: a frame was rejected ([`crate::ErrorBody`]).
    Error = 3,
    /// Either direction: liveness; a producer's heartbeat asks for the current ACK state.
    Heartbeat = 4,
}

impl FrameKind {
    /// Decode the kind byte; `None` for a value this version does not know.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Data),
            2 => Some(Self::Ack),
            3 => Some(Self::Error),
            4 => Some(Self::Heartbeat),
            _ => None,
        }
    }
}

/// The frame header exactly as it is on the wire (see the crate docs for the layout).
///
/// All fields are little-endian and unaligned, so a `&FrameHeader` can be
/// taken at any byte offset of a received buffer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    /// [`crate::MAGIC`].
    pub magic: U16,
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u8,
    /// A [`FrameKind`] value.
    pub kind: u8,
    /// Bits from [`flags`].
    pub flags: U16,
    /// Must be zero.
    pub reserved: U16,
    /// Bytes of payload following the header.
    pub payload_len: U32,
    /// CRC-32 of header bytes 0..12 and 16..40 followed by the payload.
    pub crc32: U32,
    /// Stream the frame belongs to.
    pub stream_id: U32,
    /// Producer that assigned `sequence`.
    pub producer_id: U32,
    /// Per (producer, stream) sequence number, starting at 1. In an ACK: the
    /// highest contiguous sequence acknowledged. In an ERROR: the rejected one.
    pub sequence: U64,
    /// Producer send time in nanoseconds (opaque to the broker; echoed in ACKs).
    pub timestamp_ns: U64,
}

// Pin the layout: size and every offset documented in the crate docs.
const _: () = {
    assert!(size_of::<FrameHeader>() == HEADER_LEN);
    assert!(offset_of!(FrameHeader, magic) == 0);
    assert!(offset_of!(FrameHeader, version) == 2);
    assert!(offset_of!(FrameHeader, kind) == 3);
    assert!(offset_of!(FrameHeader, flags) == 4);
    assert!(offset_of!(FrameHeader, reserved) == 6);
    assert!(offset_of!(FrameHeader, payload_len) == 8);
    assert!(offset_of!(FrameHeader, crc32) == 12);
    assert!(offset_of!(FrameHeader, stream_id) == 16);
    assert!(offset_of!(FrameHeader, producer_id) == 20);
    assert!(offset_of!(FrameHeader, sequence) == 24);
    assert!(offset_of!(FrameHeader, timestamp_ns) == 32);
};

/// Byte offset of the CRC field; the CRC covers everything but these 4 bytes.
pub(crate) const CRC_OFFSET: usize = offset_of!(FrameHeader, crc32);

impl FrameHeader {
    /// The frame kind, if known.
    pub fn frame_kind(&self) -> Option<FrameKind> {
        FrameKind::from_u8(self.kind)
    }

    /// Total bytes of the frame (header + payload) as declared by the header.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len.get() as usize
    }
}
