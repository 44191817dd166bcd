"""events.history over RabbitMQ's native stream protocol (rstream), against AMQP 0.9.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit import stream
from servicekit.amqp import declare_history_stream, declare_producer_exchange
from servicekit.messages import RUN, RUN_FROM, RUN_PRODUCER, RUN_TO, message_for
from servicekit.native_stream import NativeHistory, history_reader, open_native
from servicekit.replay import Replay, ReplayResult
from shared_contracts.envelope import Envelope
from shared_contracts.names import PRODUCER_EXCHANGES
from testbed.history import History, generate, publish
from testbed.ports import free_port
from testbed.projections import (
    assert_reports_match,
    consuming,
    publish_and_catch_up,
    wait_caught_up,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> ReportingSettings:
    return ReportingSettings(database_url=make_database("rstream"), amqp_url=make_vhost())


async def publish_like_relays(amqp_url: str, history: History, *, batch: int) -> None:
    """The relays' messages (ids, type, app id, position and traceparent headers), confirmed
    in batches of `batch`: 500 like a relay catching up, 1 like a live one."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_history_stream(channel)  # bound to the exchanges by the consumer
        exchanges = {
            name: await declare_producer_exchange(channel, name)
            for name in set(PRODUCER_EXCHANGES.values())
        }
        messages = []
        for i, body in enumerate(history.envelopes):
            envelope = Envelope.model_validate(body)
            message = message_for(envelope, TRACEPARENT if i % 2 else None)
            if i % 7 == 0:  # a refill's headers: strings and integers
                message.headers.update(
                    {RUN: "run-1", RUN_FROM: 1, RUN_TO: 10**12, RUN_PRODUCER: envelope.producer}
                )
            messages.append((PRODUCER_EXCHANGES[envelope.producer], message, envelope.event_type))
        for start in range(0, len(messages), batch):
            await asyncio.gather(
                *(
                    exchanges[exchange].publish(message, routing_key=key)
                    for exchange, message, key in messages[start : start + batch]
                )
            )


def seen(messages: list[stream.HistoryMessage]) -> list[tuple[Any, ...]]:
    return [(m.offset, dict(m.headers), m.body, m.app_id, m.traceparent) for m in messages]


async def read_all(reader: stream.HistoryReader, start: stream.Start) -> list[Any]:
    return [m async for m in stream.scan(reader, start, None, idle=2.0)]


async def test_the_native_reader_gives_the_same_messages_and_offsets_as_amqp(
    settings: ReportingSettings,
) -> None:
    history = generate(1_200, seed=3)
    async with consuming(settings):  # declares the queues, binds events.history
        await publish_like_relays(settings.amqp_url, history.prefix(1_000), batch=500)
        await publish_like_relays(
            settings.amqp_url, History(history.envelopes[1_000:], {}), batch=1
        )  # tiny chunks at the end, one message each
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        amqp = stream.AmqpHistory(connection)
        native = await open_native(settings.amqp_url)
        try:
            assert native.protocol != amqp.protocol
            by_amqp = await read_all(amqp, "first")
            by_native = await read_all(native, "first")
            assert len(by_amqp) == len(history.envelopes)
            assert seen(by_native) == seen(by_amqp)
            assert [m.offset for m in by_native] == list(range(len(history.envelopes)))
            assert {m.app_id for m in by_native} == {"auth_svc", "user_svc"}
            assert by_native[7].headers[RUN_FROM] == 1 and by_native[7].headers[RUN] == "run-1"
            # From an offset inside a chunk, and the ends.
            assert seen(await read_all(native, 437)) == seen(by_amqp[437:])
            assert await stream.first_offset(native) == await stream.first_offset(amqp) == 0
            last = len(history.envelopes) - 1
            assert await stream.end_offset(native) == await stream.end_offset(amqp) == last
        finally:
            await native.close()


async def test_a_native_reader_tries_each_node_of_a_cluster_list(
    settings: ReportingSettings,
) -> None:
    history = generate(300, seed=5)
    async with consuming(settings):
        await publish_like_relays(settings.amqp_url, history, batch=100)
    dead = settings.amqp_url.replace("127.0.0.1", "192.0.2.1")  # refuses (TEST-NET-1)
    native = await open_native(f"{dead},{settings.amqp_url}")
    try:
        assert native.node.host == "127.0.0.1"
        assert len(await read_all(native, "first")) == len(history.envelopes)
    finally:
        await native.close()
    with pytest.raises(OSError):
        await open_native(f"{dead},{settings.amqp_url}", free_port())


async def test_a_stream_port_without_the_stream_is_another_brokers_and_not_used(
    make_vhost: Callable[[], str],
) -> None:
    """A private broker (no stream plugin) on a host whose own broker serves 5552: the port
    answers, for a vhost with no events.history. Reading there would fail or read another
    history; the reader refuses it, so replay falls back to AMQP."""
    empty = make_vhost()  # nothing declared: no events.history in it
    with pytest.raises(LookupError, match=r"no events\.history"):
        await open_native(empty)


async def rebuilt(settings: ReportingSettings, **options: Any) -> ReplayResult:
    replay = Replay(
        ReportingProjection(),
        database_url=settings.database_url,
        amqp_url=settings.amqp_url,
        batch_size=500,
        idle_seconds=0.5,
        stall_seconds=10,
        **options,
    )
    return await asyncio.wait_for(replay.run(asyncio.Event()), 180)


async def test_a_replay_over_the_native_protocol_rebuilds_the_live_reports(
    settings: ReportingSettings,
) -> None:
    history = generate(6_000, seed=12)
    bodies = history.bodies()
    async with consuming(settings, prefetch=200):
        await publish_and_catch_up(settings, history.prefix(4_000))
        replay = asyncio.create_task(rebuilt(settings))
        await publish(settings.amqp_url, bodies[4_000:])  # keeps arriving during the replay
        result = await replay
        assert result.swapped and not result.interrupted
        assert result.progress.protocol == NativeHistory.protocol
        assert result.progress.applied >= 4_000
        await wait_caught_up(settings, history)  # the live consumer applies the rest
    await assert_reports_match(settings, history)


async def test_with_the_stream_port_unreachable_replay_falls_back_to_amqp_and_says_so(
    settings: ReportingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    history = generate(2_000, seed=13)
    async with consuming(settings):
        await publish_and_catch_up(settings, history)
    closed = free_port()  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="servicekit.native_stream"):
        result = await rebuilt(settings, stream_port=closed)
    assert result.swapped
    assert result.progress.protocol == stream.AmqpHistory.protocol
    warnings = [r for r in caplog.records if r.name == "servicekit.native_stream"]
    assert len(warnings) == 1
    assert "slower" in warnings[0].getMessage()
    assert "rabbitmq_stream" in warnings[0].getMessage()
    await assert_reports_match(settings, history)
    async with history_reader(settings.amqp_url, closed) as (reader, _):
        assert reader.protocol == stream.AmqpHistory.protocol
