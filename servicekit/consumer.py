"""The consumer runtime every consuming service uses.

Each service reads its own durable quorum queue `<service>.q` (single active consumer, so
replicas are safe and per-producer order is kept), acks only after its handler has committed,
and lets the broker dead-letter a message to `<service>.dlq` after `delivery_limit` failed
attempts. Messages that can never succeed (not JSON, not an envelope, data failing its
schema) go to the DLQ at once; unknown event types and newer schema versions are acked and
counted, so a producer can evolve ahead of its consumers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter
from pydantic import ValidationError

from servicekit import context
from servicekit.aio import supervise
from servicekit.amqp import declare_consumer_queues
from servicekit.relay import TRANSIENT_ERRORS
from shared_contracts.envelope import Envelope
from shared_contracts.events import CONTRACTS, contract_for

log = logging.getLogger("servicekit.consumer")

Outcome = Literal["applied", "duplicate"]
Handler = Callable[[Envelope], Awaitable[Outcome]]

MESSAGES = Counter(
    "consumer_messages_total",
    "Messages by outcome: applied, duplicate, skipped_unknown, skipped_newer_version, "
    "dead_lettered, retried",
    ["service", "outcome"],
)


@dataclass
class ConsumerStatus:
    role: str = "starting"  # starting | consuming | reconnecting | stopped
    last_error: str | None = None
    last_position: dict[str, int] | None = None


class Consumer:
    """Feeds one service's handler from its queue. Construct, then `await run(stop)`."""

    def __init__(
        self,
        *,
        service: str,
        amqp_url: str,
        bindings: dict[str, list[str]],
        handle: Handler,
        prefetch: int = 100,
        delivery_limit: int = 5,
        retry_delay_seconds: float = 0.5,
        max_backoff_seconds: float = 10.0,
    ) -> None:
        self.service = service
        self.amqp_url = amqp_url
        self.bindings = bindings
        self.handle = handle
        self.prefetch = prefetch
        self.delivery_limit = delivery_limit
        self.retry_delay = retry_delay_seconds
        self.max_backoff = max_backoff_seconds
        self.status = ConsumerStatus(last_position={})

    async def run(self, stop: asyncio.Event) -> None:
        await supervise(
            stop,
            self._consume,
            on_failure=self._lost,
            expected=TRANSIENT_ERRORS,
            log=log,
            what=f"consumer {self.service}",
            max_backoff=self.max_backoff,
        )
        self.status.role = "stopped"

    def _lost(self, exc: Exception) -> None:
        self.status.role = "reconnecting"
        self.status.last_error = f"{type(exc).__name__}: {exc}"

    async def _consume(self, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect(self.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await declare_consumer_queues(
                channel, self.service, self.bindings, delivery_limit=self.delivery_limit
            )
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            self.status.role = "consuming"
            self.status.last_error = None
            log.info("consumer started", extra={"consumer": self.service, "queue": queue.name})
            async with queue.iterator() as messages:
                stop_task = asyncio.ensure_future(stop.wait())
                closed_task = asyncio.ensure_future(closed.wait())
                try:
                    while not stop.is_set():
                        next_task = asyncio.ensure_future(anext(messages))
                        done, _ = await asyncio.wait(
                            {next_task, stop_task, closed_task},
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if next_task not in done:
                            next_task.cancel()
                            if closed_task in done:
                                raise ConnectionError("broker connection closed")
                            break
                        await self._process(next_task.result())
                finally:
                    stop_task.cancel()
                    closed_task.cancel()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = Envelope.model_validate_json(message.body)
        except ValidationError as exc:
            await self._dead_letter(message, "malformed envelope", exc)
            return
        contract = contract_for(envelope.event_type, envelope.schema_version)
        if contract is None:
            outcome = "skipped_unknown"
            if any(
                t == envelope.event_type and v < envelope.schema_version for (t, v) in CONTRACTS
            ):
                outcome = "skipped_newer_version"
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
            await message.ack()
            return
        try:
            contract.model_validate(envelope.data)
        except ValidationError as exc:
            await self._dead_letter(message, "data failed its schema", exc)
            return
        handled = await self._handle_with_retries(message, envelope)
        if handled is None:
            return
        MESSAGES.labels(self.service, handled).inc()
        assert self.status.last_position is not None
        self.status.last_position[envelope.producer] = envelope.position
        await message.ack()

    async def _handle_with_retries(
        self, message: AbstractIncomingMessage, envelope: Envelope
    ) -> Outcome | None:
        """Run the handler, retrying in place so that later messages never overtake this one.

        Requeueing through the broker would let the next message be applied first, and a
        projection that tracks positions would then skip this one as a duplicate. After
        `delivery_limit` failed attempts the message is dead-lettered. The broker's own
        delivery limit still catches a message that crashes the process every time.
        """
        delay = self.retry_delay
        error: Exception = RuntimeError("no attempt made")
        for attempt in range(1, self.delivery_limit + 1):
            try:
                with context.bound(
                    correlation_id=envelope.correlation_id,
                    causation_id=str(envelope.event_id),
                    request_id=envelope.correlation_id,
                    traceparent=_header(message, "traceparent"),
                ):
                    return await self.handle(envelope)
            except Exception as exc:  # noqa: BLE001 - any handler failure is retried
                error = exc
                MESSAGES.labels(self.service, "retried").inc()
                log.warning(
                    "handler failed",
                    extra={
                        "event_id": str(envelope.event_id),
                        "event_type": envelope.event_type,
                        "attempt": attempt,
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )
                if attempt < self.delivery_limit:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
        await self._dead_letter(message, "handler failed repeatedly", error)
        return None

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, exc: Exception
    ) -> None:
        MESSAGES.labels(self.service, "dead_lettered").inc()
        log.error(
            "dead-lettering a message that can never be processed",
            extra={"message_id": message.message_id, "reason": reason, "error": str(exc)[:500]},
        )
        await message.reject(requeue=False)


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    return None if value is None else str(value)
