"""Stored auth events -> public contract events. Everything else stays private.

Only what others need crosses the wire: never a password hash, a refresh-token hash or any
key material.
"""

from __future__ import annotations

from typing import Any

from auth_svc.domain import Account
from shared_contracts.events import (
    AccountLocked,
    AccountRegistered,
    ContractEvent,
    LoginFailed,
    LoginSucceeded,
    PasswordChanged,
)


def to_contract(event: Any) -> ContractEvent | None:
    """The public event for a stored one, or None for private events (rehash, refresh
    tokens, e-mail registrations)."""
    if isinstance(event, Account.Registered):
        return AccountRegistered(
            user_id=event.originator_id, email=event.email, display_name=event.display_name
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
    return None
