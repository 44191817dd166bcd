"""`make bench`: run every benchmark, print a table, write bench/results/<date>.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = [
    "bench.users_me",
    "bench.login",
    "bench.patch_profile",
    "bench.relay_backlog",
    "bench.gateway",
    "bench.projection",
    "bench.webhooks",
]


def main() -> None:
    results = []
    for module in BENCHMARKS:
        out = subprocess.run(
            [sys.executable, "-m", module], check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    path = Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(
            f"{r['benchmark']}\n    {json.dumps({k: v for k, v in r.items() if k != 'benchmark'})}"
        )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
