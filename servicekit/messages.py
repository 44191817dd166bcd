"""The message vocabulary the relay, the consumer, the projections and the replay share.

- outgoing: the public envelope of a stored event, and the AMQP message that carries it;
- incoming: an envelope validated against its contract (`IncomingEvent`), and what handling
  it came to (`Outcome`);
- the headers our messages carry: the position, the traceparent, a dead letter's error,
  a republish run's bounds;
- the failures of the infrastructure (broker, database, network), which are waited out and
  never count against a message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import aio_pika
import aiormq
import eventsourcing.persistence
import psycopg

from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.events import CONTRACTS, ContractEvent, contract_for

# Failures of the infrastructure, not of a message: retried until they pass.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    # eventsourcing re-raises psycopg's errors as its own (a lost database in a handler
    # that saves events, e.g. user_svc's consumer, must be waited out, not dead-lettered).
    eventsourcing.persistence.OperationalError,
    eventsourcing.persistence.InterfaceError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    asyncio.TimeoutError,
)

# -- headers -----------------------------------------------------------------------------

POSITION = "x-position"  # the event's position in its producer's store
TRACEPARENT = "traceparent"  # W3C trace context of the publish
STREAM_OFFSET = "x-stream-offset"  # set by RabbitMQ on every message read from a stream

# A dead letter's headers, written by the consumer, read by `esctl dlq`.
ERROR_REASON = "x-error-reason"
ERROR = "x-error"
DEAD_LETTERED_AT = "x-dead-lettered-at"
ORIGINAL_EXCHANGE = "x-original-exchange"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
DEAD_LETTER_HEADERS = (
    ERROR_REASON,
    ERROR,
    DEAD_LETTERED_AT,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
)

# A republish run's headers (`esctl republish`), read by a replay of a truncated stream.
RUN = "x-republish-run"
RUN_FROM = "x-republish-from"
RUN_TO = "x-republish-to"
RUN_PRODUCER = "x-republish-producer"


@dataclass(frozen=True)
class DeadLetter:
    """Why a message was dead-lettered, as its headers say."""

    reason: str
    error: str
    at: datetime
    exchange: str
    routing_key: str

    def headers(self) -> dict[str, Any]:
        return {
            ERROR_REASON: self.reason,
            ERROR: self.error,
            DEAD_LETTERED_AT: self.at.isoformat(),
            ORIGINAL_EXCHANGE: self.exchange,
            ORIGINAL_ROUTING_KEY: self.routing_key,
        }

    @classmethod
    def of(cls, reason: str, exc: BaseException, exchange: str, routing_key: str) -> DeadLetter:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        return cls(reason, error, datetime.now(UTC), exchange, routing_key)

    @classmethod
    def read(cls, headers: Mapping[str, Any]) -> DeadLetter:
        """What a dead letter's headers say: ours, or else the broker's (its `x-death`, when
        its own delivery limit dead-lettered the message)."""
        death: Mapping[str, Any] = {}
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            death = deaths[0]
        at: datetime | None = None
        if DEAD_LETTERED_AT in headers:
            try:
                at = datetime.fromisoformat(str(headers[DEAD_LETTERED_AT]))
            except ValueError:
                at = None
        elif isinstance(death.get("time"), datetime):
            at = death["time"] if death["time"].tzinfo else death["time"].replace(tzinfo=UTC)
        return cls(
            reason=str(
                headers.get(ERROR_REASON) or headers.get("x-first-death-reason") or "unknown"
            ),
            error=str(headers.get(ERROR) or ""),
            at=at or datetime.fromtimestamp(0, UTC),
            exchange=str(headers.get(ORIGINAL_EXCHANGE) or death.get("exchange") or ""),
            routing_key=str(headers.get(ORIGINAL_ROUTING_KEY) or ""),
        )


# What the broker adds when it redelivers or dead-letters a message.
BROKER_HEADERS = ("x-death", "x-first-death", "x-last-death", "x-delivery-count")


def retry_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A dead letter's headers for its retry: it starts afresh, without the error or the
    broker's counts (where it came from stays), and says when it was retried."""
    dropped = (ERROR_REASON, ERROR, DEAD_LETTERED_AT)
    kept = {
        k: v for k, v in headers.items() if k not in dropped and not k.startswith(BROKER_HEADERS)
    }
    return {**kept, "x-retried-at": datetime.now(UTC).isoformat()}


# -- outgoing ----------------------------------------------------------------------------


def envelope_for(event: Any, position: int, contract: ContractEvent) -> Envelope:
    """The public envelope of a stored event (a `TracedAggregate.Event`)."""
    metadata: dict[str, str] = getattr(event, "metadata", {}) or {}
    return Envelope(
        event_id=event_id_for(contract.producer, event.originator_id, event.originator_version),
        event_type=contract.event_type,
        schema_version=contract.schema_version,
        occurred_at=event.timestamp.astimezone(UTC),
        producer=contract.producer,
        aggregate_id=event.originator_id,
        aggregate_version=event.originator_version,
        position=position,
        correlation_id=metadata.get("correlation_id"),
        causation_id=metadata.get("causation_id"),
        data=contract.model_dump(mode="json"),
    )


def message_for(envelope: Envelope, traceparent: str | None) -> aio_pika.Message:
    """The AMQP message of an envelope: persistent, with its ids, type and position."""
    headers: dict[str, Any] = {POSITION: envelope.position}
    if traceparent:
        headers[TRACEPARENT] = traceparent
    return aio_pika.Message(
        body=envelope.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(envelope.event_id),
        type=envelope.event_type,
        timestamp=envelope.occurred_at,
        app_id=envelope.producer,
        correlation_id=envelope.correlation_id,
        headers=headers,
    )


# -- incoming ----------------------------------------------------------------------------

Outcome = Literal["applied", "duplicate"]


@dataclass(frozen=True)
class IncomingEvent:
    """An event to handle: its envelope and its validated contract."""

    envelope: Envelope
    event: ContractEvent


def validated(envelope: Envelope) -> ContractEvent | None:
    """The envelope's contract event, or None for an unknown type or a newer version.

    Raises ValidationError when the data fails its schema.
    """
    contract = contract_for(envelope.event_type, envelope.schema_version)
    if contract is None:
        return None
    return contract.model_validate(envelope.data)


def is_newer_version(envelope: Envelope) -> bool:
    return any(t == envelope.event_type and v < envelope.schema_version for (t, v) in CONTRACTS)
