"""The side effects that leave the stack under chaos: welcome mails (notify_svc, to a maildir)
and webhooks (integration_svc, to a loopback receiver), and the checks that each accepted
registration has exactly one intent and was sent, and nothing else was.

The spec allows a send to be repeated once after a crash between sending and marking (after
the claim's lease), always with the same `Message-ID` / `webhook-id`; it never allows a second
intent for one event, an effect without an accepted write, or an accepted write without one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from testbed.projections import live_generation
from testbed.receiver import Receiver, Request

WEBHOOK_ENDPOINT = "chaos"
# What the endpoint subscribes to: the registrations (the effect under test) and the profile
# edits (so that a refused If-Match edit would show up as a webhook if it leaked).
WEBHOOK_EVENTS = ("auth.account.registered", "user.profile.updated")
MAIL_DOMAIN = "chaos.test"
MAIL_FROM = f"eskit chaos <no-reply@{MAIL_DOMAIN}>"
WELCOME = "welcome"
# A send may be repeated once (crash or lost database between sending and marking).
MOST_COPIES = 2


class WebhookSink:
    """`testbed.receiver.Receiver` on its own thread and event loop, for the module."""

    def __init__(self) -> None:
        self.receiver = Receiver()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> WebhookSink:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.receiver.start(), self._loop).result(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{WEBHOOK_ENDPOINT}"

    def received(self) -> list[Request]:
        return list(self.receiver.requests)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        self._loop.close()


@dataclass
class Mail:
    message_id: str
    to: list[str]
    sender: str


class MaildirReader:
    """The mails delivered to a maildir (`new/` and `cur/`), each file parsed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: dict[str, Mail] = {}
        self._lock = threading.Lock()

    def mails(self) -> list[Mail]:
        with self._lock:
            for sub in ("new", "cur"):
                folder = self.path / sub
                if not folder.is_dir():
                    continue
                for entry in os.scandir(folder):
                    key = entry.name.split(":", 1)[0]  # cur/ appends ":2,<flags>"
                    if key in self._seen:
                        continue
                    with open(entry.path, "rb") as f:
                        headers = BytesHeaderParser().parse(f)
                    self._seen[key] = Mail(
                        str(headers.get("Message-ID", "")).strip(),
                        [a.lower() for _, a in getaddresses(headers.get_all("To", []))],
                        str(headers.get("From", "")),
                    )
            return list(self._seen.values())

    def copies(self, message_id: str) -> int:
        return sum(1 for m in self.mails() if m.message_id == message_id)


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, as a receiver does it (README), without our code."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and hmac.compare_digest(signature, expected)
        for version, _, signature in (
            s.partition(",") for s in headers.get("webhook-signature", "").split()
        )
    )


@dataclass(frozen=True)
class Registration:
    """A registration stored in auth_svc's event store."""

    event_id: str
    email: str
    user_id: str
    display_name: str | None


@dataclass
class Effects:
    """What the effects check found; `problems` empty when every guarantee held."""

    problems: list[str] = field(default_factory=list)
    mails: int = 0  # this ledger's welcome mails sent (distinct Message-IDs)
    webhooks: int = 0  # this ledger's registration webhooks received (distinct webhook-ids)
    mail_copies: int = 0  # repeated copies of a mail (same Message-ID), every case so far
    webhook_copies: int = 0  # repeated copies of a webhook (same webhook-id), every case so far


def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(query).fetchall()


def _recipients(url: str) -> dict[str, tuple[str | None, bool]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        live = live_generation(conn, "notify_svc")
        if live is None:
            return {}
        rows = conn.execute(
            sql.SQL("SELECT user_id::text, email, profile FROM {}").format(
                sql.Identifier(live, "recipients")
            )
        ).fetchall()
    return {r[0]: (r[1], bool(r[2])) for r in rows}


def read_effects(
    notify_db: str, integration_db: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[str, tuple[str | None, bool]]]:
    """(mail intents, webhook deliveries, notify_svc's recipients), read directly."""
    intents = _rows(
        notify_db,
        "SELECT event_id::text, effect, user_id::text, event_type, context->>'email', "
        "context->>'display_name', message_id, status, attempts, last_error "
        "FROM public.mail_intents",
    )
    deliveries = _rows(
        integration_db,
        "SELECT d.event_id::text, d.endpoint_id, d.status, d.attempts, d.last_error, "
        "m.event_type FROM public.webhook_deliveries d JOIN public.webhook_messages m "
        "USING (event_id)",
    )
    return intents, deliveries, _recipients(notify_db)


def check_effects(
    *,
    notify_db: str,
    integration_db: str,
    maildir: MaildirReader,
    sink: WebhookSink,
    secret: str,
    registrations: list[Registration],
    subscribed: dict[str, str],
    ledgers: list[tuple[str, dict[str, str], set[str]]],
) -> Effects:
    """Mails and webhooks agree with the event stores and with what clients were told.

    `registrations`: every registration stored; `subscribed`: event_id -> event_type of every
    stored event the webhook endpoint subscribes to; `ledgers`: (tag, email -> user_id
    accepted, bios refused) of each ledger checked."""
    found = Effects()
    problems = found.problems
    intents, deliveries, recipients = read_effects(notify_db, integration_db)
    mails = maildir.mails()
    requests = sink.received()

    # -- notify_svc: one welcome intent per stored registration, each sent, nothing else.
    by_event = {r.event_id: r for r in registrations}
    welcome: dict[str, list[tuple[Any, ...]]] = defaultdict(list)  # event_id -> intents
    welcome_by_email: Counter[str] = Counter()
    for row in intents:
        event_id, effect, user_id, event_type, email, name, _, status, attempts, error = row
        if effect != WELCOME or event_type != "auth.account.registered":
            # The load never changes a password nor locks an account (threshold 1000).
            problems.append(f"mail intent {effect} for {event_type} {event_id}: no such write")
            continue
        welcome[event_id].append(row)
        welcome_by_email[email] += 1
        reg = by_event.get(event_id)
        if reg is None:
            problems.append(f"welcome intent for {email} ({event_id}): no such registration")
        elif (email, user_id, name) != (reg.email, reg.user_id, reg.display_name):
            problems.append(f"welcome intent {event_id} for {email}/{name}, stored {reg}")
        if status == "failed":
            problems.append(f"welcome mail to {email} failed after {attempts}: {error}")
    mail_copies: Counter[str] = Counter(m.message_id for m in mails)
    mail_to: dict[str, set[str]] = defaultdict(set)
    for m in mails:
        mail_to[m.message_id].update(m.to)
    intent_ids = {row[6] for rows in welcome.values() for row in rows}
    if strays := set(mail_copies) - intent_ids:
        problems.append(f"{len(strays)} mails with no intent, e.g. {sorted(strays)[:2]}")
    unsent = unmailed = 0
    for reg in registrations:
        rows = welcome.get(reg.event_id, [])
        if len(rows) != 1:
            problems.append(f"{reg.email}: {len(rows)} welcome intents (want 1)")
            continue
        message_id, status = rows[0][6], rows[0][7]
        copies = mail_copies[message_id]
        unsent += status != "sent"
        unmailed += copies == 0
        if copies > MOST_COPIES:
            problems.append(f"{reg.email}: welcome mail {message_id} sent {copies} times")
        if copies and mail_to[message_id] != {reg.email}:
            problems.append(f"{reg.email}: welcome mail went to {sorted(mail_to[message_id])}")
    if unsent or unmailed:
        problems.append(f"welcome mails not marked sent: {unsent}, not in the maildir: {unmailed}")
    found.mail_copies = sum(c - 1 for c in mail_copies.values() if c > 1)

    # -- integration_svc: one delivery per (subscribed event, endpoint), each received.
    rows_by_event: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in deliveries:
        event_id, endpoint_id, status, attempts, error, event_type = row
        rows_by_event[event_id].append(row)
        if endpoint_id != WEBHOOK_ENDPOINT:
            problems.append(f"delivery {event_id} to an unknown endpoint {endpoint_id}")
        if subscribed.get(event_id) != event_type:
            problems.append(f"delivery of {event_type} {event_id}: no such subscribed event")
        if status == "failed":
            problems.append(f"webhook {event_id} failed after {attempts}: {error}")
    received: Counter[str] = Counter()
    bodies: dict[str, dict[str, Any]] = {}
    forged = 0
    for request in requests:
        webhook_id = request.headers.get("webhook-id", "")
        received[webhook_id] += 1
        if not verify_signature(secret, request.headers, request.body):
            forged += 1
        body = json.loads(request.body)
        if bodies.setdefault(webhook_id, body) != body:
            problems.append(f"webhook {webhook_id} sent again with another body")
    if forged:
        problems.append(f"{forged} webhooks with a bad signature")
    if strays := set(received) - set(rows_by_event):
        problems.append(f"{len(strays)} webhooks with no delivery row, e.g. {sorted(strays)[:2]}")
    undelivered = unreceived = 0
    for event_id, event_type in subscribed.items():
        rows = rows_by_event.get(event_id, [])
        if len(rows) != 1:
            problems.append(f"{event_type} {event_id}: {len(rows)} deliveries (want 1)")
            continue
        undelivered += rows[0][2] != "delivered"
        copies = received[event_id]
        unreceived += copies == 0
        if copies > MOST_COPIES:
            problems.append(f"webhook {event_id} received {copies} times")
        body = bodies.get(event_id)
        if body is not None and (body.get("event_id"), body.get("type")) != (event_id, event_type):
            problems.append(f"webhook {event_id} carried {body.get('type')} {body.get('event_id')}")
    if undelivered or unreceived:
        problems.append(f"webhooks not marked delivered: {undelivered}, not received: {unreceived}")
    found.webhook_copies = sum(c - 1 for c in received.values() if c > 1)

    # -- per ledger: accepted registrations have their effects, refused writes none.
    mail_by_event = {event_id: rows[0][6] for event_id, rows in welcome.items() if len(rows) == 1}
    for tag, users, rejected_bios in ledgers:
        mine = [r for r in registrations if r.email in users]
        for reg in mine:
            if welcome_by_email[reg.email] != 1:
                problems.append(f"{tag}: {reg.email} has {welcome_by_email[reg.email]} intents")
            email, profiled = recipients.get(reg.user_id, (None, False))
            if email != reg.email or not profiled:
                problems.append(f"{tag}: notify_svc knows {reg.email} as {email} ({profiled=})")
        strays = {e for e in welcome_by_email if e.startswith(f"{tag}-") and e not in users}
        if strays:
            problems.append(f"{tag}: welcome intents for unaccepted sign-ups {sorted(strays)[:3]}")
        leaked = {
            b["data"].get("bio") for b in bodies.values() if b.get("type") == "user.profile.updated"
        } & rejected_bios
        if leaked:
            problems.append(f"{tag}: refused edits went out as webhooks: {sorted(leaked)[:3]}")
        found.mails = sum(1 for r in mine if mail_copies[mail_by_event.get(r.event_id, "")])
        found.webhooks = sum(1 for r in mine if received[r.event_id])
    return found


def effect_seen(maildir: MaildirReader, sink: WebhookSink, event_id: str, message_id: str) -> bool:
    """The welcome mail and the webhook of one registration are out."""
    return maildir.copies(message_id) > 0 and any(
        r.headers.get("webhook-id") == event_id for r in sink.received()
    )
