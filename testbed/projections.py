"""Running reporting_svc's projection in-process and checking it against a history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from reporting_svc.projection import Reporting
from reporting_svc.reports import REPORTS, read_report
from reporting_svc.settings import ReportingSettings
from servicekit.consumer import Consumer
from servicekit.process import ProjectionWorker
from servicekit.projection import Projection, ProjectionStore
from testbed.history import History


async def positions(settings: ReportingSettings) -> dict[str, int]:
    async with ProjectionStore(Reporting(), settings.database_url) as store:
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
        projection or Reporting(),
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
