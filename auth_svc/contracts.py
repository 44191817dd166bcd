"""Stored auth events -> public contract events. Everything else stays private.

Only what others need crosses the wire: never a password hash, a refresh-token hash, a
verification or reset token (nor its hash) or any key material. Verification and reset links
cross only sealed to notify_svc's public key.
"""

from __future__ import annotations

from typing import Any

from auth_svc.domain import Account
from servicekit.shredding import UNPUBLISHED_ERASED
from shared_contracts.events import (
    AccountDeleted,
    AccountLocked,
    AccountRegistered,
    ContractEvent,
    EmailVerificationRequested,
    EmailVerified,
    LoginFailed,
    LoginSucceeded,
    PasswordChanged,
    PasswordReset,
    PasswordResetRequested,
    SessionRevoked,
)


def to_contract(event: Any) -> ContractEvent | None:
    """The public event for a stored one, or None for private events (rehash, refresh-token
    rotation, e-mail registrations), or for an erased event whose contract requires a
    personal field (the address): like a private one, the relay records its position and
    moves on. Erased optional fields (the display name) go out as null."""
    if isinstance(event, Account.Registered):
        if event.email is None:  # erased (servicekit.shredding)
            return _erased(AccountRegistered)
        return AccountRegistered(
            user_id=event.originator_id,
            email=event.email,
            display_name=event.display_name,
            verification_link_sealed=event.verification_link_sealed,
            verification_expires_at=event.verification_expires_at,
        )
    if isinstance(event, Account.EmailVerificationRequested):
        return EmailVerificationRequested(
            user_id=event.originator_id, expires_at=event.expires_at, link_sealed=event.link_sealed
        )
    if isinstance(event, Account.EmailVerified):
        if event.email is None:
            return _erased(EmailVerified)
        return EmailVerified(user_id=event.originator_id, email=event.email)
    if isinstance(event, Account.PasswordResetRequested):
        return PasswordResetRequested(
            user_id=event.originator_id, expires_at=event.expires_at, link_sealed=event.link_sealed
        )
    if isinstance(event, Account.PasswordReset):
        return PasswordReset(user_id=event.originator_id)
    if isinstance(event, Account.RefreshFamilyRevoked):
        return SessionRevoked(
            user_id=event.originator_id, session_id=event.family_id, reason=event.reason
        )
    if isinstance(event, Account.LoginSucceeded):
        return LoginSucceeded(user_id=event.originator_id)
    if isinstance(event, Account.LoginFailed):
        return LoginFailed(
            user_id=event.originator_id, consecutive_failures=event.consecutive_failures
        )
    if isinstance(event, Account.Locked):
        return AccountLocked(
            user_id=event.originator_id,
            locked_until=event.locked_until,
            failed_attempts=event.failed_attempts,
        )
    if isinstance(event, Account.PasswordChanged):
        return PasswordChanged(user_id=event.originator_id)
    if isinstance(event, Account.Deleted):
        return AccountDeleted(user_id=event.originator_id)
    return None


def _erased(contract: type[ContractEvent]) -> None:
    UNPUBLISHED_ERASED.labels(contract.event_type).inc()
