//! Byte layouts of segments and batch records (drawn in the crate docs), and
//! the record checks shared by recovery, the followers and the tests.

use core::mem::{offset_of, size_of};

use kaelix_protocol::{Frame, FrameError, HEADER_LEN};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a hugepage and the unit of every segment and mapping length.
pub const HUGE_PAGE_BYTES: u64 = 2 * 1024 * 1024;
/// Size of the segment header at byte 0 of every segment.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Size of a batch record header (and of the end-of-segment marker).
pub const BATCH_HEADER_LEN: usize = 40;
/// Magic at byte 0 of a segment: the bytes `KXSEG001`.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"KXSEG001");
/// Magic at byte 0 of a batch record: the bytes `KXB1`.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"KXB1");
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Batch kind: a batch of frames of one stream.
pub const KIND_DATA: u8 = 1;
/// Batch kind: end of segment; nothing follows in this segment.
pub const KIND_END: u8 = 2;

/// The 64-byte header at the start of every segment.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: U64,
    /// CRC-32 of bytes 12..64.
    pub header_crc: U32,
    /// [`SEGMENT_VERSION`].
    pub version: U32,
    /// Segment number (0, 1, 2, ...); the segment starts at log position `number * size`.
    pub number: U64,
    /// Segment size in bytes (a multiple of 2 MiB).
    pub size: U64,
    /// Caller time when the segment was created, ns.
    pub created_ns: U64,
    /// Zero.
    pub reserved: [u8; 24],
}

const _: () = {
    assert!(size_of::<SegmentHeader>() == SEGMENT_HEADER_LEN);
    assert!(offset_of!(SegmentHeader, magic) == 0);
    assert!(offset_of!(SegmentHeader, header_crc) == 8);
    assert!(offset_of!(SegmentHeader, version) == 12);
    assert!(offset_of!(SegmentHeader, number) == 16);
    assert!(offset_of!(SegmentHeader, size) == 24);
    assert!(offset_of!(SegmentHeader, created_ns) == 32);
    assert!(offset_of!(SegmentHeader, reserved) == 40);
};

impl SegmentHeader {
    /// A sealed (CRC filled) header.
    pub fn new(number: u64, size: u64, created_ns: u64) -> Self {
        let mut header = Self {
            magic: U64::new(SEGMENT_MAGIC),
            header_crc: U32::ZERO,
            version: U32::new(SEGMENT_VERSION),
            number: U64::new(number),
            size: U64::new(size),
            created_ns: U64::new(created_ns),
            reserved: [0; 24],
        };
        header.header_crc = U32::new(crc32fast::hash(&header.as_bytes()[12..]));
        header
    }

    /// Parse and check the header at the start of `bytes`.
    pub fn check(bytes: &[u8], number: u64, size: u64) -> Result<Self, String> {
        let Ok((header, _)) = Self::read_from_prefix(bytes) else {
            return Err(format!(
                "segment header needs {SEGMENT_HEADER_LEN} bytes, file has {}",
                bytes.len()
            ));
        };
        if header.magic.get() != SEGMENT_MAGIC {
            return Err(format!("bad segment magic 0x{:016x}", header.magic.get()));
        }
        let crc = crc32fast::hash(&header.as_bytes()[12..]);
        if crc != header.header_crc.get() {
            return Err(format!(
                "segment header crc mismatch: stored 0x{:08x}, computed 0x{crc:08x}",
                header.header_crc.get()
            ));
        }
        if header.version.get() != SEGMENT_VERSION {
            return Err(format!(
                "unsupported segment version {}",
                header.version.get()
            ));
        }
        if header.number.get() != number || header.size.get() != size {
            return Err(format!(
                "segment header says number {} size {}, expected number {number} size {size}",
                header.number.get(),
                header.size.get()
            ));
        }
        Ok(header)
    }
}

/// The 40-byte header of a batch record (also the end-of-segment marker).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct BatchHeader {
    /// [`BATCH_MAGIC`].
    pub magic: U32,
    /// CRC-32 of bytes 8..40 of this header.
    pub header_crc: U32,
    /// [`KIND_DATA`] or [`KIND_END`].
    pub kind: u8,
    /// Zero.
    pub flags: u8,
    /// Zero.
    pub reserved: U16,
    /// Stream of every frame in the batch (0 in an end marker).
    pub stream_id: U32,
    /// Frames in the batch (0 in an end marker).
    pub frame_count: U32,
    /// Bytes of frames after this header (0 in an end marker).
    pub byte_len: U32,
    /// Stream offset of the first frame.
    pub base_offset: U64,
    /// Caller time of the append (or of the seal), ns.
    pub append_time_ns: U64,
}

const _: () = {
    assert!(size_of::<BatchHeader>() == BATCH_HEADER_LEN);
    assert!(offset_of!(BatchHeader, magic) == 0);
    assert!(offset_of!(BatchHeader, header_crc) == 4);
    assert!(offset_of!(BatchHeader, kind) == 8);
    assert!(offset_of!(BatchHeader, flags) == 9);
    assert!(offset_of!(BatchHeader, reserved) == 10);
    assert!(offset_of!(BatchHeader, stream_id) == 12);
    assert!(offset_of!(BatchHeader, frame_count) == 16);
    assert!(offset_of!(BatchHeader, byte_len) == 20);
    assert!(offset_of!(BatchHeader, base_offset) == 24);
    assert!(offset_of!(BatchHeader, append_time_ns) == 32);
};

impl BatchHeader {
    /// A data batch header with its CRC filled in.
    pub fn data(
        stream_id: u32,
        frame_count: u32,
        byte_len: u32,
        base_offset: u64,
        append_time_ns: u64,
    ) -> Self {
        Self::sealed(
            KIND_DATA,
            stream_id,
            frame_count,
            byte_len,
            base_offset,
            append_time_ns,
        )
    }

    /// An end-of-segment marker.
    pub fn end(append_time_ns: u64) -> Self {
        Self::sealed(KIND_END, 0, 0, 0, 0, append_time_ns)
    }

    fn sealed(
        kind: u8,
        stream_id: u32,
        frame_count: u32,
        byte_len: u32,
        base_offset: u64,
        append_time_ns: u64,
    ) -> Self {
        let mut header = Self {
            magic: U32::new(BATCH_MAGIC),
            header_crc: U32::ZERO,
            kind,
            flags: 0,
            reserved: U16::ZERO,
            stream_id: U32::new(stream_id),
            frame_count: U32::new(frame_count),
            byte_len: U32::new(byte_len),
            base_offset: U64::new(base_offset),
            append_time_ns: U64::new(append_time_ns),
        };
        header.header_crc = U32::new(crc32fast::hash(&header.as_bytes()[8..]));
        header
    }

    /// Offset one past the last frame (`base_offset + frame_count`).
    pub fn next_offset(&self) -> u64 {
        self.base_offset.get() + u64::from(self.frame_count.get())
    }

    /// Bytes the record takes in the segment, header included.
    pub fn record_len(&self) -> usize {
        BATCH_HEADER_LEN + self.byte_len.get() as usize
    }

    /// Read a header at the start of `bytes` without checking anything.
    pub fn peek(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(header, _)| header)
    }
}

/// Why a record does not check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordFault {
    /// All zero where a header should be: the end of written data.
    Zero,
    /// Fewer bytes than a header before the end of the segment or file.
    Truncated {
        /// Bytes left.
        available: usize,
    },
    /// The magic is wrong.
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// The header CRC is wrong.
    HeaderCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Kind, flags or reserved bytes hold values this version does not write.
    BadFields,
    /// The frames run past the end of the segment or file.
    FramesTruncated {
        /// Frame bytes the header declares.
        declared: usize,
        /// Bytes left.
        available: usize,
    },
    /// A frame does not parse (CRC or other).
    Frame(FrameError),
    /// A frame belongs to another stream.
    FrameStream {
        /// The frame's stream.
        found: u32,
    },
    /// The frame count or byte length does not match the frames.
    Count {
        /// Frames the header declares.
        declared: u32,
        /// Frames found.
        found: u32,
    },
}

impl core::fmt::Display for RecordFault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Zero => write!(f, "zero bytes where a batch header should be"),
            Self::Truncated { available } => {
                write!(f, "batch header truncated ({available} bytes left)")
            }
            Self::BadMagic { found } => write!(f, "bad batch magic 0x{found:08x}"),
            Self::HeaderCrc { stored, computed } => {
                write!(
                    f,
                    "batch header crc mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"
                )
            }
            Self::BadFields => write!(
                f,
                "batch header has unknown kind or non-zero reserved fields"
            ),
            Self::FramesTruncated {
                declared,
                available,
            } => {
                write!(
                    f,
                    "batch declares {declared} frame bytes, {available} available"
                )
            }
            Self::Frame(err) => write!(f, "frame in batch: {err}"),
            Self::FrameStream { found } => write!(
                f,
                "frame of stream {found} inside the batch of another stream"
            ),
            Self::Count { declared, found } => {
                write!(f, "batch declares {declared} frames, holds {found}")
            }
        }
    }
}

/// What [`check_record`] found at an offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A valid data batch.
    Data(BatchHeader),
    /// A valid end-of-segment marker.
    End(BatchHeader),
}

/// Check the header only (no frame CRCs): what readers of trusted memory use.
pub fn check_header(bytes: &[u8]) -> Result<BatchHeader, RecordFault> {
    let Some(header) = BatchHeader::peek(bytes) else {
        return Err(RecordFault::Truncated {
            available: bytes.len(),
        });
    };
    if header.magic.get() != BATCH_MAGIC {
        if header.as_bytes().iter().all(|byte| *byte == 0) {
            return Err(RecordFault::Zero);
        }
        return Err(RecordFault::BadMagic {
            found: header.magic.get(),
        });
    }
    let computed = crc32fast::hash(&header.as_bytes()[8..]);
    if computed != header.header_crc.get() {
        return Err(RecordFault::HeaderCrc {
            stored: header.header_crc.get(),
            computed,
        });
    }
    let known = match header.kind {
        KIND_DATA => header.frame_count.get() > 0,
        KIND_END => header.frame_count.get() == 0 && header.byte_len.get() == 0,
        _ => false,
    };
    if !known || header.flags != 0 || header.reserved.get() != 0 {
        return Err(RecordFault::BadFields);
    }
    Ok(header)
}

/// Check the record at the start of `bytes` completely: header CRC and every
/// frame's CRC, count and stream. `bytes` ends where the segment (or file) ends.
pub fn check_record(bytes: &[u8]) -> Result<Record, RecordFault> {
    let header = check_header(bytes)?;
    if header.kind == KIND_END {
        return Ok(Record::End(header));
    }
    let declared = header.byte_len.get() as usize;
    let Some(frames) = bytes.get(BATCH_HEADER_LEN..BATCH_HEADER_LEN + declared) else {
        return Err(RecordFault::FramesTruncated {
            declared,
            available: bytes.len() - BATCH_HEADER_LEN,
        });
    };
    let mut at = 0;
    let mut count = 0u32;
    while at < frames.len() {
        let frame = Frame::parse_at(&frames[at..], at).map_err(RecordFault::Frame)?;
        if frame.stream_id() != header.stream_id.get() {
            return Err(RecordFault::FrameStream {
                found: frame.stream_id(),
            });
        }
        at += frame.len();
        count += 1;
    }
    if count != header.frame_count.get() {
        return Err(RecordFault::Count {
            declared: header.frame_count.get(),
            found: count,
        });
    }
    Ok(Record::Data(header))
}

/// Length of the frame at the start of `bytes` as its header declares it
/// (no CRC check), or `None` when the header does not fit.
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    let len = bytes.get(8..12)?;
    let payload = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    Some(HEADER_LEN + payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_protocol::{FrameFields, encode_frame};

    fn frame(stream: u32, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        encode_frame(&mut buf, &FrameFields::data(stream, 1, seq, 0), payload).unwrap();
        buf
    }

    fn record(stream: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = frames.concat();
        let header = BatchHeader::data(stream, frames.len() as u32, body.len() as u32, 10, 99);
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn record_round_trip_and_faults() {
        let rec = record(3, &[frame(3, 1, b"abc"), frame(3, 2, b"")]);
        let Ok(Record::Data(header)) = check_record(&rec) else {
            panic!("valid record rejected")
        };
        assert_eq!(header.next_offset(), 12);
        assert_eq!(header.record_len(), rec.len());
        assert_eq!(check_record(&[0u8; 64]), Err(RecordFault::Zero));
        assert!(matches!(
            check_record(&rec[..20]),
            Err(RecordFault::Truncated { .. })
        ));
        assert!(matches!(
            check_record(&rec[..60]),
            Err(RecordFault::FramesTruncated { .. })
        ));
        let mut bad = rec.clone();
        bad[14] ^= 1;
        assert!(matches!(
            check_record(&bad),
            Err(RecordFault::HeaderCrc { .. })
        ));
        let mut bad = rec.clone();
        bad[BATCH_HEADER_LEN + 41] ^= 1;
        assert!(matches!(check_record(&bad), Err(RecordFault::Frame(_))));
        let other = record(3, &[frame(4, 1, b"x")]);
        assert!(matches!(
            check_record(&other),
            Err(RecordFault::FrameStream { found: 4 })
        ));
        let end = BatchHeader::end(5);
        assert!(matches!(check_record(end.as_bytes()), Ok(Record::End(_))));
    }

    #[test]
    fn segment_header_checks() {
        let header = SegmentHeader::new(7, HUGE_PAGE_BYTES, 1);
        let bytes = header.as_bytes().to_vec();
        assert!(SegmentHeader::check(&bytes, 7, HUGE_PAGE_BYTES).is_ok());
        assert!(SegmentHeader::check(&bytes, 8, HUGE_PAGE_BYTES).is_err());
        let mut bad = bytes.clone();
        bad[20] ^= 4;
        assert!(SegmentHeader::check(&bad, 7, HUGE_PAGE_BYTES).is_err());
        assert!(SegmentHeader::check(&bytes[..10], 7, HUGE_PAGE_BYTES).is_err());
    }
}
