"""`make bench`: run every benchmark, print a table, write bench/results/<date>.json.

Each benchmark prints one JSON object as its last line. Its figures are shown beside their
baseline from the same run: the key `baseline_<figure>`, or a key that shares the figure's
prefix and names a baseline (`catch_up_baseline_...` for `catch_up_...`), or the benchmark's
only baseline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS = [
    "bench.peers",  # ../shared/bench/peers/compare.py against esctl up: hello, CRUD peer, eskit
    "bench.users_me",
    "bench.login",
    "bench.login_cost",  # CPU per login by process: the stack against the CRUD peer
    "bench.forgot",  # known vs unknown addresses: throughput ratio within 0.9-1.1
    "bench.patch_profile",
    "bench.erasure",  # register and PATCH with personal fields encrypted vs plain: >= 0.9
    "bench.relay_backlog",
    "bench.gateway",
    "bench.projection",
    "bench.replay_live",  # REPLAY_LIVE_TIMEOUT_SECONDS (default 300) bounds each live replay
    "bench.replay_stream",  # STREAM_EVENTS (200000): native-protocol replay vs raw AMQP read
    "bench.webhooks",
    "bench.observability",
    "bench.soak",  # SOAK_SECONDS (default 600): mixed load, a consumer killed, broker restarted
]


def baseline_for(key: str, result: dict[str, Any]) -> str | None:
    """The baseline measured for figure `key`, if the benchmark has one in the same unit."""
    if f"baseline_{key}" in result:
        return f"baseline_{key}"
    if "ratio" in key:
        return None
    words = key.split("_")
    percentile = {w for w in words if re.fullmatch(r"p\d+", w)}

    def fits(candidate: str) -> int:
        """How many trailing words (the unit) the two share; 0 when they do not fit."""
        other = candidate.split("_")
        if percentile - set(other) or candidate.split("baseline", maxsplit=1)[0] not in key:
            return 0
        shared = 0
        for a, b in zip(reversed(words), reversed(other), strict=False):
            if a != b:
                break
            shared += 1
        return shared

    baselines = [
        k
        for k, v in result.items()
        if "baseline" in k and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    scored = sorted(((fits(k), len(k.split("baseline")[0]), k) for k in baselines), reverse=True)
    return scored[0][2] if scored and scored[0][0] > 0 else None


def table(result: dict[str, Any]) -> list[str]:
    lines = [str(result.get("benchmark", "?"))]
    for key, value in result.items():
        if key in ("benchmark", "target") or "baseline" in key:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            base = baseline_for(key, result)
            beside = f"{result[base]:>12}  ({base})" if base else ""
            lines.append(f"    {key:<44} {value:>12}  {beside}")
        else:
            lines.append(f"    {key:<44} {json.dumps(value)[:160]}")
    if "target" in result:
        lines.append(f"    target: {result['target']}")
    return lines


def main() -> None:
    results = []
    failed = []
    for module in BENCHMARKS:
        run = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
        lines = run.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"benchmark": module, "error": run.stderr.strip()[-500:]}
        if run.returncode != 0:
            failed.append(module)
            result["exit_code"] = run.returncode
        results.append(result)
    path = Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'figure':<48} {'value':>12}  baseline")
    for r in results:
        print("\n".join(table(r)))
    print(f"written to {path}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
