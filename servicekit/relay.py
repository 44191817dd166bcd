"""The relay: a producer's event store is its outbox.

One relay per producer tails the producer's notification log, maps each stored event to its
public contract (private events are skipped), publishes it with publisher confirms, and only
then records the position in the producer's own database. Delivery is therefore at least
once, in position order; a re-send carries the same deterministic `event_id`.

Exactly one relay per producer is active at a time: it holds a PostgreSQL advisory lock on a
dedicated connection, which is also the connection that LISTENs for new events. Replicas
wait as standbys. Any broker or database failure drops leadership and connections; the relay
reconnects with backoff and resumes from the recorded position.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import aiormq
import psycopg
from eventsourcing.application import Application
from eventsourcing.persistence import Notification
from prometheus_client import Counter, Gauge, Histogram

from servicekit import amqp, messages, telemetry
from servicekit.amqp import declare_producer_exchange
from servicekit.batching import COALESCE_SECONDS, Coalescing
from servicekit.eventstore import connection_kwargs, eventsourcing_env
from servicekit.messages import (
    RUN,
    RUN_FROM,
    RUN_PRODUCER,
    RUN_TO,
    TRACEPARENT,
    TRANSIENT_ERRORS,
    envelope_for,
    message_for,
)
from servicekit.settings import PersonalDataStoreSettings, ServiceSettings
from servicekit.supervise import sleep_unless_stopped, supervise
from shared_contracts.events import ContractEvent

log = logging.getLogger("servicekit.relay")

ToContract = Callable[[Any], ContractEvent | None]

RELAY_TABLE = "relay_positions"
RELAY_TABLE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {RELAY_TABLE} ("
    "producer text PRIMARY KEY, position bigint NOT NULL DEFAULT 0, "
    "updated_at timestamptz NOT NULL DEFAULT now())"
)

PUBLISHED = Counter("relay_published_total", "Events published and confirmed", ["producer"])
CONFIRM_LATENCY = Histogram(
    "relay_confirm_seconds",
    "Time from publishing a batch to its last confirm",
    ["producer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
BACKLOG = Gauge(
    "relay_backlog_events", "Producer's latest position minus the relay's", ["producer"]
)
POSITION = Gauge("relay_position", "Last position confirmed and recorded", ["producer"])
LEADER = Gauge("relay_is_leader", "1 while this replica is the active relay", ["producer"])


def create_relay_table(database_url: str) -> None:
    with psycopg.connect(**connection_kwargs(database_url), autocommit=True) as conn:
        conn.execute(RELAY_TABLE_DDL)


@dataclass
class OutgoingBatch:
    last_position: int
    messages: list[tuple[str, aio_pika.Message]] = field(default_factory=list)


@dataclass
class RelayStatus:
    role: str = "starting"  # starting | standby | leader | reconnecting | stopped
    position: int = 0
    last_error: str | None = None


class Relay:
    """Publishes one producer's public events. Construct, then `await run(stop)`."""

    def __init__(
        self,
        app: Application[Any],
        *,
        producer: str,
        exchange: str,
        to_contract: ToContract,
        amqp_url: str,
        database_url: str,
        batch_size: int = 500,
        idle_wait_seconds: float = 1.0,
        lock_retry_seconds: float = 1.0,
        max_backoff_seconds: float = 10.0,
        coalesce_seconds: float = COALESCE_SECONDS,
    ) -> None:
        self.app = app
        self.coalescing = Coalescing(coalesce_seconds, f"{producer} relay")
        self.producer = producer
        self.exchange_name = exchange
        self.to_contract = to_contract
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.batch_size = batch_size
        self.idle_wait = idle_wait_seconds
        self.lock_retry = lock_retry_seconds
        self.max_backoff = max_backoff_seconds
        self.status = RelayStatus()
        self._channel_name: str = getattr(app.recorder, "channel_name", f"{app.name}_events")

    @classmethod
    def of_store(
        cls,
        store: Callable[..., Application[Any]],
        settings: ServiceSettings,
        *,
        producer: str,
        exchange: str,
        to_contract: ToContract,
    ) -> Relay:
        """The relay of a service's event store (an Application class), from its settings.

        Two connections: the library's pool reads the notification log; the relay's own
        session holds the leader's lock and LISTENs.
        """
        # A store with personal data: the relay reads them (to drop or null erased fields).
        extra = (
            settings.personal_data_env() if isinstance(settings, PersonalDataStoreSettings) else {}
        )
        return cls(
            store(env=eventsourcing_env(settings.database_url, pool_size=2, extra=extra)),
            producer=producer,
            exchange=exchange,
            to_contract=to_contract,
            amqp_url=settings.amqp_url,
            database_url=settings.database_url,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await supervise(
            stop,
            self._lead,
            on_failure=self._lost,
            expected=TRANSIENT_ERRORS,
            log=log,
            what=f"relay {self.producer}",
            max_backoff=self.max_backoff,
        )
        self.status.role = "stopped"
        LEADER.labels(self.producer).set(0)

    def ready(self) -> bool:
        return self.status.role in ("leader", "standby")

    def state(self) -> RelayStatus:
        return self.status

    def _lost(self, exc: Exception) -> None:
        self.status.role = "reconnecting"
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        LEADER.labels(self.producer).set(0)

    async def _lead(self, stop: asyncio.Event) -> None:
        kw = connection_kwargs(self.database_url)
        async with await psycopg.AsyncConnection.connect(**kw, autocommit=True) as conn:
            if not await self._become_leader(conn, stop):
                return
            await conn.execute(f'LISTEN "{self._channel_name}"')
            connection = await amqp.connect(self.amqp_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                await declare_producer_exchange(channel, self.exchange_name)
                position = await self._load_position(conn)
                self.status.role = "leader"
                self.status.last_error = None
                LEADER.labels(self.producer).set(1)
                log.info("relay is active", extra={"producer": self.producer, "position": position})
                loop = asyncio.get_running_loop()
                published = -math.inf  # loop time of the last publish
                while not stop.is_set():
                    batch = await asyncio.to_thread(self._next_batch, position)
                    if batch.last_position == position:
                        await self._wait_for_new_events(conn)
                        wait = published + self.coalescing.seconds() - loop.time()
                        if wait > 0:
                            # Steady writes: what is committed until the window's end after the
                            # last publish goes in one read and one round of confirms.
                            await sleep_unless_stopped(stop, wait)
                            await self._wait_for_new_events(conn, received_only=True)
                        continue
                    await self._publish(channel, batch.messages)
                    published = loop.time()
                    await conn.execute(
                        f"UPDATE {RELAY_TABLE} SET position = %s, updated_at = now() "  # noqa: S608
                        "WHERE producer = %s",
                        (batch.last_position, self.producer),
                    )
                    position = batch.last_position
                    self.status.position = position
                    POSITION.labels(self.producer).set(position)

    async def _become_leader(self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event) -> bool:
        while not stop.is_set():
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (f"relay:{self.producer}",)
            )
            row = await cur.fetchone()
            if row and row[0]:
                return True
            if self.status.role != "standby":
                log.info("another relay is active; standing by", extra={"producer": self.producer})
            self.status.role = "standby"
            await sleep_unless_stopped(stop, self.lock_retry)
        return False

    async def _load_position(self, conn: psycopg.AsyncConnection[Any]) -> int:
        await conn.execute(
            f"INSERT INTO {RELAY_TABLE} (producer) VALUES (%s) ON CONFLICT DO NOTHING",  # noqa: S608
            (self.producer,),
        )
        cur = await conn.execute(
            f"SELECT position FROM {RELAY_TABLE} WHERE producer = %s",  # noqa: S608
            (self.producer,),
        )
        row = await cur.fetchone()
        position = int(row[0]) if row else 0
        self.status.position = position
        POSITION.labels(self.producer).set(position)
        return position

    def _next_batch(self, position: int) -> OutgoingBatch:
        """Read and map the next page of the notification log (runs in a thread)."""
        notifications: Sequence[Notification] = self.app.recorder.select_notifications(
            start=position, limit=self.batch_size, inclusive_of_start=False
        )
        batch = OutgoingBatch(last_position=position)
        for notification in notifications:
            event = self.app.mapper.to_domain_event(notification)
            contract = self.to_contract(event)
            batch.last_position = notification.id
            if contract is None:
                continue
            envelope = envelope_for(event, notification.id, contract)
            traceparent = (getattr(event, "metadata", {}) or {}).get("traceparent")
            batch.messages.append((envelope.event_type, message_for(envelope, traceparent)))
        if len(notifications) < self.batch_size:
            BACKLOG.labels(self.producer).set(0)  # the read reached the end of the log
        else:  # a full page: more may wait (a query only when catching up)
            latest = self.app.recorder.max_notification_id() or 0
            BACKLOG.labels(self.producer).set(max(latest - batch.last_position, 0))
        return batch

    async def _publish(
        self,
        channel: aio_pika.abc.AbstractChannel,
        messages: list[tuple[str, aio_pika.Message]],
    ) -> None:
        if not messages:
            return
        spans = [self._publish_span(key, message) for key, message in messages]
        started = time.perf_counter()
        try:
            # Publishes are written to the channel in call order; confirms are awaited together.
            # Through the aiormq channel with wait=False: aio-pika's publish holds the channel's
            # lock until its frame has been written, one event-loop turn per message, so each
            # left in a send of its own. Queued together, the batch leaves in one
            # (servicekit.amqp's corked writer); each confirm is still awaited.
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            await asyncio.gather(
                *(
                    underlay.basic_publish(
                        message.body,
                        exchange=self.exchange_name,
                        routing_key=key,
                        properties=message.properties,
                        mandatory=False,
                        timeout=30,
                        wait=False,
                    )
                    for key, message in messages
                )
            )
        except BaseException as exc:
            for span in spans:
                if span is not None:
                    span.set_status(telemetry.StatusCode.ERROR, type(exc).__name__)
                    span.end()
            raise
        for span in spans:
            if span is not None:
                span.end()
        CONFIRM_LATENCY.labels(self.producer).observe(time.perf_counter() - started)
        PUBLISHED.labels(self.producer).inc(len(messages))

    def _publish_span(self, routing_key: str, message: aio_pika.Message) -> telemetry.Span | None:
        """A PRODUCER span under the event's *stored* traceparent; the message carries it on.

        Events stored without a traceparent get none: a span per message of an untraced
        backlog would only start thousands of one-span traces.
        """
        headers = message.headers
        parent = telemetry.context_from_traceparent(str(headers.get(TRACEPARENT) or ""))
        if parent is None:
            return None
        span = telemetry.start_span(
            f"publish {self.exchange_name}",
            parent=parent,
            kind=telemetry.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": self.exchange_name,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message.message_id or "",
                "eskit.producer": self.producer,
                "eskit.position": int(str(headers.get(messages.POSITION, 0))),
            },
        )
        traceparent = telemetry.traceparent_of(span.get_span_context())
        if traceparent:
            headers[TRACEPARENT] = traceparent
        return span

    async def _wait_for_new_events(
        self, conn: psycopg.AsyncConnection[Any], *, received_only: bool = False
    ) -> None:
        """Until a NOTIFY of a commit (or `idle_wait`); `received_only`: take only those
        already received, without waiting."""
        if received_only:
            async for _ in conn.notifies(timeout=0):
                pass
            return
        async for _ in conn.notifies(timeout=self.idle_wait, stop_after=1):
            pass


@dataclass
class Republished:
    run: str
    start: int
    to: int
    published: int = 0
    position: int = 0


async def republish(
    relay: Relay,
    start: int,
    *,
    on_progress: Callable[[Republished], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Republished:
    """Refill `events.history` with the producer's public events from position `start`.

    Only the stream receives them (through the default exchange), not the producer exchange:
    live consumers are not disturbed. Each message carries the run's headers, which a replay
    uses to read a truncated stream (see servicekit.replay).
    """
    import uuid

    from shared_contracts.names import HISTORY_STREAM

    latest = await asyncio.to_thread(lambda: relay.app.recorder.max_notification_id() or 0)
    result = Republished(run=uuid.uuid4().hex, start=start, to=latest, position=start - 1)
    connection = await amqp.connect(relay.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_producer_exchange(channel, relay.exchange_name)
        while result.position < latest and not (stop and stop.is_set()):
            batch = await asyncio.to_thread(relay._next_batch, result.position)
            if batch.last_position == result.position:
                break
            for _, message in batch.messages:
                message.headers.update(
                    {
                        RUN: result.run,
                        RUN_FROM: start,
                        RUN_TO: latest,
                        RUN_PRODUCER: relay.producer,
                    }
                )
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(message, routing_key=HISTORY_STREAM)
                    for _, message in batch.messages
                )
            )
            result.published += len(batch.messages)
            result.position = batch.last_position
            if on_progress:
                on_progress(result)
    return result
