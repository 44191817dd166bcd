"""Process entry points for relays and consumers: configure logs, run beside a health server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from servicekit import telemetry
from servicekit.aio import sleep_unless_stopped
from servicekit.consumer import Consumer, ProjectionHandler
from servicekit.logs import configure_logging
from servicekit.projection import Projection, ProjectionStore
from servicekit.relay import TRANSIENT_ERRORS, Relay
from servicekit.settings import ServiceSettings
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


def serve_projection(
    projection: Projection,
    settings: ServiceSettings,
    *,
    port: int,
    prefetch: int,
    delivery_limit: int,
) -> None:
    """Run `projection`'s consumer until SIGINT/SIGTERM, with /health and /metrics on `port`."""
    consumer, store = projection_consumer(
        projection, settings, prefetch=prefetch, delivery_limit=delivery_limit
    )
    _serve(
        f"{projection.name}.consumer",
        settings,
        port,
        lambda stop: run_projection(consumer, store, stop),
        is_ready=lambda: consumer.status.role == "consuming",
        status=lambda: consumer.status,
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
    asyncio.run(
        run_worker(
            name=name, host=settings.host, port=port, task=task, is_ready=is_ready, status=status
        )
    )
