"""Keeping a worker alive: it outlives lost connections and restarts of the broker or the
database, retrying with backoff until it is told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep for `seconds`, returning early when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def supervise(
    stop: asyncio.Event,
    attempt: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    on_failure: Callable[[Exception], None],
    expected: tuple[type[BaseException], ...],
    log: logging.Logger,
    what: str,
    max_backoff: float,
    initial_backoff: float = 0.2,
    healthy_after: float = 5.0,
) -> None:
    """Run `attempt` until `stop`; after any failure, report it and retry with backoff.

    Workers must outlive lost connections and restarts of the broker or the database;
    failures outside `expected` are logged with their traceback. The backoff doubles with
    each failure in a row and starts again from `initial_backoff` once an attempt has run
    `healthy_after` seconds: an outage long past must not slow the recovery from the next.
    """
    loop = asyncio.get_running_loop()
    backoff = initial_backoff
    while not stop.is_set():
        started = loop.time()
        try:
            await attempt(stop)
            backoff = initial_backoff
        except Exception as exc:
            if loop.time() - started >= healthy_after:
                backoff = initial_backoff
            on_failure(exc)
            log.warning(
                "%s lost its connection; retrying",
                what,
                extra={"worker": what, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=not isinstance(exc, expected),
            )
            await sleep_unless_stopped(stop, backoff)
            backoff = min(backoff * 2, max_backoff)
