//! # kaelix-protocol: the MemoryStreamer wire format
//!
//! Sans-IO codec for the frames producers send to the broker over UDP and the
//! frames the broker sends back (acknowledgements, errors, heartbeats).
//! It knows nothing of sockets, threads, clocks or the broker: callers hand in
//! byte slices and get typed views or typed errors back.
//!
//! What it leaves out on purpose: transport (the data plane owns sockets and
//! rings), storage record framing (the storage crate wraps frames in batches),
//! and anything that allocates. Decoding borrows the caller's buffer
//! ([`Frame`] is a zero-copy view); encoding writes into the caller's buffer
//! ([`DatagramBuilder`], [`encode_frame`]).
//!
//! ## Frame layout (40-byte header, all integers little-endian)
//!
//! ```text
//!  offset  size  field         meaning
//!  ------  ----  ------------  ---------------------------------------------
//!       0     2  magic         0x584B, the bytes "KX" on the wire
//!       2     1  version       1 (PROTOCOL_VERSION)
//!       3     1  kind          1 DATA, 2 ACK, 3 ERROR, 4 HEARTBEAT
//!       4     2  flags         bit 0 RETRANSMIT, bit 1 ACK_NOW; others zero
//!       6     2  reserved      must be zero
//!       8     4  payload_len   bytes of payload after the header (<= 65536)
//!      12     4  crc32         CRC-32 (IEEE) of bytes 0..12, 16..40, payload
//!      16     4  stream_id     stream the frame belongs to
//!      20     4  producer_id   producer that assigned the sequence
//!      24     8  sequence      per (producer, stream) sequence, from 1
//!      32     8  timestamp_ns  producer send time, ns (opaque to the broker)
//!      40     -  payload       payload_len bytes
//! ```
//!
//! A datagram carries one or more frames back to back with no padding. The
//! first frame starts at byte 0, so the XDP program can check the magic and
//! version of the first frame before steering a packet to the data plane.
//!
//! ACK and ERROR frames carry small fixed bodies as payload ([`AckBody`],
//! [`ErrorBody`]), documented on their types.
//!
//! ## Main types
//! - [`FrameHeader`]: the 40-byte header as a zerocopy struct.
//! - [`Frame`]: a validated view of one frame inside a buffer.
//! - [`Datagram`] / [`Frames`]: iterate the frames of a datagram in place.
//! - [`DatagramBuilder`]: pack frames into a caller's buffer.
//! - [`FrameError`], [`EncodeError`]: what was wrong, with the facts.
//! - [`fetch`]: the TCP fetch protocol of remote consumers ([`FetchRequest`],
//!   [`FetchResponseHeader`], [`FetchRecords`]).
//! - [`redirect`]: the leader hint a `not_leader` ERROR frame carries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod body;
mod codec;
mod error;
pub mod fetch;
mod header;
pub mod redirect;

pub use body::{AckBody, DurabilityLevel, ErrorBody, ErrorCode};
pub use codec::{Datagram, DatagramBuilder, Frame, FrameFields, Frames, encode_frame, frame_crc};
pub use error::{EncodeError, FrameError};
pub use fetch::{
    FetchBodyError, FetchDecodeError, FetchErrorCode, FetchRecords, FetchRequest,
    FetchResponseHeader,
};
pub use header::{FrameHeader, FrameKind, flags};
pub use redirect::{LEADER_HINT_MAX, LeaderHint, parse_leader_hint};

/// The two magic bytes at offset 0 of every frame, as a little-endian u16.
pub const MAGIC: u16 = u16::from_le_bytes(*b"KX");
/// The protocol version this crate encodes and accepts.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 40;
/// Largest payload a frame may carry (64 KiB).
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Largest UDP payload over IPv4 (65535 - 8 UDP - 20 IPv4).
pub const MAX_DATAGRAM_LEN: usize = 65_507;
