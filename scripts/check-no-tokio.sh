#!/usr/bin/env bash
# Fail when a sans-IO crate (kaelix-protocol, kaelix-storage) depends on tokio.
#
# ARCHITECTURE.md: protocol and storage do no I/O of their own and know
# nothing of tokio. This checks their normal (non-dev, non-build) dependency
# trees on every target platform for tokio or any tokio-* crate.
set -euo pipefail
cd "$(dirname "$0")/.."

CRATES=(kaelix-protocol kaelix-storage)
failed=0
for crate in "${CRATES[@]}"; do
    tree=$(cargo tree --locked -p "$crate" -e normal --target all --prefix none)
    offenders=$(grep -E '^tokio(-[a-z0-9_-]+)? v' <<<"$tree" | sort -u || true)
    if [[ -n $offenders ]]; then
        failed=1
        {
            echo "ERROR: $crate depends on tokio; it must stay sans-IO (see docs/architecture.md)."
            echo "Offending crates:"
            sed 's/^/    /' <<<"$offenders"
            echo "How they come in:"
            while read -r name version _; do
                cargo tree --locked -p "$crate" -e normal --target all -i "$name@${version#v}" |
                    sed 's/^/    /'
            done <<<"$offenders"
        } >&2
    else
        echo "ok: $crate has no tokio in its normal dependency tree"
    fi
done
exit "$failed"
