"""reporting_svc's composition root: database setup and the projection's consumer."""

from __future__ import annotations

import asyncio

from reporting_svc.projection import Reporting
from reporting_svc.settings import ReportingSettings
from servicekit.eventstore import ensure_database
from servicekit.process import ProjectionWorker
from servicekit.projection import ProjectionStore
from servicekit.service import Service


def projection(settings: ReportingSettings | None = None) -> Reporting:
    """The projection `esctl replay reporting_svc` rebuilds."""
    return Reporting()


def init_db(settings: ReportingSettings | None = None) -> None:
    """Create the database and the live generation's tables (idempotent)."""
    settings = settings or ReportingSettings()
    ensure_database(settings.database_url)

    async def setup() -> None:
        async with ProjectionStore(Reporting(), settings.database_url) as store:
            await store.setup()

    asyncio.run(setup())


def worker(settings: ReportingSettings) -> ProjectionWorker:
    """The projection fed from `reporting_svc.q`."""
    return ProjectionWorker(projection(settings), settings)


SERVICE = Service(
    name=Reporting.name,
    settings=ReportingSettings,
    init_db=init_db,
    consumer=worker,
    projection=projection,
)
