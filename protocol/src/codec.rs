//! Decoding frames in place and encoding them into caller buffers.

use zerocopy::FromBytes;
use zerocopy::little_endian::{U16, U32, U64};

use crate::body::{AckBody, ErrorBody};
use crate::header::{CRC_OFFSET, FrameHeader, FrameKind, flags};
use crate::{EncodeError, FrameError, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN, PROTOCOL_VERSION};

/// CRC-32 of a frame: header bytes 0..12 and 16..40, then the payload.
///
/// `header` must be at least [`HEADER_LEN`] bytes (only the first 40 are read).
pub fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    debug_assert!(header.len() >= HEADER_LEN);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..CRC_OFFSET]);
    hasher.update(&header[CRC_OFFSET + 4..HEADER_LEN]);
    hasher.update(payload);
    hasher.finalize()
}

/// A validated frame inside a caller's buffer: header and payload borrowed, never copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    header: &'a FrameHeader,
    payload: &'a [u8],
    bytes: &'a [u8],
    kind: FrameKind,
}

impl<'a> Frame<'a> {
    /// Decode and validate the frame at the start of `buf` (`offset` is only
    /// used in error reports). On success the frame is `frame.len()` bytes long;
    /// bytes after it are not looked at.
    pub fn parse_at(buf: &'a [u8], offset: usize) -> Result<Self, FrameError> {
        let (header, rest) =
            FrameHeader::ref_from_prefix(buf).map_err(|_| FrameError::Truncated {
                offset,
                needed: HEADER_LEN,
                available: buf.len(),
            })?;
        if header.magic.get() != MAGIC {
            return Err(FrameError::BadMagic {
                offset,
                found: header.magic.get(),
            });
        }
        if header.version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion {
                offset,
                found: header.version,
            });
        }
        let kind = FrameKind::from_u8(header.kind).ok_or(FrameError::UnknownKind {
            offset,
            found: header.kind,
        })?;
        if header.flags.get() & !flags::ALL != 0 || header.reserved.get() != 0 {
            return Err(FrameError::ReservedBitsSet {
                offset,
                flags: header.flags.get(),
                reserved: header.reserved.get(),
            });
        }
        let payload_len = header.payload_len.get() as usize;
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge {
                offset,
                len: payload_len,
                max: MAX_PAYLOAD_LEN,
            });
        }
        let Some(payload) = rest.get(..payload_len) else {
            return Err(FrameError::LengthMismatch {
                offset,
                declared: payload_len,
                available: rest.len(),
            });
        };
        let bytes = &buf[..HEADER_LEN + payload_len];
        let computed = frame_crc(bytes, payload);
        if computed != header.crc32.get() {
            return Err(FrameError::CrcMismatch {
                offset,
                expected: header.crc32.get(),
                computed,
            });
        }
        let body_needed = match kind {
            FrameKind::Ack => size_of::<AckBody>(),
            FrameKind::Error => size_of::<ErrorBody>(),
            FrameKind::Data | FrameKind::Heartbeat => 0,
        };
        if payload_len < body_needed || (kind == FrameKind::Ack && payload_len != body_needed) {
            return Err(FrameError::BadBody {
                offset,
                kind: if kind == FrameKind::Ack {
                    "ack"
                } else {
                    "error"
                },
                expected: body_needed,
                found: payload_len,
            });
        }
        Ok(Self {
            header,
            payload,
            bytes,
            kind,
        })
    }

    /// Decode and validate the frame at the start of `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self, FrameError> {
        Self::parse_at(buf, 0)
    }

    /// The header.
    pub fn header(&self) -> &'a FrameHeader {
        self.header
    }

    /// The frame kind.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The payload bytes.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The whole frame (header and payload) as it is on the wire.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Header plus payload length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Stream id.
    pub fn stream_id(&self) -> u32 {
        self.header.stream_id.get()
    }

    /// Producer id.
    pub fn producer_id(&self) -> u32 {
        self.header.producer_id.get()
    }

    /// Sequence number.
    pub fn sequence(&self) -> u64 {
        self.header.sequence.get()
    }

    /// Producer timestamp in nanoseconds.
    pub fn timestamp_ns(&self) -> u64 {
        self.header.timestamp_ns.get()
    }

    /// Flag bits.
    pub fn flags(&self) -> u16 {
        self.header.flags.get()
    }

    /// The ACK body, if this is an ACK frame.
    pub fn ack(&self) -> Option<&'a AckBody> {
        (self.kind == FrameKind::Ack)
            .then(|| AckBody::ref_from_bytes(self.payload).ok())
            .flatten()
    }

    /// The ERROR body and its optional message bytes, if this is an ERROR frame.
    pub fn error(&self) -> Option<(&'a ErrorBody, &'a [u8])> {
        (self.kind == FrameKind::Error)
            .then(|| ErrorBody::ref_from_prefix(self.payload).ok())
            .flatten()
    }
}

/// A received datagram: one or more frames back to back.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    buf: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Wrap a received buffer. Nothing is validated until iteration.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Iterate the frames in place. Yields `Err` at most once: a frame that
    /// does not parse leaves the rest of the datagram without a known length,
    /// so iteration ends after it. Frames before it are valid.
    pub fn frames(&self) -> Frames<'a> {
        Frames {
            buf: self.buf,
            offset: 0,
            done: self.buf.is_empty(),
        }
    }
}

/// Iterator over the frames of a [`Datagram`].
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    buf: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    /// Byte offset of the next frame.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = &self.buf[self.offset..];
        match Frame::parse_at(rest, self.offset) {
            Ok(frame) => {
                self.offset += frame.len();
                self.done = self.offset >= self.buf.len();
                Some(Ok(frame))
            }
            Err(err) => {
                self.done = true;
                Some(Err(err))
            }
        }
    }
}

/// The header fields of a frame to encode (magic, version, length and CRC are filled in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameFields {
    /// Frame kind.
    pub kind: FrameKind,
    /// Flag bits from [`flags`].
    pub flags: u16,
    /// Stream id.
    pub stream_id: u32,
    /// Producer id.
    pub producer_id: u32,
    /// Sequence number.
    pub sequence: u64,
    /// Timestamp in nanoseconds.
    pub timestamp_ns: u64,
}

impl FrameFields {
    /// Fields of a DATA frame without flags.
    pub fn data(stream_id: u32, producer_id: u32, sequence: u64, timestamp_ns: u64) -> Self {
        Self {
            kind: FrameKind::Data,
            flags: 0,
            stream_id,
            producer_id,
            sequence,
            timestamp_ns,
        }
    }
}

/// Encode one frame at the start of `buf`; returns the bytes written.
pub fn encode_frame(
    buf: &mut [u8],
    fields: &FrameFields,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    encode_frame_parts(buf, fields, &[payload])
}

/// Encode one frame whose payload is the concatenation of `parts`.
fn encode_frame_parts(
    buf: &mut [u8],
    fields: &FrameFields,
    parts: &[&[u8]],
) -> Result<usize, EncodeError> {
    let payload_len: usize = parts.iter().map(|part| part.len()).sum();
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(EncodeError::PayloadTooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    if fields.flags & !flags::ALL != 0 {
        return Err(EncodeError::UnknownFlags {
            flags: fields.flags,
        });
    }
    let needed = HEADER_LEN + payload_len;
    let available = buf.len();
    let Some(out) = buf.get_mut(..needed) else {
        return Err(EncodeError::BufferFull { needed, available });
    };
    let header = FrameHeader {
        magic: U16::new(MAGIC),
        version: PROTOCOL_VERSION,
        kind: fields.kind as u8,
        flags: U16::new(fields.flags),
        reserved: U16::ZERO,
        payload_len: U32::new(payload_len as u32),
        crc32: U32::ZERO,
        stream_id: U32::new(fields.stream_id),
        producer_id: U32::new(fields.producer_id),
        sequence: U64::new(fields.sequence),
        timestamp_ns: U64::new(fields.timestamp_ns),
    };
    let (head, body) = out.split_at_mut(HEADER_LEN);
    zerocopy::IntoBytes::write_to(&header, head).expect("head is exactly HEADER_LEN bytes");
    let mut at = 0;
    for part in parts {
        body[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    let crc = frame_crc(head, body);
    head[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(needed)
}

/// Packs frames back to back into a caller's buffer (one datagram).
///
/// Nothing is allocated; when the next frame does not fit, `push_*` returns
/// [`EncodeError::BufferFull`] and the datagram built so far stays intact.
#[derive(Debug)]
pub struct DatagramBuilder<'a> {
    buf: &'a mut [u8],
    len: usize,
    frames: usize,
}

impl<'a> DatagramBuilder<'a> {
    /// Start an empty datagram in `buf` (its length is the datagram's limit).
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            len: 0,
            frames: 0,
        }
    }

    /// Append one frame.
    pub fn push(&mut self, fields: &FrameFields, payload: &[u8]) -> Result<(), EncodeError> {
        self.push_parts(fields, &[payload])
    }

    fn push_parts(&mut self, fields: &FrameFields, parts: &[&[u8]]) -> Result<(), EncodeError> {
        let written = encode_frame_parts(&mut self.buf[self.len..], fields, parts)?;
        self.len += written;
        self.frames += 1;
        Ok(())
    }

    /// Append a DATA frame.
    pub fn push_data(
        &mut self,
        stream_id: u32,
        producer_id: u32,
        sequence: u64,
        timestamp_ns: u64,
        payload: &[u8],
    ) -> Result<(), EncodeError> {
        self.push(
            &FrameFields::data(stream_id, producer_id, sequence, timestamp_ns),
            payload,
        )
    }

    /// Append an ACK frame for `(stream_id, producer_id)` acknowledging `sequence`.
    pub fn push_ack(
        &mut self,
        stream_id: u32,
        producer_id: u32,
        sequence: u64,
        timestamp_ns: u64,
        body: &AckBody,
    ) -> Result<(), EncodeError> {
        let fields = FrameFields {
            kind: FrameKind::Ack,
            flags: 0,
            stream_id,
            producer_id,
            sequence,
            timestamp_ns,
        };
        self.push(&fields, zerocopy::IntoBytes::as_bytes(body))
    }

    /// Append an ERROR frame about the frame `(stream_id, producer_id, sequence)`.
    pub fn push_error(
        &mut self,
        stream_id: u32,
        producer_id: u32,
        sequence: u64,
        body: &ErrorBody,
        message: &[u8],
    ) -> Result<(), EncodeError> {
        let fields = FrameFields {
            kind: FrameKind::Error,
            flags: 0,
            stream_id,
            producer_id,
            sequence,
            timestamp_ns: 0,
        };
        self.push_parts(&fields, &[zerocopy::IntoBytes::as_bytes(body), message])
    }

    /// Bytes used so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no frame was pushed.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Frames pushed so far.
    pub fn frame_count(&self) -> usize {
        self.frames
    }

    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.len
    }

    /// The encoded datagram.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Forget the frames pushed so far and start a new datagram in the same buffer.
    pub fn clear(&mut self) {
        self.len = 0;
        self.frames = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DurabilityLevel, ErrorCode, MAX_DATAGRAM_LEN};
    use proptest::prelude::*;

    fn data_frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        let n = encode_frame(&mut buf, &FrameFields::data(7, 9, seq, 1234), payload).unwrap();
        assert_eq!(n, buf.len());
        buf
    }

    #[test]
    fn round_trip_one_frame() {
        let buf = data_frame(42, b"hello");
        let frame = Frame::parse(&buf).unwrap();
        assert_eq!(frame.kind(), FrameKind::Data);
        assert_eq!(frame.stream_id(), 7);
        assert_eq!(frame.producer_id(), 9);
        assert_eq!(frame.sequence(), 42);
        assert_eq!(frame.timestamp_ns(), 1234);
        assert_eq!(frame.payload(), b"hello");
        assert_eq!(frame.len(), HEADER_LEN + 5);
        assert_eq!(&buf[..2], b"KX");
    }

    #[test]
    fn every_corruption_is_named() {
        let good = data_frame(1, b"payload");
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(
            Frame::parse(&bad),
            Err(FrameError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[2] = 9;
        assert!(matches!(
            Frame::parse(&bad),
            Err(FrameError::UnsupportedVersion { found: 9, .. })
        ));
        let mut bad = good.clone();
        bad[3] = 77;
        assert!(matches!(
            Frame::parse(&bad),
            Err(FrameError::UnknownKind { found: 77, .. })
        ));
        let mut bad = good.clone();
        bad[6] = 1;
        assert!(matches!(
            Frame::parse(&bad),
            Err(FrameError::ReservedBitsSet { .. })
        ));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            Frame::parse(&bad),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(
            Frame::parse(&bad),
            Err(FrameError::LengthMismatch {
                offset: 0,
                declared: 100,
                available: 7
            })
        );
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        let err = Frame::parse(&bad).unwrap_err();
        assert!(matches!(err, FrameError::CrcMismatch { .. }));
        assert_eq!(err.code(), ErrorCode::CrcMismatch);
        assert!(matches!(
            Frame::parse(&good[..39]),
            Err(FrameError::Truncated {
                needed: 40,
                available: 39,
                ..
            })
        ));
    }

    #[test]
    fn crc_covers_every_header_field() {
        let good = data_frame(1, b"x");
        // Bytes 0..12 are structural (checked before the CRC), 12..16 is the CRC itself.
        for byte in CRC_OFFSET + 4..HEADER_LEN {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            assert!(
                matches!(Frame::parse(&bad), Err(FrameError::CrcMismatch { .. })),
                "flip at byte {byte} not caught by crc"
            );
        }
    }

    #[test]
    fn datagram_of_many_frames() {
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        let mut builder = DatagramBuilder::new(&mut buf);
        let payload = [0xAB; 64];
        let mut pushed = 0u64;
        while builder
            .push_data(3, 4, pushed + 1, pushed, &payload)
            .is_ok()
        {
            pushed += 1;
        }
        assert_eq!(pushed as usize, MAX_DATAGRAM_LEN / (HEADER_LEN + 64));
        let bytes = builder.as_bytes().to_vec();
        let frames: Vec<_> = Datagram::new(&bytes)
            .frames()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(frames.len() as u64, pushed);
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(frame.sequence(), i as u64 + 1);
            assert_eq!(frame.payload(), &payload);
        }
    }

    #[test]
    fn bad_frame_in_middle_stops_iteration_after_good_ones() {
        let mut bytes = data_frame(1, b"a");
        let second_at = bytes.len();
        bytes.extend(data_frame(2, b"b"));
        bytes.extend(data_frame(3, b"c"));
        bytes[second_at + HEADER_LEN] ^= 0xFF;
        let results: Vec<_> = Datagram::new(&bytes).frames().collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert_eq!(results[1].unwrap_err().offset(), second_at);
    }

    #[test]
    fn ack_and_error_bodies() {
        let mut buf = [0u8; 256];
        let mut builder = DatagramBuilder::new(&mut buf);
        let ack = AckBody {
            credit: U32::new(4096),
            level: DurabilityLevel::Fsync as u8,
            reserved: [0; 3],
            last_offset: U64::new(77),
        };
        builder.push_ack(1, 2, 99, 5, &ack).unwrap();
        let err = ErrorBody {
            code: U16::new(ErrorCode::UnknownStream as u16),
            reserved: U16::ZERO,
            detail: U32::new(0),
        };
        builder
            .push_error(1, 2, 100, &err, b"no such stream")
            .unwrap();
        let bytes = builder.as_bytes().to_vec();
        let mut frames = Datagram::new(&bytes).frames();
        let ack_frame = frames.next().unwrap().unwrap();
        assert_eq!(ack_frame.ack(), Some(&ack));
        assert_eq!(ack_frame.sequence(), 99);
        let err_frame = frames.next().unwrap().unwrap();
        let (body, message) = err_frame.error().unwrap();
        assert_eq!(
            ErrorCode::from_u16(body.code.get()),
            Some(ErrorCode::UnknownStream)
        );
        assert_eq!(message, b"no such stream");
        assert!(frames.next().is_none());
    }

    #[test]
    fn ack_with_short_body_is_rejected() {
        let mut buf = [0u8; 64];
        let fields = FrameFields {
            kind: FrameKind::Ack,
            ..FrameFields::data(1, 1, 1, 1)
        };
        let n = encode_frame(&mut buf, &fields, &[0u8; 3]).unwrap();
        assert!(matches!(
            Frame::parse(&buf[..n]),
            Err(FrameError::BadBody { .. })
        ));
    }

    #[test]
    fn encoder_errors() {
        let mut small = [0u8; 50];
        assert_eq!(
            encode_frame(&mut small, &FrameFields::data(1, 1, 1, 1), &[0; 11]),
            Err(EncodeError::BufferFull {
                needed: 51,
                available: 50
            })
        );
        let mut big = vec![0u8; MAX_PAYLOAD_LEN + 100];
        assert!(matches!(
            encode_frame(
                &mut big,
                &FrameFields::data(1, 1, 1, 1),
                &vec![0; MAX_PAYLOAD_LEN + 1]
            ),
            Err(EncodeError::PayloadTooLarge { .. })
        ));
        let fields = FrameFields {
            flags: 0x8000,
            ..FrameFields::data(1, 1, 1, 1)
        };
        assert_eq!(
            encode_frame(&mut big, &fields, b""),
            Err(EncodeError::UnknownFlags { flags: 0x8000 })
        );
    }

    #[test]
    fn error_codes_round_trip() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.index(), i);
            assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        for level in DurabilityLevel::ALL {
            assert_eq!(level.name().parse::<DurabilityLevel>(), Ok(level));
            assert_eq!(DurabilityLevel::from_u8(level as u8), Some(level));
        }
        assert!("quorum".parse::<DurabilityLevel>().is_err());
    }

    proptest! {
        #[test]
        fn prop_round_trip(
            frames in proptest::collection::vec(
                (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>(), 0u16..4, proptest::collection::vec(any::<u8>(), 0..300)),
                1..20,
            )
        ) {
            let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
            let mut builder = DatagramBuilder::new(&mut buf);
            for (stream, producer, seq, ts, fl, payload) in &frames {
                let fields = FrameFields { flags: *fl, ..FrameFields::data(*stream, *producer, *seq, *ts) };
                builder.push(&fields, payload).unwrap();
            }
            let bytes = builder.as_bytes().to_vec();
            let decoded: Vec<_> = Datagram::new(&bytes).frames().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(decoded.len(), frames.len());
            for (frame, (stream, producer, seq, ts, fl, payload)) in decoded.iter().zip(&frames) {
                prop_assert_eq!(frame.stream_id(), *stream);
                prop_assert_eq!(frame.producer_id(), *producer);
                prop_assert_eq!(frame.sequence(), *seq);
                prop_assert_eq!(frame.timestamp_ns(), *ts);
                prop_assert_eq!(frame.flags(), *fl);
                prop_assert_eq!(frame.payload(), payload.as_slice());
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut total = 0;
            for result in Datagram::new(&bytes).frames() {
                match result {
                    Ok(frame) => total += frame.len(),
                    Err(err) => { prop_assert!(err.offset() <= bytes.len()); let _ = err.to_string(); }
                }
            }
            prop_assert!(total <= bytes.len());
        }

        #[test]
        fn prop_single_bit_flip_is_detected(seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 1..200), bit in 0usize..(8 * 240)) {
            let good = data_frame(seq, &payload);
            let bit = bit % (good.len() * 8);
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let parsed = Frame::parse(&bad);
            prop_assert!(parsed.is_err(), "flip of bit {} accepted: {:?}", bit, parsed);
        }
    }
}
