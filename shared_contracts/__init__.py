"""Public contracts: what crosses the wire between services. Pure data, no I/O."""

from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.events import (
    CONTRACTS,
    AccountLocked,
    AccountRegistered,
    ContractEvent,
    LoginFailed,
    LoginSucceeded,
    PasswordChanged,
    ProfileCreated,
    ProfileUpdated,
    contract_for,
)
from shared_contracts.names import (
    AUTH_EVENTS,
    HISTORY_STREAM,
    PRODUCER_EXCHANGES,
    USER_EVENTS,
    dead_letter_queue,
    live_queue,
)
from shared_contracts.tokens import AccessTokenClaims

__all__ = [
    "AUTH_EVENTS",
    "CONTRACTS",
    "HISTORY_STREAM",
    "PRODUCER_EXCHANGES",
    "USER_EVENTS",
    "AccessTokenClaims",
    "AccountLocked",
    "AccountRegistered",
    "ContractEvent",
    "Envelope",
    "LoginFailed",
    "LoginSucceeded",
    "PasswordChanged",
    "ProfileCreated",
    "ProfileUpdated",
    "contract_for",
    "dead_letter_queue",
    "event_id_for",
    "live_queue",
]
