#!/usr/bin/env bash
# What `make run` runs: build the `kaelix` binary in release mode and run it.
#
# Until the broker exists this is the protocol demo: encode a datagram of
# frames, send it over loopback UDP, decode and verify every frame. When the
# broker lands, this script starts it instead (`kaelix serve ...`).
set -euo pipefail
cd "$(dirname "$0")/.."

exec cargo run --release --locked --bin kaelix -- protocol-demo "$@"
