"""Reading everything a stack keeps, as text, for the tests that look for what must not be
there: a bearer secret (tests/e2e/test_accounts_stack.py) or an erased person
(tests/e2e/test_erasure_stack.py). Every table of a database, the mails of a maildir, and
the messages of a queue or of `events.history` from its first offset."""

from __future__ import annotations

import email
import email.policy
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
from psycopg import sql

from servicekit.eventstore import connection_kwargs
from servicekit.stream import AmqpHistory


def texts_of_value(value: Any) -> Iterable[str]:
    """A column's value as text (bytes also decompressed, should they be zlib'd)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        yield raw.decode("latin-1")
        try:
            yield zlib.decompress(raw).decode("latin-1")
        except zlib.error:
            pass
    elif value is not None:
        yield value if isinstance(value, str) else json.dumps(value, default=str)


def database_texts(url: str) -> tuple[int, list[tuple[str, str]]]:
    """(tables read, [(schema.table, text of a value)]) of every table of the database."""
    found: list[tuple[str, str]] = []
    with psycopg.connect(**connection_kwargs(url, connect_timeout=10)) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            rows = conn.execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table))
            ).fetchall()
            for row in rows:
                for value in row:
                    found.extend((f"{schema}.{table}", t) for t in texts_of_value(value))
    return len(tables), found


@dataclass(frozen=True)
class Message:
    body: bytes
    headers: dict[str, Any]

    @property
    def envelope(self) -> dict[str, Any]:
        envelope: dict[str, Any] = json.loads(self.body)
        return envelope

    @property
    def text(self) -> str:
        return self.body.decode("latin-1") + json.dumps(self.headers, default=str)


async def history(connection: aio_pika.abc.AbstractConnection) -> list[Message]:
    """Every message `events.history` still holds, from its first offset."""
    out: list[Message] = []
    async with AmqpHistory(connection).subscribe("first", prefetch=500) as stream:
        while batch := await stream.take(500, wait=3, linger=0.2):
            out.extend(Message(m.body, dict(m.headers)) for m in batch)
    return out


@dataclass
class Mail:
    to: str
    subject: str
    text: str  # every text part, decoded
    path: Path


def maildir_mails(maildir: Path) -> list[Mail]:
    """Every mail of a maildir (`new` and `cur`), its text parts decoded."""
    found = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            text = "\n".join(
                part.get_content()
                for part in message.walk()
                if part.get_content_maintype() == "text"
            )
            found.append(
                Mail(
                    str(message.get("To", "")).lower(), str(message.get("Subject", "")), text, path
                )
            )
    return found
