#!/usr/bin/env bash
# What `make run` runs: build `kaelix` (release), start a broker on the
# embedded defaults (socket backend, data on 127.0.0.1:7000, fetch on :7001,
# admin on :7002, metrics on :7003, a temporary data directory), produce a few
# messages, consume them back, show the broker's status, then keep the broker
# running until Ctrl-C. When stdin is not a terminal (CI, scripts) it stops the
# broker cleanly instead of waiting.
#
# Extra arguments go to `kaelix serve` (e.g. `make run ARGS="--config my.toml"`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin kaelix
KAELIX=${CARGO_TARGET_DIR:-target}/release/kaelix
LOG=$(mktemp -t kaelix-run.XXXXXX.log)

"$KAELIX" serve "$@" >"$LOG" 2>&1 &
BROKER=$!
stop_broker() {
    if kill -0 "$BROKER" 2>/dev/null; then
        kill -TERM "$BROKER"
        wait "$BROKER" || true
    fi
}
trap stop_broker EXIT

for _ in $(seq 1 100); do
    grep -q "kaelix admin ready" "$LOG" && break
    if ! kill -0 "$BROKER" 2>/dev/null; then
        echo "the broker exited during start-up:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.1
done
grep -E "kaelix (broker|admin) ready" "$LOG" || { cat "$LOG" >&2; exit 1; }

echo
echo "== produce: three messages to stream 1 (memory) and three to stream 3 (fsync)"
printf 'hello from make run\nsecond message\nthird message\n' | "$KAELIX" produce --stream 1
printf 'durable one\ndurable two\ndurable three\n' | "$KAELIX" produce --stream 3

echo
echo "== consume: stream 1 and stream 3 over the TCP fetch protocol (offset<TAB>message)"
"$KAELIX" consume --stream 1 --count 3
"$KAELIX" consume --stream 3 --count 3

echo
echo "== broker status"
"$KAELIX" broker status

if [ -t 0 ]; then
    echo
    echo "The broker keeps running (log: $LOG). Try:"
    echo "  echo hi | $KAELIX produce --stream 1"
    echo "  $KAELIX consume --stream 1 --follow"
    echo "  $KAELIX stream list"
    echo "Press Ctrl-C to stop it."
    trap 'echo; echo stopping; stop_broker; exit 0' INT
    wait "$BROKER"
else
    echo
    echo "stdin is not a terminal: stopping the broker"
    stop_broker
    trap - EXIT
    grep -E "stopped cleanly" "$LOG" || { echo "the broker did not stop cleanly:" >&2; cat "$LOG" >&2; exit 1; }
fi
