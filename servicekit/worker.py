"""Runs a long-lived worker (a relay or a consumer) beside a small HTTP server.

The server gives the worker the same operational surface as the REST services:
`/health/live`, `/health/ready` (the worker says whether it is connected), `/metrics`, and
`/status` (what the worker is doing). SIGINT/SIGTERM stop both cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import asdict, is_dataclass
from typing import Any

import uvicorn

from servicekit.web import create_app

log = logging.getLogger("servicekit.worker")

WorkerTask = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class NotReady(Exception):
    pass


async def run_worker(
    *,
    name: str,
    host: str,
    port: int,
    task: WorkerTask,
    is_ready: Callable[[], bool],
    status: Callable[[], Any],
    shutdown_timeout: float = 10.0,
) -> None:
    stop = asyncio.Event()

    async def readiness() -> None:
        if not is_ready():
            raise NotReady

    app = create_app(title=name, readiness_checks=[("worker", readiness)])

    @app.get("/status", include_in_schema=False)
    async def worker_status() -> Any:
        value = status()
        return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off", access_log=False)
    )
    worker_task = asyncio.create_task(task(stop), name=f"{name}-worker")
    server_task = asyncio.create_task(server.serve(), name=f"{name}-http")
    done, _ = await asyncio.wait({worker_task, server_task}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    server.should_exit = True
    if worker_task in done and worker_task.exception() is not None:
        log.error("worker failed", exc_info=worker_task.exception())
    try:
        await asyncio.wait_for(worker_task, timeout=shutdown_timeout)
    except TimeoutError:
        log.warning("worker did not stop in time; cancelling", extra={"worker": name})
        worker_task.cancel()
    except Exception:  # noqa: BLE001 - the failure was logged above
        log.debug("worker ended with an error", extra={"worker": name})
    await server_task
