"""What a subscriber needs to read a message: its envelope, and the typed event it carries,
or the reason to skip it. Pure: no broker, no database.

    received = read(message.body)          # ValidationError: not an envelope (a poison)
    if isinstance(received, Skipped):      # an unknown type, or a newer version: ack it
        return
    match received.event:
        case AccountRegistered(user_id=user_id, email=email): ...
        case ProfileUpdated() as profile: ...

Delivery is at least once: deduplicate by `received.envelope.event_id` (or by `position`
per `producer`), recorded in the same transaction as what the event changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from shared_contracts.envelope import Envelope
from shared_contracts.events import CONTRACTS, ContractEvent, contract_for

E = TypeVar("E", bound=ContractEvent)

SkipReason = Literal["unknown_event_type", "newer_schema_version", "retired_schema_version"]


@dataclass(frozen=True)
class Received(Generic[E]):
    """An envelope and its event, validated against the contract of its type and version."""

    envelope: Envelope
    event: E


@dataclass(frozen=True)
class Skipped:
    """An envelope this build has no contract for: acknowledge it and go on.

    `newer_schema_version`: the producer publishes a version this build does not know yet
    (beside the old one until consumers move: the old one arrives as well).
    `retired_schema_version`: a version older than any this build still reads.
    """

    envelope: Envelope
    reason: SkipReason


def newest_version(event_type: str) -> int | None:
    """The newest schema version of `event_type` this build knows, or None."""
    versions = [v for (t, v) in CONTRACTS if t == event_type]
    return max(versions, default=None)


def decode(envelope: Envelope) -> Received[ContractEvent] | Skipped:
    """The typed event of an envelope, or why it is skipped.

    Raises pydantic's ValidationError when the data fails its contract's schema.
    """
    contract = contract_for(envelope.event_type, envelope.schema_version)
    if contract is not None:
        return Received(envelope, contract.model_validate(envelope.data))
    newest = newest_version(envelope.event_type)
    if newest is None:
        return Skipped(envelope, "unknown_event_type")
    if envelope.schema_version > newest:
        return Skipped(envelope, "newer_schema_version")
    return Skipped(envelope, "retired_schema_version")


def read(body: bytes | str) -> Received[ContractEvent] | Skipped:
    """`decode` of a message body (JSON). Raises ValidationError when it is no envelope."""
    return decode(Envelope.model_validate_json(body))


def event_as(envelope: Envelope, contract: type[E]) -> E:
    """The envelope's data as one given contract, when the caller already knows the type.

    Raises ValueError when the envelope is of another event type or schema version.
    """
    if (envelope.event_type, envelope.schema_version) != (
        contract.event_type,
        contract.schema_version,
    ):
        msg = (
            f"{envelope.event_type} v{envelope.schema_version} is not "
            f"{contract.event_type} v{contract.schema_version}"
        )
        raise ValueError(msg)
    return contract.model_validate(envelope.data)
