"""Soak: a steady mixed load (reads, writes, logins) for SOAK_SECONDS (default 600), with a
consumer SIGKILLed once (at 1/3) and the broker restarted once (at 2/3).

The stack runs as separate processes on a private PostgreSQL cluster and a private RabbitMQ
node (see testbed/servers.py): restarting the broker never disturbs anyone else.

Reports p50/p99/p999 per route (the whole run, beside the same route in the calm first third
as its baseline), the error rate (failed attempts that clients retried), the memory (RSS) of
every process at start and end against a stated bound, and the loss count: the violations of
the guarantees checked by testbed/stack.py (must be 0).

    SOAK_SECONDS=60 python -m bench.soak      # or: python -m bench.soak 60
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import percentile, report
from testbed.audit import Audit
from testbed.checks import check_everything, end_to_end_recovery, until_no_problems
from testbed.load import Ledger, LoadGenerator
from testbed.servers import PrivateRabbit, private_servers
from testbed.stack import Stack, running_stack

RATE_PER_S = float(os.environ.get("SOAK_RATE", "20"))  # client operations per second
# Memory bound: no process may end above start * 1.5 + 64 MiB (caches fill, then stay).
RSS_GROWTH_FACTOR = 1.5
RSS_GROWTH_SLACK_MIB = 64.0


async def steady_load(load: LoadGenerator, seconds: float, calm: Ledger) -> None:
    """Paced operations: 20% new users (register, login, edit), 50% reads, 30% logins."""
    ledger = load.ledger
    sessions: list[tuple[str, str]] = []  # (email, token)
    deadline = time.monotonic() + seconds
    calm_until = time.monotonic() + seconds / 3
    rng = random.Random(7)
    interval = 1.0 / RATE_PER_S
    index = 0
    pending: set[asyncio.Task[None]] = set()

    async def operation(kind: str, n: int) -> None:
        if kind == "user" or not sessions:
            email = await load.one_user(n)
            token = await load.login(email) if email else None
            if email and token:
                sessions.append((email, token))
        elif kind == "read":
            await load.read_profile(rng.choice(sessions)[1])
        else:
            email, _ = rng.choice(sessions)
            await load.login(email)

    next_at = time.monotonic()
    while time.monotonic() < deadline:
        roll = rng.random()
        kind = "user" if roll < 0.2 else "read" if roll < 0.7 else "login"
        task = asyncio.create_task(operation(kind, index))
        pending.add(task)
        task.add_done_callback(pending.discard)
        index += 1
        if time.monotonic() < calm_until:  # the calm third's latencies are the baseline
            for route, values in ledger.latencies.items():
                calm.latencies[route] = list(values)
        next_at += interval
        await asyncio.sleep(max(next_at - time.monotonic(), 0.001))
    await asyncio.gather(*pending)


def soak(seconds: float) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="eskit-soak-logs-"))
    with private_servers(prefix="eskit-soak-") as (postgres, rabbit):
        audit = Audit(rabbit.url()).start()
        try:
            with running_stack(postgres, rabbit, workdir, log_level="WARNING") as stack:
                return asyncio.run(_soak(stack, audit, seconds))
        finally:
            audit.close()
            shutil.rmtree(workdir, ignore_errors=True)


async def _soak(stack: Stack, audit: Audit, seconds: float) -> dict[str, object]:
    ledger, calm = Ledger(tag="soak"), Ledger(tag="calm")
    await asyncio.sleep(2)  # let every process settle before measuring memory
    rss_start = stack.rss_mib()
    load = LoadGenerator(stack, ledger)
    recoveries: dict[str, float] = {}

    async def faults() -> None:
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(stack.kill, "reporting_svc.consumer")
        recoveries["sigkill reporting_svc.consumer"] = await end_to_end_recovery(
            stack, audit, ledger, time.monotonic(), 60
        )
        await asyncio.sleep(max(seconds * 2 / 3 - (time.monotonic() - started), 0))
        assert isinstance(stack.rabbit, PrivateRabbit)  # soak runs one broker
        await asyncio.to_thread(stack.rabbit.restart, 3)
        recoveries["rabbitmq restart"] = await end_to_end_recovery(
            stack, audit, ledger, time.monotonic(), 60
        )

    started = time.monotonic()
    try:
        await asyncio.gather(steady_load(load, seconds, calm), faults())
    finally:
        await load.aclose()
    elapsed = time.monotonic() - started
    verdict, catch_up = await until_no_problems(
        lambda: check_everything(stack, audit, [ledger]), 120
    )
    rss_end = stack.rss_mib()

    result: dict[str, object] = {
        "benchmark": f"soak: {seconds:.0f}s of mixed load at {RATE_PER_S:.0f} ops/s, "
        "a consumer SIGKILLed and the broker restarted once",
        "seconds": round(elapsed, 1),
    }
    for route in sorted(ledger.latencies):
        key = route.lower().replace("/", "_").replace(" ", "").strip("_")
        for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
            result[f"{key}_{name}_ms"] = percentile(ledger.latencies[route], q)
            result[f"baseline_{key}_{name}_ms"] = percentile(calm.latencies.get(route, []), q)
        result[f"{key}_requests"] = ledger.requests[route]
    attempts = sum(ledger.requests.values())
    growth = {name: round(rss_end.get(name, 0.0) - start, 1) for name, start in rss_start.items()}
    over = [
        name
        for name, start in rss_start.items()
        if rss_end.get(name, 0.0) > start * RSS_GROWTH_FACTOR + RSS_GROWTH_SLACK_MIB
        and name != "reporting_svc.consumer"  # restarted mid-run: its start is not comparable
    ]
    result.update(
        {
            "operations_accepted": ledger.accepted,
            "requests": attempts,
            "error_rate": round(sum(ledger.errors.values()) / max(attempts, 1), 5),
            "errors_by_route": dict(ledger.errors),
            "rss_start_mib": rss_start,
            "rss_end_mib": rss_end,
            "rss_growth_mib": growth,
            "rss_bound": f"end <= start * {RSS_GROWTH_FACTOR} + {RSS_GROWTH_SLACK_MIB:.0f} MiB",
            "rss_over_bound": over,
            "recovery_s": {k: round(v, 1) for k, v in recoveries.items()},
            "catch_up_s": round(catch_up, 1),
            "duplicates_suppressed": stack.duplicates_suppressed(),
            "loss_count": len(verdict.problems),
            "problems": verdict.problems[:10],
            "target": "loss_count == 0, rss_over_bound empty, error_rate only during faults",
        }
    )
    return result


def main() -> None:
    seconds = float(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SOAK_SECONDS", "600"))
    result = soak(seconds)
    report("soak", result)
    if result["loss_count"] or result["rss_over_bound"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
