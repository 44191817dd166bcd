"""reporting_svc's composition root: database setup and the projection's consumer."""

from __future__ import annotations

from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.process import ProjectionWorker
from servicekit.projection import init_projection_db
from servicekit.service import Service


def projection(settings: ReportingSettings | None = None) -> ReportingProjection:
    """The projection `esctl replay reporting_svc` rebuilds."""
    return ReportingProjection()


def init_db(settings: ReportingSettings | None = None) -> None:
    """Create the database and the live generation's tables (idempotent)."""
    settings = settings or ReportingSettings()
    init_projection_db(settings.database_url, projection(settings))


def worker(settings: ReportingSettings) -> ProjectionWorker:
    """The projection fed from `reporting_svc.q`."""
    return ProjectionWorker(projection(settings), settings)


SERVICE = Service(
    name=ReportingProjection.name,
    settings=ReportingSettings,
    init_db=init_db,
    consumer=worker,
    projection=projection,
)
