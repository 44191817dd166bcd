"""integration_svc's composition root: database setup, and the consumer process with its
webhook dispatcher."""

from __future__ import annotations

import asyncio
import logging

import psycopg

from integration_svc import deliveries, endpoints
from integration_svc.dispatcher import WebhookDispatcher
from integration_svc.egress import EgressPolicy
from integration_svc.endpoints import Endpoint, EndpointError
from integration_svc.erasure import purge_bodies
from integration_svc.projection import WebhookProjection
from integration_svc.settings import IntegrationSettings
from servicekit.eventstore import connection_kwargs
from servicekit.process import ProjectionWorker
from servicekit.projection import init_projection_db
from servicekit.service import CannotStart, Service
from servicekit.supervise import sleep_unless_stopped

log = logging.getLogger("integration_svc")


def projection(settings: IntegrationSettings | None = None) -> WebhookProjection:
    """The projection `esctl replay integration_svc` rebuilds (positions only; it sends nothing)."""
    return WebhookProjection()


def policy(settings: IntegrationSettings) -> EgressPolicy:
    return EgressPolicy.from_settings(
        allow_loopback=settings.allow_loopback,
        allow_private_networks=settings.allow_private_networks,
        allowed_networks=settings.allowed_networks,
    )


def init_db(settings: IntegrationSettings | None = None) -> None:
    """Create the database, the endpoint and delivery tables, and the live generation."""
    settings = settings or IntegrationSettings()
    init_projection_db(
        settings.database_url, projection(settings), (*endpoints.DDL, *deliveries.DDL)
    )


def file_endpoints(settings: IntegrationSettings) -> list[Endpoint] | None:
    """The endpoints of INTEGRATION_WEBHOOKS_FILE (None when unset); raises EndpointError."""
    if not settings.webhooks_file:
        return None
    return endpoints.load_file(settings.webhooks_file, policy(settings))


class IntegrationWorker(ProjectionWorker):
    """The consumer (records deliveries) and the dispatcher (sends them), in one process."""

    dispatcher: WebhookDispatcher

    def __init__(
        self, settings: IntegrationSettings, from_file: list[Endpoint] | None = None
    ) -> None:
        super().__init__(
            projection(settings), settings, WebhookDispatcher(settings), erasure_hook=purge_bodies
        )
        self.from_file = from_file

    async def run(self, stop: asyncio.Event) -> None:
        if self.from_file is not None:
            await self._sync_file(stop)
        await super().run(stop)

    async def _sync_file(self, stop: asyncio.Event) -> None:
        assert self.from_file is not None
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **connection_kwargs(self.settings.database_url)
                )
                async with conn:
                    await endpoints.sync_file(conn, self.from_file)
                log.info(
                    "webhook endpoints synced from file", extra={"endpoints": len(self.from_file)}
                )
                return
            except (psycopg.OperationalError, OSError):
                await sleep_unless_stopped(stop, 1.0)


def worker(settings: IntegrationSettings) -> IntegrationWorker:
    """The projection fed from `integration_svc.q`, with the endpoints of the webhooks file."""
    try:
        return IntegrationWorker(settings, file_endpoints(settings))
    except (EndpointError, ValueError) as exc:
        raise CannotStart(str(exc)) from None


SERVICE = Service(
    name=WebhookProjection.name,
    settings=IntegrationSettings,
    init_db=init_db,
    consumer=worker,
    projection=projection,
)
