#!/usr/bin/env python3
"""Write the seed corpus for the `datagram` fuzz target (fuzz/seeds/datagram/).

Random bytes almost never carry a valid CRC-32, so without seeds the fuzzer
spends its time on the first header checks. These seeds are valid datagrams
(every frame kind, several frames per datagram) plus the two ways a datagram
commonly ends badly. The layout follows protocol/src/lib.rs (40-byte header,
little-endian); zlib.crc32 is the same CRC-32 (IEEE) as crc32fast. Re-run this
script when the frame layout changes:

    python3 scripts/fuzz-seeds.py
"""

import pathlib
import struct
import zlib

MAGIC = 0x584B  # b"KX" little-endian
VERSION = 1
DATA, ACK, ERROR, HEARTBEAT = 1, 2, 3, 4
RETRANSMIT, ACK_NOW = 1, 2
HEADER = struct.Struct("<HBBHHIIIIQQ")
assert HEADER.size == 40


def frame(kind, payload=b"", flags=0, stream=1, producer=7, seq=1, ts=1_000):
    head = HEADER.pack(MAGIC, VERSION, kind, flags, 0, len(payload), 0, stream, producer, seq, ts)
    crc = zlib.crc32(head[:12] + head[16:] + payload)
    return head[:12] + struct.pack("<I", crc) + head[16:] + payload


def ack_body(credit, level, last_offset):
    return struct.pack("<IB3xQ", credit, level, last_offset)


def error_body(code, detail):
    return struct.pack("<HHI", code, 0, detail)


SEEDS = {
    "data_64b": frame(DATA, bytes(range(64))),
    "data_empty": frame(DATA),
    "data_x3_flags": frame(DATA, b"a", seq=1)
    + frame(DATA, b"bb", flags=RETRANSMIT, seq=2)
    + frame(DATA, b"ccc", flags=ACK_NOW, seq=3),
    "ack": frame(ACK, ack_body(4096, 2, 77), seq=99),
    "error_message": frame(ERROR, error_body(10, 0) + b"no such stream", seq=100, ts=0),
    "heartbeat": frame(HEARTBEAT, stream=0, seq=0),
    "mixed": frame(DATA, b"m" * 16)
    + frame(ACK, ack_body(1, 0, 0xFFFF_FFFF_FFFF_FFFF))
    + frame(ERROR, error_body(8, 0))
    + frame(HEARTBEAT),
    "then_truncated": frame(DATA, b"ok") + frame(DATA, b"cut")[:25],
    "then_bad_crc": frame(DATA, b"ok") + frame(DATA, b"flip")[:-1] + b"F",
}


def main():
    out = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "seeds" / "datagram"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (out / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")


if __name__ == "__main__":
    main()
