"""Retention removed the start of events.history: replay says so; republish refills it."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

import pytest

from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.eventstore import eventsourcing_env
from servicekit.relay import Relay, create_relay_table, republish
from servicekit.replay import Replay, ReplayError
from shared_contracts.names import AUTH_EVENTS
from testbed.producer import Member, MemberApp, to_contract
from testbed.projections import consuming, positions

MEMBERS = 1_500


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def producer(make_database: Callable[[str], str]) -> Iterator[tuple[MemberApp, str]]:
    db = make_database("members")
    MemberApp(env=eventsourcing_env(db, create_table=True)).close()
    create_relay_table(db)
    app = MemberApp(env=eventsourcing_env(db, pool_size=4))
    yield app, db
    app.close()


def fill(app: MemberApp) -> None:
    for start in range(0, MEMBERS, 250):
        members = [Member.join(f"m{i}@example.com") for i in range(start, start + 250)]
        for member in members[::3]:
            member.visit()
        app.save(*members)


async def relay_everything(relay: Relay, app: MemberApp) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    latest = app.recorder.max_notification_id() or 0
    for _ in range(600):
        if relay.status.position >= latest:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert relay.status.position >= latest


async def test_replay_detects_retention_and_succeeds_after_republish(
    producer: tuple[MemberApp, str],
    make_database: Callable[[str], str],
    make_vhost: Callable[[], str],
) -> None:
    app, db = producer
    amqp_url = make_vhost()
    vhost = unquote(urlsplit(amqp_url).path[1:])
    # Keep little of the stream, in small segments, so that retention bites at once.
    rabbitmqctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "retention",
        r"^events\.history$",
        '{"max-length-bytes": 60000, "stream-max-segment-size-bytes": 20000}',
    )
    settings = ReportingSettings(database_url=make_database("retention"), amqp_url=amqp_url)
    relay = Relay(
        app,
        producer="auth_svc",
        exchange=AUTH_EVENTS,
        to_contract=to_contract,
        amqp_url=amqp_url,
        database_url=db,
    )
    await asyncio.to_thread(fill, app)
    async with consuming(settings):
        await relay_everything(relay, app)
        for _ in range(200):
            if (await positions(settings)).get("auth_svc") == relay.status.position:
                break
            await asyncio.sleep(0.05)

        def rebuild() -> Replay:
            return Replay(
                ReportingProjection(),
                database_url=settings.database_url,
                amqp_url=amqp_url,
                dry_run=True,
                idle_seconds=0.5,
                stall_seconds=5,
            )

        with pytest.raises(ReplayError, match=r"esctl republish auth_svc --from 1"):
            await rebuild().run(asyncio.Event())

        rabbitmqctl("clear_policy", "-p", vhost, "retention")
        refilled = await republish(relay, 1)
        assert refilled.published == public_events(app)
        result = await rebuild().run(asyncio.Event())
        assert result.differences == []  # the refilled rebuild equals the live read model
        assert result.progress.applied == refilled.published


def public_events(app: MemberApp) -> int:
    notifications = app.recorder.select_notifications(start=1, limit=10 * MEMBERS)
    return sum(1 for n in notifications if to_contract(app.mapper.to_domain_event(n)))
