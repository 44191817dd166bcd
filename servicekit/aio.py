"""Small asyncio helpers for long-running workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop, the event loop uvicorn already gives the REST services.

    Relays, consumers and dispatchers spend their time in socket I/O and callbacks, which
    uvloop runs in C; psycopg, aio-pika and httpx work on it unchanged.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def drain(batch: list[T], inbox: asyncio.Queue[T], limit: int) -> None:
    """Move what `inbox` holds into `batch`, until `batch` has `limit` items."""
    while len(batch) < limit and not inbox.empty():
        batch.append(inbox.get_nowait())


async def fill(batch: list[T], inbox: asyncio.Queue[T], *, limit: int, linger: float) -> None:
    """`drain`, and keep draining what arrives within `linger` seconds, up to `limit`.

    For consumers of a backlog: applying a batch is quicker than the broker delivers its
    messages one by one, so taking only what is queued made batches of about ten events (a
    transaction and its round trips for every ten). A few milliseconds fill them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    drain(batch, inbox, limit)
    while len(batch) < limit and loop.time() < deadline:
        await asyncio.sleep(0.002)
        drain(batch, inbox, limit)


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
) -> None:
    """Run `attempt` until `stop`; after any failure, report it and retry with backoff.

    Workers must outlive lost connections and restarts of the broker or the database;
    failures outside `expected` are logged with their traceback.
    """
    backoff = 0.2
    while not stop.is_set():
        try:
            await attempt(stop)
            backoff = 0.2
        except Exception as exc:
            on_failure(exc)
            log.warning(
                "%s lost its connection; retrying",
                what,
                extra={"worker": what, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=not isinstance(exc, expected),
            )
            await sleep_unless_stopped(stop, backoff)
            backoff = min(backoff * 2, max_backoff)
