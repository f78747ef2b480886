//! Codec benchmarks: encode + decode + CRC verify of 64-byte-payload frames.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kaelix_protocol::{Datagram, DatagramBuilder, Frame, FrameFields, HEADER_LEN, encode_frame};
use std::hint::black_box;

const PAYLOAD: [u8; 64] = [0x5A; 64];

fn one_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_64B");
    group.throughput(Throughput::Elements(1));
    let mut buf = [0u8; HEADER_LEN + 64];
    group.bench_function("encode_decode_verify", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let fields = FrameFields::data(1, 7, seq, seq);
            let n = encode_frame(&mut buf, &fields, black_box(&PAYLOAD)).expect("fits");
            let frame = Frame::parse(black_box(&buf[..n])).expect("valid");
            black_box(frame.sequence())
        })
    });
    group.finish();
}

fn full_datagram(c: &mut Criterion) {
    // A datagram as large as a 3.5 KB veth MTU allows: 33 frames of 104 bytes.
    const FRAMES: usize = 33;
    let mut group = c.benchmark_group("datagram_33x64B");
    group.throughput(Throughput::Elements(FRAMES as u64));
    let mut buf = vec![0u8; FRAMES * (HEADER_LEN + 64)];
    group.bench_function("encode_decode_verify", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            let mut builder = DatagramBuilder::new(&mut buf);
            for _ in 0..FRAMES {
                seq += 1;
                builder
                    .push_data(1, 7, seq, seq, black_box(&PAYLOAD))
                    .expect("fits");
            }
            let len = builder.len();
            let mut last = 0;
            for frame in Datagram::new(black_box(&buf[..len])).frames() {
                last = frame.expect("valid").sequence();
            }
            black_box(last)
        })
    });
    group.finish();
}

criterion_group!(benches, one_frame, full_datagram);
criterion_main!(benches);
