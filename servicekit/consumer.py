"""The consumer runtime every consuming service uses.

Each service reads its own durable quorum queue `<service>.q` (single active consumer, so
replicas are safe and per-producer order is kept) and acks only after its handler has
committed. When a backlog exists, the messages already delivered (up to the prefetch) are
handed over as one batch, so a projection applies many events in one transaction.

Outcomes, each logged and counted in `consumer_messages_total`:
- not JSON, not an envelope, or data failing its schema: dead-lettered at once;
- unknown event type or newer schema version: acked and skipped, so a producer can evolve
  ahead of its consumers;
- at or below the recorded position: acked as a duplicate (the handler decides);
- the handler fails: the batch is retried one message at a time, in place (requeueing would
  let later messages overtake it), with backoff; after `delivery_limit` failures the message
  is dead-lettered with its error and the messages behind it go on;
- the process dies while handling it, `delivery_limit` times (counted by the handler in its
  own store, see `attempts`): dead-lettered the same way;
- the database or the broker is down: retried until it is back, never dead-lettered.

Only handler failures count toward `delivery_limit`. The broker's `x-delivery-count` does
not: on a quorum queue it rises for every unacked message whenever the consumer's connection
goes away, so a few flaps during a backlog would bring healthy messages to any small limit.
The broker's own limit is a high backstop (servicekit.amqp.BROKER_DELIVERY_LIMIT).

A poison message is first parked by the handler (`park`, so that a later `esctl dlq retry`
is applied even though later positions have been applied meanwhile), then published to
`<service>.dlx` with the error in its headers (confirmed), then acked. In that order, a
failure in between leaves the message in the live queue, parked: its redelivery is applied
like a retry, never skipped as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from servicekit import amqp, context, telemetry
from servicekit.amqp import dead_letter_exchange, declare_consumer_queues
from servicekit.batching import COALESCE_SECONDS, Coalescing, drain, fill, gather_for
from servicekit.messages import (
    TRACEPARENT,
    TRANSIENT_ERRORS,
    DeadLetter,
    IncomingEvent,
    Outcome,
    is_newer_version,
    validated,
)
from servicekit.projection import ProjectionStore
from servicekit.supervise import sleep_unless_stopped, supervise
from shared_contracts.envelope import Envelope
from shared_contracts.names import dead_letter_queue, live_queue

log = logging.getLogger("servicekit.consumer")
T = TypeVar("T")

__all__ = ["BatchHandler", "Consumer", "Outcome", "ProjectionHandler", "one_at_a_time"]

# Failures of the infrastructure, not of the message: retried until they pass.
INFRASTRUCTURE_ERRORS = TRANSIENT_ERRORS
BACKLOG_BATCH = 16  # this many messages already queued means a backlog: batches may linger

MESSAGES = Counter(
    "consumer_messages_total",
    "Messages by outcome: applied, duplicate, skipped_unknown, skipped_newer_version, "
    "dead_lettered, retried",
    ["service", "outcome"],
)
BATCH_SIZE = Histogram(
    "consumer_batch_size",
    "Messages handled per batch (one transaction)",
    ["service"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
POSITION = Gauge(
    "consumer_position", "Last position applied or skipped, per producer", ["service", "producer"]
)
LAG_SECONDS = Gauge(
    "consumer_lag_seconds",
    "Age of the last event handled when it was handled, per producer",
    ["service", "producer"],
)
LAG_EVENTS = Gauge(
    "consumer_lag_events",
    "Events waiting for the consumer: ready in its queue plus delivered and not yet settled",
    ["service"],
)
DLQ_DEPTH = Gauge("consumer_dlq_messages", "Messages in the dead-letter queue", ["service"])
# Unlike consumer_lag_seconds, this keeps meaning while nothing is handled: with events
# waiting, `time() - it` is how far behind the projection is (alert EskitProjectionLagSeconds).
LAST_EVENT_OCCURRED = Gauge(
    "consumer_last_event_occurred_timestamp_seconds",
    "When the last event handled occurred (Unix time), per producer",
    ["service", "producer"],
)

# The CONSUMER span of each message of the batch being handled, by event id.
_message_spans: contextvars.ContextVar[Mapping[uuid.UUID, telemetry.Span]] = contextvars.ContextVar(
    "message_spans", default=MappingProxyType({})
)


@contextlib.contextmanager
def handling(envelope: Envelope) -> Iterator[None]:
    """Run a block as the handling of one message: its span, correlation and causation.

    Events the block appends are caused by this one and continue its trace.
    """
    event_id = str(envelope.event_id)
    with context.bound(
        correlation_id=envelope.correlation_id,
        causation_id=event_id,
        request_id=envelope.correlation_id,
        event_id=event_id,
    ):
        span = _message_spans.get().get(envelope.event_id)
        if span is None:
            yield
            return
        token = telemetry.attach(span)
        try:
            yield
        finally:
            telemetry.detach(token)


class BatchHandler(Protocol):
    """What the runtime feeds: a batch in, one outcome per event out, in one transaction."""

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]: ...

    async def park(self, envelope: Envelope, reason: str) -> bool:
        """Remember a poison event before it is dead-lettered; False if already applied."""
        ...

    async def attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        """Crashed handlings per event id; `count` adds the one about to start."""
        ...


class ProjectionHandler:
    """Feeds a projection's live generation."""

    def __init__(self, store: ProjectionStore) -> None:
        self.store = store

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]:
        return await self.store.apply_batch(events)

    async def park(self, envelope: Envelope, reason: str) -> bool:
        return await self.store.park(envelope, reason)

    async def attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        return await self.store.attempts(envelopes, count=count)


class _OneAtATime:
    def __init__(self, handle: Callable[[Envelope], Awaitable[Outcome]]) -> None:
        self._handle = handle

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]:
        outcomes: list[Outcome] = []
        for item in events:
            with handling(item.envelope):
                outcomes.append(await self._handle(item.envelope))
        return outcomes

    async def park(self, envelope: Envelope, reason: str) -> bool:
        """Nothing to remember: such handlers are idempotent by themselves."""
        return True

    async def attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        """Not counted: the broker's backstop limit catches a message that kills the process
        every time, and a retry from the dead-letter queue is safe (the handler is
        idempotent)."""
        return {}


def one_at_a_time(handle: Callable[[Envelope], Awaitable[Outcome]]) -> BatchHandler:
    """A BatchHandler for a handler that takes one envelope (and its own transaction)."""
    return _OneAtATime(handle)


@dataclass
class ConsumerStatus:
    role: str = "starting"  # starting | consuming | reconnecting | stopped
    last_error: str | None = None
    last_position: dict[str, int] = field(default_factory=dict)
    handled: int = 0


class Consumer:
    """Feeds one service's handler from its queue. Construct, then `await run(stop)`."""

    def __init__(
        self,
        *,
        service: str,
        amqp_url: str,
        bindings: dict[str, list[str]],
        handler: BatchHandler,
        prefetch: int = 500,
        batch_size: int = 500,
        delivery_limit: int = 5,
        retry_delay_seconds: float = 0.5,
        max_backoff_seconds: float = 10.0,
        depth_poll_seconds: float | None = None,
        linger_seconds: float = 0.01,
        coalesce_seconds: float = COALESCE_SECONDS,
        on_declared: Callable[[AbstractChannel], Awaitable[None]] | None = None,
    ) -> None:
        self.service = service
        # Run each time the queues are declared, before consuming: bindings kept elsewhere.
        self.on_declared = on_declared
        self.linger = linger_seconds
        self.coalescing = Coalescing(coalesce_seconds, service)
        self._last_batch = -math.inf  # loop time the previous batch was taken
        self.depth_poll = depth_poll_seconds
        self.amqp_url = amqp_url
        self.bindings = bindings
        self.handler = handler
        self.prefetch = prefetch
        self.batch_size = max(1, min(batch_size, prefetch))
        self.delivery_limit = delivery_limit
        self.retry_delay = retry_delay_seconds
        self.max_backoff = max_backoff_seconds
        self.status = ConsumerStatus()
        self._stop = asyncio.Event()
        self._in_flight = 0  # delivered to us, not yet settled
        self._settled_early = 0  # of the batch: dead-lettered (settled) before it ends
        self._spans: dict[int, telemetry.Span] = {}  # of the batch, by delivery tag

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        await supervise(
            stop,
            self._consume,
            on_failure=self._lost,
            expected=INFRASTRUCTURE_ERRORS,
            log=log,
            what=f"consumer {self.service}",
            max_backoff=self.max_backoff,
        )
        self.status.role = "stopped"

    def ready(self) -> bool:
        return self.status.role == "consuming"

    def state(self) -> ConsumerStatus:
        return self.status

    def _lost(self, exc: Exception) -> None:
        self.status.role = "reconnecting"
        self.status.last_error = f"{type(exc).__name__}: {exc}"

    async def _consume(self, stop: asyncio.Event) -> None:
        connection = await amqp.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await declare_consumer_queues(channel, self.service, self.bindings)
            if self.on_declared is not None:
                await self.on_declared(channel)
            await channel.set_qos(prefetch_count=self.prefetch)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            channel.close_callbacks.add(lambda *_: closed.set())
            self._in_flight = 0

            async def deliver(message: AbstractIncomingMessage) -> None:
                self._in_flight += 1
                await inbox.put(message)

            poller = asyncio.create_task(self._poll_depths(connection, stop))
            tag = await queue.consume(deliver, no_ack=False)
            self.status.role = "consuming"
            self.status.last_error = None
            log.info("consumer started", extra={"consumer": self.service, "queue": queue.name})
            stop_task = asyncio.ensure_future(stop.wait())
            closed_task = asyncio.ensure_future(closed.wait())
            try:
                while not stop.is_set():
                    next_task = asyncio.ensure_future(inbox.get())
                    done, _ = await asyncio.wait(
                        {next_task, stop_task, closed_task}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if next_task not in done:
                        next_task.cancel()
                        if closed_task in done:
                            raise ConnectionError("broker connection closed")
                        break
                    batch = [next_task.result()]
                    await self._fill(batch, inbox)
                    await self._process(channel, batch)
            finally:
                stop_task.cancel()
                closed_task.cancel()
                poller.cancel()
                if not closed.is_set():
                    await queue.cancel(tag)

    async def _fill(
        self, batch: list[AbstractIncomingMessage], inbox: asyncio.Queue[AbstractIncomingMessage]
    ) -> None:
        """Add what is queued to `batch`; in a backlog, also what arrives within `linger`.

        A live message after a quiet spell (nothing queued behind it, no batch taken within
        the coalescing window) goes at once. Under steady traffic a batch is taken at most
        once per window (`coalesce_seconds`, longer while the host is CPU-bound: see
        Coalescing): each event waits at most that long, and the per-batch cost (a
        transaction and its round trips) is shared by what arrived meanwhile. A backlog shows
        as messages already queued.
        """
        drain(batch, inbox, self.batch_size)
        loop = asyncio.get_running_loop()
        wait = self._last_batch + self.coalescing.seconds() - loop.time()
        if wait > 0 and len(batch) < self.batch_size:
            # Steady traffic (the previous batch was taken moments ago): what arrives until
            # the window's end joins this batch, so one transaction carries several events.
            await gather_for(batch, inbox, limit=self.batch_size, seconds=wait)
        if len(batch) >= BACKLOG_BATCH:
            await fill(batch, inbox, limit=self.batch_size, linger=self.linger)
        self._last_batch = loop.time()

    async def _poll_depths(
        self, connection: aio_pika.abc.AbstractConnection, stop: asyncio.Event
    ) -> None:
        """Keep `consumer_lag_events` and `consumer_dlq_messages` current, from the broker.

        Its own channel: a failed passive declare closes the channel it runs on.
        """
        channel = await connection.channel()
        try:
            while not stop.is_set():
                try:
                    ready = await channel.declare_queue(live_queue(self.service), passive=True)
                    dlq = await channel.declare_queue(dead_letter_queue(self.service), passive=True)
                    LAG_EVENTS.labels(self.service).set(
                        (ready.declaration_result.message_count or 0) + self._in_flight
                    )
                    DLQ_DEPTH.labels(self.service).set(dlq.declaration_result.message_count or 0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a metric must never stop the consumer
                    log.debug("could not read queue depths", extra={"error": repr(exc)})
                    if channel.is_closed:
                        channel = await connection.channel()
                await sleep_unless_stopped(stop, self.depth_poll or telemetry.queue_poll_seconds())
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _process(
        self, channel: AbstractChannel, batch: list[AbstractIncomingMessage]
    ) -> None:
        """Triage, hand the good ones over as one batch, then settle every message."""
        BATCH_SIZE.labels(self.service).observe(len(batch))
        self._spans = {m.delivery_tag or 0: self._message_span(m) for m in batch}
        self._settled_early = 0
        try:
            await self._triage_and_handle(channel, batch)
        except BaseException as exc:
            for span in self._spans.values():
                span.set_status(telemetry.StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            for span in self._spans.values():
                span.end()
            self._spans = {}
            self._in_flight = max(self._in_flight - (len(batch) - self._settled_early), 0)

    def _message_span(self, message: AbstractIncomingMessage) -> telemetry.Span:
        """The CONSUMER span of a message: a child of the traceparent the message carries.

        That header was set by the relay from the event's stored metadata, so the span
        joins the trace of the request that caused the event.
        """
        headers = message.headers or {}
        traceparent = headers.get(TRACEPARENT)
        return telemetry.start_span(
            f"{self.service} process",
            parent=telemetry.context_from_traceparent(
                traceparent if isinstance(traceparent, str) else None
            )
            or telemetry.Context(),
            kind=telemetry.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": message.exchange or "",
                "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
                "messaging.message.id": message.message_id or "",
                "messaging.consumer.group.name": self.service,
            },
        )

    def _outcome(self, message: AbstractIncomingMessage | None, outcome: str) -> None:
        if message is not None:
            span = self._spans.get(message.delivery_tag or 0)
            if span is not None and span.is_recording():
                span.set_attribute("eskit.outcome", outcome)

    async def _triage_and_handle(
        self, channel: AbstractChannel, batch: list[AbstractIncomingMessage]
    ) -> None:
        good: list[tuple[AbstractIncomingMessage, IncomingEvent]] = []
        for message in batch:
            try:
                envelope = Envelope.model_validate_json(message.body)
            except ValidationError as exc:
                await self._dead_letter(channel, message, None, "malformed envelope", exc)
                continue
            try:
                event = validated(envelope)
            except ValidationError as exc:
                # Parking decides the poison's position: the good events before it in the
                # batch are handled first, or they would read as duplicates and be lost.
                if good:
                    await self._handle(channel, good)
                    good = []
                await self._poison(channel, message, envelope, "data failed its schema", exc)
                continue
            if event is None:
                self._skip(envelope)
                self._outcome(message, "skipped")
                continue
            good.append((message, IncomingEvent(envelope, event)))
        if good:
            await self._handle(channel, good)
        unsettled = [m for m in batch if not m.processed]
        if unsettled:  # one ack settles it and every earlier delivery of the batch
            await unsettled[-1].ack(multiple=True)

    async def _handle(
        self, channel: AbstractChannel, good: list[tuple[AbstractIncomingMessage, IncomingEvent]]
    ) -> None:
        spans = {
            applied.envelope.event_id: self._spans[message.delivery_tag or 0]
            for message, applied in good
        }
        token = _message_spans.set(spans)
        try:
            await self._handle_batch(channel, good)
        finally:
            _message_spans.reset(token)

    async def _handle_batch(
        self, channel: AbstractChannel, good: list[tuple[AbstractIncomingMessage, IncomingEvent]]
    ) -> None:
        """The batch in one call; one message at a time to isolate a failure or a crash.

        Redelivered messages may be the ones a crash interrupted. Their handling is counted
        (`attempts`) before it starts; if an earlier handling of one of them never finished,
        the batch goes one message at a time, each counted on its own, so that only the
        message that kills the process reaches the limit. The count starts at the first
        redelivery: whether the first delivery died or lost its connection cannot be told
        apart, so a message that kills the consumer every time is dead-lettered after
        `delivery_limit` deaths on redelivery (one more, counting the first delivery).
        """
        events = [applied for _, applied in good]
        redelivered = [a.envelope for m, a in good if m.redelivered]
        crashed = bool(redelivered) and any(
            n > 0 for n in (await self._attempts(redelivered, count=False)).values()
        )
        if not crashed:
            if redelivered:
                await self._attempts(redelivered, count=True)
            try:
                outcomes = await self._call(events)
            except _HandlerFailed:
                pass  # find the poison, apply the others
            else:
                for (message, applied), outcome in zip(good, outcomes, strict=True):
                    self._count(applied.envelope, outcome)
                    self._outcome(message, outcome)
                return
        for message, applied in good:
            if crashed and message.redelivered:
                counted = await self._attempts([applied.envelope], count=True)
                crashes = counted.get(applied.envelope.event_id, 0) - 1  # before this one
                if crashes >= self.delivery_limit:
                    reason = f"the consumer died while handling it, {crashes} times redelivered"
                    await self._poison(
                        channel, message, applied.envelope, reason, RuntimeError(reason)
                    )
                    continue
            try:
                outcome = (await self._call([applied], retries=self.delivery_limit))[0]
            except _HandlerFailed as failed:
                await self._poison(
                    channel, message, applied.envelope, "handler failed", failed.error
                )
                continue
            self._count(applied.envelope, outcome)
            self._outcome(message, outcome)

    async def _attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        return await self._waiting_out(lambda: self.handler.attempts(envelopes, count=count))

    async def _waiting_out(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, waiting out database and broker outages (never counted as failures)."""
        delay = self.retry_delay
        while True:
            try:
                return await call()
            except INFRASTRUCTURE_ERRORS as exc:
                if self._stop.is_set():
                    raise
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "handler's database or broker is unavailable; waiting",
                    extra={"error": self.status.last_error},
                )
            await sleep_unless_stopped(self._stop, delay)
            if self._stop.is_set():
                raise ConnectionAbortedError("stopping with the batch unacked")
            delay = min(delay * 2, self.max_backoff)

    async def _call(self, events: list[IncomingEvent], retries: int = 1) -> Sequence[Outcome]:
        """Run the handler; infrastructure failures are waited out, others retried."""
        delay = self.retry_delay
        attempt = 0
        first = events[0].envelope
        while True:
            try:
                with self._scope(events):
                    return await self._waiting_out(lambda: self.handler.handle(events))
            except INFRASTRUCTURE_ERRORS:  # raised by _waiting_out only when stopping
                raise
            except Exception as exc:
                attempt += 1
                MESSAGES.labels(self.service, "retried").inc()
                log.warning(
                    "handler failed",
                    extra={
                        "event_id": str(first.event_id),
                        "event_type": first.event_type,
                        "batch": len(events),
                        "attempt": attempt,
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )
                if attempt >= retries:
                    raise _HandlerFailed(exc) from exc
            await sleep_unless_stopped(self._stop, delay)
            if self._stop.is_set():
                raise ConnectionAbortedError("stopping with the batch unacked")
            delay = min(delay * 2, self.max_backoff)

    @contextlib.contextmanager
    def _scope(self, events: list[IncomingEvent]) -> Iterator[None]:
        """One message: its own span and context. Several: a batch span linking each one."""
        if len(events) == 1:
            with handling(events[0].envelope):
                yield
            return
        spans = _message_spans.get()
        links = [
            telemetry.Link(span.get_span_context())
            for span in (spans.get(item.envelope.event_id) for item in events)
            if span is not None and span.get_span_context().is_valid
        ]
        batch = telemetry.start_span(
            f"{self.service} process batch",
            parent=telemetry.Context(),
            kind=telemetry.SpanKind.CONSUMER,
            attributes={"messaging.batch.message_count": len(events)},
            links=links,
        )
        first = events[0].envelope
        with (
            context.bound(
                correlation_id=first.correlation_id,
                causation_id=str(first.event_id),
                request_id=first.correlation_id,
            ),
            telemetry.use_span(batch),
        ):
            yield

    def _count(self, envelope: Envelope, outcome: Outcome) -> None:
        MESSAGES.labels(self.service, outcome).inc()
        self.status.handled += 1
        self.status.last_position[envelope.producer] = envelope.position
        POSITION.labels(self.service, envelope.producer).set(envelope.position)
        LAG_SECONDS.labels(self.service, envelope.producer).set(
            max((datetime.now(UTC) - envelope.occurred_at).total_seconds(), 0.0)
        )
        LAST_EVENT_OCCURRED.labels(self.service, envelope.producer).set(
            envelope.occurred_at.timestamp()
        )
        if outcome == "duplicate":
            log.info(
                "duplicate skipped",
                extra={"event_id": str(envelope.event_id), "position": envelope.position},
            )

    def _skip(self, envelope: Envelope) -> None:
        outcome = "skipped_newer_version" if is_newer_version(envelope) else "skipped_unknown"
        MESSAGES.labels(self.service, outcome).inc()
        log.info(
            "skipping an event this build does not know",
            extra={
                "event_id": str(envelope.event_id),
                "event_type": envelope.event_type,
                "schema_version": envelope.schema_version,
                "outcome": outcome,
            },
        )

    async def _poison(
        self,
        channel: AbstractChannel,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        reason: str,
        exc: BaseException,
    ) -> None:
        """Park, then dead-letter; an event already applied is only a duplicate."""
        error = f"{type(exc).__name__}: {exc}"
        parked = await self._waiting_out(lambda: self.handler.park(envelope, f"{reason}: {error}"))
        if not parked:
            self._count(envelope, "duplicate")
            self._outcome(message, "duplicate")
            return
        await self._dead_letter(channel, message, envelope, reason, exc)

    async def _dead_letter(
        self,
        channel: AbstractChannel,
        message: AbstractIncomingMessage,
        envelope: Envelope | None,
        reason: str,
        exc: BaseException,
    ) -> None:
        """Publish to `<service>.dlx` with the error (confirmed), then ack the original."""
        MESSAGES.labels(self.service, "dead_lettered").inc()
        self._outcome(message, "dead_lettered")
        came = DeadLetter.read(message.headers or {})  # a retried letter: where it first came
        letter = DeadLetter.of(
            reason,
            exc,
            came.exchange or message.exchange or "",
            came.routing_key or message.routing_key or "",
        )
        log.error(
            "dead-lettering a message that cannot be processed",
            extra={
                "message_id": message.message_id,
                "event_id": str(envelope.event_id) if envelope else None,
                "reason": reason,
                "error": letter.error[:500],
            },
        )
        headers: dict[str, Any] = {**(message.headers or {}), **letter.headers()}
        dlx = await channel.get_exchange(dead_letter_exchange(self.service), ensure=False)
        await dlx.publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                message_id=message.message_id,
                timestamp=message.timestamp,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.routing_key or "",
        )
        await message.ack()
        self._settled_early += 1
        self._in_flight = max(self._in_flight - 1, 0)


class _HandlerFailed(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
