#!/usr/bin/env bash
# End-to-end: `kaelix serve` (socket backend) on loopback and `kaelix bench`
# at several loads: as fast as acks allow, fixed rates (latency from the
# intended send time), the three durability levels, large datagrams.
#
#   bash benches/scripts/loopback.sh          (make bench-loopback)
#   REPEATS=5 DURATION=10 bash benches/scripts/loopback.sh
#
# The broker's shard is pinned to cpu 1 (its default plan on a 2-cpu
# machine), the producer to cpu 0. Ports: 127.0.0.1, a block chosen from the
# script's pid so parallel runs do not collide.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_kaelix
init_out loopback
machine_note "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/loopback.jsonl"
PORT=$((20000 + ($$ % 400) * 10))
BROKER_PID=""
DATA_DIR=""
cleanup() { stop_broker; [[ -z "$DATA_DIR" ]] || rm -rf "$DATA_DIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# One fresh broker per scenario, with its own temporary data directory
# (deleted afterwards) and the default 64 MiB segments, whose live files sit
# in /dev/shm until the broker is stopped with SIGTERM.
scenario() {
    local label="$1"
    shift
    DATA_DIR=$(mktemp -d /tmp/kaelix-bench.XXXXXX)
    start_broker "$OUT_DIR/broker-$((++SCENARIO)).log" "" \
        --data-dir "$DATA_DIR" --data-addr "127.0.0.1:$PORT" --fetch-addr "127.0.0.1:$((PORT + 1))" \
        --admin-addr "127.0.0.1:$((PORT + 2))" --metrics-addr "127.0.0.1:$((PORT + 3))"
    bench_runs "$JSONL" "$label" "" --broker "127.0.0.1:$PORT" --cpus 0 \
        --duration "$DURATION" --warmup "$WARMUP" --message-size 64 "$@"
    stop_broker
    rm -rf "$DATA_DIR"
    DATA_DIR=""
}
SCENARIO=0

# Throughput: closed loop, 1472-byte datagrams (14 frames), then 65507-byte ones.
scenario "max, memory, 1472 B datagrams" --durability memory
scenario "max, memory, 64 KB datagrams" --durability memory --datagram-size 65507
# Latency at fixed rates (coordinated omission corrected), with a consumer.
for rate in 1000 10000 100000 300000; do
    scenario "rate $rate/s, memory" --durability memory --rate "$rate" --fetch "127.0.0.1:$((PORT + 1))"
done
# Durability levels at a moderate fixed rate, and flat out.
for level in flush fsync; do
    scenario "rate 10000/s, $level" --durability "$level" --rate 10000
    scenario "max, $level, 1472 B datagrams" --durability "$level"
done

summarize "$JSONL" | tee "$OUT_DIR/summary.txt"
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
