"""notify_svc: real RabbitMQ, real PostgreSQL, and a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from notify_svc.intents import message_id
from notify_svc.main import NotifyWorker, init_db, projection
from notify_svc.projection import NotificationProjection
from notify_svc.settings import NotifySettings
from servicekit.eventstore import connection_kwargs
from servicekit.replay import ReplayResult
from testbed.events import envelope, event_id, eventually, running
from testbed.history import publish
from testbed.ports import free_port
from testbed.projections import live_generation, rebuild


class Inbox:
    """An SMTP server's handler: keeps every accepted mail; can refuse the next few."""

    def __init__(self) -> None:
        self.mails: list[tuple[list[str], EmailMessage]] = []
        self.refuse_next = 0
        self.attempts: list[tuple[float, str, bool]] = []  # (time, Message-ID, accepted)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        refuse = self.refuse_next > 0
        self.attempts.append((time.monotonic(), str(message["Message-ID"]), not refuse))
        if refuse:
            self.refuse_next -= 1
            return "451 4.3.0 try again later"
        self.mails.append((list(envelope.rcpt_tos), message))
        return "250 OK"


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def settings(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    inbox: tuple[Inbox, int],
) -> NotifySettings:
    settings = NotifySettings(
        database_url=make_database("notify"),
        amqp_url=make_vhost(),
        smtp_url=f"smtp://127.0.0.1:{inbox[1]}",
        consumer_prefetch=50,
        retry_initial_seconds=0.3,
        retry_max_interval_seconds=1.0,
        retry_window_seconds=30,
        dispatch_poll_seconds=0.2,
        smtp_timeout_seconds=5,
    )
    init_db(settings)
    return settings


def intents(settings: NotifySettings) -> list[tuple[Any, ...]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        return conn.execute(
            "SELECT event_id, effect, status, attempts FROM mail_intents ORDER BY created_at"
        ).fetchall()


def recipients(settings: NotifySettings) -> list[tuple[Any, ...]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        live = live_generation(conn, NotificationProjection.name)
        assert live is not None
        return conn.execute(
            psycopg.sql.SQL("SELECT user_id, email, display_name, locale FROM {}").format(
                psycopg.sql.Identifier(live, "recipients")
            )
        ).fetchall()


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


async def replay(settings: NotifySettings) -> ReplayResult:
    return await rebuild(projection(settings), settings, idle_seconds=0.3, stall_seconds=5)


async def test_one_welcome_mail_per_registration_despite_redelivery_and_replay(
    settings: NotifySettings, inbox: tuple[Inbox, int], make_database: Callable[[str], str]
) -> None:
    server, _ = inbox
    ada = uuid.uuid4()
    profile = envelope(
        "user.profile.created",
        ada,
        version=1,
        position=1,
        data={"display_name": "Ada <Lovelace>", "locale": "fr-FR", "timezone": "Europe/Paris"},
    )
    registered = envelope(
        "auth.account.registered",
        ada,
        version=1,
        position=1,
        data={"email": "ada@example.com", "display_name": "ada"},
    )
    worker = NotifyWorker(settings)
    async with running(worker):
        await publish(settings.amqp_url, [profile])
        await eventually(lambda: worker.consumer.status.handled == 1, what="the profile")
        await publish(settings.amqp_url, [registered])
        await eventually(lambda: len(server.mails) == 1, what="the welcome mail")

        rcpt, mail = server.mails[0]
        assert rcpt == ["ada@example.com"]
        assert mail["Subject"] == "Bienvenue sur eskit"  # the profile's locale
        assert mail["Message-ID"] == message_id(event_id(registered), "welcome", "eskit.local")
        assert "Bonjour Ada <Lovelace>," in text_of(mail)  # the profile's display name
        assert "Bonjour Ada &lt;Lovelace&gt;," in html_of(mail)  # escaped in HTML

        await publish(settings.amqp_url, [registered])  # redelivered
        await eventually(lambda: worker.consumer.status.handled == 3, what="the redelivery")
        await asyncio.sleep(0.6)  # three dispatcher polls
        assert len(server.mails) == 1

        assert (await replay(settings)).swapped
        await asyncio.sleep(0.6)
        assert len(server.mails) == 1
        assert intents(settings) == [(event_id(registered), "welcome", "sent", 1)]
        # The rebuilt generation knows Ada again, and serves the next mail.
        assert recipients(settings) == [(ada, "ada@example.com", "Ada <Lovelace>", "fr-FR")]
        changed = envelope("auth.account.password_changed", ada, version=2, position=2)
        await publish(settings.amqp_url, [changed])
        await eventually(lambda: len(server.mails) == 2, what="the security notice")
    assert server.mails[1][1]["Subject"] == "Votre mot de passe eskit a été changé"

    # A new deployment rebuilt from the whole history (no intents table rows to collide
    # with) restores who is who, and sends nothing.
    fresh = settings.model_copy(update={"database_url": make_database("notify_fresh")})
    await asyncio.to_thread(init_db, fresh)
    assert (await replay(fresh)).swapped
    async with running(NotifyWorker(fresh)):
        await asyncio.sleep(0.6)
    assert len(server.mails) == 2
    assert intents(fresh) == []
    assert recipients(fresh) == [(ada, "ada@example.com", "Ada <Lovelace>", "fr-FR")]


async def test_an_event_the_live_consumer_had_not_applied_is_mailed_once_after_a_replay(
    settings: NotifySettings, inbox: tuple[Inbox, int]
) -> None:
    """The rebuild reads it from the stream first; the live consumer then skips it."""
    server, _ = inbox
    ada, bob = uuid.uuid4(), uuid.uuid4()
    first = envelope(
        "auth.account.registered", ada, version=1, position=1, data={"email": "ada@example.com"}
    )
    pending = envelope(
        "auth.account.registered", bob, version=1, position=2, data={"email": "bob@example.com"}
    )
    async with running(NotifyWorker(settings)):
        await publish(settings.amqp_url, [first])
        await eventually(lambda: len(server.mails) == 1, what="Ada's welcome")
    await publish(settings.amqp_url, [pending])  # the consumer is down: it waits in the queue

    assert (await replay(settings)).swapped  # the rebuild applies it as a new event

    worker = NotifyWorker(settings)
    async with running(worker):
        await eventually(lambda: worker.consumer.status.handled == 1, what="the queued event")
        await eventually(lambda: len(server.mails) == 2, what="Bob's welcome")
        await asyncio.sleep(0.6)  # three dispatcher polls
    assert sorted(rcpt[0] for rcpt, _ in server.mails) == ["ada@example.com", "bob@example.com"]
    assert sorted((str(i[0]), i[2]) for i in intents(settings)) == sorted(
        [(str(event_id(first)), "sent"), (str(event_id(pending)), "sent")]
    )


async def test_a_failing_smtp_server_gets_the_mail_once_after_backoff_with_one_message_id(
    settings: NotifySettings, inbox: tuple[Inbox, int]
) -> None:
    server, _ = inbox
    server.refuse_next = 2
    bob = uuid.uuid4()
    registered = envelope(
        "auth.account.registered", bob, version=1, position=1, data={"email": "bob@example.com"}
    )
    locked = envelope(
        "auth.account.locked",
        bob,
        version=2,
        position=2,
        data={"locked_until": "2026-11-28T17:32:00+00:00", "failed_attempts": 5},
    )
    worker = NotifyWorker(settings)
    async with running(worker):
        await publish(settings.amqp_url, [registered, locked])
        # The consumer is not held up by the failing server: both events are applied at once.
        await eventually(lambda: worker.consumer.status.handled == 2, timeout=3, what="applied")
        await eventually(lambda: len(server.mails) == 2, what="both mails")
        await asyncio.sleep(0.5)
    assert len(server.attempts) == 4 and len(server.mails) == 2
    by_subject = {m["Subject"]: m for _, m in server.mails}
    lock = by_subject["Your eskit account is locked until 28 November 2026 at 17:32 UTC"]
    assert "After 5 failed logins in a row" in text_of(lock)
    assert "Hello there," in text_of(lock)  # no name known
    ids = {
        message_id(event_id(registered), "welcome", "eskit.local"),
        message_id(event_id(locked), "locked", "eskit.local"),
    }
    assert {m["Message-ID"] for _, m in server.mails} == ids
    for mid in ids:  # every attempt of a mail carries its Message-ID; retries wait
        times = [t for t, attempt_id, _ in server.attempts if attempt_id == mid]
        assert all(b - a >= 0.15 for a, b in itertools.pairwise(times))
    rows = intents(settings)
    assert [status for *_, status, _ in rows] == ["sent", "sent"]
    assert sum(attempts for *_, attempts in rows) == 4
