"""Running one long-lived worker (a relay, a consumer) as a process of its own.

A worker runs beside a small HTTP server that gives it the same operational surface as the
REST services: `/health/live`, `/health/ready` (the worker says whether it is connected),
`/metrics`, and `/status` (what it is doing). SIGINT/SIGTERM stop both cleanly. Every such
process runs on uvloop, the loop uvicorn already gives the REST services.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import subprocess
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

import aio_pika
import uvicorn
import uvloop

from servicekit import amqp, stream, telemetry
from servicekit.consumer import Consumer, ProjectionHandler
from servicekit.erasure import ErasureSweeper, SweepHook, nothing_else
from servicekit.logs import configure_logging
from servicekit.messages import TRANSIENT_ERRORS
from servicekit.projection import Projection, ProjectionStore
from servicekit.settings import ConsumerSettings, ServiceSettings
from servicekit.supervise import sleep_unless_stopped
from servicekit.web import create_app
from shared_contracts.names import live_queue

log = logging.getLogger("servicekit.process")
T = TypeVar("T")


class Worker(Protocol):
    """What a process runs: until `stop`, saying whether it is ready and what it is doing."""

    async def run(self, stop: asyncio.Event) -> None: ...

    def ready(self) -> bool: ...

    def state(self) -> Any: ...


class NotReady(Exception):
    pass


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop, the event loop uvicorn already gives the REST services.

    Relays, consumers and dispatchers spend their time in socket I/O and callbacks, which
    uvloop runs in C; psycopg, aio-pika and httpx work on it unchanged.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def serve_worker(name: str, worker: Worker, settings: ServiceSettings, *, port: int) -> None:
    """Run `worker` until SIGINT/SIGTERM, logging and tracing as `name`, with its HTTP server
    on `port`."""
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    telemetry.configure_tracing(name)
    run_on_uvloop(run_worker(name=name, host=settings.host, port=port, worker=worker))


async def run_worker(
    *, name: str, host: str, port: int, worker: Worker, shutdown_timeout: float = 10.0
) -> None:
    stop = asyncio.Event()

    async def readiness() -> None:
        if not worker.ready():
            raise NotReady

    app = create_app(title=name, readiness_checks=[("worker", readiness)])

    @app.get("/status", include_in_schema=False)
    async def worker_status() -> Any:
        return plain(worker.state())

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off", access_log=False)
    )
    worker_task = asyncio.create_task(worker.run(stop), name=f"{name}-worker")
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


def plain(state: Any) -> Any:
    """A dataclass as a dict (recursively), anything else as it is: what /status shows."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.asdict(state)
    if isinstance(state, dict):
        return {key: plain(value) for key, value in state.items()}
    return state


async def run_projection(consumer: Consumer, store: ProjectionStore, stop: asyncio.Event) -> None:
    """Open the store, make sure its tables exist and when its queue began is known (waiting
    for the database and the broker), then consume."""
    async with store:
        while not stop.is_set():
            try:
                await store.setup()
                await note_queue_since(consumer, store)
                break
            except TRANSIENT_ERRORS as exc:
                consumer.status.last_error = f"database or broker unavailable: {exc}"
                await sleep_unless_stopped(stop, 1.0)
        await consumer.run(stop)


async def note_queue_since(consumer: Consumer, store: ProjectionStore) -> None:
    """Before the live queue is first declared, record the stream's end: what the stream
    held until then never reached this projection's consumer (ProjectionStore.queue_since).

    A queue that exists already was declared by an older build: when it began is unknown.
    """
    if await store.queue_since() is not None:
        return
    connection = await amqp.connect(consumer.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(live_queue(consumer.service), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            await store.note_queue_since(await stream.end_offset(connection) + 1)
        else:
            with contextlib.suppress(Exception):
                await channel.close()


class StopOnSignals:
    """True once SIGINT or SIGTERM arrived: for loops that poll (`while not stop: ...`)."""

    def __init__(self) -> None:
        self.stopping = False
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def __bool__(self) -> bool:
        return self.stopping


def stop_process(
    child: subprocess.Popen[Any], *, timeout: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    """Ask a child process to stop (`sig`), then kill it if it has not within `timeout`."""
    if child.poll() is None:
        child.send_signal(sig)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


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
        erasure_hook: SweepHook = nothing_else,
    ) -> None:
        self.settings = settings
        self.store = ProjectionStore(projection, settings.database_url)
        # Completes each erasure beyond the database: the service's hook, then the DLQ.
        self.sweeper = ErasureSweeper(
            projection.name,
            database_url=settings.database_url,
            amqp_url=settings.amqp_url,
            hook=erasure_hook,
        )
        self.consumer = Consumer(
            service=projection.name,
            amqp_url=settings.amqp_url,
            bindings=projection.queue_bindings or projection.bindings,
            handler=ProjectionHandler(self.store),
            prefetch=settings.consumer_prefetch,
            batch_size=settings.consumer_prefetch,
            delivery_limit=settings.consumer_delivery_limit,
            coalesce_seconds=settings.consumer_coalesce_seconds,
        )
        self.dispatcher = dispatcher

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [self.consume(stop), self.sweeper.run(stop)]
        if self.dispatcher is not None:
            tasks.append(self.dispatcher.run(stop))
        await asyncio.gather(*tasks)

    async def consume(self, stop: asyncio.Event) -> None:
        await run_projection(self.consumer, self.store, stop)

    def ready(self) -> bool:
        return self.consumer.ready()

    def state(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"consumer": self.consumer.state()}
        if self.dispatcher is not None:
            parts["dispatcher"] = self.dispatcher.status
        return parts
