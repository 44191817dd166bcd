"""Wiring of the eventsourcing library on PostgreSQL, shared by every event-sourced service.

Each service owns one database. Configuration is explicit: we build the library's
environment from a database URL rather than letting it read os.environ.
"""

from __future__ import annotations

import contextlib
import logging
import select
import uuid
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import psycopg
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    Mapper,
    ProcessRecorder,
    Recording,
    Subscription,
    Tracking,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresSubscription
from eventsourcing.utils import Environment, strtobool
from prometheus_client import Counter
from psycopg import sql

from servicekit import context, shredding, telemetry
from servicekit.shredding import KeyStore, PersonalData, PersonalDataMapper

log = logging.getLogger("servicekit.eventstore")
APPENDED = Counter(
    "eventstore_events_appended_total",
    "Events appended to a service's event store, by application and event type",
    ["app", "event_type"],
)
_APPENDED_SERIES: dict[tuple[str, type[Any]], Any] = {}


class TracedAggregate(Aggregate):
    """An aggregate whose events remember the request (or message) that caused them.

    `metadata` holds the request id, correlation and causation ids and the W3C traceparent,
    so that a relay publishing the event much later still links it to its cause.
    """

    class Event(Aggregate.Event):
        metadata: dict[str, str]

    class Created(Event, Aggregate.Created):
        pass

    def trigger_event(self, event_class: type[Any], **kwargs: Any) -> None:
        kwargs.setdefault("metadata", event_metadata())
        super().trigger_event(event_class, **kwargs)

    @classmethod
    def _create(cls, event_class: type[Any], **kwargs: Any) -> Any:
        kwargs.setdefault("metadata", event_metadata())
        return super()._create(event_class, **kwargs)


def event_metadata() -> dict[str, str]:
    """The call context a new event keeps; the traceparent is the current span's if any."""
    metadata = context.current().as_metadata()
    traceparent = telemetry.current_traceparent()
    if traceparent:
        metadata["traceparent"] = traceparent
    return metadata


# A peer that vanishes without a word (a dropped route, a dead host: no RST) must be noticed
# within seconds, not after the kernel's defaults (keepalive after 2 h, retransmissions for
# about 15 min): a relay's advisory lock would be held, and a LISTEN wait last, that long.
# Both ends probe: the client after 5 s idle, then every 2 s, giving up after 3 misses
# (about 11 s), and unacknowledged data fails after 10 s. The same values are set on the
# server's side of the session, so that PostgreSQL ends a cut-off session (and releases its
# locks) as quickly.
KEEPALIVE_IDLE_SECONDS = 5
KEEPALIVE_INTERVAL_SECONDS = 2
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 10_000
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": KEEPALIVE_IDLE_SECONDS,
    "keepalives_interval": KEEPALIVE_INTERVAL_SECONDS,
    "keepalives_count": KEEPALIVE_COUNT,
    "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
    "options": (
        f"-c tcp_keepalives_idle={KEEPALIVE_IDLE_SECONDS} "
        f"-c tcp_keepalives_interval={KEEPALIVE_INTERVAL_SECONDS} "
        f"-c tcp_keepalives_count={KEEPALIVE_COUNT} "
        f"-c tcp_user_timeout={TCP_USER_TIMEOUT_MS}"
    ),
}


CONNECT_TIMEOUT_SECONDS = 5  # a server that does not answer a SYN is not waited on for minutes


def connection_kwargs(database_url: str, **overrides: Any) -> dict[str, Any]:
    """Connection parameters of a postgresql:// URL, with keepalives on both ends.

    `overrides` replace parameters, e.g. a shorter `connect_timeout` for a health check.
    """
    parts = urlsplit(database_url)
    if parts.scheme not in ("postgresql", "postgres"):
        msg = f"not a postgresql:// URL: {database_url!r}"
        raise ValueError(msg)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password or ""),
        "dbname": (parts.path or "/").lstrip("/") or "postgres",
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        **KEEPALIVES,
        **overrides,
    }


# Settings the relay's ordering depends on, never left to the environment. With the library's
# database functions on, inserts skip the events table's EXCLUSIVE lock, so notification ids
# can commit out of order and a tailing relay skips an id forever (4-18 of 6,400 events were
# missed under 8 writers in shared/notes/eventsourcing.md). `EventSourcedApplication` refuses
# to start if anything (e.g. a prefixed `USERS_POSTGRES_ENABLE_DB_FUNCTIONS=y`) turns it on.
ORDERING_SETTINGS = {"POSTGRES_ENABLE_DB_FUNCTIONS": "n"}


def eventsourcing_env(
    database_url: str,
    *,
    create_table: bool = False,
    pool_size: int = 5,
    max_overflow: int = 10,
    lock_timeout: int = 5,
    connect_timeout: int = 5,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The eventsourcing library's configuration for a database URL.

    Tables are created once by `esctl db init`, never by running services (several
    processes creating them at once race), hence `create_table=False` by default.
    """
    kw = connection_kwargs(database_url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": kw["dbname"],
        "POSTGRES_HOST": kw["host"],
        "POSTGRES_PORT": str(kw["port"]),
        "POSTGRES_USER": kw["user"],
        "POSTGRES_PASSWORD": kw["password"],
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(max_overflow),
        "POSTGRES_LOCK_TIMEOUT": str(lock_timeout),
        "POSTGRES_CONNECT_TIMEOUT": str(connect_timeout),
        # No ping before each checkout (a round trip, client and server CPU, on every
        # command): a dead pooled connection fails its statement instead, and the library
        # retries that on a fresh one; keepalives and the user timeout find silent ones.
        "POSTGRES_PRE_PING": "n",
        "CREATE_TABLE": "y" if create_table else "n",
    }
    env.update(extra or {})
    env.update(ORDERING_SETTINGS)
    return env


# The library environment's keys for crypto-shredding (servicekit.shredding), filled from a
# service's settings by `personal_data_env`.
PERSONAL_DATA_KEY = "PERSONAL_DATA_KEY"
ENCRYPT_PERSONAL_DATA = "ENCRYPT_PERSONAL_DATA"


def personal_data_env(key: str | None, *, encrypt: bool = True) -> dict[str, str]:
    """The library environment's entries for a service key (base64url) and the on/off switch."""
    env = {ENCRYPT_PERSONAL_DATA: "y" if encrypt else "n"}
    if key:
        env[PERSONAL_DATA_KEY] = key
    return env


def _admin(database_url: str) -> tuple[psycopg.Connection[Any], str]:
    """A connection to the server's `postgres` database, and the URL's database name."""
    kw = connection_kwargs(database_url)
    dbname = kw.pop("dbname")
    return psycopg.connect(**kw, dbname="postgres", autocommit=True), dbname


def ensure_database(database_url: str) -> bool:
    """Create the URL's database if it does not exist. True when it was created."""
    admin, dbname = _admin(database_url)
    with admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if exists.fetchone():
            return False
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False
        return True


def drop_database(database_url: str) -> None:
    """Drop the URL's database (tests use it on databases they created themselves)."""
    admin, dbname = _admin(database_url)
    with admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


class EventSourcedApplication(Application[Any]):
    """An eventsourcing Application whose saves can carry a tracking position.

    Consumers that turn incoming messages into new events (user_svc creating a profile from
    `auth.account.registered`) record the producer's position in the same transaction as the
    new events, so a redelivered message is recognised and changes nothing.
    """

    env: ClassVar[dict[str, str]] = {}
    # Which stored events carry personal fields (servicekit.shredding); None: nothing is
    # encrypted. The key comes from the environment (`personal_data_env`).
    personal_data: ClassVar[PersonalData | None] = None
    personal_keys: KeyStore | None = None

    def construct_factory(self, env: Environment) -> InfrastructureFactory:
        """The library's factory, its pool given our keepalives, its ordering settings checked.

        The library opens its pool lazily, so the connection parameters can still be set here.
        """
        factory = super().construct_factory(env)
        datastore = getattr(factory, "datastore", None)
        if datastore is None:  # not PostgreSQL (unit tests on POPO)
            return factory
        if datastore.enable_db_functions:
            msg = (
                f"{self.name}: POSTGRES_ENABLE_DB_FUNCTIONS is on; inserts would skip the "
                "events table lock and the relay could miss events. Remove that setting."
            )
            raise ValueError(msg)
        datastore.pool.kwargs.update(KEEPALIVES, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        return factory

    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()

    def construct_mapper(self) -> Mapper[Any]:
        """The library's mapper; with `personal_data` declared, one that seals those fields."""
        mapper = super().construct_mapper()
        personal = type(self).personal_data
        if personal is None:
            return mapper
        datastore = getattr(self.factory, "datastore", None)
        creating_tables = datastore is not None and strtobool(self.env.get("CREATE_TABLE", "y"))
        if creating_tables:
            with psycopg.connect(**self._connect_kwargs(), autocommit=True) as conn:
                shredding.create_table(conn)
        key = self.env.get(PERSONAL_DATA_KEY)
        encrypt = strtobool(self.env.get(ENCRYPT_PERSONAL_DATA, "y"))
        if key:
            service_key = shredding.service_key_from(key)
            self.personal_keys = (
                shredding.PersonalKeys(
                    self._connect_kwargs(), service_key, name=f"{self.name}-personal-keys"
                )
                if datastore is not None
                else shredding.MemoryPersonalKeys()
            )
        elif encrypt and not creating_tables:  # `esctl db init` needs no key
            log.warning(
                "%s: no personal data key is set: personal fields are stored unencrypted "
                "and cannot be erased by destroying a key",
                self.name,
            )
        return PersonalDataMapper(
            mapper.transcoder,
            compressor=mapper.compressor,
            cipher=mapper.cipher,
            personal=personal,
            keys=self.personal_keys,
            encrypt=encrypt,
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        """Connection parameters of the library's own database, with our keepalives."""
        env = self.env
        url = "postgresql://{user}:{password}@{host}:{port}/{dbname}".format(
            user=quote(env.get("POSTGRES_USER", "postgres"), safe=""),
            password=quote(env.get("POSTGRES_PASSWORD", ""), safe=""),
            host=env.get("POSTGRES_HOST", "127.0.0.1"),
            port=env.get("POSTGRES_PORT", "5432"),
            dbname=quote(env.get("POSTGRES_DBNAME", "postgres"), safe=""),
        )
        return connection_kwargs(url)

    def close(self) -> None:
        super().close()
        if self.personal_keys is not None:
            self.personal_keys.close()

    # --- erasure (crypto-shredding) -------------------------------------------------------

    def erase_person(self, subject: uuid.UUID) -> bool:
        """Destroy the person's key and drop their aggregates from this process's caches.

        Idempotent: True when this call destroyed the key. Their stored events stay; their
        personal fields read as erased from now on (other processes: within
        `shredding.KEY_CACHE_SECONDS`).
        """
        if self.personal_keys is None:
            msg = f"{self.name}: no personal data key is configured: nothing can be erased"
            raise RuntimeError(msg)
        destroyed = self.personal_keys.erase(subject)
        self.evict_person(subject)
        return destroyed

    def person_erased_at(self, subject: uuid.UUID) -> datetime | None:
        """When the person's key was destroyed; None while it is not."""
        if self.personal_keys is None:
            return None
        return self.personal_keys.erased_at(subject)

    def evict_person(self, subject: uuid.UUID) -> None:
        """Forget the person in memory: their key, and their aggregates in the repository's
        cache (the subject's own and those keyed to it, e.g. an e-mail registration)."""
        if self.personal_keys is not None:
            self.personal_keys.forget(subject)
        related: set[uuid.UUID] = set()
        if isinstance(self.mapper, PersonalDataMapper):
            related = self.mapper.related.of(subject)
        for aggregate_id in {subject, *related}:
            self.evict(aggregate_id)

    def evict(self, aggregate_id: uuid.UUID) -> None:
        """Drop an aggregate from the repository's cache (the next get reads the store)."""
        cache = self.repository.cache
        if cache is None:
            return
        with contextlib.suppress(KeyError):
            cache.get(aggregate_id, evict=True)

    def _record(self, processing_event: ProcessingEvent[Any]) -> list[Recording[Any]]:
        """Append within a span whose traceparent every appended event keeps.

        The relay later starts its publish span from that stored traceparent, so the chain
        request -> append -> publish -> consume holds however late the relay publishes.
        """
        events = processing_event.events
        span = telemetry.start_span(
            f"append {self.name}",
            attributes={
                "eventstore.application": self.name,
                "eventstore.events": len(events),
                "eventstore.event_types": sorted({type(e).__qualname__ for e in events}),
            },
        )
        with telemetry.use_span(span):
            traceparent = telemetry.traceparent_of(span.get_span_context())
            if traceparent:
                for event in events:
                    metadata = getattr(event, "metadata", None)
                    if isinstance(metadata, dict):
                        metadata["traceparent"] = traceparent
            try:
                recordings = super()._record(processing_event)
            except IntegrityError:
                if not self._landed(events):
                    raise
                recordings = []  # our own commit, met again by the library's retry
        for event in events:
            key = (self.name, type(event))
            series = _APPENDED_SERIES.get(key)
            if series is None:
                series = _APPENDED_SERIES[key] = APPENDED.labels(
                    self.name, type(event).__qualname__
                )
            series.inc()
        return recordings

    def _landed(self, events: list[Any]) -> bool:
        """Whether these very events are stored: the connection broke after COMMIT was sent,
        the library retried the insert and met our own rows (IntegrityError). Without this,
        a command retried on that conflict would record its facts twice (a second login)."""
        for event in events:
            version = event.originator_version
            stored = list(self.events.get(event.originator_id, gt=version - 1, lte=version))
            same = (type(stored[0]), getattr(stored[0], "timestamp", None)) if stored else None
            if same != (type(event), event.timestamp):
                return False
        return bool(events)

    def save_tracked(self, *aggregates: Aggregate, tracking: Tracking) -> None:
        processing: ProcessingEvent[Any] = ProcessingEvent(tracking)
        processing.collect_events(*aggregates)
        recordings = self._record(processing)
        self._take_snapshots(processing)
        self._notify(recordings)

    def tracked_position(self, producer: str) -> int:
        assert isinstance(self.recorder, ProcessRecorder)
        return self.recorder.max_tracking_id(producer) or 0


# How long the notification listener blocks before it looks at its stop flag again.
LISTEN_WAKE_SECONDS = 0.5


class QuietPostgresSubscription(PostgresSubscription):
    """The library's subscription to the notification log, without its idle spin.

    Its listener thread waits with `notifies(timeout=0.1)`: psycopg rounds what is left of a
    timeout down to whole milliseconds, so the last millisecond of every 0.1 s is a loop of
    `poll(fd, 0)` (about 60 calls). That was 6 ms of CPU a second, forever, in each replica
    of user_svc, the largest idle cost of the stack. Here the thread blocks in `poll` for
    LISTEN_WAKE_SECONDS (whole milliseconds, no spin), then takes what arrived with a
    zero timeout. Stopping takes at most that long; a dead connection (POLLERR/POLLHUP)
    fails the read and stops the subscription, as before.
    """

    def _listen(self) -> None:
        try:
            with self._recorder.datastore.get_connection() as conn:
                conn.execute(
                    sql.SQL("LISTEN {0}").format(sql.Identifier(self._recorder.channel_name))
                )
                poller = select.poll()
                poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
                wake_ms = round(LISTEN_WAKE_SECONDS * 1000)
                while not self._has_been_stopped and not self._thread_error:
                    # Notifications already read by LISTEN's round trip come first.
                    for _ in conn.notifies(timeout=0):
                        self._has_been_notified.set()
                    poller.poll(wake_ms)
        except BaseException as e:  # noqa: BLE001 - as the library's listener: kept, then stop
            if self._thread_error is None:
                self._thread_error = e
            self.stop()


def subscribe(recorder: ApplicationRecorder, *, gt: int | None = None) -> Subscription[Any]:
    """`recorder.subscribe(gt=...)`; on PostgreSQL, with a listener that does not spin."""
    if isinstance(recorder, PostgresApplicationRecorder):
        return QuietPostgresSubscription(recorder=recorder, gt=gt)
    return recorder.subscribe(gt=gt)
