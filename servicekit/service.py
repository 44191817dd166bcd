"""How a service declares itself: once, in its composition root (`<service>/main.py`).

A `Service` names the service, its settings class and how to set up its database, and the
parts it has: a REST app, a relay (its event store published), a consumer (its queue), a
projection (rebuildable with `esctl replay`). The processes to run follow from the parts,
each with the settings field that holds its port. The registry (`registry.SERVICES`) lists
every service; the CLI, `esctl up`, the deployment checks and the tests all read it, so
nothing looks a service up by its name as a string.
"""

from __future__ import annotations

import enum
import functools
import gc
import logging
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from fastapi import FastAPI

from servicekit.eventstore import connection_kwargs
from servicekit.logs import configure_logging
from servicekit.messages import TRANSIENT_ERRORS
from servicekit.process import Worker, serve_worker
from servicekit.projection import Projection
from servicekit.relay import Relay
from servicekit.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")
log = logging.getLogger("servicekit.service")


class Role(enum.Enum):
    """A kind of process, and the settings field that holds its port."""

    API = "port"  # the REST app under uvicorn
    RELAY = "relay_port"  # the event store published to the producer's exchange
    CONSUMER = "consumer_port"  # `<service>.q` fed to the service's handler


@dataclass(frozen=True)
class Process:
    """One process of a service: `esctl serve|relay|consume <service>`."""

    service: Service[Any]
    role: Role

    @property
    def name(self) -> str:
        suffix = {Role.API: "", Role.RELAY: ".relay", Role.CONSUMER: ".consumer"}[self.role]
        return f"{self.service.name}{suffix}"

    @property
    def command(self) -> list[str]:
        """The esctl command that runs it (after `python -m esctl.main`)."""
        verb = {Role.API: "serve", Role.RELAY: "relay", Role.CONSUMER: "consume"}[self.role]
        return [verb, self.service.name]

    @property
    def port_variable(self) -> str:
        """The environment variable that sets its port, e.g. AUTH_RELAY_PORT."""
        return self.service.variable(self.role.value)

    def address(self, settings: ServiceSettings | None = None) -> tuple[str, int]:
        settings = settings or self.service.settings()
        return settings.host, int(getattr(settings, self.role.value))


@dataclass(frozen=True)
class Service(Generic[S]):
    name: str
    settings: type[S]
    init_db: Callable[[S], None]
    app: Callable[[S], FastAPI] | None = None
    relay: Callable[[S], Relay] | None = None
    consumer: Callable[[S], Worker] | None = None
    projection: Callable[[S], Projection] | None = None

    @property
    def processes(self) -> list[Process]:
        parts = ((Role.API, self.app), (Role.RELAY, self.relay), (Role.CONSUMER, self.consumer))
        return [Process(self, role) for role, part in parts if part is not None]

    def process(self, role: Role) -> Process:
        for process in self.processes:
            if process.role is role:
                return process
        raise LookupError(f"{self.name} has no {role.name.lower()} process")

    def variable(self, field: str) -> str:
        """The environment variable of one of the settings' fields, e.g. USER_DATABASE_URL."""
        alias = self.settings.model_fields[field].validation_alias
        if alias is not None:
            return str(getattr(alias, "choices", [alias])[0])
        prefix = str(self.settings.model_config.get("env_prefix", ""))
        return f"{prefix}{field}".upper()

    def run(self, role: Role) -> None:
        """Run one of the service's processes until SIGINT/SIGTERM, from the environment.

        A part that cannot be built from its settings (`CannotStart`) ends the process with
        a one-line error and exit code 2.
        """
        settings = self.settings()
        process = self.process(role)
        _, port = process.address(settings)
        try:
            if role is Role.API:
                assert self.app is not None
                _serve_app(process.name, functools.partial(self.app, settings), settings)
                return
            make = self.relay if role is Role.RELAY else self.consumer
            assert make is not None
            worker = _built_when_reachable(
                functools.partial(make, settings), process.name, settings
            )
        except CannotStart as exc:
            print(f"error: {process.name} cannot start: {exc}", file=sys.stderr)
            sys.exit(2)
        settle_heap()
        serve_worker(process.name, worker, settings, port=port)


def _built_when_reachable(
    make: Callable[[], T], name: str, settings: ServiceSettings, *, max_delay: float = 5.0
) -> T:
    """`make()`, again after a pause while the database or the broker is unreachable: a
    relay's event store connects as it is built, and a process started beside a database
    that is still starting (or out of connections) waits for it instead of exiting."""
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    delay = 0.5
    while True:
        try:
            return make()
        except TRANSIENT_ERRORS as exc:
            if (refusal := _permanent(exc) or _database_refusal(settings)) is not None:
                raise CannotStart(refusal) from None
            log.warning(
                "%s waits for its database or broker to start",
                name,
                extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"},
            )
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


# The server's answers that waiting will not change: no such database, wrong credentials. A
# refused connection carries no SQLSTATE (libpq), only the server's message.
PERMANENT_SQLSTATES = {"3D000", "28P01", "28000"}
PERMANENT_MESSAGES = (
    re.compile(r'FATAL: +database ".*" does not exist'),
    re.compile(r'FATAL: +role ".*" does not exist'),
    re.compile(r"FATAL: +password authentication failed"),
    re.compile(r"FATAL: +no pg_hba\.conf entry"),
)


def _permanent(exc: BaseException) -> str | None:
    """What the database answered, when it refused for good (a wrong URL, not an outage)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if getattr(seen, "sqlstate", None) in PERMANENT_SQLSTATES or any(
            p.search(text) for p in PERMANENT_MESSAGES
        ):
            return f"the database refuses the connection: {text.strip().splitlines()[-1]}"
        seen = seen.__cause__ or seen.__context__
    return None


def _database_refusal(settings: ServiceSettings) -> str | None:
    """Why the service's database refuses a direct connection for good, if it does (a pool
    only says it got no connection in time)."""
    url = getattr(settings, "database_url", None)
    if not url:
        return None
    try:
        with psycopg.connect(**connection_kwargs(url, connect_timeout=2)):
            return None
    except psycopg.Error as exc:
        return _permanent(exc)


class CannotStart(Exception):
    """A part of a service cannot be built from its settings; the message says why."""


def _serve_app(name: str, factory: Callable[[], FastAPI], settings: ServiceSettings) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # the app's lifespan has started: its heap is built
            settle_heap()

    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    config = uvicorn.Config(
        factory,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
    )
    Server(config).run()


def settle_heap() -> None:
    """Move everything built at start (modules, the app, its schemas: some 100,000 objects)
    out of the garbage collector's reach. A full collection walks every tracked object and
    holds the GIL throughout: tens of milliseconds per collection with that heap, stalling
    every request in flight, which is what set GET /users/me's p99 far above hello-world's.
    Frozen objects are never collected, which is what they are for: they live as long as the
    process."""
    gc.collect()
    gc.freeze()
