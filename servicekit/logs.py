"""Structured logs: one JSON object per line, or a readable line on a terminal.

Every line carries the service, the level, the message and, where they apply, the request id,
the trace and span ids of the current span, and the event being handled. Secrets never reach
a line: fields named like a secret are replaced, token- and hash-shaped strings are masked
wherever they appear, and e-mail addresses are masked at INFO and above (DEBUG keeps them
for local investigation).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from servicekit import context, telemetry

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

REDACTED = "[redacted]"
_SECRET_FIELD = re.compile(
    r"pass(word)?|secret|token|authori[sz]ation|cookie|hash|private|api_?key|signature",
    re.IGNORECASE,
)
_SECRET_TEXT = re.compile(
    r"eyJ[\w-]{6,}\.[\w-]{6,}\.[\w-]*"  # a JWT
    r"|\$argon2[\w$=,+/.-]+"  # an argon2 hash
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*-----END [A-Z ]*PRIVATE KEY-----"
    r"|(?i:bearer)\s+[\w.~+/=-]{8,}"
)
_EMAIL = re.compile(r"[\w.+-]+@([\w-]+\.)+[\w-]{2,}")


def redact(value: str, *, hide_email: bool) -> str:
    """`value` with tokens, hashes, keys (and e-mail addresses when asked) masked."""
    value = _SECRET_TEXT.sub(REDACTED, value)
    if hide_email and "@" in value:
        value = _EMAIL.sub("[email]", value)
    return value


def _clean(key: str, value: Any, *, hide_email: bool) -> Any:
    if _SECRET_FIELD.search(key):
        return REDACTED
    if key == "email" and hide_email:
        return "[email]"
    if isinstance(value, str):
        return redact(value, hide_email=hide_email)
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value), hide_email=hide_email)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context and extras of a record, cleaned."""
    hide_email = record.levelno >= logging.INFO
    fields: dict[str, Any] = {}
    ctx = context.current()
    if ctx.request_id:
        fields["request_id"] = ctx.request_id
    ids = telemetry.current_ids()
    if ids:
        fields["trace_id"], fields["span_id"] = ids
    if ctx.event_id:
        fields["event_id"] = ctx.event_id
    for key, value in vars(record).items():
        if key not in _RESERVED and not key.startswith("_"):
            fields[key] = _clean(key, value, hide_email=hide_email)
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        hide_email = record.levelno >= logging.INFO
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": redact(record.getMessage(), hide_email=hide_email),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc_info"] = redact(self.formatException(record.exc_info), hide_email=True)
        return json.dumps(line, default=str)


class ConsoleFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        hide_email = record.levelno >= logging.INFO
        extras = _fields(record)
        extras.pop("span_id", None)
        if "trace_id" in extras:  # enough of it to find the trace in `esctl up --trace`
            extras["trace"] = extras.pop("trace_id")[:8]
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        message = redact(record.getMessage(), hide_email=hide_email)
        text = f"{ts} {record.levelname[0]} {self.service:<12} {message} {tail}"
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info), hide_email=True)
        return text.rstrip()


def configure_logging(service: str, *, level: str = "INFO", fmt: str = "auto") -> None:
    """Route every logger to stderr in JSON (or console format on a terminal)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter(service) if use_console else JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "aiormq", "aio_pika", "httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").handlers[:] = []
    logging.getLogger("uvicorn.error").propagate = True
