"""The public event types, one pydantic model per (event_type, schema_version).

A breaking change is a new model with the next `schema_version`, published beside the old one
until consumers have moved. Additive changes keep the version.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

# A field that carries a bearer secret (a verification or reset link) sealed to notify_svc's
# public key: ciphertext that only notify_svc opens. Such a field is never forwarded beyond
# the bus (webhooks drop it: `without_sealed`).
SEALED: JsonDict = {"x-sealed": True}


def sealed_field(description: str) -> Any:
    """An optional str field marked `x-sealed` in the schema."""
    return Field(default=None, description=description, json_schema_extra=SEALED)


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
    email_verified: bool = Field(
        default=False, description="Always false at registration (added in 1.1)."
    )
    verification_link_sealed: str | None = sealed_field(
        "The e-mail verification link, sealed to notify_svc's public key (added in 1.1)."
    )
    verification_expires_at: AwareDatetime | None = None


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


class EmailVerificationRequested(ContractEvent):
    event_type = "auth.account.email_verification_requested"
    producer = "auth_svc"
    summary = "A user asked for a new e-mail verification link (the link is sealed)."

    user_id: uuid.UUID
    expires_at: AwareDatetime
    link_sealed: str | None = sealed_field(
        "The verification link, sealed to notify_svc's public key."
    )


class EmailVerified(ContractEvent):
    event_type = "auth.account.email_verified"
    producer = "auth_svc"
    summary = "A user confirmed their e-mail address with a verification link."

    user_id: uuid.UUID
    email: str


class PasswordResetRequested(ContractEvent):
    event_type = "auth.account.password_reset_requested"
    producer = "auth_svc"
    summary = "Someone asked to reset the password of an existing account (the link is sealed)."

    user_id: uuid.UUID
    expires_at: AwareDatetime
    link_sealed: str | None = sealed_field(
        "The single-use reset link, sealed to notify_svc's public key."
    )


class PasswordReset(ContractEvent):
    event_type = "auth.account.password_reset"
    producer = "auth_svc"
    summary = "A password was reset with a reset link; every session was revoked, any lock lifted."

    user_id: uuid.UUID


class SessionRevoked(ContractEvent):
    event_type = "auth.session.revoked"
    producer = "auth_svc"
    summary = (
        "A session (a refresh-token family, the `sid` of its access tokens) ended: its access "
        "tokens must be refused from now on."
    )

    user_id: uuid.UUID
    session_id: uuid.UUID
    reason: str = Field(
        description=(
            "logout, ended, logout_all, reuse, password_changed, password_reset or account_deleted"
        )
    )


class AccountDeleted(ContractEvent):
    event_type = "auth.account.deleted"
    producer = "auth_svc"
    summary = (
        "An account was deleted at its owner's request (added in 1.2). It carries no personal "
        "data: every subscriber erases the person `user_id` from its own store on receipt, and "
        "no replay may bring their data back."
    )

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
        EmailVerificationRequested,
        EmailVerified,
        PasswordResetRequested,
        PasswordReset,
        SessionRevoked,
        AccountDeleted,
        ProfileCreated,
        ProfileUpdated,
    )
}


def contract_for(event_type: str, schema_version: int) -> type[ContractEvent] | None:
    """The model of a published event, or None when this build does not know it."""
    return CONTRACTS.get((event_type, schema_version))


def without_sealed(
    event_type: str, schema_version: int, data: dict[str, object]
) -> dict[str, object]:
    """`data` without the sealed fields of its contract: what may leave the bus."""
    contract = contract_for(event_type, schema_version)
    if contract is None:
        return data
    sealed = {
        name
        for name, info in contract.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("x-sealed")
    }
    return {k: v for k, v in data.items() if k not in sealed}
