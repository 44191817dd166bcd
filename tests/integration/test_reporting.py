"""reporting_svc fed by real RabbitMQ into real PostgreSQL, compared with expected reports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from reporting_svc.projection import ReportingProjection
from reporting_svc.reports import read_report
from reporting_svc.settings import ReportingSettings
from servicekit.eventstore import connection_kwargs
from servicekit.messages import IncomingEvent, validated
from servicekit.projection import ProjectionStore
from shared_contracts.envelope import Envelope
from testbed.cli import ESCTL
from testbed.events import envelope, eventually
from testbed.history import generate, publish
from testbed.ports import free_port
from testbed.projections import (
    assert_reports_match,
    consuming,
    publish_and_catch_up,
    wait_caught_up,
)


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> ReportingSettings:
    return ReportingSettings(database_url=make_database("reporting"), amqp_url=make_vhost())


async def test_live_consumption_of_ten_thousand_events_yields_the_expected_reports(
    settings: ReportingSettings,
) -> None:
    history = generate(10_000)
    async with consuming(settings):
        await publish_and_catch_up(settings, history)
    await assert_reports_match(settings, history)


async def test_redelivered_and_older_events_change_nothing(settings: ReportingSettings) -> None:
    history = generate(600, seed=3)
    bodies = history.bodies()
    async with consuming(settings, prefetch=50):
        await publish_and_catch_up(settings, history)
        await publish(settings.amqp_url, bodies[:300])  # duplicates and out-of-order olds
        await publish(settings.amqp_url, bodies[-5:])
        await asyncio.sleep(1.0)
    await assert_reports_match(settings, history)


async def test_two_replicas_on_one_queue_give_the_same_result(
    settings: ReportingSettings,
) -> None:
    history = generate(3_000, seed=11)
    async with consuming(settings, prefetch=100), consuming(settings, prefetch=100):
        await publish_and_catch_up(settings, history)
    await assert_reports_match(settings, history)


async def consumer_process(
    settings: ReportingSettings, prefetch: int = 200
) -> subprocess.Popen[bytes]:
    """`esctl consume reporting_svc` as its own process, once it is consuming."""
    port = free_port()
    env = {
        **os.environ,
        "REPORTING_DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        "REPORTING_CONSUMER_PORT": str(port),
        "REPORTING_CONSUMER_PREFETCH": str(prefetch),
        "LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [*ESCTL, "consume", "reporting_svc"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health/ready")).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the consumer exited while starting"
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("the consumer never became ready")


async def test_sigkill_mid_batch_then_restart_applies_every_event_once(
    settings: ReportingSettings,
) -> None:
    history = generate(10_000, seed=5)
    proc = await consumer_process(settings, prefetch=50)
    try:
        await publish(settings.amqp_url, history.bodies())
        async with await psycopg.AsyncConnection.connect(
            **connection_kwargs(settings.database_url), autocommit=True
        ) as conn:
            deadline = asyncio.get_running_loop().time() + 60
            while await applied(conn) < 1_000:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            killed_at = await applied(conn)
        assert killed_at < sum(history.last_position.values()), "killed too late to prove anything"
        proc = await consumer_process(settings)
        await wait_caught_up(settings, history)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    await assert_reports_match(settings, history)


async def applied(conn: psycopg.AsyncConnection[Any]) -> int:
    """Sum of the positions the live generation has applied (0 before the first batch)."""
    cur = await conn.execute("SELECT to_regclass('public.projection_generations') IS NOT NULL")
    exists = await cur.fetchone()
    if not (exists and exists[0]):
        return 0
    row = await (await conn.execute("SELECT live FROM projection_generations")).fetchone()
    if row is None:
        return 0
    cur = await conn.execute(
        psycopg.sql.SQL("SELECT coalesce(sum(position), 0) FROM {}").format(
            psycopg.sql.Identifier(row[0], "_positions")
        )
    )
    total = await cur.fetchone()
    return int(total[0]) if total else 0


async def test_an_event_parked_before_its_last_delivery_is_applied_once(
    settings: ReportingSettings,
) -> None:
    """The consumer parks a message near the delivery limit, then applies it: a later
    redelivery of it must still be a duplicate."""
    history = generate(40, seed=9)
    items = [
        IncomingEvent(env, event)
        for env in (Envelope.model_validate(e) for e in history.envelopes)
        if (event := validated(env)) is not None
    ]
    async with ProjectionStore(ReportingProjection(), settings.database_url) as store:
        await store.setup()
        await store.park(items[0].envelope, "delivery limit reached")
        assert await store.apply_batch(items) == ["applied"] * len(items)
        assert await store.apply_batch(items[:1]) == ["duplicate"]
        assert await store.parked_count() == 0
    await assert_reports_match(settings, history)


async def test_a_poison_event_does_not_swallow_the_good_ones_before_it_in_its_batch(
    settings: ReportingSettings,
) -> None:
    """Parking an event that fails its schema decides its position; the good events ahead
    of it in the same batch are applied first, not taken for duplicates and lost."""
    users = [uuid.uuid4() for _ in range(3)]

    def signup(n: int, position: int) -> tuple[str, str, bytes]:
        data = {"email": f"u{n}@example.com", "display_name": f"U{n}"}
        return envelope(
            "auth.account.registered", users[n], version=1, position=position, data=data
        )

    poison = envelope("auth.account.locked", users[0], version=2, position=3)  # no data
    async with consuming(settings):
        pass  # the queue, declared and bound
    await publish(settings.amqp_url, [signup(0, 1), signup(1, 2), poison, signup(2, 4)])
    async with consuming(settings) as consumer:  # one batch: all four are waiting
        await eventually(lambda: consumer.status.handled >= 3, what="the signups")
    assert sum(row[1] for row in read_report(settings.database_url, "signups").rows) == 3
    async with ProjectionStore(ReportingProjection(), settings.database_url) as store:
        assert await store.parked_count() == 1
