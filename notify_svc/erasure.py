"""notify_svc's part of an erasure beyond its database: the maildir copies of the person's mail.

With no `NOTIFY_SMTP_URL`, every mail is a file in `NOTIFY_MAILDIR` (`tmp/`, `new/`, and
`cur/` once a mail reader has seen it), named by `mailbox.Maildir`, not by us. The person's
intents keep their `message_id` through the erasure (it is derived from the event id and the
effect, nothing personal), so the sweeper scans the maildir's headers for those Message-IDs
and deletes the files that carry one. A mail claimed before the erasure may still be on its
way for up to `NOTIFY_SMTP_TIMEOUT_SECONDS`; the erasure is complete only once that bound has
passed after it and a scan after that found nothing left (every pass deletes what it finds).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger("notify_svc.erasure")

_headers = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def message_id_of(path: Path) -> str | None:
    """The Message-ID of one maildir file, reading its headers only."""
    try:
        with path.open("rb") as handle:
            head = b""
            for line in handle:
                if line in (b"\n", b"\r\n"):
                    break
                head += line
    except OSError:
        return None  # moved or deleted meanwhile (a mail reader at work)
    value = _headers.parsebytes(head).get("Message-ID")
    return str(value).strip() if value else None


def remove_mail(maildir: Path, message_ids: Collection[str]) -> int:
    """Delete every file of `maildir` whose Message-ID is one of `message_ids`."""
    if not message_ids:
        return 0
    removed = 0
    for sub in ("tmp", "new", "cur"):
        folder = maildir / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and message_id_of(path) in message_ids:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


class MaildirEraser:
    """The sweeper's hook (servicekit.erasure.SweepHook) for notify_svc."""

    def __init__(self, maildir: str, *, in_flight_seconds: float) -> None:
        self.maildir = Path(maildir)
        self.in_flight = timedelta(seconds=in_flight_seconds)

    async def __call__(
        self, conn: psycopg.AsyncConnection[Any], erasures: dict[uuid.UUID, datetime]
    ) -> Collection[uuid.UUID]:
        rows = await (
            await conn.execute(
                "SELECT message_id FROM public.mail_intents WHERE user_id = ANY(%s::uuid[])",
                (list(erasures),),
            )
        ).fetchall()
        removed = await asyncio.to_thread(remove_mail, self.maildir, {str(r[0]) for r in rows})
        if removed:
            log.info("erased mails removed from the maildir", extra={"files": removed})
        settled = datetime.now(UTC) - self.in_flight
        return [user for user, erased_at in erasures.items() if erased_at <= settled]
