#!/usr/bin/env python3
"""Print the criterion results under target/criterion as a Markdown table.

For each benchmark: the median time per iteration and, when the benchmark
declares a throughput in elements (frames), the median per element.
Run it after `make bench`; performance.yml writes its output to the job summary.

    python3 scripts/bench-summary.py [CRITERION_DIR]
"""

import json
import os
import pathlib
import sys


def main():
    default = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "criterion"
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default
    rows = []
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        estimates = json.loads((bench.parent / "estimates.json").read_text())
        median_ns = estimates["median"]["point_estimate"]
        elements = (meta.get("throughput") or {}).get("Elements")
        per_element = f"{median_ns / elements:.1f}" if elements else ""
        rows.append((meta["full_id"], f"{median_ns:.1f}", str(elements or ""), per_element))
    if not rows:
        sys.exit(f"no criterion results under {root}: run `make bench` first")
    print("| benchmark | median ns / iteration | elements | median ns / element |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
