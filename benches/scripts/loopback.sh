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
cleanup() { stop_broker; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_broker "$OUT_DIR/broker.log" "" \
    --data-addr "127.0.0.1:$PORT" --fetch-addr "127.0.0.1:$((PORT + 1))" \
    --admin-addr "127.0.0.1:$((PORT + 2))" --metrics-addr "127.0.0.1:$((PORT + 3))"
log "broker on 127.0.0.1:$PORT (pid $BROKER_PID)"

common=(--broker "127.0.0.1:$PORT" --cpus 0 --duration "$DURATION" --warmup "$WARMUP" --message-size 64)

# Throughput: closed loop, 1472-byte datagrams (14 frames), then 65507-byte ones.
bench_runs "$JSONL" "max, memory, 1472 B datagrams" "" "${common[@]}" --durability memory
bench_runs "$JSONL" "max, memory, 64 KB datagrams" "" "${common[@]}" --durability memory --datagram-size 65507
# Latency at fixed rates (coordinated omission corrected).
for rate in 10000 100000 500000; do
    bench_runs "$JSONL" "rate $rate/s, memory" "" "${common[@]}" --durability memory --rate "$rate"
done
# Durability levels at a moderate fixed rate.
for level in flush fsync; do
    bench_runs "$JSONL" "rate 100000/s, $level" "" "${common[@]}" --durability "$level" --rate 100000
done
bench_runs "$JSONL" "max, fsync, 1472 B datagrams" "" "${common[@]}" --durability fsync

stop_broker
summarize "$JSONL" | tee "$OUT_DIR/summary.txt"
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
