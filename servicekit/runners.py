"""Process entry points for relays and consumers: configure logs, run beside a health server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from servicekit import aio, telemetry
from servicekit.aio import sleep_unless_stopped
from servicekit.consumer import Consumer, ProjectionHandler
from servicekit.logs import configure_logging
from servicekit.projection import Projection, ProjectionStore
from servicekit.relay import TRANSIENT_ERRORS, Relay
from servicekit.settings import ConsumerSettings, ServiceSettings
from servicekit.worker import run_worker


def serve_relay(relay: Relay, settings: ServiceSettings, *, port: int) -> None:
    """Run `relay` until SIGINT/SIGTERM, with /health and /metrics on `port`."""
    _serve(
        f"{relay.producer}.relay",
        settings,
        port,
        relay.run,
        is_ready=lambda: relay.status.role in ("leader", "standby"),
        status=lambda: relay.status,
    )


def serve_consumer(consumer: Consumer, settings: ServiceSettings, *, port: int) -> None:
    """Run `consumer` until SIGINT/SIGTERM, with /health and /metrics on `port`."""
    _serve(
        f"{consumer.service}.consumer",
        settings,
        port,
        consumer.run,
        is_ready=lambda: consumer.status.role == "consuming",
        status=lambda: consumer.status,
    )


def projection_consumer(
    projection: Projection,
    settings: ServiceSettings,
    *,
    prefetch: int,
    delivery_limit: int,
) -> tuple[Consumer, ProjectionStore]:
    """A projection's store and the consumer that feeds its live generation."""
    store = ProjectionStore(projection, settings.database_url)
    consumer = Consumer(
        service=projection.name,
        amqp_url=settings.amqp_url,
        bindings=projection.bindings,
        handler=ProjectionHandler(store),
        prefetch=prefetch,
        batch_size=prefetch,
        delivery_limit=delivery_limit,
    )
    return consumer, store


async def run_projection(consumer: Consumer, store: ProjectionStore, stop: asyncio.Event) -> None:
    """Open the store, make sure its tables exist (waiting for the database), then consume."""
    async with store:
        while not stop.is_set():
            try:
                await store.setup()
                break
            except TRANSIENT_ERRORS as exc:
                consumer.status.last_error = f"database unavailable: {exc}"
                await sleep_unless_stopped(stop, 1.0)
        await consumer.run(stop)


class Dispatcher(Protocol):
    """Carries out the intents a projection records (mails, webhooks), beside its consumer."""

    status: Any

    async def run(self, stop: asyncio.Event) -> None: ...


class ProjectionWorker:
    """A projection's consumer and, in the same process, the dispatcher of its intents."""

    def __init__(
        self,
        projection: Projection,
        settings: ConsumerSettings,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.settings = settings
        self.consumer, self.store = projection_consumer(
            projection,
            settings,
            prefetch=settings.consumer_prefetch,
            delivery_limit=settings.consumer_delivery_limit,
        )
        self.dispatcher = dispatcher

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [run_projection(self.consumer, self.store, stop)]
        if self.dispatcher is not None:
            tasks.append(self.dispatcher.run(stop))
        await asyncio.gather(*tasks)

    def ready(self) -> bool:
        return self.consumer.status.role == "consuming"

    def status(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"consumer": self.consumer.status}
        if self.dispatcher is not None:
            parts["dispatcher"] = self.dispatcher.status
        return {name: _plain(part) for name, part in parts.items()}


def _plain(status: Any) -> Any:
    if dataclasses.is_dataclass(status) and not isinstance(status, type):
        return dataclasses.asdict(status)
    return status


def serve_projection(worker: ProjectionWorker) -> None:
    """Run a projection's worker until SIGINT/SIGTERM, with /health and /metrics beside it."""
    _serve(
        f"{worker.consumer.service}.consumer",
        worker.settings,
        worker.settings.consumer_port,
        worker.run,
        is_ready=worker.ready,
        status=worker.status,
    )


def _serve(
    name: str,
    settings: ServiceSettings,
    port: int,
    task: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    is_ready: Callable[[], bool],
    status: Callable[[], Any],
) -> None:
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    telemetry.configure_tracing(name)
    aio.run(
        run_worker(
            name=name, host=settings.host, port=port, task=task, is_ready=is_ready, status=status
        )
    )
