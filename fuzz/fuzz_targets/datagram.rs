//! Fuzz the datagram decoder: any byte string must decode to a run of valid
//! frames followed by at most one typed error, without panicking.
//!
//! Besides "no panic", every yielded item is checked against what the codec
//! promises:
//! - frames tile the datagram from byte 0 with no gaps, each inside the input;
//! - a decoded frame re-encodes to exactly the bytes it was decoded from
//!   (so the decoder accepted nothing the encoder cannot produce);
//! - ACK and ERROR frames expose their bodies;
//! - an error names the offset where the failing frame starts and ends iteration;
//! - `Frame::parse` on the whole input agrees with the first item of `frames()`.
#![no_main]

use kaelix_protocol::{
    Datagram, Frame, FrameFields, FrameKind, HEADER_LEN, MAX_PAYLOAD_LEN, encode_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = Datagram::new(data).frames();
    let mut offset = 0usize;
    let mut first = None;
    while let Some(item) = frames.next() {
        first.get_or_insert(item);
        match item {
            Ok(frame) => {
                check_frame(&frame, &data[offset..]);
                offset += frame.len();
                assert_eq!(frames.offset(), offset, "iterator offset drifted");
            }
            Err(err) => {
                assert_eq!(err.offset(), offset, "error names the wrong frame start");
                assert!(!err.code().name().is_empty());
                assert!(!err.to_string().is_empty());
                assert!(frames.next().is_none(), "iteration went on after an error");
                break;
            }
        }
    }
    assert!(offset <= data.len());
    if first.is_none() {
        assert!(data.is_empty(), "non-empty datagram yielded nothing");
    }

    let parsed = Frame::parse(data);
    match first {
        Some(item) => assert_eq!(parsed, item, "Frame::parse disagrees with frames()"),
        None => assert!(parsed.is_err(), "empty input parsed as a frame"),
    }
});

/// Check one decoded frame that starts at the beginning of `rest`.
fn check_frame(frame: &Frame<'_>, rest: &[u8]) {
    let len = frame.len();
    assert!(len >= HEADER_LEN && len <= rest.len());
    assert!(frame.payload().len() <= MAX_PAYLOAD_LEN);
    assert_eq!(
        frame.as_bytes(),
        &rest[..len],
        "frame is not a view of the input"
    );
    assert_eq!(frame.payload().len(), len - HEADER_LEN);
    assert_eq!(frame.header().frame_len(), len);
    assert_eq!(frame.header().frame_kind(), Some(frame.kind()));

    match frame.kind() {
        FrameKind::Ack => assert!(frame.ack().is_some(), "ACK without a body"),
        FrameKind::Error => assert!(frame.error().is_some(), "ERROR without a body"),
        FrameKind::Data | FrameKind::Heartbeat => {
            assert!(frame.ack().is_none() && frame.error().is_none());
        }
    }

    let fields = FrameFields {
        kind: frame.kind(),
        flags: frame.flags(),
        stream_id: frame.stream_id(),
        producer_id: frame.producer_id(),
        sequence: frame.sequence(),
        timestamp_ns: frame.timestamp_ns(),
    };
    let mut scratch = vec![0u8; len];
    let written = encode_frame(&mut scratch, &fields, frame.payload())
        .expect("a decoded frame's fields and payload are encodable");
    assert_eq!(
        &scratch[..written],
        frame.as_bytes(),
        "decode then encode changed the bytes"
    );
}
