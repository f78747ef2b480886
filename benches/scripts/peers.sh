#!/usr/bin/env bash
# MemoryStreamer next to NATS (core publish, JetStream file storage) and
# Redis Streams (XADD) on the same machine, in the same run, with the same
# message size and count: REPEATS runs each, medians and min-max spread, one
# table with ratios.
#
#   bash benches/scripts/peers.sh          (make bench-peers; root, installs Debian packages)
#   COUNT=1000000 REPEATS=5 bash benches/scripts/peers.sh
#   NATS_MODES=core bash benches/scripts/peers.sh   (no JetStream)
#
# Warm-up: before its REPEATS measured runs, every system gets one
# unrecorded run of COUNT/10 messages (same tool, same settings). The
# measured runs are then measured whole (WARMUP defaults to 0 here: with a
# time-based warm-up, kaelix memory and NATS core would finish 500,000
# messages inside it and report nothing).
#
# Load tools: `kaelix bench --count` for MemoryStreamer, nats_bench.py (a
# small NATS protocol client next to this script; Debian has no `nats bench`)
# and Debian's redis-benchmark for Redis. Everything listens on 127.0.0.1 on
# ports chosen from the script's pid. Every server and load tool runs with
# the same scheduling ($SCHED, see lib.sh).
#
# What an acknowledgement means differs; the table says it per row:
# - kaelix memory: appended to the in-memory (tmpfs/hugepage) log.
# - kaelix flush: written to the disk copy (page cache); fsync every
#   storage.flush_interval_ms (100 ms).
# - kaelix fsync: the flusher wrote and fdatasync'ed it (group commit).
# - NATS core: no acknowledgement at all; a final PING/PONG shows the server
#   processed everything (with no subscriber, the messages are dropped).
# - NATS JetStream (2.9.10): PubAck after the message was written (write(2),
#   page cache) to the stream's block file; the file store fsyncs every
#   2 minutes (hard-coded SyncInterval), not per message. Closest kaelix
#   level: flush. Async publish with at most 8192 unacknowledged (the same
#   in-flight limit as kaelix bench's default).
# - Redis XADD, appendonly no: the reply means applied in memory.
# - Redis XADD, appendfsync always: the AOF was written and fsynced before
#   the reply (group commit per event-loop turn).
set -euo pipefail
WARMUP="${WARMUP:-0}"
source "$(dirname "$0")/lib.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
COUNT="${COUNT:-500000}"
WARMUP_COUNT=$((COUNT / 10))
MESSAGE_SIZE=64

apt_install() {
    local attempt
    for attempt in 1 2; do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "$@" >&2; then
            return 0
        fi
        log "apt-get install failed (attempt $attempt); retrying once"
        apt-get update >&2 || true
    done
    return 1
}
# Idempotent: installs only what is missing (Debian 12: nats-server 2.9.10, Redis 7.0).
if ! command -v nats-server >/dev/null || ! command -v redis-server >/dev/null \
    || ! command -v redis-benchmark >/dev/null || ! command -v jq >/dev/null; then
    [[ $EUID -eq 0 ]] || { echo "peers.sh must install nats-server, redis-server and jq: run as root" >&2; exit 1; }
    apt_install nats-server redis-server redis-tools jq
fi

ensure_kaelix
init_out peers
machine_note "$OUT_DIR/machine.txt"
{
    echo "nats-server: $(nats-server --version)"
    echo "redis: $(redis-server --version | cut -d' ' -f1-3)"
} >> "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/peers.jsonl"
BASE=$((24000 + ($$ % 300) * 10))
PIDS=()
BROKER_PID=""
DATA_DIR=$(mktemp -d /tmp/kaelix-peers.XXXXXX)
cleanup() {
    stop_broker
    rm -rf "$DATA_DIR"
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$OUT_DIR/nats-js" "$OUT_DIR/redis-mem" "$OUT_DIR/redis-aof"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
    local port="$1" i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port" >&2
    return 1
}

# --- MemoryStreamer ---
start_broker "$OUT_DIR/broker.log" "" \
    --data-dir "$DATA_DIR" --data-addr "127.0.0.1:$BASE" --fetch-addr "127.0.0.1:$((BASE + 1))" \
    --admin-addr "127.0.0.1:$((BASE + 2))" --metrics-addr "127.0.0.1:$((BASE + 3))"
for level in memory flush fsync; do
    # Warm-up run, not recorded.
    "${PRIO[@]}" "$KAELIX" bench --json --broker "127.0.0.1:$BASE" --cpus 0 --count "$WARMUP_COUNT" \
        --warmup 0 --duration 600 --message-size "$MESSAGE_SIZE" --durability "$level" >/dev/null
    bench_runs "$JSONL" "kaelix $level" "" --broker "127.0.0.1:$BASE" --cpus 0 \
        --count "$COUNT" --warmup "$WARMUP" --duration 600 --message-size "$MESSAGE_SIZE" --durability "$level"
done
stop_broker

# --- NATS (one server, JetStream on, file storage in the results dir) ---
mkdir -p "$OUT_DIR/nats-js"
setsid "${PRIO[@]}" nats-server -a 127.0.0.1 -p "$((BASE + 4))" -js -sd "$OUT_DIR/nats-js" >"$OUT_DIR/nats.log" 2>&1 &
PIDS+=($!)
wait_port "$((BASE + 4))"
for mode in ${NATS_MODES:-core js}; do
    # Warm-up run, not recorded.
    "${PRIO[@]}" python3 "$HERE/nats_bench.py" "$mode" --port "$((BASE + 4))" --count "$WARMUP_COUNT" \
        --warmup 0 --message-size "$MESSAGE_SIZE" --label warmup >/dev/null
    for ((run = 1; run <= REPEATS; run++)); do
        "${PRIO[@]}" python3 "$HERE/nats_bench.py" "$mode" --port "$((BASE + 4))" --count "$COUNT" \
            --warmup "$WARMUP" --message-size "$MESSAGE_SIZE" --label "nats $mode" \
            | jq -c --arg run "$run" '. + {run: ($run | tonumber)}' >> "$JSONL"
        log "nats $mode #$run: $(tail -1 "$JSONL" | jq -r '.msgs_per_sec | floor') msgs/s"
    done
done

# --- Redis Streams ---
PAYLOAD=$(head -c "$MESSAGE_SIZE" /dev/zero | tr '\0' 'x')
redis_runs() {
    local label="$1" port="$2" run csv
    # Warm-up run, not recorded.
    "${PRIO[@]}" redis-benchmark -h 127.0.0.1 -p "$port" -n "$((COUNT / 10))" -c 8 -P 64 -q \
        XADD kxbench '*' p "$PAYLOAD" >/dev/null
    for ((run = 1; run <= REPEATS; run++)); do
        csv=$("${PRIO[@]}" redis-benchmark -h 127.0.0.1 -p "$port" -n "$COUNT" -c 8 -P 64 --csv \
            XADD kxbench '*' p "$PAYLOAD" | tail -1)
        python3 - "$label" "$run" "$csv" <<'EOF' >> "$JSONL"
import csv, json, sys
label, run, line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
row = next(csv.reader([line]))
rps, avg, lo, p50, p95, p99, hi = (float(x) for x in row[1:8])
print(json.dumps({"label": label, "system": "redis", "run": run, "msgs_per_sec": rps,
                  "acked_level": "reply", "target_rate": None, "retransmitted_frames": 0,
                  "produce_ack_us": {"p50": p50 * 1e3, "p95": p95 * 1e3, "p99": p99 * 1e3,
                                     "max": hi * 1e3}}))
EOF
        log "$label #$run: $(tail -1 "$JSONL" | jq -r '.msgs_per_sec | floor') msgs/s"
    done
}
mkdir -p "$OUT_DIR/redis-mem" "$OUT_DIR/redis-aof"
setsid "${PRIO[@]}" redis-server --bind 127.0.0.1 --port "$((BASE + 5))" --dir "$OUT_DIR/redis-mem" \
    --save '' --appendonly no --protected-mode no >"$OUT_DIR/redis-mem.log" 2>&1 &
PIDS+=($!)
setsid "${PRIO[@]}" redis-server --bind 127.0.0.1 --port "$((BASE + 6))" --dir "$OUT_DIR/redis-aof" \
    --save '' --appendonly yes --appendfsync always --protected-mode no >"$OUT_DIR/redis-aof.log" 2>&1 &
PIDS+=($!)
wait_port "$((BASE + 5))"
wait_port "$((BASE + 6))"
redis_runs "redis XADD, appendonly no" "$((BASE + 5))"
redis_runs "redis XADD, appendfsync always" "$((BASE + 6))"

# --- One table ---
python3 - "$JSONL" "$COUNT" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
count = sys.argv[2]
semantics = {
    "kaelix memory": "ack: appended to the in-memory log",
    "kaelix flush": "ack: written to disk copy (page cache), fsync every 100 ms",
    "kaelix fsync": "ack: written + fdatasync'ed (group commit)",
    "nats core": "no ack (final PING/PONG); no subscriber",
    "nats js": "PubAck: written to file store (page cache), fsync every 2 min",
    "redis XADD, appendonly no": "reply: applied in memory",
    "redis XADD, appendfsync always": "reply: AOF written + fsynced",
}
order = list(semantics)
by = {}
for row in rows:
    by.setdefault(row["label"], []).append(row)
def fmt(values, scale=1.0, digits=0):
    values = [v * scale for v in values]
    return "%s (%s-%s)" % tuple(f"{v:,.{digits}f}" for v in (statistics.median(values), min(values), max(values)))
levels = ("memory", "flush", "fsync")
ours = {level: statistics.median(r["msgs_per_sec"] for r in by.get("kaelix " + level, [{"msgs_per_sec": 0}]))
        for level in levels}
print(f"{count} messages of 64-byte payloads per run; medians (min-max) of {len(by.get('kaelix memory', []))} runs")
header = ["system", "what an ack means", "msgs/s", "p50 us", "p99 us"] + [f"kaelix {level} / this" for level in levels]
table = [header]
for label in order:
    runs = by.get(label)
    if not runs:
        continue
    mps = [r["msgs_per_sec"] for r in runs]
    lat = [r["produce_ack_us"] for r in runs if r.get("produce_ack_us")]
    p50 = fmt([l["p50"] for l in lat], digits=0) if lat else "-"
    p99 = fmt([l["p99"] for l in lat], digits=0) if lat else "-"
    med = statistics.median(mps)
    table.append([label, semantics[label], fmt(mps), p50, p99]
                 + [f"{ours[level] / med:.2f}x" if med else "-" for level in levels])
widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
for row in table:
    print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
EOF
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
