"""notify_svc's composition root: database setup, and the consumer process with its dispatcher."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import psycopg

from notify_svc.dispatcher import MailDispatcher
from notify_svc.intents import DDL
from notify_svc.mail import mail_domain
from notify_svc.projection import Notifications
from notify_svc.settings import NotifySettings
from servicekit.consumer import Consumer
from servicekit.eventstore import connection_kwargs, ensure_database
from servicekit.logs import configure_logging
from servicekit.projection import ProjectionStore
from servicekit.runners import projection_consumer, run_projection
from servicekit.worker import run_worker

SERVICE = Notifications.name
SETTINGS = NotifySettings


def projection(settings: NotifySettings | None = None) -> Notifications:
    """The projection `esctl replay notify_svc` rebuilds (recipients; it records no intents)."""
    settings = settings or NotifySettings()
    return Notifications(mail_domain=mail_domain(settings.mail_from))


def init_db(settings: NotifySettings | None = None) -> None:
    """Create the database, the intents table and the live generation's tables (idempotent)."""
    settings = settings or NotifySettings()
    ensure_database(settings.database_url)
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        for statement in DDL:
            conn.execute(statement)

    async def setup() -> None:
        async with ProjectionStore(projection(settings), settings.database_url) as store:
            await store.setup()

    asyncio.run(setup())


class NotifyWorker:
    """The consumer (records intents) and the dispatcher (sends them), in one process."""

    def __init__(self, settings: NotifySettings, dispatcher: MailDispatcher | None = None) -> None:
        self.consumer: Consumer
        self.consumer, self.store = projection_consumer(
            projection(settings),
            settings,
            prefetch=settings.consumer_prefetch,
            delivery_limit=settings.consumer_delivery_limit,
        )
        self.dispatcher = dispatcher or MailDispatcher(settings)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(
            run_projection(self.consumer, self.store, stop), self.dispatcher.run(stop)
        )

    def ready(self) -> bool:
        return self.consumer.status.role == "consuming"

    def status(self) -> dict[str, Any]:
        return {
            "consumer": asdict(self.consumer.status),
            "dispatcher": asdict(self.dispatcher.status),
        }


def consume() -> None:
    """Run the projection from `notify_svc.q` and send its mails until SIGINT/SIGTERM."""
    settings = NotifySettings()
    configure_logging(f"{SERVICE}.consumer", level=settings.log_level, fmt=settings.log_format)
    worker = NotifyWorker(settings)
    asyncio.run(
        run_worker(
            name=f"{SERVICE}.consumer",
            host=settings.host,
            port=settings.consumer_port,
            task=worker.run,
            is_ready=worker.ready,
            status=worker.status,
        )
    )
