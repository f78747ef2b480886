//! The TCP fetch protocol remote consumers speak to the broker.
//!
//! A consumer opens a TCP connection to the broker's fetch port and sends
//! fetch requests; the broker answers each one with a response header
//! followed by the stored frames, verbatim and back to back, so the consumer
//! checks every frame's CRC itself. Requests on one connection are answered
//! in order; `request_id` is echoed so a client may pipeline.
//!
//! Sans-IO like the rest of the crate: [`FetchRequest`] and
//! [`FetchResponseHeader`] encode into and decode from caller buffers, and
//! [`FetchRecords`] walks a response body in place.
//!
//! ## Request (32 bytes, all integers little-endian)
//!
//! ```text
//!  offset  size  field        meaning
//!  ------  ----  -----------  ---------------------------------------------
//!       0     2  magic        0x464B, the bytes "KF" on the wire
//!       2     1  version      1 (FETCH_VERSION)
//!       3     1  kind         1 (FETCH_REQUEST)
//!       4     4  request_id   chosen by the client, echoed in the response
//!       8     4  stream_id    stream to read
//!      12     4  max_bytes    most frame bytes wanted in the response
//!      16     8  from_offset  stream offset of the first record wanted
//!      24     4  max_wait_ms  how long the broker may hold the request when
//!                             nothing at or after from_offset is readable yet
//!      28     4  reserved     zero
//! ```
//!
//! ## Response header (56 bytes), then `byte_len` bytes of frames
//!
//! ```text
//!  offset  size  field           meaning
//!  ------  ----  --------------  ------------------------------------------
//!       0     2  magic           0x464B ("KF")
//!       2     1  version         1
//!       3     1  kind            2 (FETCH_RESPONSE)
//!       4     2  error           FetchErrorCode; 0 = none
//!       6     2  reserved        zero
//!       8     4  request_id      the request's
//!      12     4  stream_id       the request's
//!      16     8  first_offset    offset of the first frame below
//!      24     8  next_offset     offset to ask for next
//!      32     8  high_watermark  last readable offset + 1
//!      40     8  log_start       first offset still stored (retention)
//!      48     4  record_count    frames that follow
//!      52     4  byte_len        bytes of frames that follow
//!      56     -  frames          record_count frames, each a 40-byte
//!                                header plus payload (crate-level layout)
//! ```
//!
//! Offsets are dense within a response: the `i`-th frame (from 0) has
//! offset `first_offset + i`, and `next_offset = first_offset +
//! record_count`. A response ends where the stream's offsets have a hole
//! (offsets never written), so `first_offset` may exceed the `from_offset`
//! asked for. The broker never returns a frame at or beyond
//! `high_watermark` (it only serves what is readable at the stream's
//! durability level), returns at least one frame when one is readable even if
//! it is larger than `max_bytes` (so a consumer never stalls on a big frame),
//! and otherwise stays within `max_bytes`.
//!
//! When `from_offset == high_watermark` (the consumer is caught up) the broker
//! holds the request up to `max_wait_ms` and answers as soon as something
//! becomes readable, or with zero frames when the wait ends. An error
//! response carries no frames; `high_watermark` and `log_start` are still
//! filled in where known, so a consumer can re-seek after
//! [`FetchErrorCode::OffsetOutOfRange`].

use core::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{Frame, FrameError, HEADER_LEN};

/// The two magic bytes of every fetch request and response, as a little-endian u16.
pub const FETCH_MAGIC: u16 = u16::from_le_bytes(*b"KF");
/// The fetch protocol version this crate encodes and accepts.
pub const FETCH_VERSION: u8 = 1;
/// `kind` byte of a request.
pub const FETCH_REQUEST: u8 = 1;
/// `kind` byte of a response.
pub const FETCH_RESPONSE: u8 = 2;
/// Size of an encoded [`FetchRequest`].
pub const FETCH_REQUEST_LEN: usize = 32;
/// Size of an encoded [`FetchResponseHeader`].
pub const FETCH_RESPONSE_HEADER_LEN: usize = 56;
/// Largest `byte_len` a response may declare (64 MiB). A reader refuses a
/// larger header before allocating anything for it.
pub const FETCH_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Longest `max_wait_ms` a broker honours (60 s); longer requests are clamped.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

/// Why a fetch failed, carried in the response header's `error` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum FetchErrorCode {
    /// The stream does not exist on this broker.
    UnknownStream = 1,
    /// `from_offset` is below `log_start` (removed by retention) or beyond
    /// `high_watermark`.
    OffsetOutOfRange = 2,
    /// The request could not be decoded (bad magic, version or kind, reserved bits set).
    BadRequest = 3,
    /// This broker does not lead the stream.
    NotLeader = 4,
    /// The stored data could not be read (corruption, I/O error).
    StorageError = 5,
}

impl FetchErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [Self; 5] = [
        Self::UnknownStream,
        Self::OffsetOutOfRange,
        Self::BadRequest,
        Self::NotLeader,
        Self::StorageError,
    ];

    /// Decode the wire value; `None` for 0 (no error) or an unknown code.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as u16 == value)
    }

    /// A stable snake_case name, for counters and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownStream => "unknown_stream",
            Self::OffsetOutOfRange => "offset_out_of_range",
            Self::BadRequest => "bad_request",
            Self::NotLeader => "not_leader",
            Self::StorageError => "storage_error",
        }
    }
}

impl core::fmt::Display for FetchErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why fetch bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FetchDecodeError {
    /// Fewer bytes than the fixed part needs.
    #[error("truncated fetch {what}: need {needed} bytes, {available} available")]
    Truncated {
        /// "request" or "response header".
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// The first two bytes are not [`FETCH_MAGIC`].
    #[error("bad fetch magic 0x{found:04x} (expected 0x{expected:04x})", expected = FETCH_MAGIC)]
    BadMagic {
        /// The value found.
        found: u16,
    },
    /// A version this build does not speak.
    #[error("unsupported fetch version {found} (supported: {supported})", supported = FETCH_VERSION)]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// The kind byte is not the one expected here.
    #[error("unexpected fetch kind {found} (expected {expected})")]
    UnexpectedKind {
        /// The kind byte found.
        found: u8,
        /// The kind expected.
        expected: u8,
    },
    /// Reserved bytes are not zero.
    #[error("reserved fetch bytes set: 0x{found:08x}")]
    ReservedBitsSet {
        /// The reserved field.
        found: u32,
    },
    /// The error field holds a value this version does not know.
    #[error("unknown fetch error code {found}")]
    UnknownErrorCode {
        /// The value found.
        found: u16,
    },
    /// `byte_len` exceeds [`FETCH_BYTES_MAX`].
    #[error("fetch response declares {byte_len} bytes, more than the maximum of {max}", max = FETCH_BYTES_MAX)]
    TooLarge {
        /// The declared length.
        byte_len: u32,
    },
    /// The header's counts contradict each other (records without bytes, or
    /// an error response carrying frames, or `next_offset` not
    /// `first_offset + record_count`).
    #[error(
        "inconsistent fetch response: error {error}, {record_count} records in {byte_len} bytes, offsets {first_offset}..{next_offset}"
    )]
    Inconsistent {
        /// The error field.
        error: u16,
        /// Declared record count.
        record_count: u32,
        /// Declared byte length.
        byte_len: u32,
        /// Declared first offset.
        first_offset: u64,
        /// Declared next offset.
        next_offset: u64,
    },
}

/// Why a response body did not match its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FetchBodyError {
    /// A frame did not decode (its offset inside the body is in the error).
    #[error("frame at stream offset {offset} is invalid")]
    Frame {
        /// Stream offset of the bad frame.
        offset: u64,
        /// What was wrong.
        source: FrameError,
    },
    /// The body holds fewer or more frames than `record_count`, or the
    /// frames do not fill `byte_len` exactly.
    #[error("fetch body holds {found} frames in {bytes} bytes, header says {expected} frames")]
    CountMismatch {
        /// Frames the header declared.
        expected: u32,
        /// Frames found.
        found: u32,
        /// Body bytes.
        bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RequestWire {
    magic: U16,
    version: u8,
    kind: u8,
    request_id: U32,
    stream_id: U32,
    max_bytes: U32,
    from_offset: U64,
    max_wait_ms: U32,
    reserved: U32,
}

const _: () = {
    assert!(size_of::<RequestWire>() == FETCH_REQUEST_LEN);
    assert!(offset_of!(RequestWire, magic) == 0);
    assert!(offset_of!(RequestWire, version) == 2);
    assert!(offset_of!(RequestWire, kind) == 3);
    assert!(offset_of!(RequestWire, request_id) == 4);
    assert!(offset_of!(RequestWire, stream_id) == 8);
    assert!(offset_of!(RequestWire, max_bytes) == 12);
    assert!(offset_of!(RequestWire, from_offset) == 16);
    assert!(offset_of!(RequestWire, max_wait_ms) == 24);
    assert!(offset_of!(RequestWire, reserved) == 28);
};

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ResponseWire {
    magic: U16,
    version: u8,
    kind: u8,
    error: U16,
    reserved: U16,
    request_id: U32,
    stream_id: U32,
    first_offset: U64,
    next_offset: U64,
    high_watermark: U64,
    log_start: U64,
    record_count: U32,
    byte_len: U32,
}

const _: () = {
    assert!(size_of::<ResponseWire>() == FETCH_RESPONSE_HEADER_LEN);
    assert!(offset_of!(ResponseWire, magic) == 0);
    assert!(offset_of!(ResponseWire, version) == 2);
    assert!(offset_of!(ResponseWire, kind) == 3);
    assert!(offset_of!(ResponseWire, error) == 4);
    assert!(offset_of!(ResponseWire, reserved) == 6);
    assert!(offset_of!(ResponseWire, request_id) == 8);
    assert!(offset_of!(ResponseWire, stream_id) == 12);
    assert!(offset_of!(ResponseWire, first_offset) == 16);
    assert!(offset_of!(ResponseWire, next_offset) == 24);
    assert!(offset_of!(ResponseWire, high_watermark) == 32);
    assert!(offset_of!(ResponseWire, log_start) == 40);
    assert!(offset_of!(ResponseWire, record_count) == 48);
    assert!(offset_of!(ResponseWire, byte_len) == 52);
};

fn check_prelude(
    magic: u16,
    version: u8,
    kind: u8,
    expected_kind: u8,
) -> Result<(), FetchDecodeError> {
    if magic != FETCH_MAGIC {
        return Err(FetchDecodeError::BadMagic { found: magic });
    }
    if version != FETCH_VERSION {
        return Err(FetchDecodeError::UnsupportedVersion { found: version });
    }
    if kind != expected_kind {
        return Err(FetchDecodeError::UnexpectedKind {
            found: kind,
            expected: expected_kind,
        });
    }
    Ok(())
}

/// A fetch request: read `stream_id` from `from_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRequest {
    /// Chosen by the client, echoed in the response.
    pub request_id: u32,
    /// Stream to read.
    pub stream_id: u32,
    /// Stream offset of the first record wanted.
    pub from_offset: u64,
    /// Most frame bytes wanted (at least one frame is returned regardless).
    pub max_bytes: u32,
    /// How long the broker may wait for data when the consumer is caught up.
    pub max_wait_ms: u32,
}

impl FetchRequest {
    /// Encode into the first [`FETCH_REQUEST_LEN`] bytes of `buf`.
    pub fn encode(&self, buf: &mut [u8; FETCH_REQUEST_LEN]) {
        let wire = RequestWire {
            magic: U16::new(FETCH_MAGIC),
            version: FETCH_VERSION,
            kind: FETCH_REQUEST,
            request_id: U32::new(self.request_id),
            stream_id: U32::new(self.stream_id),
            max_bytes: U32::new(self.max_bytes),
            from_offset: U64::new(self.from_offset),
            max_wait_ms: U32::new(self.max_wait_ms),
            reserved: U32::ZERO,
        };
        buf.copy_from_slice(wire.as_bytes());
    }

    /// Decode from the start of `buf` (bytes past [`FETCH_REQUEST_LEN`] are ignored).
    pub fn decode(buf: &[u8]) -> Result<Self, FetchDecodeError> {
        let (wire, _) =
            RequestWire::ref_from_prefix(buf).map_err(|_| FetchDecodeError::Truncated {
                what: "request",
                needed: FETCH_REQUEST_LEN,
                available: buf.len(),
            })?;
        check_prelude(wire.magic.get(), wire.version, wire.kind, FETCH_REQUEST)?;
        if wire.reserved.get() != 0 {
            return Err(FetchDecodeError::ReservedBitsSet {
                found: wire.reserved.get(),
            });
        }
        Ok(Self {
            request_id: wire.request_id.get(),
            stream_id: wire.stream_id.get(),
            from_offset: wire.from_offset.get(),
            max_bytes: wire.max_bytes.get(),
            max_wait_ms: wire.max_wait_ms.get(),
        })
    }
}

/// The fixed part of a fetch response; `byte_len` bytes of frames follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchResponseHeader {
    /// `None` on success.
    pub error: Option<FetchErrorCode>,
    /// The request's id.
    pub request_id: u32,
    /// The request's stream.
    pub stream_id: u32,
    /// Offset of the first frame in the body.
    pub first_offset: u64,
    /// Offset to ask for next (`first_offset + record_count`).
    pub next_offset: u64,
    /// Last readable offset + 1 when the response was built.
    pub high_watermark: u64,
    /// First offset still stored.
    pub log_start: u64,
    /// Frames in the body.
    pub record_count: u32,
    /// Bytes in the body.
    pub byte_len: u32,
}

impl FetchResponseHeader {
    /// A successful response header for `record_count` frames of `byte_len`
    /// bytes starting at `first_offset`.
    pub fn ok(
        request: &FetchRequest,
        first_offset: u64,
        record_count: u32,
        byte_len: u32,
        high_watermark: u64,
        log_start: u64,
    ) -> Self {
        Self {
            error: None,
            request_id: request.request_id,
            stream_id: request.stream_id,
            first_offset,
            next_offset: first_offset + u64::from(record_count),
            high_watermark,
            log_start,
            record_count,
            byte_len,
        }
    }

    /// An error response header (no frames) for `request`.
    pub fn error(
        request: &FetchRequest,
        code: FetchErrorCode,
        high_watermark: u64,
        log_start: u64,
    ) -> Self {
        Self {
            error: Some(code),
            first_offset: request.from_offset,
            next_offset: request.from_offset,
            ..Self::ok(
                request,
                request.from_offset,
                0,
                0,
                high_watermark,
                log_start,
            )
        }
    }

    /// Encode into the first [`FETCH_RESPONSE_HEADER_LEN`] bytes of `buf`.
    pub fn encode(&self, buf: &mut [u8; FETCH_RESPONSE_HEADER_LEN]) {
        debug_assert!(self.byte_len <= FETCH_BYTES_MAX);
        debug_assert_eq!(
            self.next_offset,
            self.first_offset + u64::from(self.record_count)
        );
        let wire = ResponseWire {
            magic: U16::new(FETCH_MAGIC),
            version: FETCH_VERSION,
            kind: FETCH_RESPONSE,
            error: U16::new(self.error.map_or(0, |code| code as u16)),
            reserved: U16::ZERO,
            request_id: U32::new(self.request_id),
            stream_id: U32::new(self.stream_id),
            first_offset: U64::new(self.first_offset),
            next_offset: U64::new(self.next_offset),
            high_watermark: U64::new(self.high_watermark),
            log_start: U64::new(self.log_start),
            record_count: U32::new(self.record_count),
            byte_len: U32::new(self.byte_len),
        };
        buf.copy_from_slice(wire.as_bytes());
    }

    /// Decode and check the fixed part at the start of `buf`. The header is
    /// checked for internal consistency (error responses carry no frames, a
    /// frame takes at least [`HEADER_LEN`] bytes, `byte_len` is at most
    /// [`FETCH_BYTES_MAX`]), so a reader may size its body buffer from
    /// `byte_len` once this succeeds.
    pub fn decode(buf: &[u8]) -> Result<Self, FetchDecodeError> {
        let (wire, _) =
            ResponseWire::ref_from_prefix(buf).map_err(|_| FetchDecodeError::Truncated {
                what: "response header",
                needed: FETCH_RESPONSE_HEADER_LEN,
                available: buf.len(),
            })?;
        check_prelude(wire.magic.get(), wire.version, wire.kind, FETCH_RESPONSE)?;
        if wire.reserved.get() != 0 {
            return Err(FetchDecodeError::ReservedBitsSet {
                found: u32::from(wire.reserved.get()),
            });
        }
        let error_value = wire.error.get();
        let error = match error_value {
            0 => None,
            value => Some(
                FetchErrorCode::from_u16(value)
                    .ok_or(FetchDecodeError::UnknownErrorCode { found: value })?,
            ),
        };
        let byte_len = wire.byte_len.get();
        if byte_len > FETCH_BYTES_MAX {
            return Err(FetchDecodeError::TooLarge { byte_len });
        }
        let record_count = wire.record_count.get();
        let first_offset = wire.first_offset.get();
        let next_offset = wire.next_offset.get();
        let consistent = (error.is_none() || (record_count == 0 && byte_len == 0))
            && (record_count == 0) == (byte_len == 0)
            && u64::from(record_count) * HEADER_LEN as u64 <= u64::from(byte_len)
            && first_offset.checked_add(u64::from(record_count)) == Some(next_offset);
        if !consistent {
            return Err(FetchDecodeError::Inconsistent {
                error: error_value,
                record_count,
                byte_len,
                first_offset,
                next_offset,
            });
        }
        Ok(Self {
            error,
            request_id: wire.request_id.get(),
            stream_id: wire.stream_id.get(),
            first_offset,
            next_offset,
            high_watermark: wire.high_watermark.get(),
            log_start: wire.log_start.get(),
            record_count,
            byte_len,
        })
    }

    /// Iterate the frames of `body` (the `byte_len` bytes that followed this
    /// header), each with its stream offset.
    pub fn records<'a>(&self, body: &'a [u8]) -> FetchRecords<'a> {
        FetchRecords::new(body, self.first_offset, self.record_count)
    }
}

/// Iterator over the frames of a fetch response body, each with its stream
/// offset. Every frame is fully validated (CRC included). Yields `Err` at
/// most once, then stops; after the last frame it checks that the count
/// and length match the header.
#[derive(Debug, Clone)]
pub struct FetchRecords<'a> {
    body: &'a [u8],
    at: usize,
    offset: u64,
    expected: u32,
    found: u32,
    done: bool,
}

impl<'a> FetchRecords<'a> {
    /// Walk `body`, whose first frame has stream offset `first_offset` and
    /// which should hold exactly `record_count` frames.
    pub fn new(body: &'a [u8], first_offset: u64, record_count: u32) -> Self {
        Self {
            body,
            at: 0,
            offset: first_offset,
            expected: record_count,
            found: 0,
            done: false,
        }
    }
}

impl<'a> Iterator for FetchRecords<'a> {
    type Item = Result<(u64, Frame<'a>), FetchBodyError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = &self.body[self.at..];
        if rest.is_empty() || self.found == self.expected {
            self.done = true;
            return (!rest.is_empty() || self.found != self.expected).then_some(Err(
                FetchBodyError::CountMismatch {
                    expected: self.expected,
                    found: self.found + u32::from(!rest.is_empty()),
                    bytes: self.body.len(),
                },
            ));
        }
        match Frame::parse_at(rest, self.at) {
            Ok(frame) => {
                let offset = self.offset;
                self.at += frame.len();
                self.offset = self.offset.wrapping_add(1);
                self.found += 1;
                Some(Ok((offset, frame)))
            }
            Err(source) => {
                self.done = true;
                Some(Err(FetchBodyError::Frame {
                    offset: self.offset,
                    source,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameFields, encode_frame};
    use proptest::prelude::*;

    fn request() -> FetchRequest {
        FetchRequest {
            request_id: 7,
            stream_id: 3,
            from_offset: 1 << 40,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
        }
    }

    fn body_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let mut frame = vec![0u8; HEADER_LEN + payload.len()];
            encode_frame(
                &mut frame,
                &FrameFields::data(3, 9, i as u64 + 1, 0),
                payload,
            )
            .unwrap();
            body.extend(frame);
        }
        body
    }

    #[test]
    fn request_layout_is_pinned() {
        let mut buf = [0u8; FETCH_REQUEST_LEN];
        request().encode(&mut buf);
        assert_eq!(&buf[0..2], b"KF");
        assert_eq!(buf[2], FETCH_VERSION);
        assert_eq!(buf[3], FETCH_REQUEST);
        assert_eq!(&buf[4..8], &7u32.to_le_bytes());
        assert_eq!(&buf[8..12], &3u32.to_le_bytes());
        assert_eq!(&buf[12..16], &(1u32 << 20).to_le_bytes());
        assert_eq!(&buf[16..24], &(1u64 << 40).to_le_bytes());
        assert_eq!(&buf[24..28], &500u32.to_le_bytes());
        assert_eq!(&buf[28..32], &[0; 4]);
        assert_eq!(FetchRequest::decode(&buf), Ok(request()));
    }

    #[test]
    fn response_round_trip_with_records() {
        let body = body_of(&[b"one", b"two", b""]);
        let header = FetchResponseHeader::ok(&request(), 100, 3, body.len() as u32, 104, 0);
        let mut buf = [0u8; FETCH_RESPONSE_HEADER_LEN];
        header.encode(&mut buf);
        assert_eq!(&buf[0..2], b"KF");
        assert_eq!(buf[3], FETCH_RESPONSE);
        assert_eq!(&buf[24..32], &103u64.to_le_bytes());
        let decoded = FetchResponseHeader::decode(&buf).unwrap();
        assert_eq!(decoded, header);
        let records: Vec<_> = decoded
            .records(&body)
            .collect::<Result<_, _>>()
            .expect("body matches header");
        let offsets: Vec<u64> = records.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(offsets, [100, 101, 102]);
        assert_eq!(records[1].1.payload(), b"two");
    }

    #[test]
    fn error_response_round_trip() {
        let header =
            FetchResponseHeader::error(&request(), FetchErrorCode::OffsetOutOfRange, 50, 10);
        let mut buf = [0u8; FETCH_RESPONSE_HEADER_LEN];
        header.encode(&mut buf);
        let decoded = FetchResponseHeader::decode(&buf).unwrap();
        assert_eq!(decoded.error, Some(FetchErrorCode::OffsetOutOfRange));
        assert_eq!((decoded.high_watermark, decoded.log_start), (50, 10));
        assert_eq!(decoded.records(&[]).count(), 0);
        for code in FetchErrorCode::ALL {
            assert_eq!(FetchErrorCode::from_u16(code as u16), Some(code));
        }
        assert_eq!(FetchErrorCode::from_u16(0), None);
    }

    #[test]
    fn decoder_names_every_problem() {
        let mut good = [0u8; FETCH_REQUEST_LEN];
        request().encode(&mut good);
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            FetchRequest::decode(&bad),
            Err(FetchDecodeError::BadMagic { .. })
        ));
        let mut bad = good;
        bad[2] = 2;
        assert_eq!(
            FetchRequest::decode(&bad),
            Err(FetchDecodeError::UnsupportedVersion { found: 2 })
        );
        let mut bad = good;
        bad[3] = FETCH_RESPONSE;
        assert!(matches!(
            FetchRequest::decode(&bad),
            Err(FetchDecodeError::UnexpectedKind { found: 2, .. })
        ));
        let mut bad = good;
        bad[31] = 1;
        assert!(matches!(
            FetchRequest::decode(&bad),
            Err(FetchDecodeError::ReservedBitsSet { .. })
        ));
        assert!(matches!(
            FetchRequest::decode(&good[..31]),
            Err(FetchDecodeError::Truncated { needed: 32, .. })
        ));

        let header = FetchResponseHeader::ok(&request(), 0, 1, 45, 1, 0);
        let mut good = [0u8; FETCH_RESPONSE_HEADER_LEN];
        header.encode(&mut good);
        let mut bad = good;
        bad[52..56].copy_from_slice(&(FETCH_BYTES_MAX + 1).to_le_bytes());
        assert!(matches!(
            FetchResponseHeader::decode(&bad),
            Err(FetchDecodeError::TooLarge { .. })
        ));
        let mut bad = good;
        bad[52..56].copy_from_slice(&39u32.to_le_bytes());
        assert!(matches!(
            FetchResponseHeader::decode(&bad),
            Err(FetchDecodeError::Inconsistent { .. })
        ));
        let mut bad = good;
        bad[4] = 99;
        assert_eq!(
            FetchResponseHeader::decode(&bad),
            Err(FetchDecodeError::UnknownErrorCode { found: 99 })
        );
        let mut bad = good;
        bad[4] = FetchErrorCode::UnknownStream as u8;
        assert!(matches!(
            FetchResponseHeader::decode(&bad),
            Err(FetchDecodeError::Inconsistent { .. })
        ));
    }

    #[test]
    fn body_that_disagrees_with_header_is_reported() {
        let body = body_of(&[b"a", b"b"]);
        let too_few: Vec<_> = FetchRecords::new(&body, 0, 3).collect();
        assert!(matches!(
            too_few.last(),
            Some(Err(FetchBodyError::CountMismatch {
                expected: 3,
                found: 2,
                ..
            }))
        ));
        let too_many: Vec<_> = FetchRecords::new(&body, 0, 1).collect();
        assert_eq!(too_many.len(), 2);
        assert!(matches!(
            too_many[1],
            Err(FetchBodyError::CountMismatch { .. })
        ));
        let mut corrupt = body.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        let results: Vec<_> = FetchRecords::new(&corrupt, 5, 2).collect();
        assert!(matches!(
            results[1],
            Err(FetchBodyError::Frame { offset: 6, .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_request_round_trip(request_id: u32, stream_id: u32, from_offset: u64, max_bytes: u32, max_wait_ms: u32) {
            let request = FetchRequest { request_id, stream_id, from_offset, max_bytes, max_wait_ms };
            let mut buf = [0u8; FETCH_REQUEST_LEN];
            request.encode(&mut buf);
            prop_assert_eq!(FetchRequest::decode(&buf), Ok(request));
        }

        #[test]
        fn prop_response_round_trip(
            request_id: u32,
            first_offset in 0u64..u64::MAX / 2,
            high_watermark: u64,
            log_start: u64,
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..20),
        ) {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let body = body_of(&slices);
            let request = FetchRequest { request_id, ..request() };
            let header = FetchResponseHeader::ok(&request, first_offset, payloads.len() as u32, body.len() as u32, high_watermark, log_start);
            let mut buf = [0u8; FETCH_RESPONSE_HEADER_LEN];
            header.encode(&mut buf);
            let decoded = FetchResponseHeader::decode(&buf).unwrap();
            prop_assert_eq!(decoded, header);
            let records: Vec<_> = decoded.records(&body).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(records.len(), payloads.len());
            for (i, ((offset, frame), payload)) in records.iter().zip(&payloads).enumerate() {
                prop_assert_eq!(*offset, first_offset + i as u64);
                prop_assert_eq!(frame.payload(), payload.as_slice());
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), count in 0u32..10, first: u64) {
            let _ = FetchRequest::decode(&bytes).map_err(|err| err.to_string());
            if let Ok(header) = FetchResponseHeader::decode(&bytes) {
                prop_assert!(header.byte_len <= FETCH_BYTES_MAX);
                prop_assert!(header.record_count as usize * HEADER_LEN <= header.byte_len as usize);
            }
            let mut seen = 0usize;
            for item in FetchRecords::new(&bytes, first, count) {
                match item {
                    Ok((_, frame)) => seen += frame.len(),
                    Err(err) => { let _ = err.to_string(); }
                }
            }
            prop_assert!(seen <= bytes.len());
        }
    }
}
