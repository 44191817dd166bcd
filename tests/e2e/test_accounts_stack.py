"""Accounts (issue 16) against the whole stack as processes (`esctl up`): verification and
reset through the real mail (notify_svc's maildir), sessions ended and refused by user_svc
within a second, and the secret scan: no verification or reset token, and no link, outside
auth_svc and notify_svc.

One stack for every check, the gateway included. It exports its spans to a receiver of the
test's, logs every line (DEBUG, the access log included), and integration_svc delivers
every event type (`#`) to a loopback receiver. Two queues of the test's own, bound to both
exchanges before any traffic, keep every message published; `events.history` is read from
its first offset.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import jwt
import pytest

import registry
from esctl.trace import SpanReceiver
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS
from testbed.cli import esctl
from testbed.effects import WebhookSink
from testbed.up import EsctlUp, esctl_up
from tests.support.amqp import subscribed
from tests.support.scan import Mail, Message, database_texts, history, maildir_mails

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"
LINK = re.compile(r"(https?://[^\s\"'<>]+#token=([A-Za-z0-9_-]+))")
# Where a token may be: the services that make and mail it.
KEEPERS = {"auth_svc", "notify_svc"}
SCAN_QUEUES = {AUTH_EVENTS: "scan.auth.events", USER_EVENTS: "scan.user.events"}
TRIALS = 20


def links(mail: Mail) -> list[tuple[str, str]]:
    """(link, token) of each link in the mail (its text and HTML parts carry the same)."""
    return sorted({(m.group(1), m.group(2)) for m in LINK.finditer(mail.text)})


@dataclass
class AccountsStack:
    up: EsctlUp
    spans: SpanReceiver
    sink: WebhookSink
    work: Path
    # Every token and link the test read from a mail (the scan looks for each).
    secrets: set[str] = field(default_factory=set)

    @property
    def auth(self) -> str:
        return self.up.auth

    @property
    def users(self) -> str:
        return self.up.users

    def mails(self, to: str) -> list[Mail]:
        return [m for m in maildir_mails(self.work / "maildir") if to.lower() in m.to]

    def wait_for_mail(self, to: str, subject: str, timeout: float = 60) -> Mail:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for mail in self.mails(to):
                if subject in mail.subject:
                    return mail
            time.sleep(0.2)
        got = [m.subject for m in self.mails(to)]
        raise AssertionError(f"no mail '{subject}' to {to} in {timeout}s (got {got})")

    def link_of(self, mail: Mail) -> str:
        """The token of the mail's one link, kept for the scan (the link and the token)."""
        found = links(mail)
        assert len(found) == 1, mail.text
        link, token = found[0]
        assert len(token) >= 43  # 256 random bits at least
        self.secrets.update({link, token})
        return token


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path_factory: Any
) -> Iterator[AccountsStack]:
    work = tmp_path_factory.mktemp("e2e-accounts")
    sink = WebhookSink().start()
    try:
        with (
            SpanReceiver() as receiver,
            esctl_up(
                make_database,
                make_vhost,
                work,
                ready_timeout=150,
                LOG_LEVEL="DEBUG",  # every line there is, the access log included
                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                OTEL_BSP_SCHEDULE_DELAY="100",
                INTEGRATION_ALLOW_LOOPBACK="true",  # development only: the receiver is local
                INTEGRATION_RETRY_INITIAL_SECONDS="1",
                AUTH_FORGOT_LIMIT_PER_IP="1000",
            ) as up,
        ):
            env = {**up.env, "NO_COLOR": "1"}
            added = esctl("webhooks", "add", sink.url, "--event", "#", "--id", "every", env=env)
            assert added.returncode == 0, added.stderr
            asyncio.run(_declare_scan_queues(up.amqp_url))
            yield AccountsStack(up, receiver, sink, work)
    finally:
        sink.close()


async def _declare_scan_queues(amqp_url: str) -> None:
    """A queue per exchange, bound to every key before any traffic: every message is kept."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for exchange, queue_name in SCAN_QUEUES.items():
            declared = await channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
            await queue.bind(declared, routing_key="#")


def claims(access_token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    return decoded


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {tokens['access_token']}"}


def register(client: httpx.Client, email_address: str) -> str:
    r = client.post(
        "/auth/register",
        json={"email": email_address, "password": PASSWORD, "display_name": "Ada"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["user_id"])


def login(client: httpx.Client, email_address: str, password: str = PASSWORD) -> dict[str, Any]:
    r = client.post("/auth/login", json={"email": email_address, "password": password})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def new_address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


# --- verification ------------------------------------------------------------------------


async def test_registration_mails_a_link_that_verifies_the_address_everywhere(
    stack: AccountsStack,
) -> None:
    address = new_address("verify")
    async with (
        subscribed(stack.up.amqp_url, AUTH_EVENTS, "auth.account.#") as events,
        httpx.AsyncClient(base_url=stack.auth, timeout=10) as client,
    ):
        r = await client.post(
            "/auth/register",
            json={"email": address, "password": PASSWORD, "display_name": "Ada"},
        )
        assert r.status_code == 201, r.text
        user_id = r.json()["user_id"]
        r = await client.post("/auth/login", json={"email": address, "password": PASSWORD})
        assert r.status_code == 200, r.text
        first = r.json()
        assert claims(first["access_token"])["email_verified"] is False
        mail = await asyncio.to_thread(stack.wait_for_mail, address, "Welcome")
        token = stack.link_of(mail)

        assert (await client.post("/auth/email/verify", json={"token": token})).status_code == 204
        again = await client.post("/auth/email/verify", json={"token": token})
        assert again.status_code == 400  # spent

        refreshed = await client.post(
            "/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert refreshed.status_code == 200
        assert claims(refreshed.json()["access_token"])["email_verified"] is True
        deadline = time.monotonic() + 20
        verified: list[dict[str, Any]] = []
        while not verified and time.monotonic() < deadline:
            verified = [
                b
                for b in events.bodies
                if b["event_type"] == "auth.account.email_verified"
                and b["data"]["user_id"] == user_id
            ]
            await asyncio.sleep(0.05)
        assert verified, [b["event_type"] for b in events.bodies]
        assert verified[0]["data"]["email"] == address

    async with httpx.AsyncClient(base_url=stack.users, timeout=10) as users:
        profile = await users.get("/users/me", headers=bearer(refreshed.json()))
        assert profile.status_code == 200, profile.text
        assert profile.json()["email_verified"] is True
        before = await users.get("/users/me", headers=bearer(first))
        assert before.json()["email_verified"] is False  # as that older token says


def test_a_resent_link_replaces_the_welcome_link(stack: AccountsStack) -> None:
    address = new_address("resend")
    with httpx.Client(base_url=stack.auth, timeout=10) as client:
        register(client, address)
        tokens = login(client, address)
        welcome = stack.link_of(stack.wait_for_mail(address, "Welcome"))
        assert client.post("/auth/email/verify/resend", headers=bearer(tokens)).status_code == 204
        mail = stack.wait_for_mail(address, "Confirm your e-mail")
        resent = stack.link_of(mail)
        assert resent != welcome
        assert client.post("/auth/email/verify", json={"token": welcome}).status_code == 400
        assert client.post("/auth/email/verify", json={"token": resent}).status_code == 204


# --- reset -----------------------------------------------------------------------------


def test_forgot_mails_a_link_whose_reset_ends_every_session(stack: AccountsStack) -> None:
    address = new_address("reset")
    with httpx.Client(base_url=stack.auth, timeout=10) as client:
        register(client, address)
        sessions = [login(client, address), login(client, address)]
        r = client.post("/auth/password/forgot", json={"email": address})
        assert r.status_code == 202
        token = stack.link_of(stack.wait_for_mail(address, "Reset your eskit password"))
        done = client.post(
            "/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert done.status_code == 204, done.text
        for pair in sessions:
            dead = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
            assert dead.status_code == 401
        assert login(client, address, NEW_PASSWORD)["token_type"] == "bearer"
        old = client.post("/auth/login", json={"email": address, "password": PASSWORD})
        assert old.status_code == 401
        replay = client.post(
            "/auth/password/reset", json={"token": token, "new_password": "yet another one!"}
        )
        assert replay.status_code == 400
    notice = stack.wait_for_mail(address, "password was reset")
    assert links(notice) == []  # the notice carries no link


# --- sessions --------------------------------------------------------------------------


async def _first_refusal(users: httpx.AsyncClient, headers: dict[str, str]) -> float:
    """Poll GET /users/me until it answers 401; the monotonic time of that answer."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = await users.get("/users/me", headers=headers)
        if r.status_code == 401:
            return time.monotonic()
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.005)
    raise AssertionError("user_svc never refused the ended session's token")


async def test_an_ended_session_is_refused_by_user_svc_within_a_second(
    stack: AccountsStack,
) -> None:
    address = new_address("sessions")
    async with (
        httpx.AsyncClient(base_url=stack.auth, timeout=10) as auth,
        httpx.AsyncClient(base_url=stack.users, timeout=10) as users,
    ):
        r = await auth.post("/auth/register", json={"email": address, "password": PASSWORD})
        assert r.status_code == 201

        async def log_in() -> dict[str, Any]:
            r = await auth.post("/auth/login", json={"email": address, "password": PASSWORD})
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body

        # Two logins, two sessions; ending one kills its refresh and, soon, its access token.
        one, two = await log_in(), await log_in()
        listed = await auth.get("/auth/sessions", headers=bearer(two))
        assert {s["id"] for s in listed.json()["sessions"]} == {
            claims(one["access_token"])["sid"],
            claims(two["access_token"])["sid"],
        }
        delays = []
        for trial in range(TRIALS):
            victim = one if trial == 0 else await log_in()
            headers = bearer(victim)
            assert (await users.get("/users/me", headers=headers)).status_code == 200
            sid = claims(victim["access_token"])["sid"]
            ended = await auth.delete(f"/auth/sessions/{sid}", headers=bearer(two))
            assert ended.status_code == 204
            answered = time.monotonic()
            delays.append(await _first_refusal(users, headers) - answered)
            refresh = await auth.post(
                "/auth/refresh", json={"refresh_token": victim["refresh_token"]}
            )
            assert refresh.status_code == 401
        # The other session lived through it all.
        assert (await users.get("/users/me", headers=bearer(two))).status_code == 200

        # logout-all: every session ends (this one too), everywhere.
        three = await log_in()
        r = await auth.post("/auth/logout-all", headers=bearer(two))
        assert r.status_code == 204
        for pair in (two, three):
            dead = await auth.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
            assert dead.status_code == 401
            await _first_refusal(users, bearer(pair))
        assert (await auth.get("/auth/sessions", headers=bearer(three))).status_code == 401

    delays.sort()
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    print(  # the measurement, for the report (pytest -s)
        f"\nsession revocation -> first 401 at user_svc over {TRIALS} trials: "
        f"median {statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {delays[-1] * 1000:.0f} ms"
    )
    # Generous: the target is 1 s (p99); a loaded two-core host must not fail it spuriously.
    assert delays[-1] < 5, delays


def test_through_the_gateway_sessions_show_the_client_and_forgot_is_limited_per_ip(
    stack: AccountsStack,
) -> None:
    """The gateway (HAProxy rendered from compose/kong.yml, as Kong would route) passes the
    client's address on: a session lists the address the client connected from, not the
    gateway's; and `forgot` is limited per client address at the edge (10 a minute), before
    auth_svc's own limits."""
    address = new_address("edge")
    source = "127.0.0.23"
    with stack.up.client(source) as edge:
        r = edge.post("/auth/register", json={"email": address, "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = edge.post(
            "/auth/login",
            json={"email": address, "password": PASSWORD},
            headers={"user-agent": "edge-browser/1.0"},
        )
        assert r.status_code == 200, r.text
        tokens = r.json()
        listed = edge.get("/auth/sessions", headers=bearer(tokens))
        assert listed.status_code == 200, listed.text
        (session,) = listed.json()["sessions"]
        assert session["client_ip"] == source, session
        assert session["user_agent"] == "edge-browser/1.0"
        assert session["current"] is True

    with stack.up.client("127.0.0.24") as edge:
        answers = [
            edge.post("/auth/password/forgot", json={"email": new_address("nobody")})
            for _ in range(12)
        ]
    statuses = [r.status_code for r in answers]
    assert statuses[:10] == [202] * 10, statuses
    assert statuses[10:] == [429, 429], statuses
    assert answers[-1].headers.get("retry-after"), dict(answers[-1].headers)
    # Another client address is not affected.
    with stack.up.client("127.0.0.25") as edge:
        r = edge.post("/auth/password/forgot", json={"email": new_address("nobody")})
        assert r.status_code == 202, r.text


# --- the secret scan -------------------------------------------------------------------


async def drained(amqp_url: str) -> dict[str, list[Message]]:
    """Every message kept by the scan queues, and every message of events.history."""
    out: dict[str, list[Message]] = {name: [] for name in [*SCAN_QUEUES, "events.history"]}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for exchange, queue_name in SCAN_QUEUES.items():
            queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                out[exchange].append(Message(message.body, dict(message.headers or {})))
        out["events.history"] = await history(connection)
    return out


def caught_up(stack: AccountsStack) -> bool:
    """Every consumer's queue is empty (a message is acknowledged once applied) and nothing
    is dead-lettered. (`behind` never reaches 0: private events take positions too.)"""
    result = esctl(
        "projections", "status", "--format", "json", env={**stack.up.env, "NO_COLOR": "1"}
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(not r["dlq"] for r in rows), rows
    return bool(rows) and all(r["queued"] == 0 for r in rows)


def test_no_token_nor_link_leaves_auth_svc_and_notify_svc(stack: AccountsStack) -> None:
    # Its own verification, resend and reset, whatever ran before it.
    address = new_address("scan")
    with httpx.Client(base_url=stack.auth, timeout=10) as client:
        user_id = register(client, address)
        tokens = login(client, address)
        welcome = stack.link_of(stack.wait_for_mail(address, "Welcome"))
        assert client.post("/auth/email/verify/resend", headers=bearer(tokens)).status_code == 204
        resent = stack.link_of(stack.wait_for_mail(address, "Confirm your e-mail"))
        assert client.post("/auth/email/verify", json={"token": resent}).status_code == 204
        assert client.post("/auth/email/verify", json={"token": welcome}).status_code == 400
        client.post("/auth/password/forgot", json={"email": address})
        reset = stack.link_of(stack.wait_for_mail(address, "Reset your eskit password"))
        r = client.post("/auth/password/reset", json={"token": reset, "new_password": NEW_PASSWORD})
        assert r.status_code == 204
        stack.wait_for_mail(address, "password was reset")

    secrets = sorted(stack.secrets)
    assert len(secrets) >= 6  # this test's three links and tokens at least
    # Only the random part of a token is secret (its head is a version and the account id).
    needles = secrets + [s[-40:] for s in secrets if "#token=" not in s]

    def leaks(where: str, texts: Iterable[str]) -> list[str]:
        return [f"{where}: {n[:12]}..." for t in texts for n in needles if n in t]

    def readable(texts: Iterable[str]) -> bool:
        """The scan reads these as text: this test's account shows in them."""
        return any(address in t or user_id in t for t in texts)

    # Wait until every projection has applied every event, and every webhook arrived.
    deadline = time.monotonic() + 90
    while not caught_up(stack):
        assert time.monotonic() < deadline, "the projections never caught up"
        time.sleep(0.5)
    messages = asyncio.run(drained(stack.up.amqp_url))
    published = messages[AUTH_EVENTS] + messages[USER_EVENTS]
    event_ids = {m.envelope["event_id"] for m in published}
    types = {m.envelope["event_type"] for m in published}
    assert {
        "auth.account.registered",
        "auth.account.email_verification_requested",
        "auth.account.email_verified",
        "auth.account.password_reset_requested",
        "auth.account.password_reset",
        "auth.session.revoked",
        "user.profile.created",
    } <= types, types
    while not event_ids <= {r.headers.get("webhook-id") for r in stack.sink.received()}:
        assert time.monotonic() < deadline, "some webhooks never arrived"
        time.sleep(0.3)
    time.sleep(1.0)  # the last spans' export (every 100 ms)

    found: list[str] = []
    for where, read in messages.items():
        assert readable(m.text for m in read), f"{where}: this test's events not read"
        found += leaks(where, (m.text for m in read))
    assert len(messages["events.history"]) >= len(event_ids)

    webhooks = [r.body.decode("latin-1") + json.dumps(r.headers) for r in stack.sink.received()]
    assert readable(webhooks)
    found += leaks("webhook", webhooks)

    logs = [stack.up.log.read_text(errors="replace"), (stack.work / "stack.log").read_text()]
    assert "/auth/email/verify" in logs[0]  # the access log is there to be scanned
    found += leaks("log", logs)

    spans = list(stack.spans.spans)
    traced = {s.service for s in spans}  # auth_svc, auth_svc.relay, notify_svc.consumer...
    assert {t.split(".")[0] for t in traced} >= {
        "auth_svc",
        "user_svc",
        "notify_svc",
        "integration_svc",
    }, traced
    span_texts = [json.dumps([s.name, s.attributes, s.links], default=str) for s in spans]
    assert any("/auth/email/verify" in t for t in span_texts)  # the routes' spans are there
    found += leaks("span", span_texts)

    tables = 0
    for service in registry.SERVICES:
        if service.name in KEEPERS:
            continue
        count, texts = database_texts(stack.up.env[service.variable("database_url")])
        tables += count
        if service.name in ("user_svc", "integration_svc"):  # their rows name the account
            assert readable(t for _, t in texts), f"{service.name}: the account not found"
        for table, text in texts:
            found += leaks(f"{service.name} {table}", [text])
    assert tables >= 6, tables

    assert found == [], "\n".join(sorted(set(found)))
    # The scan can see: it finds every one in the mails themselves (notify_svc's output).
    mails = "\n".join(m.text for m in stack.mails("@example.com"))
    assert len(leaks("mails", [mails])) == len(needles)
