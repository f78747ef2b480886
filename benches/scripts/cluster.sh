#!/usr/bin/env bash
# Replicated (3 nodes) vs single node, one run, same load: `kaelix serve`
# processes on 127.0.0.1 and `kaelix bench` (release build), then the time
# from SIGKILL of a shard leader to the first ACK of the new leader.
#
#   bash benches/scripts/cluster.sh          (make bench-cluster)
#   REPEATS=5 DURATION=10 RATE=20000 bash benches/scripts/cluster.sh
#   PARTS=failover FAILOVER_SAMPLES=10 bash benches/scripts/cluster.sh
#   PARTS=transfer TIMINGS=tuned bash benches/scripts/cluster.sh
#
# Part "load" (REPEATS runs of each row, medians and min-max): every row
# sends 64-byte messages from one producer, flat out (closed loop, at most
# 8192 unacknowledged) and at RATE msgs/s (default 20000; latency from each
# message's intended send time), to
#   single         one broker, default configuration: stream 1 (memory) and
#                  stream 3 (fsync);
#   rf0            one broker that is a one-node cluster (`cluster init`)
#                  with cluster.replication_factor = 0, streams at
#                  `replicated` and `replicated_fsync` (a replica set of one:
#                  they ack as memory and fsync do; this row shows what the
#                  cluster machinery costs when it replicates nothing);
#   cluster        three brokers, replication_factor = 3, the same two
#                  streams: acked once 2 of 3 replicas hold the batch in
#                  memory (replicated) or fsynced (replicated_fsync). The
#                  producer knows all three (`--brokers`) and follows the
#                  not_leader redirect to the shard's leader.
# One fresh broker (or cluster) per group of rows; the cluster's first ACK
# (shard assignment, followers caught up) is waited for with an unmeasured
# run before the measured ones.
#
# Part "failover" (FAILOVER_SAMPLES per timing, default 5; TIMINGS="tuned
# default"): a fresh 3-node cluster, a producer at RATE msgs/s on the
# replicated stream for 4 s, the shard leader killed with SIGKILL 2 s in.
# Figure: kill to first ACK from the new leader = the end of the longest
# ACK silence (kaelix bench lists every silence of >= 10 ms between ACKs
# (the first 1024), ack_silences_unix_ns, wall clock) that ends after the
# kill (`date +%s%N` right before kill -KILL) and starts at most 200 ms
# after it (a dying process may still send ACKs for a few ms); also that
# silence (last ACK of the old leader to first of the new), the run's
# longest silence and its worst produce->ack. A sample with no such silence
# shows "?" and counts as missing. "tuned": heartbeat 20 ms,
# election timeout 60-100 ms, failover_after_ms 150; "default": the
# defaults (heartbeat 50, election 150-300, failover_after_ms 1000).
#
# Part "transfer" (the same samples and timings): the same, but 2 s in the
# shard's leadership moves as planned (`kaelix cluster transfer --shard 0`,
# to the follower whose log goes furthest) instead of a kill. Figures: the
# same ACK silence around the request, and the transfer's own report (the
# new leader had the whole log / was recorded / took writes, ms after the
# request).
#
# The machine has 2 cpus: three brokers (each a busy-polling shard thread
# with adaptive idle, a flusher, tokio threads for Raft and replication) and
# the load generator share them. Nothing is pinned here, in every row
# (dataplane.cores = "none", no --cpus), so the rows are comparable with
# each other (loopback.sh pins the shard to cpu 1 and the producer to cpu 0;
# its single-node figures are not comparable with these). SCHED defaults to
# normal in this script: replication and Raft run on SCHED_OTHER tokio
# threads, and SCHED_FIFO shard threads spinning on 2 cpus would starve
# them. SCHED=fifo or nice still work (lib.sh).
#
# Ports: 127.0.0.1, a block chosen from the script's pid; node i uses
# base+10i .. base+10i+5 (data, fetch, admin, metrics, raft, replication).
# Every broker has its own temporary directory (removed on exit) and is
# stopped on exit (SIGTERM, then SIGKILL), also on Ctrl-C or a failure.
set -euo pipefail
SCHED="${SCHED:-normal}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RATE="${RATE:-20000}"
# Every broker's idle strategy (all rows): three brokers share 2 cpus, and
# the default (20000 empty polls spinning after each batch) keeps three
# shard threads busy, so the Raft and replication threads wait for a cpu
# (p50 of replicated ACKs 20 ms at 200 msgs/s with it, 4 ms with this).
IDLE="${IDLE:-{adaptive={spin_cycles=100,yield_cycles=10,park_us=1000\}\}}"
MESSAGE_SIZE="${MESSAGE_SIZE:-64}"
PARTS="${PARTS-load failover transfer}"
FAILOVER_SAMPLES="${FAILOVER_SAMPLES:-5}"
TIMINGS="${TIMINGS:-tuned default}"
command -v jq >/dev/null || { echo "cluster.sh needs jq" >&2; exit 1; }

ensure_kaelix
init_out cluster
machine_note "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/cluster.jsonl"
FAILOVER_JSONL="$OUT_DIR/failover.jsonl"
PORT=$((24000 + ($$ % 300) * 60))
PIDS=()
DIRS=()
BENCH_PID=""

# stop_all: SIGTERM to every broker at once, SIGKILL after 20 s; logs how
# long each took (a broker that needed SIGKILL is named).
stop_all() {
    local i pid left
    if [[ -n "$BENCH_PID" ]]; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
        BENCH_PID=""
    fi
    ((${#PIDS[@]})) || return 0
    local start=$SECONDS
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 200; i++)); do
        left=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && left=$((left + 1)); done
        ((left)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "broker pid $pid still running $((SECONDS - start)) s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    local dir
    for dir in "${DIRS[@]}"; do rm -rf "$dir"; done
    DIRS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { echo $((PORT + 10 * $1 + $2)); }
data_addr() { echo "127.0.0.1:$(port "$1" 0)"; }
admin_addr() { echo "127.0.0.1:$(port "$1" 2)"; }

# start_node ID RF TIMING: one `kaelix serve` with a [cluster] section
# (node ID, replication factor RF, timings tuned|default) and streams 1
# (replicated) and 2 (replicated_fsync); RF "" starts a plain broker with the
# default configuration (streams 1 memory, 2 flush, 3 fsync) instead.
start_node() {
    local id="$1" rf="$2" timing="$3" dir
    dir=$(mktemp -d /tmp/kaelix-cluster-bench.XXXXXX)
    DIRS+=("$dir")
    local args=(--data-dir "$dir/data" --data-addr "$(data_addr "$id")"
        --fetch-addr "127.0.0.1:$(port "$id" 1)" --admin-addr "$(admin_addr "$id")"
        --metrics-addr "127.0.0.1:$(port "$id" 3)"
        --set 'dataplane.cores="none"' --set reload.watch=false --set "dataplane.shard.idle=$IDLE")
    local env=(KAELIX_LOG="${KAELIX_LOG:-warn}")
    if [[ -n "$rf" ]]; then
        printf '[[streams]]\nid = 1\ndurability = "replicated"\n\n[[streams]]\nid = 2\ndurability = "replicated_fsync"\n' \
            > "$dir/kaelix.toml"
        args=(--config "$dir/kaelix.toml" "${args[@]}")
        env+=(KAELIX__CLUSTER__NODE_ID="$id" KAELIX__CLUSTER__ADDR="127.0.0.1:$(port "$id" 4)"
            KAELIX__CLUSTER__REPLICATION_FACTOR="$rf"
            KAELIX__CLUSTER__REPLICATION_ADDR="127.0.0.1:$(port "$id" 5)")
        if [[ $timing == tuned ]]; then
            env+=(KAELIX__CLUSTER__HEARTBEAT_MS=20 KAELIX__CLUSTER__ELECTION_TIMEOUT_MIN_MS=60
                KAELIX__CLUSTER__ELECTION_TIMEOUT_MAX_MS=100 KAELIX__CLUSTER__FAILOVER_AFTER_MS=150)
        fi
    fi
    # lib.sh's start_broker inherits the environment: export, start, unset.
    local var
    for var in "${env[@]}"; do export "${var?}"; done
    start_broker "$OUT_DIR/node$id-$((++STARTS)).log" "" "${args[@]}"
    for var in "${env[@]}"; do unset "${var%%=*}"; done
    PIDS+=("$BROKER_PID")
}
STARTS=0

# kaelix_cli ARGS...: a kaelix CLI call with a deadline.
kaelix_cli() { timeout 60 "$KAELIX" "$@" >>"$OUT_DIR/cli.log" 2>&1; }

# start_cluster N RF TIMING: nodes 1..N, `cluster init` on node 1, the others join.
start_cluster() {
    local n="$1" rf="$2" timing="$3" id
    for ((id = 1; id <= n; id++)); do start_node "$id" "$rf" "$timing"; done
    kaelix_cli cluster init --admin "$(admin_addr 1)"
    for ((id = 2; id <= n; id++)); do
        kaelix_cli cluster join "$(admin_addr 1)" --admin "$(admin_addr "$id")"
    done
}

# brokers N: --broker and --brokers for nodes 1..N.
brokers() {
    local n="$1" id list=""
    for ((id = 2; id <= n; id++)); do list+="${list:+,}$(data_addr "$id")"; done
    echo "--broker $(data_addr 1)${list:+ --brokers $list}"
}

# ready N STREAM: an unmeasured run until the first ACKs (shard assigned,
# followers connected); prints the stream's final destination.
ready() {
    local n="$1" stream="$2" out
    # shellcheck disable=SC2046
    out=$("$KAELIX" bench --json $(brokers "$n") --streams "$stream" --message-size "$MESSAGE_SIZE" \
        --count 2000 --duration 60 --warmup 0 --rate 2000 --drain 30 2>>"$OUT_DIR/cli.log") || return 1
    if [[ $(echo "$out" | jq '.acked') -lt 2000 ]]; then
        echo "the cluster did not acknowledge its first messages: $(echo "$out" | jq -c '{acked, unacked_at_end, warnings}')" >&2
        return 1
    fi
    echo "$out" | jq -r '.destinations[0].addr // "'"$(data_addr 1)"'"'
}

# rows GROUP N STREAM...: for each stream (label from its level), REPEATS
# runs flat out and REPEATS at RATE.
rows() {
    local group="$1" n="$2" stream level
    shift 2
    for stream in "$@"; do
        ready "$n" "$stream" >/dev/null
        level=$(stream_level "$group" "$stream")
        # shellcheck disable=SC2046
        bench_runs "$JSONL" "$group, $level, max" "" $(brokers "$n") --streams "$stream" \
            --duration "$DURATION" --warmup "$WARMUP" --message-size "$MESSAGE_SIZE"
        # shellcheck disable=SC2046
        bench_runs "$JSONL" "$group, $level, rate $RATE/s" "" $(brokers "$n") --streams "$stream" \
            --duration "$DURATION" --warmup "$WARMUP" --message-size "$MESSAGE_SIZE" --rate "$RATE"
    done
}
stream_level() {
    case "$1:$2" in
        single*:1) echo memory ;;
        single*:3) echo fsync ;;
        *:1) echo replicated ;;
        *:2) echo replicated_fsync ;;
    esac
}

load_part() {
    log "single node: memory and fsync"
    start_node 1 "" ""
    rows "single node" 1 1 3
    stop_all
    log "one-node cluster, replication_factor 0"
    start_cluster 1 0 tuned
    rows "1-node cluster rf 0" 1 1 2
    stop_all
    log "3-node cluster, replication_factor 3"
    start_cluster 3 3 tuned
    rows "3-node cluster rf 3" 3 1 2
    stop_all
    summarize "$JSONL" | tee "$OUT_DIR/summary.txt"
}

# One failover sample: fresh cluster, load at RATE, then 2 s in either
# SIGKILL of the shard leader (MODE kill) or `kaelix cluster transfer` of
# shard 0 to the follower whose log goes furthest (MODE transfer).
failover_sample() {
    local mode="$1" timing="$2" sample="$3" leader id victim="" raft_leader out event_ns report="{}"
    local name="$mode-$timing-$sample"
    start_cluster 3 3 "$timing"
    leader=$(ready 3 1)
    for ((id = 1; id <= 3; id++)); do
        [[ "$(data_addr "$id")" == "$leader" ]] && victim=$id
    done
    [[ -n "$victim" ]] || { echo "shard leader $leader is none of the nodes" >&2; return 1; }
    raft_leader=$(timeout 30 "$KAELIX" cluster status --json --admin "$(admin_addr 1)" 2>>"$OUT_DIR/cli.log" \
        | jq -r '.leader // "?"') || raft_leader="?"
    # shellcheck disable=SC2046
    "$KAELIX" bench --json --label "$mode $timing #$sample" $(brokers 3) --streams 1 \
        --message-size "$MESSAGE_SIZE" --rate "$RATE" --duration 4 --warmup 0.5 --drain 20 \
        >"$OUT_DIR/$name.json" 2>>"$OUT_DIR/cli.log" &
    BENCH_PID=$!
    sleep 2
    event_ns=$(date +%s%N)
    if [[ $mode == kill ]]; then
        kill -KILL "${PIDS[$((victim - 1))]}"
    else
        report=$(timeout 30 "$KAELIX" cluster transfer --shard 0 --json --admin "$(admin_addr "$victim")" \
            2>>"$OUT_DIR/cli.log") || report='{"error": "transfer failed (see cli.log)"}'
    fi
    wait "$BENCH_PID" || { BENCH_PID=""; echo "kaelix bench failed (see $OUT_DIR/cli.log)" >&2; return 1; }
    BENCH_PID=""
    # The silence of the event: the longest silence that ends after it and
    # starts at most 200 ms after it (a killed process may still send ACKs
    # for a few ms; a transferring leader acknowledges what it has in
    # flight before it hands over): last ACK of the old leader .. first of
    # the new.
    out=$(jq -c --arg mode "$mode" --arg timing "$timing" --argjson event "$event_ns" --argjson victim "$victim" \
        --arg raft "$raft_leader" --argjson report "$report" '
        (.ack_silences_unix_ns
         | map(select(.next_ack >= $event and .last_ack <= $event + 200000000))
         | max_by(.next_ack - .last_ack)) as $s
        | {mode: $mode, timing: $timing, victim: $victim, raft_leader_before: $raft,
           kill_to_first_ack_ms: (if $s then ($s.next_ack - $event) / 1e6 else null end),
           ack_silence_ms: (if $s then ($s.next_ack - $s.last_ack) / 1e6 else null end),
           longest_silence_ms: (.ack_silence_max_us / 1e3),
           worst_produce_ack_ms: (.produce_ack_us.max / 1e3),
           destination_after: .destinations[0].addr, redirects, rotations,
           acked, rejected, unacked_at_end, retransmitted_frames, transfer: $report}' "$OUT_DIR/$name.json")
    echo "$out" >> "$FAILOVER_JSONL"
    log "$mode $timing #$sample: $(echo "$out" | jq -r '"node \(.victim) \(if .mode == "kill" then "killed" else "gave up the lead" end) (raft leader was \(.raft_leader_before)): first ACK of the new leader \(.kill_to_first_ack_ms // "?" | if type == "number" then . * 10 | round / 10 else . end) ms after it (? = no silence of 10 ms or more), longest ACK silence \(.longest_silence_ms | . * 10 | round / 10) ms, now at \(.destination_after)\(if .mode == "transfer" then "; transfer report \(.transfer | tostring)" else "" end)"')"
    stop_all
}

failover_part() {
    local mode="$1" timing sample
    for timing in $TIMINGS; do
        for ((sample = 1; sample <= FAILOVER_SAMPLES; sample++)); do
            failover_sample "$mode" "$timing" "$sample"
        done
    done
    jq -rs --arg mode "$mode" '
      def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                         else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      def r1: . * 10 | round / 10;
      map(select(.mode == $mode)) | group_by(.timing)
      | (["mode", "timings", "samples", "event -> first ACK ms median (min-max)", "all samples ms", "ACK silence ms median", "worst produce->ack ms median", "transfer: taking writes ms median", "unacked after the drain, rejected"] | @tsv),
        (.[] | (map(.kill_to_first_ack_ms | numbers)) as $k | [$mode, .[0].timing, length,
                (if ($k | length) > 0 then "\($k | median | r1) (\($k | min | r1)-\($k | max | r1))" else "-" end),
                (map(.kill_to_first_ack_ms | if type == "number" then r1 else "?" end | tostring) | join(", ")),
                (map(.ack_silence_ms | numbers) | if length > 0 then median | r1 else "-" end),
                (map(.worst_produce_ack_ms) | median | r1),
                (map(.transfer.leading_ms | numbers) | if length > 0 then median | r1 else "-" end),
                "\(map(.unacked_at_end) | add), \(map(.rejected) | add)"] | @tsv)' "$FAILOVER_JSONL" \
        | column -t -s $'\t' | tee "$OUT_DIR/$mode.txt"
}

for part in $PARTS; do
    case "$part" in
        load) load_part ;;
        failover) failover_part kill ;;
        transfer) failover_part transfer ;;
        *) echo "PARTS: load, failover and/or transfer (got $part)" >&2; exit 1 ;;
    esac
done
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
