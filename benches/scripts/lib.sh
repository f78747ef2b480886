# Helpers shared by the end-to-end benchmark scripts (sourced, not run).
#
#   KAELIX       the kaelix binary (default: target/release/kaelix, built if missing)
#   OUT_DIR      where results go (default: target/bench/<script>-<date>)
#   REPEATS      runs per scenario (default 3; medians and min-max spread are reported)
#   DURATION     measured seconds per run (default 5)
#   WARMUP       warm-up seconds per run (default 1)
#   SCHED        how the hot threads are scheduled: fifo (default as root:
#                SCHED_FIFO priority 10 for the broker's shard, flusher and
#                sync threads and for the load generator, so the figures describe
#                the software more than the neighbours' jobs on a shared
#                machine; the kernel still takes the cpus back for ~5 % of
#                every second), nice (`nice -n $NICE`, default -15, for the
#                whole broker and load generator) or normal

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPEATS="${REPEATS:-3}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
NICE="${NICE:--15}"
if [[ -z "${SCHED:-}" ]]; then
    if [[ $EUID -eq 0 ]]; then SCHED=fifo; else SCHED=normal; fi
fi
case "$SCHED" in
    fifo) PRIO=(chrt -f 10); BROKER_PRIO=() ;;
    nice) PRIO=(nice -n "$NICE"); BROKER_PRIO=("${PRIO[@]}") ;;
    normal) PRIO=(); BROKER_PRIO=() ;;
    *) echo "SCHED must be fifo, nice or normal (got $SCHED)" >&2; exit 1 ;;
esac

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ensure_kaelix() {
    if [[ -z "${KAELIX:-}" ]]; then
        KAELIX="${CARGO_TARGET_DIR:-$ROOT/target}/release/kaelix"
        if [[ ! -x "$KAELIX" ]]; then
            log "building kaelix (release)"
            (cd "$ROOT" && cargo build --release --locked -p kaelix-tools >&2)
        fi
    fi
    [[ -x "$KAELIX" ]] || { echo "kaelix binary not found at $KAELIX" >&2; exit 1; }
}

init_out() {
    local name="$1"
    OUT_DIR="${OUT_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/bench/$name-$(date +%Y%m%d-%H%M%S)}"
    mkdir -p "$OUT_DIR"
    log "results in $OUT_DIR"
}

# machine_note FILE: what the figures were measured on.
machine_note() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "kernel: $(uname -r)"
        echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
        echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "broker and load generator scheduling: $SCHED (${PRIO[*]:-default})"
        echo "kaelix: $("$KAELIX" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
    } > "$1"
}

# wait_for_line FILE PATTERN SECONDS: until PATTERN appears in FILE.
wait_for_line() {
    local file="$1" pattern="$2" seconds="$3" i
    for ((i = 0; i < seconds * 10; i++)); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out after ${seconds}s waiting for '$pattern' in $file:" >&2
    tail -20 "$file" >&2
    return 1
}

# start_broker LOGFILE [NETNS] -- ARGS...: start `kaelix serve ARGS` (in NETNS
# when given, "" for none); sets BROKER_PID. The broker runs in its own session
# so Ctrl-C of the script reaches it only through our trap.
start_broker() {
    local logfile="$1" netns="$2"
    shift 2
    if [[ -n "$netns" ]]; then
        setsid ip netns exec "$netns" "${BROKER_PRIO[@]}" "$KAELIX" serve "$@" >"$logfile" 2>&1 &
    else
        setsid "${BROKER_PRIO[@]}" "$KAELIX" serve "$@" >"$logfile" 2>&1 &
    fi
    BROKER_PID=$!
    wait_for_line "$logfile" "kaelix admin ready" 60
    if [[ $SCHED == fifo ]]; then
        # Only the threads on the acknowledgement path: a spinning SCHED_FIFO
        # thread would starve same-priority threads (tokio) sharing its cpu.
        local task
        for task in /proc/"$BROKER_PID"/task/*; do
            case "$(cat "$task/comm" 2>/dev/null)" in
                kaelix-shard-* | kaelix-flush-* | kaelix-sync-*) chrt -f -p 10 "${task##*/}" >/dev/null ;;
            esac
        done
    fi
}

# stop_broker: SIGTERM, then wait (SIGKILL after 20 s).
stop_broker() {
    [[ -n "${BROKER_PID:-}" ]] || return 0
    if kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 200; i++)); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
    fi
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
}

# bench_runs JSONL LABEL [NETNS] -- ARGS...: REPEATS runs of `kaelix bench --json ARGS`,
# one compact JSON object per line appended to JSONL (label added).
bench_runs() {
    local jsonl="$1" label="$2" netns="$3" run out
    shift 3
    for ((run = 1; run <= REPEATS; run++)); do
        if [[ -n "$netns" ]]; then
            out=$(ip netns exec "$netns" "${PRIO[@]}" "$KAELIX" bench --json --label "$label" "$@") || return 1
        else
            out=$("${PRIO[@]}" "$KAELIX" bench --json --label "$label" "$@") || return 1
        fi
        echo "$out" | jq -c --arg run "$run" '. + {run: ($run | tonumber)}' >> "$jsonl"
        log "$label #$run: $(echo "$out" | jq -r '"\(.msgs_per_sec | floor) msgs/s, p50 \(.produce_ack_us.p50) us, p99 \(.produce_ack_us.p99) us"')"
    done
}

# summarize JSONL: one row per label with medians and min-max of the runs.
summarize() {
    jq -rs '
      def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                         else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      def r0: . * 1 | floor;
      def r1: . * 10 | round / 10;
      group_by(.label)
      | map({label: .[0].label,
             runs: length,
             level: .[0].acked_level,
             rate: .[0].target_rate,
             mps: (map(.msgs_per_sec) | {m: median, lo: min, hi: max}),
             p50: (map(.produce_ack_us.p50) | {m: median, lo: min, hi: max}),
             p99: (map(.produce_ack_us.p99) | {m: median, lo: min, hi: max}),
             p999: (map(.produce_ack_us["p99.9"]) | median),
             e2e: (map(select((.end_to_end_us | type) == "object") | .end_to_end_us)
                   | if length > 0 then "\(map(.p50) | median | r1) / \(map(.p99) | median | r1)" else "-" end),
             retx: (map(.retransmitted_frames) | add)})
      | (["scenario", "runs", "acked at", "msgs/s median (min-max)", "p50 us median (min-max)", "p99 us median (min-max)", "p99.9 us", "produce->consume p50 / p99 us", "retransmitted frames"] | @tsv),
        (.[] | [.label, .runs, .level,
                "\(.mps.m | r0) (\(.mps.lo | r0)-\(.mps.hi | r0))",
                "\(.p50.m | r1) (\(.p50.lo | r1)-\(.p50.hi | r1))",
                "\(.p99.m | r1) (\(.p99.lo | r1)-\(.p99.hi | r1))",
                (.p999 | r1), .e2e, .retx] | @tsv)' "$1" | column -t -s $'\t'
}
