#!/usr/bin/env python3
"""A small NATS load client for the peer comparison (benches/scripts/peers.sh).

Speaks the NATS text protocol over one TCP connection (standard library only):

- ``core``: pipelined ``PUB`` of COUNT messages, then ``PING`` and wait for
  ``PONG`` (the server has then processed every message). Core NATS does not
  acknowledge publishes, so only throughput is reported.
- ``js``: JetStream publish with a reply subject; the server answers each
  message with a PubAck once it is stored in the stream (file storage). At
  most WINDOW messages are unacknowledged; produce->ack latency is the time
  from the send of a message's chunk to the arrival of its PubAck (acks come
  back in order on one connection). The stream KXBENCH (file storage, one
  replica) is created when missing and purged before the run, so every run
  starts from an empty stream; afterwards its state is checked (every
  message stored).

  What a PubAck means in nats-server 2.9 (Debian 12's 2.9.10, read from its
  source): the stream's file store is opened with ``AsyncFlush = false``, so
  the message is written to the block file with write(2) before the PubAck
  (flush in place, page cache); fsync runs from a timer every 2 minutes
  (``SyncInterval = 2 * time.Minute`` in stream.go; not configurable before
  2.10's ``sync_interval``). Not fsynced per message.

A stall fails instead of hanging: no progress for TIMEOUT seconds raises an
error naming how many messages were sent and acknowledged.

Messages sent during the first WARMUP seconds are not measured; the window
ends with the last ack (the same rule as ``kaelix bench --count``). Prints one
JSON object shaped like ``kaelix bench --json`` (latencies in microseconds).
"""

import argparse
import json
import resource
import socket
import time

CHUNK = 256


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


class Connection:
    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.read_line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\nPING\r\n')
        while self.read_line() != b"PONG":
            pass

    def fill(self, block=True):
        """Read what the server sent; with block, wait up to the timeout."""
        self.sock.settimeout(self.timeout if block else 0.0)
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return False
        except socket.timeout:
            raise TimeoutError("nothing from the server for %.0f s" % self.timeout) from None
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data
        return True

    def read_line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                    continue
                return line
            self.fill()

    def messages(self):
        """Parse complete MSG frames from the buffer: yields payloads; other lines are returned as-is."""
        out = []
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return out
            line = bytes(self.buf[:end])
            if line.startswith(b"MSG "):
                size = int(line.rsplit(b" ", 1)[1])
                if len(self.buf) < end + 2 + size + 2:
                    return out
                out.append(bytes(self.buf[end + 2 : end + 2 + size]))
                del self.buf[: end + 2 + size + 2]
            else:
                del self.buf[: end + 2]
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise RuntimeError(line.decode())
                out.append(line)

    def request(self, subject, payload):
        inbox = b"_INBOX.kxsetup"
        self.sock.sendall(b"SUB %s 99\r\nPUB %s %s %d\r\n%s\r\n" % (inbox, subject, inbox, len(payload), payload))
        while True:
            self.fill()
            for item in self.messages():
                if not item.startswith(b"+OK") and item not in (b"PONG",):
                    self.sock.sendall(b"UNSUB 99\r\n")
                    return item


def run_core(conn, args, payload):
    line = b"PUB kxbench.core %d\r\n%s\r\n" % (len(payload), payload)
    chunk = line * CHUNK
    start = time.perf_counter()
    warm_end = start + args.warmup
    sent = 0
    measured_start = None
    measured = 0
    while sent < args.count:
        n = min(CHUNK, args.count - sent)
        conn.sock.sendall(chunk if n == CHUNK else line * n)
        sent += n
        now = time.perf_counter()
        if now >= warm_end:
            if measured_start is None:
                measured_start = now
            else:
                measured += n
    conn.sock.sendall(b"PING\r\n")
    while conn.read_line() != b"PONG":
        pass
    end = time.perf_counter()
    window = end - (measured_start or start)
    return {"msgs_per_sec": measured / window if window > 0 else 0.0, "window_secs": window,
            "acked": 0, "latency": []}


def js_api(conn, subject, body=b""):
    reply = json.loads(conn.request(subject, body))
    if "error" in reply:
        raise RuntimeError("%s failed: %s" % (subject.decode(), reply["error"]))
    return reply


def run_js(conn, args, payload):
    config = {
        "name": "KXBENCH", "subjects": ["kxbench.js"], "storage": "file",
        "retention": "limits", "discard": "old", "max_msgs": -1, "num_replicas": 1,
    }
    # Idempotent: creating a stream that exists with the same config succeeds.
    info = js_api(conn, b"$JS.API.STREAM.CREATE.KXBENCH", json.dumps(config).encode())
    if info["config"]["storage"] != "file":
        raise RuntimeError("stream KXBENCH has %s storage, not file" % info["config"]["storage"])
    js_api(conn, b"$JS.API.STREAM.PURGE.KXBENCH")
    conn.sock.sendall(b"SUB _INBOX.kxbench 1\r\n")
    line = b"PUB kxbench.js _INBOX.kxbench %d\r\n%s\r\n" % (len(payload), payload)
    chunk = line * CHUNK
    sent_at = []  # per chunk: (first message index, count, time)
    start = time.perf_counter()
    warm_end = start + args.warmup
    sent = acked = errors = 0
    measured_acks = 0
    last_ack = start
    latencies = []
    chunk_index = 0
    while acked < args.count:
        while sent < args.count and sent - acked + CHUNK <= args.window:
            n = min(CHUNK, args.count - sent)
            conn.sock.sendall(chunk if n == CHUNK else line * n)
            sent_at.append((sent, n, time.perf_counter()))
            sent += n
        # The window is full (or everything is sent): wait for acks. (An
        # earlier version polled without blocking while less than a chunk
        # was free and busy-looped; at SCHED_FIFO that starved the server's
        # JetStream goroutines, the "stall" of the first peer run:
        # nats-server logged `Internal subscription on "kxbench.js" took too
        # long: 39.9s`.)
        try:
            conn.fill()
        except TimeoutError as err:
            raise TimeoutError("%s: %d sent, %d acknowledged" % (err, sent, acked)) from None
        now = time.perf_counter()
        for item in conn.messages():
            if item.startswith(b"{"):
                if b'"error"' in item:
                    errors += 1
                first, n, at = sent_at[chunk_index]
                if at >= warm_end:
                    latencies.append(now - at)
                if now >= warm_end:
                    measured_acks += 1
                acked += 1
                last_ack = now
                if acked >= first + n:
                    chunk_index += 1
    window = last_ack - max(warm_end, start)
    state = js_api(conn, b"$JS.API.STREAM.INFO.KXBENCH")["state"]
    if errors == 0 and state["messages"] != args.count:
        raise RuntimeError("stream KXBENCH holds %d messages after %d acknowledged publishes"
                           % (state["messages"], args.count))
    return {"msgs_per_sec": measured_acks / window if window > 0 else 0.0, "window_secs": window,
            "acked": acked, "errors": errors, "latency": latencies,
            "stored": {"messages": state["messages"], "bytes": state["bytes"]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["core", "js"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--message-size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds without anything from the server before giving up")
    parser.add_argument("--label", required=True)
    args = parser.parse_args()
    conn = Connection("127.0.0.1", args.port, args.timeout)
    payload = b"\xa5" * args.message_size
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = run_core(conn, args, payload) if args.mode == "core" else run_js(conn, args, payload)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_secs = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lat = sorted(result.pop("latency"))
    us = lambda v: v * 1e6
    out = {
        "label": args.label,
        "system": "nats",
        "acked_level": "none (core publish is not acknowledged)" if args.mode == "core"
        else "JetStream PubAck (written to the file store, fsync every 2 min)",
        "message_size": args.message_size,
        "count": args.count,
        "target_rate": None,
        "msgs_per_sec": result["msgs_per_sec"],
        "window_secs": result["window_secs"],
        "produce_ack_us": None if not lat else {
            "p50": us(percentile(lat, 0.50)), "p90": us(percentile(lat, 0.90)),
            "p99": us(percentile(lat, 0.99)), "p99.9": us(percentile(lat, 0.999)),
            "max": us(lat[-1]), "samples": len(lat)},
        "retransmitted_frames": 0,
        "rejected": result.get("errors", 0),
        "stored": result.get("stored"),
        "window": args.window if args.mode == "js" else None,
        "client_cpu_secs": cpu_secs,
    }
    if out["rejected"]:
        raise SystemExit("%d publishes answered with an error: %s" % (out["rejected"], json.dumps(out)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
