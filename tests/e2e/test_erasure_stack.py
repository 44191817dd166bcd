"""Erasure (issue 13) against the whole stack as processes (`esctl up`).

A person uses everything (registration and its mail, verification, two logins, profile
edits, a reset mail, webhooks of every event type), then deletes their account while
notify_svc's consumer is down (frozen: SIGSTOP). The erasure completes when it comes back.
Then, once the stream's retention bound (`HISTORY_MAX_AGE`, short here) has passed and more
traffic has rolled its segments over, nothing of the person is found: not in any table of
any service database (the event stores read raw and decoded through the library), not in
any queue nor in `events.history`, not in the maildir. The aggregates still load,
`esctl republish` refills the stream and `esctl replay` rebuilds every projection, and
still nothing comes back. The address then registers again, as a new account.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

import registry
from auth_svc.main import build_service
from servicekit.shredding import new_service_key
from testbed.cli import esctl
from testbed.effects import WebhookSink
from testbed.stack import settings_from_env
from testbed.up import EsctlUp, esctl_up
from tests.support.scan import database_texts, history, maildir_mails
from user_svc.main import profile_service

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"
RETENTION_SECONDS = 10
# Small segments, so that retention (which drops whole segments) acts within the test.
SEGMENT_BYTES = 4096


@dataclass
class Person:
    """Someone whose every personal value is unique to this run, so a find is theirs."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    user_id: str = ""

    @property
    def address(self) -> str:
        return f"erase-{self.tag}@example.com"

    @property
    def first_name(self) -> str:
        return f"Ada Erasable{self.tag}"

    @property
    def new_name(self) -> str:
        return f"Ada Renamed{self.tag}"

    @property
    def bio(self) -> str:
        return f"Bio that must vanish {self.tag}"

    @property
    def avatar(self) -> str:
        return f"https://avatars.example.com/{self.tag}.png"

    @property
    def needles(self) -> list[str]:
        return [self.address, self.first_name, self.new_name, self.bio, self.avatar]

    def found_in(self, where: str, texts: Iterable[str]) -> list[str]:
        return [f"{where}: {n}" for t in texts for n in self.needles if n in t]


@dataclass
class ErasureStack:
    up: EsctlUp
    sink: WebhookSink
    work: Path

    @property
    def cli_env(self) -> dict[str, str]:
        return {**self.up.env, "NO_COLOR": "1"}

    def esctl(self, *args: str) -> Any:
        return esctl(*args, env=self.cli_env, timeout=300)

    def caught_up(self) -> bool:
        result = self.esctl("projections", "status", "--format", "json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert all(not r["dlq"] for r in rows), rows
        return bool(rows) and all(r["queued"] == 0 for r in rows)

    def wait_caught_up(self, timeout: float = 120) -> None:
        wait_until(self.caught_up, timeout, "the projections never caught up")

    def erasure_status(self, user_id: str) -> tuple[int, list[dict[str, Any]]]:
        result = self.esctl("erasure", "status", user_id, "--json")
        assert result.returncode in (0, 1), result.stdout + result.stderr
        rows: list[dict[str, Any]] = json.loads(result.stdout)["services"]
        return result.returncode, rows

    def database_url(self, service: str) -> str:
        return self.up.env[registry.service(service).variable("database_url")]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path_factory: Any
) -> Iterator[ErasureStack]:
    work = tmp_path_factory.mktemp("e2e-erasure")
    sink = WebhookSink().start()
    try:
        with esctl_up(
            make_database,
            make_vhost,
            work,
            up_args=("--no-gateway",),
            ready_timeout=150,
            INTEGRATION_ALLOW_LOOPBACK="true",  # development only: the receiver is local
            INTEGRATION_RETRY_INITIAL_SECONDS="1",
            AUTH_PERSONAL_DATA_KEY=new_service_key(),
            USER_PERSONAL_DATA_KEY=new_service_key(),
            AUTH_ADDRESS_ID_KEY=new_service_key(),
            HISTORY_MAX_AGE=f"{RETENTION_SECONDS}s",
            HISTORY_SEGMENT_BYTES=str(SEGMENT_BYTES),
        ) as up:
            stack = ErasureStack(up, sink, work)
            added = stack.esctl("webhooks", "add", sink.url, "--event", "#", "--id", "every")
            assert added.returncode == 0, added.stderr
            yield stack
    finally:
        sink.close()


def bearer(tokens: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {tokens['access_token']}"}


def login(client: httpx.Client, address: str, password: str, agent: str) -> dict[str, Any]:
    r = client.post(
        "/auth/login", json={"email": address, "password": password}, headers={"user-agent": agent}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def wait_for_mail(stack: ErasureStack, to: str, subject: str, timeout: float = 60) -> str:
    """The text of the first mail to `to` whose subject has `subject`."""
    found: list[str] = []

    def arrived() -> bool:
        found[:] = [
            m.text
            for m in maildir_mails(stack.work / "maildir")
            if to.lower() in m.to and subject in m.subject
        ]
        return bool(found)

    wait_until(arrived, timeout, f"no mail '{subject}' to {to}")
    return found[0]


def token_in(mail: str) -> str:
    return mail.split("#token=", 1)[1].split(maxsplit=1)[0].rstrip(".\"'<>)")


def use_everything(stack: ErasureStack, person: Person) -> dict[str, Any]:
    """Every personal trace a user can leave; the tokens of their second session."""
    with (
        httpx.Client(base_url=stack.up.auth, timeout=10) as auth,
        httpx.Client(base_url=stack.up.users, timeout=10) as users,
    ):
        r = auth.post(
            "/auth/register",
            json={"email": person.address, "password": PASSWORD, "display_name": person.first_name},
        )
        assert r.status_code == 201, r.text
        person.user_id = str(r.json()["user_id"])
        welcome = wait_for_mail(stack, person.address, "Welcome")
        assert auth.post("/auth/email/verify", json={"token": token_in(welcome)}).status_code == 204
        login(auth, person.address, PASSWORD, "first-browser")
        tokens = login(auth, person.address, PASSWORD, "second-browser")
        wait_until(
            lambda: users.get("/users/me", headers=bearer(tokens)).status_code == 200,
            30,
            "no profile",
        )
        changes = {"display_name": person.new_name, "bio": person.bio, "avatar_url": person.avatar}
        r = users.patch("/users/me", json=changes, headers=bearer(tokens))
        assert r.status_code == 200, r.text
        auth.post("/auth/password/forgot", json={"email": person.address})
        wait_for_mail(stack, person.address, "Reset your eskit password")
    return tokens


def every_table(stack: ErasureStack) -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    for service in registry.SERVICES:
        _, found = database_texts(stack.database_url(service.name))
        texts += [(f"{service.name} {table}", text) for table, text in found]
    return texts


def decoded_event_stores(stack: ErasureStack) -> list[str]:
    """Every stored event of auth_svc and user_svc, decoded through the library (the
    personal fields decrypted where their key still exists), as text."""
    texts: list[str] = []
    auth = build_service(settings_from_env(registry.service("auth_svc"), stack.up.env))
    users = profile_service(settings_from_env(registry.service("user_svc"), stack.up.env))
    for app in (auth, users):
        try:
            start = 1
            while page := list(app.recorder.select_notifications(start=start, limit=500)):
                for notification in page:
                    event = app.mapper.to_domain_event(notification)
                    texts.append(json.dumps(vars(event), default=str))
                start = page[-1].id + 1
        finally:
            app.close()
    return texts


def aggregates_load(stack: ErasureStack, user_id: str) -> None:
    auth = build_service(settings_from_env(registry.service("auth_svc"), stack.up.env))
    users = profile_service(settings_from_env(registry.service("user_svc"), stack.up.env))
    try:
        account = auth.get_account(uuid.UUID(user_id))
        assert account.version > 1
        profile: Any = users.repository.get(uuid.UUID(user_id))
        assert profile.version > 1
        assert profile.display_name is None and profile.bio is None
    finally:
        auth.close()
        users.close()


async def queues_and_history(amqp_url: str, management: str) -> tuple[list[str], list[str]]:
    """The messages every queue of the stack's vhost holds (read and put back), and
    events.history from its first offset, as text."""
    vhost = amqp_url.rsplit("/", 1)[1]
    held: list[str] = []
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        r = await client.get(f"{management}/api/queues/{vhost}")
        r.raise_for_status()
        for queue in r.json():
            # Messages a consumer holds (unacknowledged) are being applied; the ready ones
            # are read and put back.
            name, depth = queue["name"], int(queue.get("messages_ready", 0))
            if not depth or name == "events.history":
                continue
            peek = await client.post(
                f"{management}/api/queues/{vhost}/{name}/get",
                json={"count": depth, "ackmode": "ack_requeue_true", "encoding": "auto"},
            )
            assert peek.status_code == 200, f"{name}: {peek.status_code} {peek.text}"
            held += [f"{name}: {m['payload']} {m['properties']}" for m in peek.json()]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        kept = await history(connection)
    return held, [m.text for m in kept]


def management_url() -> str:
    return os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")


def test_a_deleted_person_is_gone_from_every_store_and_queue(stack: ErasureStack) -> None:
    person = Person()
    tokens = use_everything(stack, person)
    stack.wait_caught_up()
    wait_until(
        lambda: bool(person.found_in("webhook", [r.body.decode() for r in stack.sink.received()])),
        60,
        "no webhook carried the person",
    )

    # The scan sees them before: it can find what it looks for. The event stores are
    # encrypted at rest: their raw rows never show the person, even now.
    before = every_table(stack)
    assert person.found_in("tables", (t for _, t in before))
    raw_stores = [t for where, t in before if where.split()[0] in ("auth_svc", "user_svc")]
    assert person.found_in("auth/user raw", raw_stores) == []
    assert person.found_in("decoded", decoded_event_stores(stack))
    _, stream = asyncio.run(queues_and_history(stack.up.amqp_url, management_url()))
    assert person.found_in("events.history", stream)
    last_personal_publish = time.monotonic()

    with (
        httpx.Client(base_url=stack.up.auth, timeout=10) as auth,
        httpx.Client(base_url=stack.up.users, timeout=10) as users,
    ):
        # Bad input erases nothing.
        assert (
            auth.request("DELETE", "/auth/account", json={"password": PASSWORD}).status_code == 401
        )
        r = auth.request(
            "DELETE", "/auth/account", json={"password": "not the password"}, headers=bearer(tokens)
        )
        assert r.status_code in (401, 403), r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        login(auth, person.address, PASSWORD, "still-there")

        # notify_svc's consumer is down while the deletion is published.
        notify = stack.up.child("notify_svc.consumer")
        os.kill(notify, signal.SIGSTOP)
        try:
            r = auth.request(
                "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(tokens)
            )
            assert r.status_code == 202, r.text
            r = auth.post("/auth/login", json={"email": person.address, "password": PASSWORD})
            assert r.status_code == 401, r.text
            r = auth.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
            assert r.status_code == 401, r.text
            wait_until(
                lambda: users.get("/users/me", headers=bearer(tokens)).status_code == 401,
                10,
                "user_svc still takes the deleted account's token",
            )

            def others_done() -> bool:
                _, rows = stack.erasure_status(person.user_id)
                return all(r["done"] for r in rows if r["service"] != "notify_svc")

            wait_until(others_done, 60, "the erasure never reached the running services")
            code, rows = stack.erasure_status(person.user_id)
            assert code == 1
            assert {r["service"]: r["done"] for r in rows}["notify_svc"] is False, rows
        finally:
            os.kill(notify, signal.SIGCONT)
        wait_until(
            lambda: stack.erasure_status(person.user_id)[0] == 0,
            90,
            "the erasure never completed after notify_svc's consumer came back",
        )
        r = auth.request(
            "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(tokens)
        )
        assert r.status_code in (401, 404, 410), r.text

    # integration_svc delivered the deletion to the endpoint subscribed to everything.
    wait_until(
        lambda: any(
            json.loads(r.body).get("type") == "auth.account.deleted"
            or json.loads(r.body).get("event_type") == "auth.account.deleted"
            for r in stack.sink.received()
        ),
        60,
        "auth.account.deleted never delivered",
    )

    # Past the stream's retention bound, more traffic rolls its segments over.
    while time.monotonic() < last_personal_publish + RETENTION_SECONDS + 2:
        time.sleep(0.5)
    traffic(stack, 8)
    stack.wait_caught_up()
    time.sleep(2)

    found = scan(stack, person)
    assert found == [], "\n".join(found)
    aggregates_load(stack, person.user_id)

    # A refill from the producers' (shredded) stores and a rebuild of every projection bring
    # nothing back.
    for producer in ("auth_svc", "user_svc"):
        refilled = stack.esctl("republish", producer, "--from", "1")
        assert refilled.returncode == 0, refilled.stdout + refilled.stderr
    for projection in registry.projections():
        rebuilt = stack.esctl("replay", projection.name)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    stack.wait_caught_up()
    found = scan(stack, person)
    assert found == [], "\n".join(found)
    code, rows = stack.erasure_status(person.user_id)
    assert code == 0, rows

    # The address is free again: a new account, nothing of the old one.
    with (
        httpx.Client(base_url=stack.up.auth, timeout=10) as auth,
        httpx.Client(base_url=stack.up.users, timeout=10) as users,
    ):
        r = auth.post("/auth/register", json={"email": person.address, "password": NEW_PASSWORD})
        assert r.status_code == 201, r.text
        assert r.json()["user_id"] != person.user_id
        fresh = login(auth, person.address, NEW_PASSWORD, "new-life")

        def profile() -> dict[str, Any]:
            r = users.get("/users/me", headers=bearer(fresh))
            return r.json() if r.status_code == 200 else {}

        wait_until(lambda: bool(profile()), 30, "no profile for the new account")
        assert profile()["display_name"] is None and profile()["bio"] is None


def traffic(stack: ErasureStack, accounts: int) -> None:
    """Other people registering and editing: the relays keep publishing."""
    with (
        httpx.Client(base_url=stack.up.auth, timeout=10) as auth,
        httpx.Client(base_url=stack.up.users, timeout=10) as users,
    ):
        for _ in range(accounts):
            other = Person()
            r = auth.post("/auth/register", json={"email": other.address, "password": PASSWORD})
            assert r.status_code == 201, r.text
            headers = bearer(login(auth, other.address, PASSWORD, "filler"))

            def has_profile(headers: dict[str, str] = headers) -> bool:
                return users.get("/users/me", headers=headers).status_code == 200

            wait_until(has_profile, 30, "no profile")
            users.patch("/users/me", json={"bio": "x" * 500}, headers=headers)


def scan(stack: ErasureStack, person: Person) -> list[str]:
    """Where the person is still found: tables, decoded event stores, queues, the stream,
    the maildir."""
    found = [f for where, text in every_table(stack) for f in person.found_in(where, [text])]
    found += person.found_in("decoded event store", decoded_event_stores(stack))
    held, stream = asyncio.run(queues_and_history(stack.up.amqp_url, management_url()))
    assert stream, "events.history read nothing"
    found += person.found_in("events.history", stream)
    found += person.found_in("queues", held)
    found += person.found_in(
        "maildir", (m.text + m.to for m in maildir_mails(stack.work / "maildir"))
    )
    return found
