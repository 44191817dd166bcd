"""Per-request (or per-message) context carried into stored events and log lines."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CallContext:
    request_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    # The event being handled (consumers): for log lines, not stored with new events.
    event_id: str | None = None

    def as_metadata(self) -> dict[str, str]:
        """What a stored event keeps of the context that caused it."""
        return {k: v for k, v in vars(self).items() if v is not None and k in _STORED_FIELDS}


_STORED_FIELDS = frozenset({"request_id", "correlation_id", "causation_id", "traceparent"})


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar(
    "call_context",
    default=CallContext(),  # noqa: B039 - frozen dataclass
)


def current() -> CallContext:
    return _current.get()


def set_context(ctx: CallContext) -> contextvars.Token[CallContext]:
    return _current.set(ctx)


def reset_context(token: contextvars.Token[CallContext]) -> None:
    _current.reset(token)


@contextmanager
def bound(**fields: str | None) -> Iterator[CallContext]:
    """Run a block with some context fields replaced."""
    ctx = replace(current(), **fields)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def new_request_id() -> str:
    return str(uuid.uuid4())
