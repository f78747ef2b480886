# MemoryStreamer entry points. `make run` and `make test` work on a fresh
# Debian 12 machine as root: both run `make setup` first.
#
#   make setup     install Debian packages and cargo tools (scripts/setup.sh)
#   make build     build the whole workspace (debug)
#   make run       build and run kaelix (scripts/run.sh)
#   make test      the full gate: what .ci/run and .github/workflows/quality.yml run
#   make bench     criterion benchmarks and the end-to-end scripts (bench-*)
#   make fuzz      fuzz the datagram decoder for FUZZ_SECONDS (default 300)
#   make fmt       format the code
#   make clippy    lint with warnings as errors
#
# Every cargo command shares one target directory: $CARGO_TARGET_DIR, or
# ./target when it is not set (the fuzz build goes to its own triple subfolder
# there, so it does not invalidate the normal builds).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# Steps of `make test` share cargo's build lock and must run in order.
.NOTPARALLEL:

CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
# --locked: Cargo.lock is committed and must match Cargo.toml.
CARGO_FLAGS ?= --locked

FUZZ_TARGET ?= datagram
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 45
FUZZ_CORPUS := $(CURDIR)/fuzz/corpus/$(FUZZ_TARGET)
FUZZ_SEEDS := $(CURDIR)/fuzz/seeds/$(FUZZ_TARGET)
# --sanitizer none: the address sanitizer needs nightly (-Zsanitizer); coverage
# instrumentation alone works on stable. -a turns on debug assertions and
# overflow checks in the fuzzed code. -max_len: the largest UDP datagram.
FUZZ_RUN = $(CARGO) fuzz run $(FUZZ_TARGET) --sanitizer none -a \
	--target-dir $(CARGO_TARGET_DIR) $(FUZZ_CORPUS) $(FUZZ_SEEDS) -- \
	-dict=$(CURDIR)/fuzz/$(FUZZ_TARGET).dict -max_len=65507 -print_final_stats=1

.PHONY: all setup build run test bench fuzz fmt clippy test-dpdk \
	fmt-check check-deps test-suite bench-build fuzz-smoke \
	bench-criterion bench-release bench-loopback bench-veth bench-peers bench-local bench-cluster

all: build

setup:
	bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace $(CARGO_FLAGS)

run: setup
	bash scripts/run.sh

# The gate. Each step is also a target of its own (the GitHub workflows call them one by one).
test: setup fmt-check check-deps clippy test-suite test-dpdk bench-build fuzz-smoke
	@echo "make test: all steps passed"

# fuzz/ is its own workspace, so `--all` does not reach it.
fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check

# protocol and storage are sans-IO: fail loudly if tokio enters their normal dependencies.
check-deps:
	bash scripts/check-no-tokio.sh

clippy: setup
	$(CARGO) clippy --workspace --all-targets $(CARGO_FLAGS) -- -D warnings

test-suite: setup
	$(CARGO) test --workspace $(CARGO_FLAGS)

# The DPDK backend is behind cargo feature `dpdk` (needs libdpdk-dev, which
# scripts/setup.sh installs): lint it, and run its tests on virtual devices.
test-dpdk: setup
	$(CARGO) clippy -p kaelix-dataplane -p kaelix-controlplane -p kaelix-tests -p kaelix-tools -p kaelix-benches \
		--features kaelix-controlplane/dpdk,kaelix-tests/dpdk,kaelix-tools/dpdk,kaelix-benches/dpdk --all-targets $(CARGO_FLAGS) -- -D warnings
	$(CARGO) test -p kaelix-tests --features dpdk $(CARGO_FLAGS) \
		--test dpdk_null --test dpdk_veth --test dpdk_shard --test dpdk_broker

# Build (not run) every benchmark so they do not rot. --bench '*' selects the
# [[bench]] targets of every workspace member and leaves out the libraries'
# empty libtest bench harnesses, which would build the whole workspace in the
# release profile for nothing.
bench-build: setup
	$(CARGO) bench --workspace --bench '*' --no-run $(CARGO_FLAGS)

# Criterion micro benchmarks, then the end-to-end scripts (figures in
# target/bench/; docs/performance.md says how they were produced).
bench: setup bench-criterion bench-loopback bench-local bench-cluster bench-veth bench-peers

bench-criterion: setup
	$(CARGO) bench --workspace --bench '*' $(CARGO_FLAGS)

bench-release: setup
	$(CARGO) build --release -p kaelix-tools $(CARGO_FLAGS)

# kaelix serve + kaelix bench on 127.0.0.1 at several loads.
bench-loopback: bench-release
	bash benches/scripts/loopback.sh

# Local mapped consumer (shared-memory follower) vs remote fetch consumer:
# produce->visible latency at fixed rates on 127.0.0.1, same run.
bench-local: bench-release
	bash benches/scripts/local_consumer.sh

# Replicated (3 kaelix serve on 127.0.0.1) vs single node, same run, and the
# time from SIGKILL of a shard leader to the first ACK of the new leader.
bench-cluster: bench-release
	bash benches/scripts/cluster.sh

# Socket vs AF_XDP backend on a veth pair between two namespaces (root).
bench-veth: bench-release
	bash benches/scripts/veth.sh

# NATS (core, JetStream) and Redis Streams next to MemoryStreamer (root: apt-get).
bench-peers: bench-release
	bash benches/scripts/peers.sh

fuzz-smoke: setup
	mkdir -p $(FUZZ_CORPUS)
	$(FUZZ_RUN) -max_total_time=$(FUZZ_SMOKE_SECONDS)

fuzz: setup
	mkdir -p $(FUZZ_CORPUS)
	$(FUZZ_RUN) -max_total_time=$(FUZZ_SECONDS)

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml
