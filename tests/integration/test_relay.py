"""The relay publishes a producer's events in position order, at least once, after confirms."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import IO, Any

import httpx
import psycopg
import pytest

from auth_svc.main import init_db
from auth_svc.settings import AuthSettings
from servicekit.eventstore import connection_kwargs, eventsourcing_env
from servicekit.relay import Relay, create_relay_table
from testbed.cli import ESCTL
from testbed.ports import free_port
from testbed.producer import Member, MemberApp, to_contract
from testbed.proxy import proxied
from tests.support.amqp import subscribed

EXCHANGE = "members.test"


@pytest.fixture
def producer_db(make_database: Callable[[str], str]) -> str:
    url = make_database("relay")
    MemberApp(env=eventsourcing_env(url, create_table=True)).close()
    create_relay_table(url)
    return url


@pytest.fixture
def members(producer_db: str) -> Iterator[MemberApp]:
    app = MemberApp(env=eventsourcing_env(producer_db, pool_size=4))
    yield app
    app.close()


def write_members(app: MemberApp, count: int) -> list[int]:
    """Append `count` public events (plus a private one every 10th); return their positions."""
    positions: list[int] = []
    for i in range(count):
        member = Member.join(f"m{i}@example.com")
        if i % 10 == 0:
            member.keep_secret("s3cr3t")
        recordings = app.save(member)
        positions.append(recordings[0].notification.id)
    return positions


@asynccontextmanager
async def running_relay(app: MemberApp, db: str, amqp_url: str, **kw: Any) -> AsyncIterator[Relay]:
    relay = Relay(
        app,
        producer="members_svc",
        exchange=EXCHANGE,
        to_contract=to_contract,
        amqp_url=amqp_url,
        database_url=db,
        **kw,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def assert_in_order_with_only_resends(bodies: list[dict[str, Any]]) -> None:
    """Positions never go backwards except to re-send an event already seen, same id."""
    by_position: dict[int, str] = {}
    highest = 0
    for body in bodies:
        position, event_id = body["position"], body["event_id"]
        if position in by_position:
            assert by_position[position] == event_id, "a re-send must carry the same event_id"
            continue
        assert position > highest, f"position {position} arrived after {highest}"
        by_position[position] = event_id
        highest = position


async def test_events_arrive_in_position_order_with_the_documented_envelope(
    members: MemberApp, producer_db: str, amqp_url: str
) -> None:
    positions = write_members(members, 50)
    async with (
        subscribed(amqp_url, EXCHANGE) as received,
        running_relay(members, producer_db, amqp_url),
    ):
        await received.wait_for_positions(set(positions))
    bodies = received.bodies
    assert_in_order_with_only_resends(bodies)
    first = received.messages[0]
    body = bodies[0]
    assert set(body) == {
        "event_id",
        "event_type",
        "schema_version",
        "occurred_at",
        "producer",
        "aggregate_id",
        "aggregate_version",
        "position",
        "correlation_id",
        "causation_id",
        "data",
    }
    assert body["event_type"] == "auth.account.registered"
    assert body["occurred_at"].endswith("Z")
    assert first.message_id == body["event_id"]
    assert first.type == body["event_type"]
    assert first.content_type == "application/json"
    assert first.delivery_mode == 2
    assert first.headers["x-position"] == body["position"]
    assert first.routing_key == body["event_type"]
    # Private events are never published.
    assert all("s3cr3t" not in m.body.decode() for m in received.messages)


async def test_relay_stopped_mid_stream_resumes_from_its_recorded_position(
    members: MemberApp, producer_db: str, amqp_url: str
) -> None:
    first = write_members(members, 200)
    async with subscribed(amqp_url, EXCHANGE) as received:
        async with running_relay(members, producer_db, amqp_url, batch_size=20):
            await received.wait_for(50)
        # Stopped mid-stream (the relay may or may not have finished the first 200).
        more = await asyncio.to_thread(write_members, members, 500)
        async with running_relay(members, producer_db, amqp_url, batch_size=100):
            await received.wait_for_positions(set(first) | set(more))
    assert_in_order_with_only_resends(received.bodies)


async def test_nothing_is_lost_when_the_broker_closes_every_connection_under_load(
    members: MemberApp, producer_db: str, make_vhost: Callable[[], str]
) -> None:
    amqp_url = make_vhost()
    vhost = amqp_url.rsplit("/", 1)[1]
    async with (
        subscribed(amqp_url, EXCHANGE) as received,
        running_relay(
            members, producer_db, amqp_url, batch_size=50, max_backoff_seconds=0.5
        ) as relay,
    ):
        writer = asyncio.create_task(asyncio.to_thread(write_members, members, 600))
        await received.wait_for(100)
        subprocess.run(
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "chaos test"],
            check=True,
            timeout=60,
        )
        positions = await writer
        # The subscriber's own connection was closed too: re-subscribe and check the tail
        # arrives; the relay's recorded position proves every event was confirmed.
        async with subscribed(amqp_url, EXCHANGE) as later:
            more = await asyncio.to_thread(write_members, members, 10)
            await later.wait_for_positions(set(more))
        assert relay.status.position >= max(more)
    assert max(positions) < min(more)


async def test_only_one_relay_is_active_and_a_standby_takes_over(
    members: MemberApp, producer_db: str, amqp_url: str
) -> None:
    async with subscribed(amqp_url, EXCHANGE) as received:
        async with running_relay(members, producer_db, amqp_url) as leader:
            await _until(lambda: leader.status.role == "leader")
            async with running_relay(members, producer_db, amqp_url) as standby:
                await _until(lambda: standby.status.role == "standby")
                positions = write_members(members, 30)
                await received.wait_for_positions(set(positions))
                assert standby.status.role == "standby"
            # The standby stopped; the leader carries on.
        async with running_relay(members, producer_db, amqp_url) as successor:
            await _until(lambda: successor.status.role == "leader")
            more = write_members(members, 30)
            await received.wait_for_positions(set(more))
    assert_in_order_with_only_resends(received.bodies)
    # Each event was published once: no two relays ran together.
    assert len(received.bodies) == len({b["event_id"] for b in received.bodies})


async def test_relay_recovers_when_its_database_connections_are_killed(
    members: MemberApp, producer_db: str, amqp_url: str
) -> None:
    dbname = connection_kwargs(producer_db)["dbname"]
    async with (
        subscribed(amqp_url, EXCHANGE) as received,
        running_relay(members, producer_db, amqp_url, max_backoff_seconds=0.5) as relay,
    ):
        first = write_members(members, 20)
        await received.wait_for_positions(set(first))
        with psycopg.connect(
            **{**connection_kwargs(producer_db), "dbname": "postgres"}, autocommit=True
        ) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        more = write_members(members, 20)
        await received.wait_for_positions(set(more))
        # It may notice the lost connection only when recording the position: then it
        # reconnects, re-sends the batch (same event ids) and records it.
        await _until(lambda: relay.status.role == "leader" and relay.status.position >= max(more))
    assert_in_order_with_only_resends(received.bodies)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_relay_started_while_its_database_refuses_waits_for_it_instead_of_exiting(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> None:
    """`esctl relay` beside a database that is still starting (or out of connections): the
    process stays up, says what it waits for, and becomes ready once the database answers."""

    database = make_database("relay_waits")
    init_db(AuthSettings(database_url=database))
    port = int(connection_kwargs(database)["port"])
    health = free_port()
    with proxied(port) as proxy:
        proxy.cut()  # refused, as a database not yet listening
        env = {
            **os.environ,
            "AUTH_DATABASE_URL": database.replace(f":{port}/", f":{proxy.port}/"),
            "AMQP_URL": make_vhost(),
            "AUTH_RELAY_PORT": str(health),
            "LOG_FORMAT": "json",
        }
        with tempfile.TemporaryFile() as log:
            relay = subprocess.Popen([*ESCTL, "relay", "auth_svc"], env=env, stderr=log)
            try:
                deadline = time.monotonic() + 60
                while b"waits for its database or broker" not in _read(log):
                    assert relay.poll() is None, _read(log).decode(errors="replace")
                    assert time.monotonic() < deadline, _read(log).decode(errors="replace")
                    time.sleep(0.2)
                time.sleep(1.5)
                assert relay.poll() is None, _read(log).decode(errors="replace")
                proxy.restore()
                while not _ready(f"http://127.0.0.1:{health}/health/ready"):
                    assert relay.poll() is None, _read(log).decode(errors="replace")
                    assert time.monotonic() < deadline, _read(log).decode(errors="replace")
                    time.sleep(0.2)
            finally:
                relay.terminate()
                relay.wait(timeout=15)


def _read(log: IO[bytes]) -> bytes:
    log.seek(0)
    return log.read()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_relay_whose_database_does_not_exist_exits_at_once_saying_so(
    make_vhost: Callable[[], str],
) -> None:
    """Waiting cannot fix a wrong database name: a one-line error and exit code 2."""
    env = {
        **os.environ,
        "AUTH_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/eskit_no_such_database",
        "AMQP_URL": make_vhost(),
        "AUTH_RELAY_PORT": str(free_port()),
    }
    done = subprocess.run(
        [*ESCTL, "relay", "auth_svc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: auth_svc.relay cannot start: the database refuses")
    assert '"eskit_no_such_database" does not exist' in last
    assert "Traceback" not in done.stderr
