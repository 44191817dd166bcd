"""The FastStream example subscriber (examples/faststream_subscriber) against the whole stack
(`esctl up`): it sees each event of a sign-up and a profile edit applied exactly once, when
the relay re-sends it, when the broker redelivers it after the subscriber died, and it skips
a schema version newer than it knows."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aio_pika
import httpx
import pytest

from examples.faststream_subscriber.directory import Directory
from servicekit.process import stop_process
from shared_contracts import USER_EVENTS, Envelope
from testbed.up import EsctlUp, esctl_up
from tests.support.amqp import subscribed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path_factory: Any
) -> Iterator[EsctlUp]:
    work = tmp_path_factory.mktemp("e2e-subscriber")
    # Nine processes start at once: on a busy two-core host they need more than the 60 s default.
    with esctl_up(make_database, make_vhost, work, ready_timeout=150) as up:
        yield up


@dataclass
class Subscriber:
    """The example, run as its users would run it: `python -m examples.faststream_subscriber`."""

    amqp_url: str
    work: Path
    queue: str
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def database(self) -> Path:
        return self.work / "directory.sqlite3"

    @property
    def log(self) -> Path:
        return self.work / "subscriber.log"

    def start(self) -> None:
        self.runs += 1
        marker = f"subscribed {self.queue}"
        seen = self.log.read_text().count(marker) if self.log.exists() else 0
        env = {
            "PATH": "/usr/bin:/bin",
            "SUBSCRIBER_AMQP_URL": self.amqp_url,
            "SUBSCRIBER_DATABASE": str(self.database),
            "SUBSCRIBER_QUEUE": self.queue,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "examples.faststream_subscriber"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while self.log.read_text().count(marker) == seen:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15, sig=sig)
            self.proc = None

    def lines(self, outcome: str) -> list[str]:
        return re.findall(rf"\b{outcome} \S+ \S+.*$", self.log.read_text(), flags=re.MULTILINE)

    async def wait_for(
        self, outcome: str, needle: str, count: int = 1, timeout: float = 20
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(needle in line for line in self.lines(outcome)) >= count:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"no {count} '{outcome}' of {needle}: {self.log.read_text()[-3000:]}")


@pytest.fixture
def subscriber(stack: EsctlUp, tmp_path: Path) -> Iterator[Subscriber]:
    running = Subscriber(stack.amqp_url, tmp_path, f"directory-{uuid.uuid4().hex[:8]}.q")
    running.start()
    yield running
    running.stop()


def unacked(amqp_url: str, queue: str) -> int:
    vhost = unquote(amqp_url.rsplit("/", 1)[1])
    result = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages_unacknowledged"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    counts = dict(line.split("\t") for line in result.stdout.splitlines() if "\t" in line)
    return int(counts.get(queue, "0"))


async def member_at(subscriber: Subscriber, user_id: str, version: int) -> dict[str, Any]:
    """The subscriber's member once it has applied the registration and this profile version."""
    directory = Directory(subscriber.database)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        member = directory.member(user_id)
        if member and member["registered_at"] and member["profile_version"] >= version:
            return member
        await asyncio.sleep(0.05)
    pytest.fail(f"{user_id} never reached version {version}: {subscriber.log.read_text()[-3000:]}")


async def sign_up_and_edit(
    stack: EsctlUp, subscriber: Subscriber, bio: str
) -> tuple[str, dict[str, str]]:
    """Register, log in, and edit the profile once the registration created it (version 1),
    so that the profile's versions are known: created 1, edited 2."""
    email = f"fs-{time.time_ns()}@example.com"
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{stack.auth}/auth/register",
            json={"email": email, "password": "correct horse", "display_name": "Ada"},
        )
        assert r.status_code == 201, r.text
        user_id = r.json()["user_id"]
        r = await client.post(
            f"{stack.auth}/auth/login", json={"email": email, "password": "correct horse"}
        )
        assert r.status_code == 200, r.text
        bearer = {"authorization": f"Bearer {r.json()['access_token']}"}
        await member_at(subscriber, user_id, 1)
        r = await client.patch(f"{stack.users}/users/me", headers=bearer, json={"bio": bio})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2
    await member_at(subscriber, user_id, 2)
    return user_id, bearer


async def test_each_event_is_applied_once_even_when_the_relay_sends_it_again(
    stack: EsctlUp, subscriber: Subscriber
) -> None:
    async with (
        subscribed(stack.amqp_url, "auth.events", "auth.account.registered") as auth,
        subscribed(stack.amqp_url, "user.events", "user.profile.*") as users,
    ):
        user_id, _ = await sign_up_and_edit(stack, subscriber, bio="Analyst")
        published = [*await auth.wait_for(1), *await users.wait_for(2)]
        mine = [m for m in auth.messages + users.messages if user_id in m.body.decode()]
        assert [m.routing_key for m in mine] == [
            "auth.account.registered",
            "user.profile.created",
            "user.profile.updated",
        ]
        event_ids = [str(b["event_id"]) for b in published if b["aggregate_id"] == user_id]
        for event_id in event_ids:
            await subscriber.wait_for("applied", event_id)

        # A relay that died after publishing, before recording its position, sends the same
        # messages again (same event_id): the subscriber sees them and changes nothing.
        connection = await aio_pika.connect(stack.amqp_url)
        async with connection:
            channel = await connection.channel()
            for message in mine:
                exchange = await channel.get_exchange(message.exchange)
                await exchange.publish(
                    aio_pika.Message(
                        body=message.body,
                        message_id=message.message_id,
                        type=message.type,
                        content_type=message.content_type,
                        headers=message.headers,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=message.routing_key or "",
                )
        for event_id in event_ids:
            await subscriber.wait_for("duplicate", event_id)

    for event_id in event_ids:
        assert sum(event_id in line for line in subscriber.lines("applied")) == 1
    member = Directory(subscriber.database).member(user_id)
    assert member is not None
    assert (member["display_name"], member["bio"], member["profile_version"]) == (
        "Ada",
        "Analyst",
        2,
    )
    assert member["profile_changes"] == 2
    assert member["registered_at"] is not None
    applied = [t for i, t in Directory(subscriber.database).applied() if i in event_ids]
    assert sorted(applied) == [
        "auth.account.registered",
        "user.profile.created",
        "user.profile.updated",
    ]


async def test_a_message_redelivered_after_the_subscriber_died_is_applied_once(
    stack: EsctlUp, subscriber: Subscriber
) -> None:
    user_id, bearer = await sign_up_and_edit(stack, subscriber, bio="first")

    # Hold the subscriber's database: its next event is delivered, not committed, not acked.
    blocker = sqlite3.connect(subscriber.database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.patch(
                f"{stack.users}/users/me", headers=bearer, json={"bio": "second"}
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while unacked(stack.amqp_url, subscriber.queue) < 1:
            assert time.monotonic() < deadline, "the edit never reached the subscriber"
            await asyncio.sleep(0.1)
        subscriber.stop(sig=signal.SIGKILL)  # dies holding the message
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    subscriber.start()
    await subscriber.wait_for("applied", "(redelivered)")
    redelivered = [line for line in subscriber.lines("applied") if "(redelivered)" in line]
    assert len(redelivered) == 1 and "user.profile.updated" in redelivered[0]
    # No event was applied twice. (Counting lines before and after would race the log: the
    # subscriber commits an event before it logs it, and a login event may come late.)
    applied_ids = [line.split()[2] for line in subscriber.lines("applied")]
    assert len(applied_ids) == len(set(applied_ids)), applied_ids
    assert set(applied_ids) <= {i for i, _ in Directory(subscriber.database).applied()}
    member = Directory(subscriber.database).member(user_id)
    assert member is not None
    assert (member["bio"], member["profile_version"], member["profile_changes"]) == ("second", 3, 3)


async def test_a_newer_schema_version_than_the_subscriber_knows_is_skipped(
    stack: EsctlUp, subscriber: Subscriber
) -> None:
    user_id, _ = await sign_up_and_edit(stack, subscriber, bio="kept")
    future = Envelope(
        event_id=uuid.uuid4(),
        event_type="user.profile.updated",
        schema_version=2,
        occurred_at=datetime.now(UTC),
        producer="user_svc",
        aggregate_id=uuid.UUID(user_id),
        aggregate_version=3,
        position=10**9,
        data={"user_id": user_id, "profile": {"bio": "from the future"}},
    )
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(USER_EVENTS)
        await exchange.publish(
            aio_pika.Message(
                body=future.model_dump_json().encode(),
                message_id=str(future.event_id),
                content_type="application/json",
            ),
            routing_key=future.event_type,
        )
    await subscriber.wait_for("skipped", str(future.event_id))
    assert "newer_schema_version user.profile.updated v2" in subscriber.lines("skipped")[-1]
    member = Directory(subscriber.database).member(user_id)
    assert member is not None
    assert (member["bio"], member["profile_version"]) == ("kept", 2)
    assert str(future.event_id) not in {i for i, _ in Directory(subscriber.database).applied()}
