"""A replay of reporting_svc while writes continue, against the same replay on a quiet system.

Every round starts afresh: a temporary vhost and database, reporting_svc's consumer as
deployed (`esctl consume reporting_svc`, its own process), and 50,000 events published to the
producer exchanges (so into `reporting_svc.q` and `events.history`) and applied by it. Then
`Replay` rebuilds the projection from events.history, as `esctl replay reporting_svc` does,
timed from its start to the swap: (A) with nothing else published; (B) while well-formed
events keep arriving on the exchanges at 20/s (positions above the history's; paced,
confirmed publishes from this process, starting 2 s before the replay), which the live
consumer applies meanwhile. Rounds alternate A B A B; medians. Target: B / A <= 1.2.

After each replay: it swapped; the new generation holds every position the live consumer
had applied (its /status, read after the swap); and once the writes stop and the consumer has
caught up, the reports equal those computed independently from everything published. A
replay that has not swapped after REPLAY_LIVE_TIMEOUT_SECONDS (300) is stopped and reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence

import aio_pika
import httpx

from bench.harness import median, process, report, temp_database, temp_vhost
from reporting_svc.main import init_db
from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.amqp import declare_producer_exchange
from servicekit.replay import Progress, Replay, ReplayError, ReplayResult
from shared_contracts.names import PRODUCER_EXCHANGES
from testbed.cli import ESCTL
from testbed.history import History, generate, publish
from testbed.ports import free_port
from testbed.projections import assert_reports_match, positions, wait_caught_up

EVENTS = 50_000
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
RATE = 20  # events/s arriving during case B
WARM_UP = 2.0  # seconds of writes before the replay starts
TIMEOUT = float(os.environ.get("REPLAY_LIVE_TIMEOUT_SECONDS", "300"))
EXCHANGES = sorted(set(PRODUCER_EXCHANGES.values()))
APPLIED = re.compile(r'^consumer_messages_total\{[^}]*outcome="applied"[^}]*\} (\S+)$', re.M)


async def write(
    amqp_url: str, bodies: Sequence[tuple[str, str, bytes]], sent: list[int], stop: asyncio.Event
) -> None:
    """Publish like a relay (persistent, confirmed) at RATE/s until `stop`."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchanges = {e: await declare_producer_exchange(channel, e) for e in EXCHANGES}
        started = time.perf_counter()
        for i, (exchange, key, body) in enumerate(bodies):
            if stop.is_set():
                return
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchanges[exchange].publish(message, routing_key=key)
            sent.append(i)
            await asyncio.sleep(max(started + (i + 1) / RATE - time.perf_counter(), 0.001))


async def applied(status: httpx.AsyncClient) -> int:
    """Events the live consumer has applied (its consumer_messages_total{outcome=applied})."""
    return int(float(APPLIED.findall((await status.get("/metrics")).text)[0]))


async def replay(db: str, amqp_url: str) -> tuple[ReplayResult | None, Progress | None, str]:
    """`esctl replay reporting_svc` with its defaults: (result, progress, "") if it finished,
    else (None, progress so far, why)."""
    seen: list[Progress] = []
    rebuild = Replay(
        ReportingProjection(), database_url=db, amqp_url=amqp_url, on_progress=seen.append
    )
    stop = asyncio.Event()
    task = asyncio.create_task(rebuild.run(stop))
    done, _ = await asyncio.wait({task}, timeout=TIMEOUT)
    if done:
        try:
            result = task.result()
        except ReplayError as exc:
            return None, seen[-1] if seen else None, f"ReplayError: {exc}"
        return result, result.progress, ""
    stop.set()
    why = f"timeout: not swapped after {TIMEOUT:.0f} s"
    try:
        await asyncio.wait_for(task, timeout=15)
    except TimeoutError:
        why += "; did not stop when asked, cancelled"
    return None, seen[-1] if seen else None, why


async def one_round(full: History, live: bool) -> tuple[float | None, dict[str, object]]:
    """(seconds to the swap, or None if it did not swap; the round's figures)."""
    history = full.prefix(EVENTS)
    with temp_vhost() as amqp_url, temp_database(f"rl{uuid.uuid4().hex[:4]}") as db:
        settings = ReportingSettings(database_url=db, amqp_url=amqp_url)
        await asyncio.to_thread(init_db, settings)
        port = free_port()
        env = {
            "REPORTING_DATABASE_URL": db,
            "AMQP_URL": amqp_url,
            "REPORTING_CONSUMER_PORT": str(port),
            "LOG_LEVEL": "WARNING",
        }
        argv = [*ESCTL, "consume", "reporting_svc"]
        with process(argv, env, f"http://127.0.0.1:{port}/health/ready"):
            status = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
            await publish(amqp_url, history.bodies())
            await wait_caught_up(settings, history, timeout=300)
            sent: list[int] = []
            stop_writes = asyncio.Event()
            if live:
                tail = full.bodies()[EVENTS:]
                writer = asyncio.create_task(write(amqp_url, tail, sent, stop_writes))
                await asyncio.sleep(WARM_UP)
            applied_before, sent_before = await applied(status), len(sent)
            started = time.perf_counter()
            result, progress, error = await replay(db, amqp_url)
            seconds = min(time.perf_counter() - started, TIMEOUT)
            applied_during, sent_during = await applied(status) - applied_before, len(sent)
            had = (await status.get("/status")).json()["consumer"]["last_position"]
            holds = await positions(settings)
            if live:
                stop_writes.set()
                await writer
            everything = full.prefix(EVENTS + len(sent))
            try:
                await wait_caught_up(settings, everything, timeout=60)
                await assert_reports_match(settings, everything)
                matches = True
            except AssertionError:
                matches = False
            await status.aclose()
    swapped = result is not None and result.swapped
    return seconds if swapped else None, {
        "case": "live" if live else "quiet",
        "seconds": round(seconds, 2),
        "swapped": swapped,
        **({"error": error} if error else {}),
        "replay_applied": progress.applied if progress else 0,
        "writes_during": sent_during - sent_before,
        "live_applied_during": applied_during,
        "new_generation_holds_live_positions": (
            all(holds.get(p, 0) >= v for p, v in had.items()) if swapped else None
        ),
        "reports_match_after_catch_up": matches,
    }


async def run() -> dict[str, object]:
    full = generate(EVENTS + int(RATE * (TIMEOUT + WARM_UP + 60)), seed=99)
    rounds: list[dict[str, object]] = []
    times: dict[str, list[float]] = {"quiet": [], "live": []}
    for i in range(ROUNDS):
        for live in (False, True):
            seconds, figures = await one_round(full, live)
            if seconds is not None:
                times[str(figures["case"])].append(seconds)
            rounds.append(figures)
            print(f"round {i + 1}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    quiet_s = median(times["quiet"]) if times["quiet"] else None
    live_s = median(times["live"]) if len(times["live"]) == ROUNDS else None
    return {
        "benchmark": f"reporting_svc replay of {EVENTS} events, start to swap: quiet vs "
        f"{RATE} writes/s applied by the live consumer meanwhile",
        "replay_baseline_quiet_median_s": quiet_s,
        "replay_live_median_s": live_s,
        "replay_live_ratio": round(live_s / quiet_s, 3) if live_s and quiet_s else None,
        "live_rounds_not_swapped": ROUNDS - len(times["live"]),
        "timeout_s": TIMEOUT,
        "rounds": rounds,
        "target": "ratio <= 1.2, every replay swapped with every live position",
    }


def main() -> None:
    report("replay_live", asyncio.run(run()))


if __name__ == "__main__":
    main()
