#!/usr/bin/env bash
# Install what building and testing MemoryStreamer needs on a Debian 12 machine.
#
# Idempotent: when every Debian package and cargo tool is already there it
# only checks (well under a second) and installs nothing. Installing packages
# needs root; as another user it names what is missing and fails.
#
#   scripts/setup.sh          # what `make setup` (and so `make run` / `make test`) runs
#
# The Rust toolchain (1.95 stable, with rustfmt and clippy) is expected to be
# installed already: no other toolchain can be fetched on these machines.
set -euo pipefail

# Build and test dependencies (see shared notes, "Debian packages"):
#   clang llvm libelf-dev zlib1g-dev pkg-config make  BPF objects, libbpf-sys, libxdp-sys
#   libhwloc-dev libudev-dev                          hwlocality (topology, pinning)
#   protobuf-compiler                                 prost/tonic build scripts
#   iproute2 ethtool bpftool xdp-tools libbpf-dev     AF_XDP tests in network namespaces
#   dpdk dpdk-dev libdpdk-dev                         the `dpdk` backend feature and dpdk-testpmd
APT_PACKAGES=(
    clang llvm libelf-dev zlib1g-dev pkg-config make
    libhwloc-dev libudev-dev
    protobuf-compiler
    iproute2 ethtool bpftool xdp-tools libbpf-dev
    dpdk dpdk-dev libdpdk-dev
)

log() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

missing_packages() {
    local pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        if [[ $status != installed ]]; then
            printf '%s\n' "$pkg"
        fi
    done
}

apt_install() {
    apt-get -o DPkg::Lock::Timeout=300 update &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "$@"
}

install_packages() {
    command -v dpkg-query >/dev/null || die "dpkg-query not found: this script targets Debian 12"
    local missing
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} == 0)); then
        log "all ${#APT_PACKAGES[@]} Debian packages present"
        return
    fi
    if ((EUID != 0)); then
        die "missing Debian packages: ${missing[*]}; install them as root with: sudo scripts/setup.sh (or sudo apt-get install --no-install-recommends ${missing[*]})"
    fi
    log "installing ${missing[*]}"
    # A concurrent apt run's docker-clean hook can delete the cached .debs
    # between download and unpack; a second attempt downloads them again.
    if ! apt_install "${missing[@]}"; then
        log "apt-get failed; retrying once in 5 s"
        sleep 5
        apt_install "${missing[@]}" || die "apt-get install failed twice for: ${missing[*]}"
    fi
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) || die "still not installed after apt-get: ${missing[*]}"
}

check_toolchain() {
    command -v cargo >/dev/null ||
        die "cargo not found on PATH: install Rust 1.95 stable with rustup (or add ~/.cargo/bin to PATH)"
    cargo fmt --version >/dev/null 2>&1 ||
        die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 ||
        die "clippy missing: rustup component add clippy"
}

install_cargo_tools() {
    # cargo-fuzz drives the fuzz targets in fuzz/ (`make fuzz`, and the short run in `make test`).
    if cargo fuzz --version >/dev/null 2>&1; then
        log "cargo-fuzz present ($(cargo fuzz --version))"
    else
        log "installing cargo-fuzz"
        cargo install --locked cargo-fuzz
    fi
}

install_packages
check_toolchain
install_cargo_tools
