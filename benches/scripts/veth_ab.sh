#!/usr/bin/env bash
# A/B runs on one veth pair: several broker variants (binary, backend, NAPI
# knobs, serve settings) x several `kaelix bench` loads, alternated inside
# every repeat so that all variants see the same machine load.
#
#   sudo CASES=... BENCHES=... bash benches/scripts/veth_ab.sh
#
# CASES: one variant per line, fields separated by '|':
#   name|backend|napi_defer_hard_irqs|gro_flush_timeout_ns|serve args|kaelix binary|threaded
#   - backend: socket or af_xdp
#   - the two knobs are written to the broker-side device before the broker
#     starts (and, for af_xdp, passed in its config too)
#   - serve args: extra `kaelix serve` arguments (word-split), may be empty
#   - kaelix binary: this variant's broker *and* load generator (default $KAELIX),
#     e.g. a build of the commit before a change against one after it
#   - threaded: "napi" puts the device's NAPI in a kernel thread pinned to
#     cpu 1 (the shard's) at SCHED_FIFO 20, above the shard
# BENCHES: one load per line, 'name|kaelix bench args' (e.g. 'max|' or
#   '100k|--rate 100000' or 'xsk-max|--sender af-xdp'; the AF_XDP sender gets
#   --xdp-interface added).
#
# Example (what docs/performance.md used for the knob and backend A/B):
#   CASES='sock|socket|0|0||
#   xdp-defer|af_xdp|2|200000||
#   xdp|af_xdp|0|0||' BENCHES='max|
#   100k|--rate 100000' REPEATS=3 DURATION=4 sudo -E bash benches/scripts/veth_ab.sh
#
# Same set-up as veth.sh: two namespaces made here (names from the pid),
# 10.232.0.1 (load) and 10.232.0.2 (broker) only inside them, MTU 3506 (the
# XDP limit on veth), 3478-byte datagrams, shard on cpu 1, load on cpu 0,
# SCHED from lib.sh. Everything is removed on every exit path. Each row of
# the JSONL also carries the shard's idle cycles during the run (metrics).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [[ $EUID -ne 0 ]]; then
    echo "veth_ab.sh needs root (network namespaces, XDP, AF_XDP); skipping" >&2
    exit 0
fi
[[ -n "${CASES:-}" && -n "${BENCHES:-}" ]] || { echo "set CASES and BENCHES (see the header)" >&2; exit 1; }
ensure_kaelix
DEFAULT_KAELIX="$KAELIX"
init_out veth-ab
machine_note "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/runs.jsonl"

NS_A="kxaba$$"
NS_B="kxabb$$"
VA="kxabva$$"
VB="kxabvb$$"
IP_A=10.232.0.1
IP_B=10.232.0.2
MTU="${MTU:-3506}"
BROKER_PID=""
DATA_ROOT=$(mktemp -d /tmp/kaelix-veth-ab.XXXXXX)
cleanup() {
    stop_broker
    rm -rf "$DATA_ROOT"
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "$VA" netns "$NS_A" type veth peer name "$VB" netns "$NS_B"
ip -n "$NS_A" addr add "$IP_A/24" dev "$VA"
ip -n "$NS_B" addr add "$IP_B/24" dev "$VB"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$VA" up mtu "$MTU"
ip -n "$NS_B" link set "$VB" up mtu "$MTU"
DATAGRAM=$((MTU - 28))

in_b() { ip netns exec "$NS_B" sh -c "$1"; }
idle_cycles() {
    ip netns exec "$NS_B" curl -s 127.0.0.1:7003/metrics 2>/dev/null \
        | awk '/^kaelix_shard_idle_cycles_total/ {s += $2} END {print s + 0}'
}
broker_args=(--data-dir "$DATA_ROOT/data" --data-addr "$IP_B:7000" --fetch-addr "$IP_B:7001"
    --admin-addr 127.0.0.1:7002 --metrics-addr 127.0.0.1:7003)
load_args=(--broker "$IP_B:7000" --cpus 0 --duration "$DURATION" --warmup "$WARMUP"
    --message-size 64 --datagram-size "$DATAGRAM")

for ((rep = 1; rep <= REPEATS; rep++)); do
    while IFS='|' read -r name backend defer flush extra binary threaded; do
        [[ -z "$name" ]] && continue
        KAELIX="${binary:-$DEFAULT_KAELIX}"
        in_b "echo $defer > /sys/class/net/$VB/napi_defer_hard_irqs; echo $flush > /sys/class/net/$VB/gro_flush_timeout"
        # shellcheck disable=SC2206
        serve_extra=($extra)
        if [[ $backend == af_xdp ]]; then
            start_broker "$OUT_DIR/broker-$name-$rep.log" "$NS_B" "${broker_args[@]}" \
                --set 'dataplane.backend="af_xdp"' --set "dataplane.af_xdp.interface=\"$VB\"" \
                --set dataplane.required=true --set "dataplane.af_xdp.napi_defer_hard_irqs=$defer" \
                --set "dataplane.af_xdp.gro_flush_timeout_ns=$flush" "${serve_extra[@]}"
            # The device's NAPI exists once XDP is attached; `threaded` sticks
            # to the device, so every af_xdp variant sets it.
            if [[ ${threaded:-} == napi ]]; then
                in_b "echo 1 > /sys/class/net/$VB/threaded"
                sleep 0.2
                for pid in $(pgrep "^napi/$VB-" || true); do
                    taskset -p 2 "$pid" >/dev/null
                    chrt -f -p 20 "$pid"
                    log "NAPI thread $pid ($(cat "/proc/$pid/comm")): cpu 1, SCHED_FIFO 20"
                done
            else
                in_b "echo 0 > /sys/class/net/$VB/threaded" 2>/dev/null || true
            fi
        else
            start_broker "$OUT_DIR/broker-$name-$rep.log" "$NS_B" "${broker_args[@]}" "${serve_extra[@]}"
        fi
        while IFS='|' read -r load bench_extra; do
            [[ -z "$load" ]] && continue
            # shellcheck disable=SC2206
            args=("${load_args[@]}" $bench_extra)
            [[ " $bench_extra " == *" --sender af-xdp "* ]] && args+=(--xdp-interface "$VA")
            before=$(idle_cycles)
            out=$(ip netns exec "$NS_A" "${PRIO[@]}" "$KAELIX" bench --json --label "$name/$load" "${args[@]}")
            idle=$(($(idle_cycles) - before))
            echo "$out" | jq -c --arg rep "$rep" --arg idle "$idle" \
                '. + {run: ($rep | tonumber), shard_idle_cycles: ($idle | tonumber)}' >> "$JSONL"
            log "$name/$load #$rep: $(echo "$out" | jq -r '"\(.msgs_per_sec | floor) msgs/s, p50 \(.produce_ack_us.p50) us, p99 \(.produce_ack_us.p99) us"'), shard idle cycles $idle"
        done <<< "$BENCHES"
        stop_broker
        rm -rf "$DATA_ROOT/data"
    done <<< "$CASES"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT_DIR/machine.txt"

summarize "$JSONL" | tee "$OUT_DIR/summary.txt"
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
