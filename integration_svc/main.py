"""integration_svc's composition root: database setup, and the consumer process with its
webhook dispatcher."""

from __future__ import annotations

import asyncio
import logging

import psycopg
from aio_pika.abc import AbstractChannel

from integration_svc import bindings, deliveries, endpoints
from integration_svc.dispatcher import WebhookDispatcher
from integration_svc.egress import EgressPolicy
from integration_svc.endpoints import Endpoint, EndpointError
from integration_svc.erasure import purge_bodies
from integration_svc.projection import WebhookProjection
from integration_svc.settings import IntegrationSettings
from servicekit import amqp
from servicekit.eventstore import connection_kwargs
from servicekit.messages import TRANSIENT_ERRORS
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
        settings.database_url,
        projection(settings),
        (*endpoints.DDL, *deliveries.DDL, *bindings.DDL),
    )


def file_endpoints(settings: IntegrationSettings) -> list[Endpoint] | None:
    """The endpoints of INTEGRATION_WEBHOOKS_FILE (None when unset); raises EndpointError."""
    if not settings.webhooks_file:
        return None
    return endpoints.load_file(settings.webhooks_file, policy(settings))


class IntegrationWorker(ProjectionWorker):
    """The consumer (records deliveries) and the dispatcher (sends them), in one process.

    Its queue is bound to what the endpoints subscribe to (integration_svc.bindings): the
    webhooks file is synced with the bindings at start, and the consumer reconciles them each
    time it declares its queue.
    """

    dispatcher: WebhookDispatcher

    def __init__(
        self, settings: IntegrationSettings, from_file: list[Endpoint] | None = None
    ) -> None:
        super().__init__(
            projection(settings), settings, WebhookDispatcher(settings), erasure_hook=purge_bodies
        )
        self.from_file = from_file
        self.consumer.on_declared = self._bind

    async def run(self, stop: asyncio.Event) -> None:
        if self.from_file is not None:
            await self._sync_file(stop)
        await super().run(stop)

    async def _sync_file(self, stop: asyncio.Event) -> None:
        """The file's endpoints into the table, the queue bound to them before that commits
        and unbound from what they no longer want after (retried until the database and the
        broker answer)."""
        assert self.from_file is not None
        while not stop.is_set():
            try:
                connection = await amqp.connect(self.settings.amqp_url)
                async with connection:
                    channel = await connection.channel()
                    conn = await psycopg.AsyncConnection.connect(
                        **connection_kwargs(self.settings.database_url)
                    )
                    async with conn:
                        async with conn.transaction():
                            await bindings.lock(conn)
                            await endpoints.sync_file(conn, self.from_file)
                            await bindings.reconcile(conn, channel, unbind=False)
                        async with conn.transaction():
                            await bindings.reconcile(conn, await connection.channel())
                log.info(
                    "webhook endpoints synced from file", extra={"endpoints": len(self.from_file)}
                )
                return
            except TRANSIENT_ERRORS as exc:
                log.warning("cannot sync the webhooks file yet", extra={"error": repr(exc)})
                await sleep_unless_stopped(stop, 1.0)

    async def _bind(self, channel: AbstractChannel) -> None:
        """Bind the just-declared queue to what the endpoints want; `#` if the table cannot
        be read now (a superset, unbound by the next reconciliation)."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                **connection_kwargs(self.settings.database_url)
            )
            async with conn, conn.transaction():
                keys = await bindings.reconcile(conn, channel)
        except (psycopg.Error, OSError) as exc:
            log.warning(
                "cannot read the webhook endpoints: binding every event until the next "
                "reconciliation",
                extra={"error": repr(exc)},
            )
            await bindings.bind_everything(channel)
            return
        log.info("queue bound to the endpoints' event types", extra={"routing_keys": keys})


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
