"""Exchange, queue and stream names. Defined once; services import them."""

from typing import Final

AUTH_EVENTS: Final = "auth.events"
USER_EVENTS: Final = "user.events"

# Producer name (the `producer` field of the envelope) -> its topic exchange.
PRODUCER_EXCHANGES: Final[dict[str, str]] = {
    "auth_svc": AUTH_EVENTS,
    "user_svc": USER_EVENTS,
}

# The retained log of every public event, for replays.
HISTORY_STREAM: Final = "events.history"


def live_queue(service: str) -> str:
    """The durable quorum queue a consuming service reads from."""
    return f"{service}.q"


def dead_letter_queue(service: str) -> str:
    """Where a consuming service's poison messages end up."""
    return f"{service}.dlq"
