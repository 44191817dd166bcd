"""The envelope: the JSON body of every message on a producer exchange."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer

# Fixed namespace so that event ids are the same wherever and whenever computed.
EVENT_ID_NAMESPACE = uuid.UUID("6f1c9a57-2a0e-4d55-9a43-2b1f0c6f3e11")


def event_id_for(producer: str, aggregate_id: uuid.UUID, aggregate_version: int) -> uuid.UUID:
    """Deterministic event id: a re-send of the same stored event carries the same id.

    The producer is part of it: two services may keep aggregates under the same id (an
    account and its profile share the user id), and their events must not share an id.
    """
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{producer}:{aggregate_id}:{aggregate_version}")


class Envelope(BaseModel):
    """Metadata common to every public event, with the event's own fields in `data`.

    Consumers ignore unknown fields, so fields may be added without a new version.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: uuid.UUID
    event_type: str = Field(min_length=1, examples=["auth.account.registered"])
    schema_version: int = Field(ge=1)
    occurred_at: AwareDatetime
    producer: str = Field(min_length=1, examples=["auth_svc"])
    aggregate_id: uuid.UUID
    aggregate_version: int = Field(ge=1)
    position: int = Field(ge=1, description="Notification id in the producer's store")
    correlation_id: str | None = None
    causation_id: str | None = None
    data: dict[str, Any]

    @field_serializer("occurred_at")
    def _rfc3339_utc(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
