"""The public event types, one pydantic model per (event_type, schema_version).

A breaking change is a new model with the next `schema_version`, published beside the old one
until consumers have moved. Additive changes keep the version.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class ContractEvent(BaseModel):
    """Base of every public event's `data`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    producer: ClassVar[str]
    summary: ClassVar[str]


# --- auth_svc -------------------------------------------------------------------------------


class AccountRegistered(ContractEvent):
    event_type = "auth.account.registered"
    producer = "auth_svc"
    summary = "A new account was registered."

    user_id: uuid.UUID
    email: str
    display_name: str | None = None


class LoginSucceeded(ContractEvent):
    event_type = "auth.account.login_succeeded"
    producer = "auth_svc"
    summary = "A user logged in with the right password."

    user_id: uuid.UUID


class LoginFailed(ContractEvent):
    event_type = "auth.account.login_failed"
    producer = "auth_svc"
    summary = "A login to an existing account failed (wrong password)."

    user_id: uuid.UUID
    consecutive_failures: int = Field(ge=1)


class AccountLocked(ContractEvent):
    event_type = "auth.account.locked"
    producer = "auth_svc"
    summary = "An account was locked after repeated login failures."

    user_id: uuid.UUID
    locked_until: AwareDatetime
    failed_attempts: int = Field(ge=1)


class PasswordChanged(ContractEvent):
    event_type = "auth.account.password_changed"
    producer = "auth_svc"
    summary = "A user changed their password; every refresh token was revoked."

    user_id: uuid.UUID


# --- user_svc -------------------------------------------------------------------------------


class ProfileFields(ContractEvent):
    """The public state of a profile, carried whole by both profile events."""

    user_id: uuid.UUID
    email: str | None = None
    display_name: str | None = None
    bio: str | None = None
    locale: str | None = None
    timezone: str | None = None
    avatar_url: str | None = None


# The fields a user edits on their profile: every field of the contract but the ids and the
# address (auth_svc's). The one list user_svc, reporting_svc and the tests read.
PROFILE_FIELDS: tuple[str, ...] = tuple(
    name for name in ProfileFields.model_fields if name not in ("user_id", "email")
)


class ProfileCreated(ProfileFields):
    event_type = "user.profile.created"
    producer = "user_svc"
    summary = "A user's profile was created."


class ProfileUpdated(ProfileFields):
    event_type = "user.profile.updated"
    producer = "user_svc"
    summary = "A user's profile was changed; `changed` names the fields that changed."

    changed: list[str] = Field(default_factory=list)


CONTRACTS: dict[tuple[str, int], type[ContractEvent]] = {
    (c.event_type, c.schema_version): c
    for c in (
        AccountRegistered,
        LoginSucceeded,
        LoginFailed,
        AccountLocked,
        PasswordChanged,
        ProfileCreated,
        ProfileUpdated,
    )
}


def contract_for(event_type: str, schema_version: int) -> type[ContractEvent] | None:
    """The model of a published event, or None when this build does not know it."""
    return CONTRACTS.get((event_type, schema_version))
