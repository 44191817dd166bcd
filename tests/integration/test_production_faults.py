"""The guarantees under the faults a live system meets: writes that never stop, connections
lost again and again, events retried out of order, swaps under a reader's feet.

Real PostgreSQL and RabbitMQ, each test on its own database and vhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import psycopg
import pytest

from notify_svc.intents import claim
from notify_svc.main import init_db as init_notify
from notify_svc.projection import NotificationProjection
from notify_svc.settings import NotifySettings
from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit import amqp
from servicekit.amqp import declare_producer_exchange
from servicekit.eventstore import connection_kwargs
from servicekit.messages import IncomingEvent, validated
from servicekit.projection import ProjectionStore, Transaction
from servicekit.replay import Progress
from shared_contracts.envelope import Envelope
from shared_contracts.names import dead_letter_queue, live_queue
from testbed.events import envelope as one_envelope
from testbed.events import eventually
from testbed.history import generate, publish
from testbed.projections import (
    assert_reports_match,
    consuming,
    publish_and_catch_up,
    rebuild,
    wait_caught_up,
)

DELIVERY_LIMIT = 3  # testbed.projections.consuming's


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> ReportingSettings:
    return ReportingSettings(database_url=make_database("faults"), amqp_url=make_vhost())


def vhost_of(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url.split(",", maxsplit=1)[0]).path.lstrip("/")) or "/"


def close_all_connections(amqp_url: str) -> None:
    """A flap on demand: the broker closes every client connection of the vhost."""
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost_of(amqp_url), "test flap"],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await amqp.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def take_without_acking(amqp_url: str, queue: str, count: int) -> int:
    """A stand-in consumer: receive `count` deliveries, ack none, lose the connection.

    Returns the highest `x-delivery-count` seen (the broker's count of earlier deliveries).
    """
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await amqp.connect(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=count)
    declared = await channel.declare_queue(queue, passive=True)

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received.append(message)

    await declared.consume(keep, no_ack=False)
    await eventually(lambda: len(received) >= count, timeout=30, what="the stand-in's deliveries")
    close_all_connections(amqp_url)  # the connection goes away with every message unacked
    with contextlib.suppress(Exception):
        await connection.close()
    return max(int((m.headers or {}).get("x-delivery-count", 0) or 0) for m in received)


async def test_connection_losses_past_the_delivery_limit_during_a_backlog_dead_letter_nothing(
    settings: ReportingSettings,
) -> None:
    """Every lost connection raises the broker's delivery count of every unacked message;
    only handler failures may count toward the poison limit."""
    history = generate(1_200, seed=31)
    async with consuming(settings, prefetch=200):  # declares the queue, then steps aside
        pass
    await publish(settings.amqp_url, history.bodies())
    queue = live_queue(ReportingProjection.name)
    highest = 0
    for _ in range(2 * DELIVERY_LIMIT + 1):
        highest = await take_without_acking(settings.amqp_url, queue, len(history.envelopes))
    assert highest >= 2 * DELIVERY_LIMIT  # the broker counted every one of those losses
    async with consuming(settings, prefetch=200):
        await wait_caught_up(settings, history)
        for _ in range(2 * DELIVERY_LIMIT):  # and more losses while it catches up
            close_all_connections(settings.amqp_url)
            await asyncio.sleep(0.3)
        await wait_caught_up(settings, history)
    assert await queue_depth(settings.amqp_url, dead_letter_queue(ReportingProjection.name)) == 0
    await assert_reports_match(settings, history)


def applied_items(history_envelopes: Sequence[dict[str, Any]]) -> list[IncomingEvent]:
    items = []
    for raw in history_envelopes:
        env = Envelope.model_validate(raw)
        event = validated(env)
        assert event is not None
        items.append(IncomingEvent(env, event))
    return items


def profile_events(user: uuid.UUID, bios: Sequence[str]) -> list[IncomingEvent]:
    """user.profile.created (v1) then one update per further bio, each the whole profile."""
    raw = []
    for version, bio in enumerate(bios, start=1):
        kind = "user.profile.created" if version == 1 else "user.profile.updated"
        data: dict[str, Any] = {"email": None, "display_name": f"name-{version}", "bio": bio}
        data.update(locale=f"l{version}", timezone=None, avatar_url=None)
        if version > 1:
            data["changed"] = ["bio"]
        raw.append(
            json.loads(one_envelope(kind, user, version=version, position=version, data=data)[2])
        )
    return applied_items(raw)


async def test_an_old_profile_update_retried_after_newer_ones_keeps_the_newer_state(
    settings: ReportingSettings, make_database: Callable[[str], str]
) -> None:
    user = uuid.uuid4()
    created, v2, v3, v4 = profile_events(user, ["a", "", "c", "d"])  # v2 clears the bio
    notify = NotifySettings(database_url=make_database("notify_versions"))
    await asyncio.to_thread(init_notify, notify)
    for projection, url in (
        (ReportingProjection(), settings.database_url),
        (NotificationProjection(), notify.database_url),
    ):
        async with ProjectionStore(projection, url) as store:
            await store.setup()
            assert await store.apply_batch([created]) == ["applied"]
            assert await store.park(v2.envelope, "handler failed: simulated")  # poison, for now
            assert await store.apply_batch([v3, v4]) == ["applied", "applied"]
            # `esctl dlq retry` brings v2 back after the fix: applied, but older than v4.
            assert await store.apply_batch([v2]) == ["applied"]
            assert await store.apply_batch([v2]) == ["duplicate"]
            assert await store.parked_count() == 0
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        row = conn.execute(
            "SELECT bio, locale, version FROM reporting_svc_g1.profiles WHERE user_id = %s",
            (user,),
        ).fetchone()
    assert row == (True, True, 4)  # v4 has a bio; v2 (no bio) did not overwrite it
    with psycopg.connect(**connection_kwargs(notify.database_url)) as conn:
        row = conn.execute(
            "SELECT display_name, locale, profile_version FROM notify_svc_g1.recipients "
            "WHERE user_id = %s",
            (user,),
        ).fetchone()
    assert row == ("name-4", "l4", 4)


async def test_an_applied_event_is_never_parked_and_a_parked_one_is_applied_once(
    settings: ReportingSettings,
) -> None:
    items = applied_items(generate(30, seed=5).envelopes)
    async with ProjectionStore(ReportingProjection(), settings.database_url) as store:
        await store.setup()
        assert await store.apply_batch(items[:10]) == ["applied"] * 10
        # A redelivery of an applied event near any delivery limit: nothing to park.
        assert not await store.park(items[3].envelope, "delivery limit reached")
        assert await store.parked_count() == 0
        assert await store.park(items[10].envelope, "handler failed")  # above the position
        assert await store.apply_batch(items[11:]) == ["applied"] * (len(items) - 11)
        assert await store.apply_batch([items[3], items[10]]) == ["duplicate", "applied"]
        assert await store.apply_batch([items[10]]) == ["duplicate"]
        assert await store.parked_count() == 0


async def test_crashed_handlings_are_counted_only_for_undecided_events(
    settings: ReportingSettings,
) -> None:
    items = applied_items(generate(12, seed=6).envelopes)
    envelopes = [i.envelope for i in items]
    async with ProjectionStore(ReportingProjection(), settings.database_url) as store:
        await store.setup()
        await store.apply_batch(items[:6])
        counted = await store.attempts(envelopes, count=True)
        assert set(counted) == {e.event_id for e in envelopes[6:]}  # applied ones: not counted
        assert set(counted.values()) == {1}
        assert await store.attempts(envelopes[6:8], count=True) == {
            e.event_id: 2 for e in envelopes[6:8]
        }
        await store.apply_batch(items[6:])
        assert await store.attempts(envelopes, count=True) == {}  # decided now
        assert await store.attempts(envelopes, count=False) == {}  # and cleaned up


async def paced(
    amqp_url: str, bodies: list[tuple[str, str, bytes]], rate: float, stop: asyncio.Event
) -> int:
    """Publish `bodies` at `rate` per second until `stop`; how many were sent. Stopped, never
    cancelled: a publish cancelled half-way may still reach the broker uncounted."""
    sent = 0
    connection = await amqp.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchanges = {
            name: await declare_producer_exchange(channel, name) for name in {b[0] for b in bodies}
        }
        for exchange, key, body in bodies:
            if stop.is_set():
                break
            await exchanges[exchange].publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=key,
            )
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / rate)
    finally:
        await connection.close()
    return sent


@contextlib.asynccontextmanager
async def writes_that_never_stop(
    amqp_url: str, bodies: list[tuple[str, str, bytes]], rate: float = 20.0
) -> AsyncIterator[asyncio.Task[int]]:
    stop = asyncio.Event()
    task = asyncio.create_task(paced(amqp_url, bodies, rate, stop))
    try:
        yield task
    finally:
        stop.set()
        await task


async def test_replay_swaps_within_seconds_of_the_live_edge_while_writes_never_stop(
    settings: ReportingSettings,
) -> None:
    history = generate(6_000, seed=41)
    bodies = history.bodies()
    async with consuming(settings, prefetch=200):
        await publish_and_catch_up(settings, history.prefix(5_000))
        async with writes_that_never_stop(settings.amqp_url, bodies[5_000:]) as writes:
            await asyncio.sleep(1)
            edge: list[float] = []
            loop = asyncio.get_running_loop()

            def progress(p: Progress) -> None:
                if not edge and p.end >= 0 and p.offset >= 5_000 and not p.behind:
                    edge.append(loop.time())

            result = await rebuild(
                ReportingProjection(),
                settings,
                timeout=60,
                idle_seconds=0.5,
                stall_seconds=10,
                on_progress=progress,
            )
            swapped_at = loop.time()
            assert not writes.done()  # the writes were still going on at the swap
        assert result.swapped
        assert edge and swapped_at - edge[0] <= 10
        sent = writes.result()
        caught = history.prefix(5_000 + sent)
        await wait_caught_up(settings, caught)
    await assert_reports_match(settings, caught)


class Refusing(NotificationProjection):
    """notify_svc's projection, unable to apply one chosen event while `broken`."""

    def __init__(self, poison: uuid.UUID) -> None:
        super().__init__()
        self.poison = poison
        self.broken = True

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        if self.broken and any(e.envelope.event_id == self.poison for e in events):
            raise RuntimeError("cannot apply this event (simulated bug)")
        await super().apply(tx, events)


def welcome_intents(settings: NotifySettings) -> list[tuple[Any, ...]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        return conn.execute(
            "SELECT event_id FROM mail_intents WHERE effect = 'welcome' ORDER BY event_id"
        ).fetchall()


async def test_a_replay_applies_an_event_parked_in_the_live_generation_as_new(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> None:
    """Its welcome mail was never recorded: the replay records it, once, and a later
    `dlq retry` of it is a duplicate in the new generation."""
    notify = NotifySettings(database_url=make_database("notify_parked"), amqp_url=make_vhost())
    await asyncio.to_thread(init_notify, notify)
    users = [uuid.uuid4() for _ in range(5)]
    bodies = [
        one_envelope(
            "auth.account.registered", u, version=1, position=i + 1, data={"email": f"u{i}@x.io"}
        )
        for i, u in enumerate(users)
    ]
    poison = uuid.UUID(json.loads(bodies[2][2])["event_id"])
    projection = Refusing(poison)
    as_reporting = ReportingSettings(database_url=notify.database_url, amqp_url=notify.amqp_url)
    async with consuming(as_reporting, prefetch=10, projection=projection):
        await publish(notify.amqp_url, bodies)
        await eventually(
            lambda: len(welcome_intents(notify)) == 4, what="the healthy registrations' intents"
        )
        await eventually(
            lambda: queue_depth(notify.amqp_url, dead_letter_queue(NotificationProjection.name)),
            what="the poison in the DLQ",
        )
        projection.broken = False  # fixed; the replay rebuilds from events.history
        result = await rebuild(NotificationProjection(), notify, idle_seconds=0.3, stall_seconds=5)
        assert result.swapped
        assert [r[0] for r in welcome_intents(notify)] == sorted(
            uuid.UUID(json.loads(b[2])["event_id"]) for b in bodies
        )
        # The operator retries the dead letter after the swap: a duplicate now.
        connection = await amqp.connect(notify.amqp_url)
        async with connection:
            channel = await connection.channel()
            dlq = await channel.declare_queue(
                dead_letter_queue(NotificationProjection.name), passive=True
            )
            letter = await dlq.get(timeout=5)
            assert letter is not None
            await channel.default_exchange.publish(
                aio_pika.Message(letter.body), routing_key=live_queue(NotificationProjection.name)
            )
            await letter.ack()
        await asyncio.sleep(1)
    assert len(welcome_intents(notify)) == len(users)  # each exactly once
    async with ProjectionStore(NotificationProjection(), notify.database_url) as store:
        assert await store.parked_count() == 0


async def test_a_swap_never_drops_the_recipients_under_the_mail_dispatchers_claim(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> None:
    notify = NotifySettings(database_url=make_database("notify_swaps"), amqp_url=make_vhost())
    await asyncio.to_thread(init_notify, notify)
    users = [uuid.uuid4() for _ in range(50)]
    await publish(
        notify.amqp_url,
        [
            one_envelope("auth.account.registered", u, version=1, position=i + 1)
            for i, u in enumerate(users)
        ],
    )
    with psycopg.connect(**connection_kwargs(notify.database_url), autocommit=True) as conn:
        for user in users[:20]:  # due intents, so that every claim reads the recipients
            conn.execute(
                "INSERT INTO mail_intents (event_id, effect, user_id, event_type, context, "
                "message_id) VALUES (%s, 'welcome', %s, 'auth.account.registered', '{}', 'm')",
                (uuid.uuid4(), user),
            )
    stop = asyncio.Event()
    claims = 0

    async def claim_forever() -> None:
        nonlocal claims
        async with await psycopg.AsyncConnection.connect(
            **connection_kwargs(notify.database_url), autocommit=True
        ) as conn:
            while not stop.is_set():
                await claim(conn, NotificationProjection.name, limit=10, lease=0.001)
                claims += 1

    claimer = asyncio.create_task(claim_forever())
    try:
        for _ in range(4):
            swap = await rebuild(
                NotificationProjection(), notify, idle_seconds=0.2, stall_seconds=5
            )
            assert swap.swapped
            assert not claimer.done(), claimer.exception()
    finally:
        stop.set()
        await claimer  # raises if a claim failed (UndefinedTable before the fix)
    assert claims > 0
