#!/usr/bin/env bash
# Socket backend vs AF_XDP backend on the same veth pair, same load, same run.
#
#   sudo bash benches/scripts/veth.sh          (make bench-veth; needs root)
#
# Two network namespaces made here (names from the script's pid), joined by
# a veth pair with both ends inside them; 10.231.0.1 (producer side) and
# 10.231.0.2 (broker side) exist only there. Everything is removed on every
# exit path (trap). The MTU is raised to the largest one XDP on veth allows,
# found by attaching the broker's XDP program and reading the limit the
# kernel puts on the peer (maxmtu), so a datagram carries ~33 frames of
# 64-byte payloads.
#
# Matrix: broker backend {socket, af_xdp} x sender {socket (GSO), af_xdp} x
# load {as fast as acks allow, fixed 100,000 msgs/s}; REPEATS runs each.
# SENDERS="socket" leaves out the AF_XDP sender.
# The broker's shard runs on cpu 1, the producer on cpu 0.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [[ $EUID -ne 0 ]]; then
    echo "veth.sh needs root (network namespaces, XDP, AF_XDP); skipping" >&2
    exit 0
fi
ensure_kaelix
init_out veth
machine_note "$OUT_DIR/machine.txt"
JSONL="$OUT_DIR/veth.jsonl"

NS_A="kxa$$"
NS_B="kxb$$"
VA="kxva$$"
VB="kxvb$$"
IP_A=10.231.0.1
IP_B=10.231.0.2
BROKER_PID=""
# Each broker start gets a fresh data directory under this one (deleted at exit).
DATA_ROOT=$(mktemp -d /tmp/kaelix-veth.XXXXXX)
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
ip -n "$NS_A" link set "$VA" up
ip -n "$NS_B" link set "$VB" up

# set_knobs DEFER FLUSH_NS: the broker-side device's NAPI knobs. Both stay 0
# for every run: the AF_XDP sockets on a veth are copy-mode, and since Linux
# 6.13 a copy-mode AF_XDP socket has no NAPI id, so preferred busy polling
# cannot take over the device's NAPI. Deferral (napi_defer_hard_irqs=2,
# gro_flush_timeout=200000) then only made every packet that found its NAPI
# deferred wait for the 200 us timer: produce->ack p50 ~150 us at 100,000/s
# instead of ~7 us (docs/performance.md). NAPI_DEFER / GRO_FLUSH_NS override.
set_knobs() {
    ip netns exec "$NS_B" sh -c "echo $1 > /sys/class/net/$VB/napi_defer_hard_irqs; echo $2 > /sys/class/net/$VB/gro_flush_timeout"
}

broker_args=(--data-dir "$DATA_ROOT/data" --data-addr "$IP_B:7000" --fetch-addr "$IP_B:7001"
    --admin-addr 127.0.0.1:7002 --metrics-addr 127.0.0.1:7003)
NAPI_DEFER="${NAPI_DEFER:-0}"
GRO_FLUSH_NS="${GRO_FLUSH_NS:-0}"
xdp_args=(--set 'dataplane.backend="af_xdp"' --set "dataplane.af_xdp.interface=\"$VB\""
    --set dataplane.required=true
    --set "dataplane.af_xdp.napi_defer_hard_irqs=$NAPI_DEFER" --set "dataplane.af_xdp.gro_flush_timeout_ns=$GRO_FLUSH_NS")

# Find the largest MTU XDP allows: attach (broker start), read the peer's maxmtu.
start_broker "$OUT_DIR/broker-mtu-probe.log" "$NS_B" "${broker_args[@]}" "${xdp_args[@]}"
MTU=$(ip -n "$NS_A" -d link show "$VA" | grep -o 'maxmtu [0-9]*' | cut -d' ' -f2)
stop_broker
rm -rf "$DATA_ROOT/data"
[[ -n "$MTU" && "$MTU" -gt 1500 ]] || { echo "could not read the XDP MTU limit (got '$MTU')" >&2; exit 1; }
ip -n "$NS_A" link set "$VA" mtu "$MTU"
ip -n "$NS_B" link set "$VB" mtu "$MTU"
DATAGRAM=$((MTU - 28))
FRAMES=$((DATAGRAM / 104))
log "veth MTU $MTU (XDP limit on veth): datagrams of $DATAGRAM bytes, $FRAMES frames of 64-byte payloads"
echo "veth MTU: $MTU (the most XDP on veth allows here); datagram $DATAGRAM B, $FRAMES x 64-byte frames" >> "$OUT_DIR/machine.txt"

socket_sender=(--broker "$IP_B:7000" --cpus 0 --duration "$DURATION" --warmup "$WARMUP"
    --message-size 64 --datagram-size "$DATAGRAM")
xdp_sender=("${socket_sender[@]}" --sender af-xdp --xdp-interface "$VA")

for backend in socket af_xdp; do
    if [[ $backend == af_xdp ]]; then
        set_knobs "$NAPI_DEFER" "$GRO_FLUSH_NS"
        start_broker "$OUT_DIR/broker-$backend.log" "$NS_B" "${broker_args[@]}" "${xdp_args[@]}"
    else
        set_knobs 0 0
        start_broker "$OUT_DIR/broker-$backend.log" "$NS_B" "${broker_args[@]}"
    fi
    log "broker ($backend backend) in $NS_B on $IP_B:7000"
    for sender in ${SENDERS:-socket af_xdp}; do
        if [[ $sender == af_xdp ]]; then args=("${xdp_sender[@]}"); else args=("${socket_sender[@]}"); fi
        bench_runs "$JSONL" "$backend backend, $sender sender, max" "$NS_A" "${args[@]}"
        bench_runs "$JSONL" "$backend backend, $sender sender, 100000/s" "$NS_A" "${args[@]}" --rate 100000
    done
    stop_broker
    rm -rf "$DATA_ROOT/data"
done

summarize "$JSONL" | tee "$OUT_DIR/summary.txt"
# The ratio the AF_XDP issue asks for: af_xdp backend / socket backend, same sender.
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  group_by(.label) | map({key: .[0].label, value: {mps: (map(.msgs_per_sec) | median), p99: (map(.produce_ack_us.p99) | median)}}) | from_entries as $m
  | ["socket", "af_xdp"][] as $sender
  | ["max", "100000/s"][] as $load
  | $m["af_xdp backend, \($sender) sender, \($load)"] as $x | $m["socket backend, \($sender) sender, \($load)"] as $s
  | select($x != null and $s != null)
  | "\($sender) sender, \($load): af_xdp/socket throughput \(($x.mps / $s.mps * 100 | round) / 100)x, p99 \($x.p99 | round) us vs \($s.p99 | round) us"
' "$JSONL" | tee -a "$OUT_DIR/summary.txt"
echo "machine: $(tr '\n' ';' < "$OUT_DIR/machine.txt")"
