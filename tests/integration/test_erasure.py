"""Erasure in the projections (issue 13): `auth.account.deleted` erases the person from
notify_svc, reporting_svc and integration_svc, their parked events and dead-letter queues,
while the consumer was stopped too; nothing personal comes back by a later event or a replay.
Real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest
from psycopg import sql

from integration_svc import endpoints
from integration_svc.endpoints import Endpoint
from integration_svc.main import IntegrationWorker
from integration_svc.main import init_db as init_integration
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import new_secret
from notify_svc.main import NotifyWorker
from notify_svc.main import init_db as init_notify
from notify_svc.main import projection as notify_projection
from notify_svc.settings import NotifySettings
from reporting_svc.main import init_db as init_reporting
from reporting_svc.projection import ReportingProjection
from reporting_svc.reports import read_report
from reporting_svc.settings import ReportingSettings
from servicekit.eventstore import connection_kwargs
from servicekit.process import ProjectionWorker
from shared_contracts.names import dead_letter_queue
from testbed.cli import esctl
from testbed.events import envelope, eventually, running
from testbed.history import publish
from testbed.projections import rebuild
from testbed.receiver import Receiver
from tests.support.integration import integration_settings_in

Message = tuple[str, str, bytes]
ADA_TRACES = ("ada@example.com", "Lovelace", "Countess")


def traces(database_url: str, needles: tuple[str, ...] = ADA_TRACES) -> list[str]:
    """Every row of every table of the database (any schema) that holds one of `needles`."""
    found = []
    with psycopg.connect(**connection_kwargs(database_url)) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
            "AND table_type = 'BASE TABLE'"
        ).fetchall()
        for schema, name in tables:
            query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, name))
            for (row,) in conn.execute(query).fetchall():
                if any(n in row for n in needles):
                    found.append(f"{schema}.{name}: {row[:200]}")
    return found


def erasure_row(database_url: str, user: uuid.UUID) -> tuple[Any, ...] | None:
    with psycopg.connect(**connection_kwargs(database_url)) as conn:
        return conn.execute(
            "SELECT erased_at, swept_at FROM public.erasures WHERE user_id = %s", (user,)
        ).fetchone()


def swept(database_url: str, user: uuid.UUID) -> bool:
    row = erasure_row(database_url, user)
    return row is not None and row[1] is not None


def parked_users(database_url: str, projection: str) -> list[str]:
    with psycopg.connect(**connection_kwargs(database_url)) as conn:
        live = conn.execute(
            "SELECT live FROM projection_generations WHERE projection = %s", (projection,)
        ).fetchone()
        assert live is not None
        rows = conn.execute(
            sql.SQL("SELECT envelope #>> '{{data,user_id}}' FROM {}").format(
                sql.Identifier(live[0], "_parked")
            )
        ).fetchall()
    return sorted(str(r[0]) for r in rows)


async def dead_letter_users(amqp_url: str, service: str) -> list[str]:
    """The users of the messages in `<service>.dlq` (left in the queue)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dead_letter_queue(service), passive=True)
        users = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            users.append(json.loads(message.body)["data"]["user_id"])
        await channel.close()
    return sorted(users)


def poison(user: uuid.UUID, *, version: int, position: int) -> Message:
    """An `auth.account.locked` failing its schema: parked, then dead-lettered."""
    return envelope("auth.account.locked", user, version=version, position=position)


def registered(user: uuid.UUID, email: str, name: str, position: int) -> Message:
    return envelope(
        "auth.account.registered",
        user,
        version=1,
        position=position,
        data={"email": email, "display_name": name},
    )


def deleted(user: uuid.UUID, *, version: int, position: int) -> Message:
    return envelope("auth.account.deleted", user, version=version, position=position)


@pytest.fixture
def notify_settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path: Path
) -> NotifySettings:
    settings = NotifySettings(
        database_url=make_database("notify_erasure"),
        amqp_url=make_vhost(),
        maildir=str(tmp_path / "maildir"),  # no SMTP: the maildir fallback
        consumer_prefetch=50,
        consumer_delivery_limit=2,
        dispatch_poll_seconds=0.2,
        smtp_timeout_seconds=1,  # also how long an erasure waits for a mail in flight
    )
    init_notify(settings)
    return settings


def maildir_files(settings: NotifySettings) -> list[str]:
    root = Path(settings.maildir)
    return sorted(
        p.read_text(errors="replace")
        for sub in ("new", "cur", "tmp")
        if (root / sub).is_dir()
        for p in (root / sub).iterdir()
    )


async def test_notify_erases_a_person_deleted_while_its_consumer_was_stopped(
    notify_settings: NotifySettings, make_vhost: Callable[[], str]
) -> None:
    settings = notify_settings
    ada, bob = uuid.uuid4(), uuid.uuid4()
    before = [
        registered(ada, "ada@example.com", "Ada Lovelace", 1),
        registered(bob, "bob@example.com", "Bob", 2),
        envelope(
            "user.profile.created",
            ada,
            version=1,
            position=1,
            data={"display_name": "Countess of Lovelace", "locale": "fr-FR"},
        ),
        poison(ada, version=2, position=3),
        poison(bob, version=2, position=4),
    ]
    async with running(NotifyWorker(settings)):
        await publish(settings.amqp_url, before)
        await eventually(
            lambda: len(maildir_files(settings)) == 2, what="two welcome mails", timeout=45
        )
        await eventually(
            lambda: len(parked_users(settings.database_url, "notify_svc")) == 2,
            what="parking",
            timeout=45,
        )
    assert traces(settings.database_url)  # the control: Ada is there to be erased
    assert any("ada@example.com" in m for m in maildir_files(settings))

    # Deleted while the consumer is stopped: the event waits in the queue.
    gone = deleted(ada, version=3, position=5)
    await publish(settings.amqp_url, [gone])
    worker = NotifyWorker(settings)
    async with running(worker):
        await eventually(
            lambda: swept(settings.database_url, ada), what="Ada's erasure swept", timeout=45
        )
        # Later events about Ada write nothing personal, and mail nothing.
        await publish(
            settings.amqp_url,
            [
                envelope(
                    "user.profile.updated",
                    ada,
                    version=2,
                    position=2,
                    data={"display_name": "Ada Lovelace", "locale": "en-GB"},
                ),
                envelope("auth.account.password_changed", ada, version=4, position=6),
            ],
        )
        await eventually(lambda: worker.consumer.status.handled >= 3, what="the later events")
        await asyncio.sleep(0.6)  # three dispatcher polls

    assert traces(settings.database_url) == []
    mails = maildir_files(settings)
    assert len(mails) == 1 and "bob@example.com" in mails[0]
    assert parked_users(settings.database_url, "notify_svc") == [str(bob)]
    assert await dead_letter_users(settings.amqp_url, "notify_svc") == [str(bob)]
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        kept = conn.execute(
            "SELECT effect, status, context, recipient FROM mail_intents WHERE user_id = %s",
            (ada,),
        ).fetchall()
    assert kept == [("welcome", "sent", {}, None)]  # ids, status and times stay

    # A replay of the whole stream (registration first, deletion after) brings nothing back.
    assert (await rebuild(notify_projection(settings), settings, idle_seconds=0.3)).swapped
    assert traces(settings.database_url) == []

    # Nor does a replay of a stream that no longer holds the deletion (retention dropped it):
    # the erasures table outlives every generation.
    other = settings.model_copy(update={"amqp_url": make_vhost()})
    later = [
        envelope("user.profile.updated", ada, version=2, position=2, data={"display_name": "Ada"}),
        envelope("auth.account.password_changed", ada, version=4, position=6),
    ]
    await publish(other.amqp_url, [*before, *later])
    assert (await rebuild(notify_projection(other), other, idle_seconds=0.3)).swapped
    assert traces(settings.database_url) == []
    assert traces(settings.database_url, ("bob@example.com",))  # Bob was rebuilt


@pytest.fixture
def reporting_settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> ReportingSettings:
    settings = ReportingSettings(
        database_url=make_database("reporting_erasure"), amqp_url=make_vhost()
    )
    init_reporting(settings)
    return settings


def reports(settings: ReportingSettings) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: read_report(settings.database_url, name).rows
        for name in ("signups", "logins", "locked", "active-users", "profile-completeness")
    }


def without_erasures(found: list[str]) -> list[str]:
    return [row for row in found if not row.startswith("public.erasures")]


async def test_reporting_keeps_only_anonymous_counts_of_an_erased_person(
    reporting_settings: ReportingSettings,
) -> None:
    settings = reporting_settings
    ada, bob = uuid.uuid4(), uuid.uuid4()
    locked = {"locked_until": "2030-01-01T00:00:00Z", "failed_attempts": 5}
    history = [
        registered(ada, "ada@example.com", "Ada Lovelace", 1),
        registered(bob, "bob@example.com", "Bob", 2),
        envelope("auth.account.login_succeeded", ada, version=2, position=3),
        envelope("auth.account.locked", ada, version=3, position=4, data=locked),
        envelope("auth.account.locked", bob, version=2, position=5, data=locked),
        envelope("user.profile.created", ada, version=1, position=1, data={"bio": "Countess"}),
        envelope("user.profile.created", bob, version=1, position=2, data={}),
    ]
    async with running(ProjectionWorker(ReportingProjection(), settings)):
        await publish(settings.amqp_url, history)
        await eventually(
            lambda: reports(settings)["profile-completeness"] != [], what="the history"
        )
        await eventually(lambda: reports(settings)["locked"] != [], what="the lockouts")
    counted = reports(settings)
    assert traces(settings.database_url, (str(ada),))  # the control

    await publish(settings.amqp_url, [deleted(ada, version=4, position=6)])  # consumer down
    async with running(ProjectionWorker(ReportingProjection(), settings)):
        await eventually(lambda: swept(settings.database_url, ada), what="Ada's erasure")
        # A later event about Ada counts, anonymously.
        await publish(
            settings.amqp_url,
            [envelope("auth.account.login_succeeded", ada, version=5, position=7)],
        )
        await eventually(lambda: reports(settings)["logins"][0][1] == 2, what="the later login")

    after = reports(settings)
    assert without_erasures(traces(settings.database_url, (str(ada),))) == []
    for name in ("signups", "locked", "active-users"):
        assert after[name] == counted[name], name  # the same counts, anonymous
    # Ada's profile no longer exists: completeness counts Bob's alone.
    assert {row[2] for row in after["profile-completeness"]} == {1}

    assert (await rebuild(ReportingProjection(), settings, idle_seconds=0.3)).swapped
    assert without_erasures(traces(settings.database_url, (str(ada),))) == []
    assert reports(settings) == after


@pytest.fixture
def integration_settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> IntegrationSettings:
    return integration_settings_in(
        make_database,
        make_vhost,
        "integration_erasure",
        retry_window_seconds=30.0,
        request_timeout_seconds=2.0,
        breaker_failures=50,
    )


def webhook_rows(settings: IntegrationSettings, user: uuid.UUID) -> list[tuple[Any, ...]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        return conn.execute(
            "SELECT d.id, m.event_type, d.status, m.body = '', m.purged_at IS NOT NULL "
            "FROM webhook_deliveries d JOIN webhook_messages m USING (event_id) "
            "WHERE m.user_id = %s ORDER BY d.id",
            (user,),
        ).fetchall()


async def test_integration_delivers_the_deletion_after_the_persons_queued_deliveries_then_purges(
    integration_settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    settings = integration_settings
    server, base = receiver
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        endpoints.add(conn, Endpoint("crm", f"{base}/crm", ("#",), new_secret()))
    ada, bob = uuid.uuid4(), uuid.uuid4()
    async with running(IntegrationWorker(settings)):
        await publish(
            settings.amqp_url,
            [
                registered(ada, "ada@example.com", "Ada Lovelace", 1),
                registered(bob, "bob@example.com", "Bob", 2),
                envelope(
                    "user.profile.created", ada, version=1, position=1, data={"bio": "Countess"}
                ),
            ],
        )
        await eventually(lambda: len(server.to("/crm")) == 3, what="three webhooks")
    assert traces(settings.database_url)  # the control

    # While the consumer is stopped: one more event about Ada, then her deletion. The
    # endpoint fails the next attempts, so the password change is still queued (retrying)
    # when the deletion is recorded: the deletion waits for it.
    server.fail("/crm", 3)
    changed = envelope("auth.account.password_changed", ada, version=2, position=3)
    await publish(settings.amqp_url, [changed, deleted(ada, version=3, position=4)])
    async with running(IntegrationWorker(settings)):
        await eventually(
            lambda: swept(settings.database_url, ada), what="Ada's erasure", timeout=30
        )
    answered = [
        json.loads(r.body)["type"] for r in server.to("/crm") if r.status and r.status < 300
    ]
    assert answered[-2:] == ["auth.account.password_changed", "auth.account.deleted"]

    assert traces(settings.database_url) == []
    rows = webhook_rows(settings, ada)
    assert [(t, s) for _, t, s, _, _ in rows] == [
        ("auth.account.registered", "delivered"),
        ("user.profile.created", "delivered"),
        ("auth.account.password_changed", "delivered"),
        ("auth.account.deleted", "delivered"),
    ]
    assert [(empty, purged) for *_, empty, purged in rows] == [(True, True)] * 3 + [(False, False)]

    # A purged delivery cannot be sent again: a one-line error, no traceback.
    env = {**os.environ, "INTEGRATION_DATABASE_URL": settings.database_url}
    result = esctl("webhooks", "redeliver", str(rows[0][0]), env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "purged" in result.stderr and "Traceback" not in result.stderr
    # Bob's deliveries are untouched and can be.
    assert esctl("webhooks", "redeliver", "--since", "1h", env=env).returncode == 0


# The tables `esctl erasure status` reads in the event stores, with the columns it reads
# (servicekit.shredding and the eventsourcing library make the real ones).
STORE_DDL = (
    "CREATE TABLE IF NOT EXISTS personal_keys (subject uuid PRIMARY KEY, wrapped bytea NULL, "
    "created_at timestamptz NOT NULL DEFAULT now(), erased_at timestamptz NULL)",
    "CREATE TABLE IF NOT EXISTS auth_events (originator_id uuid NOT NULL, "
    "originator_version bigint NOT NULL, topic text NOT NULL, state bytea NOT NULL)",
)


def test_erasure_status_says_per_service_done_or_pending(
    make_database: Callable[[str], str],
) -> None:
    names = {
        "AUTH": "auth",
        "USER": "users",
        "REPORTING": "reporting",
        "NOTIFY": "notify",
        "INTEGRATION": "integration",
    }
    urls = {prefix: make_database(f"status_{name}") for prefix, name in names.items()}
    for prefix in ("AUTH", "USER"):
        with psycopg.connect(**connection_kwargs(urls[prefix]), autocommit=True) as conn:
            for statement in STORE_DDL:
                conn.execute(statement)
    init_reporting(ReportingSettings(database_url=urls["REPORTING"]))
    init_notify(NotifySettings(database_url=urls["NOTIFY"]))
    init_integration(IntegrationSettings(database_url=urls["INTEGRATION"]))
    env = {**os.environ, **{f"{p}_DATABASE_URL": url for p, url in urls.items()}}
    ada = uuid.uuid4()

    bad = esctl("erasure", "status", "not-a-uuid", env=env)
    assert bad.returncode == 2 and "not a user id" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    down = esctl(
        "erasure",
        "status",
        str(ada),
        env={**env, "NOTIFY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/notify"},
    )
    assert down.returncode == 2 and "notify_svc's database is unreachable" in down.stderr
    assert "Traceback" not in down.stderr

    pending = esctl("erasure", "status", str(ada), "--json", env=env)
    assert pending.returncode == 1, pending.stderr
    report = json.loads(pending.stdout)
    assert report["done"] is False
    assert [s["service"] for s in report["services"]] == [
        "auth_svc",
        "user_svc",
        "reporting_svc",
        "notify_svc",
        "integration_svc",
    ]
    assert not any(s["done"] for s in report["services"])

    for prefix in ("AUTH", "USER"):
        with psycopg.connect(**connection_kwargs(urls[prefix]), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO personal_keys (subject, wrapped, erased_at) VALUES (%s, NULL, now())",
                (ada,),
            )
    for prefix in ("REPORTING", "NOTIFY"):
        with psycopg.connect(**connection_kwargs(urls[prefix]), autocommit=True) as conn:
            conn.execute("INSERT INTO erasures (user_id, swept_at) VALUES (%s, now())", (ada,))
    with psycopg.connect(**connection_kwargs(urls["INTEGRATION"]), autocommit=True) as conn:
        conn.execute("INSERT INTO erasures (user_id) VALUES (%s)", (ada,))  # not swept yet
    partly = json.loads(esctl("erasure", "status", str(ada), "--json", env=env).stdout)
    assert {s["service"]: s["done"] for s in partly["services"]} == {
        "auth_svc": False,  # the key is destroyed, but no Account.Deleted is stored
        "user_svc": True,
        "reporting_svc": True,
        "notify_svc": True,
        "integration_svc": False,
    }

    with psycopg.connect(**connection_kwargs(urls["AUTH"]), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO auth_events VALUES (%s, 7, 'auth_svc.domain:Account.Deleted', '')",
            (ada,),
        )
    with psycopg.connect(**connection_kwargs(urls["INTEGRATION"]), autocommit=True) as conn:
        conn.execute("UPDATE erasures SET swept_at = now() WHERE user_id = %s", (ada,))
    done = esctl("erasure", "status", str(ada), env={**env, "COLUMNS": "120"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done") == 5 and "pending" not in done.stdout
