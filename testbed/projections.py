"""Running a projection in-process (reporting_svc's by default), rebuilding it as `esctl
replay` does, and checking reporting_svc's reports against a history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from reporting_svc.projection import ReportingProjection
from reporting_svc.reports import REPORTS, read_report
from reporting_svc.settings import ReportingSettings
from servicekit.consumer import Consumer
from servicekit.process import ProjectionWorker
from servicekit.projection import LIVE_GENERATION, Projection, ProjectionStore
from servicekit.replay import Replay, ReplayResult
from servicekit.settings import ServiceSettings
from testbed.history import History, publish


async def positions(settings: ReportingSettings) -> dict[str, int]:
    async with ProjectionStore(ReportingProjection(), settings.database_url) as store:
        try:
            return {p: v.position for p, v in (await store.positions()).items()}
        except LookupError:
            return {}


async def wait_caught_up(
    settings: ReportingSettings, history: History, timeout: float = 90.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await positions(settings)) != history.last_position:
        assert asyncio.get_running_loop().time() < deadline, f"stuck at {seen}"
        await asyncio.sleep(0.2)


async def publish_and_catch_up(settings: ReportingSettings, history: History) -> None:
    """Publish `history` like the relays and wait until the consumers have applied it all."""
    await publish(settings.amqp_url, history.bodies())
    await wait_caught_up(settings, history)


async def assert_reports_match(settings: ReportingSettings, history: History) -> None:
    expected = history.expected()
    for name in REPORTS:
        report = await asyncio.to_thread(read_report, settings.database_url, name)
        assert report.rows == expected[name], name


@asynccontextmanager
async def consuming(
    settings: ReportingSettings, prefetch: int = 1000, projection: Projection | None = None
) -> AsyncIterator[Consumer]:
    worker = ProjectionWorker(
        projection or ReportingProjection(),
        settings.model_copy(update={"consumer_prefetch": prefetch, "consumer_delivery_limit": 3}),
    )
    consumer = worker.consumer
    stop = asyncio.Event()
    task = asyncio.create_task(worker.consume(stop))
    try:
        for _ in range(200):
            if consumer.status.role == "consuming":
                break
            await asyncio.sleep(0.05)
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


async def rebuild(
    projection: Projection, settings: ServiceSettings, *, timeout: float = 30.0, **options: Any
) -> ReplayResult:
    """What `esctl replay` does: a new generation of `projection` built from events.history,
    swapped in once caught up (`options`: Replay's, e.g. idle_seconds, stall_seconds)."""
    replay = Replay(
        projection, database_url=settings.database_url, amqp_url=settings.amqp_url, **options
    )
    return await asyncio.wait_for(replay.run(asyncio.Event()), timeout)


def live_generation(conn: psycopg.Connection[Any], projection: str) -> str | None:
    """The schema of `projection`'s live generation (None before its first setup), read on
    the connection that then reads its tables."""
    row = conn.execute(LIVE_GENERATION, (projection,)).fetchone()
    return None if row is None else str(row[0])
