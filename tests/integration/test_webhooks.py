"""integration_svc: real RabbitMQ, real PostgreSQL and a real HTTP receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from esctl.webhooks import app as webhooks_cli
from integration_svc import endpoints
from integration_svc.endpoints import Endpoint
from integration_svc.main import IntegrationWorker, init_db
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import new_secret
from servicekit.eventstore import connection_kwargs
from testbed.events import envelope, event_id, eventually, running
from testbed.history import publish
from testbed.receiver import Receiver
from tests.support.integration import integration_settings_in


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> IntegrationSettings:
    return integration_settings_in(
        make_database,
        make_vhost,
        "integration",
        retry_window_seconds=3.0,
        connect_timeout_seconds=0.5,
        request_timeout_seconds=0.5,
        breaker_failures=3,
        breaker_cooldown_seconds=0.3,
    )


def subscribe(settings: IntegrationSettings, endpoint_id: str, url: str, *events: str) -> str:
    secret = new_secret()
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        endpoints.add(conn, Endpoint(endpoint_id, url, events or ("#",), secret))
    return secret


def deliveries(settings: IntegrationSettings) -> list[tuple[Any, ...]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        return conn.execute(
            "SELECT endpoint_id, event_id, status, attempts, last_error "
            "FROM webhook_deliveries ORDER BY id"
        ).fetchall()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """Standard Webhooks verification, written from the specification, not from our code."""
    key = base64.b64decode(secret.split("_", 1)[1])
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    content = f"{msg_id}.{timestamp}.{body.decode()}".encode()
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and hmac.compare_digest(signature, expected)
        for version, _, signature in (
            s.partition(",") for s in headers["webhook-signature"].split(" ")
        )
    )


async def test_each_event_is_delivered_once_signed_as_standard_webhooks_say(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    server, base = receiver
    secret = subscribe(settings, "crm", f"{base}/crm", "auth.account.*")
    user = uuid.uuid4()
    registered = envelope(
        "auth.account.registered", user, version=1, position=1, data={"email": "a@example.com"}
    )
    profile = envelope("user.profile.created", user, version=1, position=1)  # not subscribed
    worker = IntegrationWorker(settings)
    async with running(worker):
        await publish(settings.amqp_url, [registered, profile])
        await eventually(lambda: len(server.requests) == 1, what="the webhook")
        await publish(settings.amqp_url, [registered])  # redelivered by the broker
        # The profile event, which no endpoint wants, never reached the queue.
        await eventually(lambda: worker.consumer.status.handled == 2, what="the redelivery")
        await asyncio.sleep(0.6)  # several dispatcher rounds
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request.headers["webhook-id"] == str(event_id(registered))
    assert verify(secret, request.headers, request.body)
    assert not verify(new_secret(), request.headers, request.body)  # the check can fail
    assert not verify(secret, request.headers, request.body.replace(b"a@", b"b@"))
    payload = json.loads(request.body)
    assert payload["type"] == "auth.account.registered"
    assert payload["data"]["email"] == "a@example.com"
    assert request.headers["content-type"] == "application/json"
    assert [(e, s, a) for e, _, s, a, _ in deliveries(settings)] == [("crm", "delivered", 1)]


async def test_a_receiver_failing_three_times_gets_the_event_once_after_backoff(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    server, base = receiver
    server.fail("/flaky", 3)
    secret = subscribe(settings, "flaky", f"{base}/flaky")
    message = envelope("auth.account.password_changed", uuid.uuid4(), version=2, position=7)
    async with running(IntegrationWorker(settings)):
        await publish(settings.amqp_url, [message])
        await eventually(
            lambda: [r.status for r in server.requests] == [503, 503, 503, 200], what="4 tries"
        )
        await eventually(
            lambda: deliveries(settings)[0][2] == "delivered", timeout=3, what="delivered"
        )
        await asyncio.sleep(0.5)
    assert [r.status for r in server.requests] == [503, 503, 503, 200]
    assert {r.headers["webhook-id"] for r in server.requests} == {str(event_id(message))}
    assert all(verify(secret, r.headers, r.body) for r in server.requests)
    gaps = [b.at - a.at for a, b in itertools.pairwise(server.requests)]
    # Backoff 0.2 s, then 0.4 s (capped), each with jitter in [50%, 100%].
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.2, gaps
    assert [(s, a) for _, _, s, a, _ in deliveries(settings)] == [("delivered", 4)]


async def test_an_endpoint_that_never_answers_fails_after_the_schedule_and_slows_no_other(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    server, base = receiver
    server.hang("/hang")
    subscribe(settings, "dead", f"{base}/hang")
    subscribe(settings, "live", f"{base}/ok")
    messages = [
        envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=i + 1)
        for i in range(20)
    ]
    worker = IntegrationWorker(settings)
    async with running(worker):
        started = time.monotonic()
        await publish(settings.amqp_url, messages)
        await eventually(lambda: len(server.to("/ok")) == 20, timeout=3, what="the live endpoint")
        served_in = time.monotonic() - started
        dead = [d for d in deliveries(settings) if d[0] == "dead"]
        assert len(dead) == 20 and all(status == "pending" for _, _, status, *_ in dead)
        await eventually(lambda: worker.dispatcher.status.endpoints.get("dead") == "open")
        await eventually(
            lambda: all(d[2] == "failed" for d in deliveries(settings) if d[0] == "dead"),
            timeout=8,
            what="the dead endpoint's deliveries to fail",
        )
    assert served_in < 2.0  # well before the first timeout of the dead one had repeated
    rows = deliveries(settings)
    assert sorted({(e, s) for e, _, s, _, _ in rows}) == [("dead", "failed"), ("live", "delivered")]
    errors = [error or "" for e, *_, error in rows if e == "dead"]
    assert all("timed out" in e or e.startswith("retry window ended") for e in errors), errors
    assert any("timed out" in e for e in errors)
    # The breaker kept most deliveries from even being tried.
    assert len(server.to("/hang")) < 20


async def test_a_url_that_resolves_to_loopback_is_refused_at_delivery_time(
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
    receiver: tuple[Receiver, str],
) -> None:
    server, base = receiver
    settings = IntegrationSettings(
        database_url=make_database("ssrf"), amqp_url=make_vhost(), dispatch_poll_seconds=0.2
    )
    await asyncio.to_thread(init_db, settings)
    port = base.rsplit(":", 1)[1]
    # Stored before DNS pointed it inward (the name passed when it was added).
    subscribe(settings, "rebound", f"https://localhost:{port}/x")
    message = envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=1)
    async with running(IntegrationWorker(settings)):
        await publish(settings.amqp_url, [message])
        await eventually(
            lambda: deliveries(settings)[:1] != [] and deliveries(settings)[0][2] == "failed"
        )
    [(_, _, status, attempts, error)] = deliveries(settings)
    assert (status, attempts) == ("failed", 1)
    assert re.search(r"loopback address \(localhost resolves to (127\.0\.0\.1|::1)\)", error)
    assert server.requests == []


def test_the_cli_refuses_internal_urls_and_operates_the_delivery_log(
    settings: IntegrationSettings, make_database: Callable[[str], str]
) -> None:
    runner = CliRunner()
    # Its own vhost: `add` and `remove` bind the queue there (when it exists).
    strict = {"INTEGRATION_DATABASE_URL": settings.database_url, "AMQP_URL": settings.amqp_url}
    for url, reason in (
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://10.0.0.1/hook", "private"),
        ("https://localhost/hook", "loopback address (localhost resolves to"),
        ("http://example.com/hook", "plain http"),
    ):
        result = runner.invoke(webhooks_cli, ["add", url], env=strict)
        assert result.exit_code == 1, result.output
        assert reason in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output

    dev = {**strict, "INTEGRATION_ALLOW_LOOPBACK": "true"}
    added = runner.invoke(
        webhooks_cli, ["add", "http://127.0.0.1:9/x", "--id", "crm", "-e", "auth.#"], env=dev
    )
    assert added.exit_code == 0, added.output
    assert "whsec_" in added.output  # the generated secret, shown once
    listed = runner.invoke(webhooks_cli, ["list"], env=dev)
    assert "crm" in listed.output and "auth.#" in listed.output
    secret = added.output.split("whsec_", 1)[1].split()[0]
    assert secret not in listed.output  # masked

    assert (
        runner.invoke(
            webhooks_cli, ["add", "http://127.0.0.1:9/y", "--id", "crm"], env=dev
        ).exit_code
        == 1
    )
    assert runner.invoke(webhooks_cli, ["redeliver"], env=dev).exit_code == 1
    assert (
        runner.invoke(webhooks_cli, ["redeliver", "--since", "yesterday"], env=dev).exit_code == 1
    )
    missing = runner.invoke(webhooks_cli, ["redeliver", "12345"], env=dev)
    assert missing.exit_code == 1 and "no delivery 12345" in missing.output

    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO webhook_messages VALUES (%s, 'auth.account.locked', '{}', now())",
            (uuid.UUID(int=1),),
        )
        conn.execute(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, status, attempts, last_error) "
            "VALUES (%s, 'crm', 'failed', 9, 'gave up after 9 attempts: HTTP 500')",
            (uuid.UUID(int=1),),
        )
    failed = runner.invoke(webhooks_cli, ["deliveries", "--failed", "--json"], env=dev)
    assert failed.exit_code == 0
    [row] = [json.loads(line) for line in failed.output.splitlines()]
    assert (row["endpoint_id"], row["status"], row["attempts"]) == ("crm", "failed", 9)
    again = runner.invoke(webhooks_cli, ["redeliver", "--since", "1h"], env=dev)
    assert again.exit_code == 0 and "1 deliveries queued again" in again.output
    assert [(s, a) for _, _, s, a, _ in deliveries(settings)] == [("pending", 0)]
    removed = runner.invoke(webhooks_cli, ["remove", "crm"], env=dev)
    assert removed.exit_code == 0 and "1 pending deliveries failed" in removed.output

    nowhere = {"INTEGRATION_DATABASE_URL": make_database("empty")}
    uninitialised = runner.invoke(webhooks_cli, ["list"], env=nowhere)
    assert uninitialised.exit_code == 1 and "esctl db init" in uninitialised.output
