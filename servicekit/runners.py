"""Process entry points for relays and consumers: configure logs, run beside a health server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from servicekit.consumer import Consumer
from servicekit.logs import configure_logging
from servicekit.relay import Relay
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
    asyncio.run(
        run_worker(
            name=name, host=settings.host, port=port, task=task, is_ready=is_ready, status=status
        )
    )
