#!/usr/bin/env bash
# Local mapped consumer vs remote fetch consumer: `kaelix serve` (socket
# backend) on loopback, one `kaelix bench` producer at fixed rates, and in
# the same process, on the same messages, one remote TCP fetch consumer
# (`--fetch`) and one local consumer that follows the shard's log through
# its shared-memory mapping in /dev/shm (`--local DATA_DIR`, kaelix-client's
# Consumer::local over kaelix-storage's Follower). Latency is from each
# message's intended send time to the consumer getting the record
# (produce->consume, produce->visible for the local one), memory level.
#
#   bash benches/scripts/local_consumer.sh          (make bench-local)
#   RATES="10000" REPEATS=5 bash benches/scripts/local_consumer.sh
#   SCHED=normal LOCAL_MODES="wait spin" bash benches/scripts/local_consumer.sh
#
# LOCAL_MODES: wait (the client's default when caught up: 64 spins on the
# published positions, then 100 us naps) and/or spin (polls without
# waiting, --local-spin: a cpu busy). Default: wait, plus spin unless
# SCHED=fifo. A spinning consumer at SCHED_FIFO never yields to the
# producer and the broker's shard at the same priority: on 2 cpus nothing
# was acknowledged at all, so spin refuses SCHED=fifo. One fresh broker per
# scenario, shard on cpu 1, producer on cpu 0; the consumers are not pinned
# (with SCHED=fifo they run at SCHED_FIFO 10 like the producer; the broker's
# fetch server, on tokio threads, stays SCHED_OTHER).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RATES="${RATES:-1000 10000 100000}"
if [[ $SCHED == fifo ]]; then LOCAL_MODES="${LOCAL_MODES:-wait}"; else LOCAL_MODES="${LOCAL_MODES:-wait spin}"; fi

ensure_kaelix
init_out local-consumer
machine_note "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/local.jsonl"
PORT=$((22000 + ($$ % 400) * 10))
BROKER_PID=""
DATA_DIR=""
cleanup() { stop_broker; [[ -z "$DATA_DIR" ]] || rm -rf "$DATA_DIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

for mode in $LOCAL_MODES; do
    case "$mode" in
        wait) spin=() ;;
        spin)
            [[ $SCHED != fifo ]] || { echo "LOCAL_MODES=spin needs SCHED=normal or nice (see the header)" >&2; exit 1; }
            spin=(--local-spin) ;;
        *) echo "LOCAL_MODES: wait or spin (got $mode)" >&2; exit 1 ;;
    esac
    for rate in $RATES; do
        DATA_DIR=$(mktemp -d /tmp/kaelix-local.XXXXXX)
        start_broker "$OUT_DIR/broker-$mode-$rate.log" "" \
            --data-dir "$DATA_DIR" --data-addr "127.0.0.1:$PORT" --fetch-addr "127.0.0.1:$((PORT + 1))" \
            --admin-addr "127.0.0.1:$((PORT + 2))" --metrics-addr "127.0.0.1:$((PORT + 3))"
        bench_runs "$JSONL" "rate $rate/s, local $mode, sched $SCHED" "" --broker "127.0.0.1:$PORT" --cpus 0 \
            --duration "$DURATION" --warmup "$WARMUP" --message-size 64 --durability memory \
            --rate "$rate" --fetch "127.0.0.1:$((PORT + 1))" --local "$DATA_DIR" "${spin[@]}"
        stop_broker
        rm -rf "$DATA_DIR"
        DATA_DIR=""
    done
done

# One row per scenario: medians (min-max) over the runs.
python3 - "$JSONL" <<'PY' | tee "$OUT_DIR/summary.txt"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = {}
for row in rows:
    by.setdefault(row["label"], []).append(row)
def fmt(values):
    return "%.1f (%.1f-%.1f)" % (statistics.median(values), min(values), max(values))
header = ["scenario", "runs", "acked msgs/s", "produce->ack p50 us",
          "remote fetch p50 us", "p99", "p99.9",
          "local mapped p50 us", "p99", "p99.9", "consumed remote / local"]
table = [header]
for label, runs in by.items():
    remote = [r["end_to_end_us"] for r in runs]
    local = [r["local_end_to_end_us"] for r in runs]
    table.append([label, str(len(runs)),
                  "%.0f" % statistics.median(r["msgs_per_sec"] for r in runs),
                  fmt([r["produce_ack_us"]["p50"] for r in runs]),
                  fmt([x["p50"] for x in remote]), fmt([x["p99"] for x in remote]),
                  fmt([x["p99.9"] for x in remote]),
                  fmt([x["p50"] for x in local]), fmt([x["p99"] for x in local]),
                  fmt([x["p99.9"] for x in local]),
                  "%d / %d" % (sum(x["consumed"] for x in remote), sum(x["consumed"] for x in local))])
widths = [max(len(row[i]) for row in table) for i in range(len(header))]
for row in table:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
PY
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
