"""A replay over the native stream protocol against a raw AMQP 0.9.1 read of the same stream.

One temporary vhost. events.history is written as the relays write it (their messages: ids,
type, app id, position and traceparent headers; persistent): first STREAM_EVENTS (200,000)
in batches of 500 confirmed publishes, as relays catching up write it (large chunks). Then,
in every round, interleaved and on that same stream:

- (A) baseline: raw aio-pika from the first offset, no decoding, prefetch 1000, one
  multiple ack every 500 (shared/notes/performance.md);
- (B) `Replay` of reporting_svc, as `esctl replay` runs it (native protocol, its defaults),
  into a fresh database whose live generation holds the last position of each producer (as
  if its consumer had caught up), timed from the start to the swap;
- (C) raw rstream, no decoding (what the protocol gives before any work on the messages);
- (D) with BENCH_AMQP_REPLAY=1: the same replay over AMQP 0.9.1 (the fallback).

Target: B >= 1.5 x A. The live-written case follows on a second vhost: LIVE_EVENTS (20,000)
published one confirmed message at a time, so one message a chunk as the live relays write
it, read the same ways (A and B). Medians of ROUNDS (BENCH_ROUNDS, default 2) rounds; the
1,000,000-event estimate is B's median seconds x 5, extrapolated (said so in the output).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Sequence

import aio_pika
import psycopg
from psycopg import sql
from rstream import Consumer, ConsumerOffsetSpecification, MessageContext, OffsetType

from bench.harness import median, report, temp_database, temp_vhost
from reporting_svc.main import init_db
from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.amqp import declare_history_stream, declare_producer_exchange
from servicekit.eventstore import connection_kwargs
from servicekit.messages import message_for
from servicekit.native_stream import CREDIT, DEFAULT_STREAM_PORT, NativeHistory, StreamNode
from servicekit.replay import Replay
from shared_contracts.envelope import Envelope
from shared_contracts.names import HISTORY_STREAM, PRODUCER_EXCHANGES
from testbed.history import History, generate
from testbed.projections import live_generation

STREAM_EVENTS = int(os.environ.get("STREAM_EVENTS", "200000"))
LIVE_EVENTS = int(os.environ.get("LIVE_EVENTS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
AMQP_REPLAY = os.environ.get("BENCH_AMQP_REPLAY", "") == "1"  # (D), off by default
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def write_like_relays(amqp_url: str, history: History, *, batch: int) -> None:
    """The relays' messages, `batch` confirmed publishes at a time (1: one a chunk)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchanges = {
            name: await declare_producer_exchange(channel, name)
            for name in sorted(set(PRODUCER_EXCHANGES.values()))
        }
        pending = []
        for body in history.envelopes:
            envelope = Envelope.model_validate(body)
            exchange = exchanges[PRODUCER_EXCHANGES[envelope.producer]]
            message = message_for(envelope, TRACEPARENT)
            pending.append(exchange.publish(message, routing_key=envelope.event_type))
            if len(pending) >= batch:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)


async def raw_amqp(amqp_url: str, count: int) -> float:
    """(A) Seconds for aio-pika to receive `count` messages from the first offset."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        history = await declare_history_stream(channel)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if seen % 500 == 0 or seen == count:
                await message.ack(multiple=True)
            if seen == count:
                done.set()

        started = time.perf_counter()
        tag = await history.consume(on_message, arguments={"x-stream-offset": "first"})
        await done.wait()
        elapsed = time.perf_counter() - started
        await history.cancel(tag)
    return elapsed


async def raw_rstream(amqp_url: str, count: int) -> float:
    """(C) Seconds for rstream to receive `count` messages, undecoded, CREDIT chunks ahead."""
    node = StreamNode.of(amqp_url, DEFAULT_STREAM_PORT)
    consumer = Consumer(  # rstream as it comes: a credit a chunk, a callback a message
        node.host, node.port, username=node.username, password=node.password, vhost=node.vhost
    )
    done = asyncio.Event()
    seen = 0

    def on_message(_: bytes, __: MessageContext) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    await consumer.start()
    try:
        started = time.perf_counter()
        await consumer.subscribe(
            HISTORY_STREAM,
            on_message,
            decoder=lambda b: b,
            offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
            initial_credit=CREDIT,
        )
        await done.wait()
        return time.perf_counter() - started
    finally:
        await consumer.close()


def caught_up_live(db: str, history: History) -> None:
    """The live generation holds each producer's last position, as after its consumer
    caught up: the replay must read the whole stream before it may swap."""
    last: dict[str, dict[str, object]] = {}
    for envelope in history.envelopes:
        last[envelope["producer"]] = envelope
    with psycopg.connect(**connection_kwargs(db)) as conn:
        live = live_generation(conn, ReportingProjection.name)
        assert live is not None
        for producer, envelope in last.items():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (producer, position, event_id, occurred_at) "
                    "VALUES (%s, %s, %s, %s)"
                ).format(sql.Identifier(live, "_positions")),
                (producer, envelope["position"], envelope["event_id"], envelope["occurred_at"]),
            )


async def replay(amqp_url: str, history: History, *, native: bool) -> tuple[float, int, str]:
    """(B, D) Seconds from the start of a replay to its swap; events applied; protocol."""
    with temp_database(f"rs{uuid.uuid4().hex[:4]}") as db:
        await asyncio.to_thread(init_db, ReportingSettings(database_url=db))
        await asyncio.to_thread(caught_up_live, db, history)
        rebuild = Replay(
            ReportingProjection(),
            database_url=db,
            amqp_url=amqp_url,
            stream_port=DEFAULT_STREAM_PORT if native else None,
        )
        started = time.perf_counter()
        result = await rebuild.run(asyncio.Event())
        elapsed = time.perf_counter() - started
    assert result.swapped, "the replay did not swap"
    return elapsed, result.progress.applied, result.progress.protocol


def rate(count: int, seconds: list[float]) -> float:
    return round(count / median(seconds), 1)


async def measure(
    amqp_url: str, history: History, cases: Sequence[str], label: str
) -> dict[str, object]:
    count = len(history.envelopes)
    times: dict[str, list[float]] = {case: [] for case in cases}
    applied: dict[str, int] = {}
    for i in range(ROUNDS):
        for case in cases:
            if case == "raw_amqp":
                seconds = await raw_amqp(amqp_url, count)
            elif case == "raw_rstream":
                seconds = await raw_rstream(amqp_url, count)
            else:
                seconds, applied[case], protocol = await replay(
                    amqp_url, history, native=case == "replay_native"
                )
                expected = NativeHistory.protocol if case == "replay_native" else "AMQP 0.9.1"
                assert protocol == expected, f"{case} read over {protocol}"
            times[case].append(seconds)
            print(
                f"{label} round {i + 1} {case}: {seconds:.2f} s, {count / seconds:.0f}/s",
                file=sys.stderr,
                flush=True,
            )
    out: dict[str, object] = {f"{label}_events": count}
    for case in cases:
        out[f"{label}_{case}_per_s"] = rate(count, times[case])
        out[f"{label}_{case}_seconds"] = [round(s, 2) for s in times[case]]
    base = median(times["raw_amqp"])
    for case in cases:
        if case != "raw_amqp":
            out[f"{label}_{case}_ratio"] = round(base / median(times[case]), 3)
    for case, n in applied.items():
        out[f"{label}_{case}_applied"] = n
    return out


async def run() -> dict[str, object]:
    figures: dict[str, object] = {}
    with temp_vhost() as amqp_url:
        history = generate(STREAM_EVENTS, seed=31)
        started = time.perf_counter()
        await write_like_relays(amqp_url, history, batch=500)
        print(f"wrote {STREAM_EVENTS} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        cases: tuple[str, ...] = ("raw_amqp", "replay_native", "raw_rstream")
        if AMQP_REPLAY:  # about 4 minutes a round at 200,000 events
            cases += ("replay_amqp",)
        figures.update(await measure(amqp_url, history, cases, "batched"))
    with temp_vhost() as amqp_url:
        history = generate(LIVE_EVENTS, seed=32)
        started = time.perf_counter()
        await write_like_relays(amqp_url, history, batch=1)
        print(f"wrote {LIVE_EVENTS} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        figures.update(
            await measure(amqp_url, history, ("raw_amqp", "replay_native", "raw_rstream"), "live")
        )
    batched = figures["batched_replay_native_seconds"]
    assert isinstance(batched, list)
    million = median(batched) * 1_000_000 / STREAM_EVENTS
    return {
        "benchmark": f"replay of {STREAM_EVENTS} events over the native stream protocol vs a raw "
        "AMQP 0.9.1 read of the same stream (written in batches of 500); and written one "
        f"message a chunk ({LIVE_EVENTS} events)",
        "replay_stream_baseline_raw_amqp_per_s": figures["batched_raw_amqp_per_s"],
        "replay_stream_per_s": figures["batched_replay_native_per_s"],
        "replay_stream_ratio": figures["batched_replay_native_ratio"],
        **figures,
        "replay_1m_seconds_extrapolated": round(million, 1),
        "target": "replay_stream_ratio >= 1.5 (batched); the live-written case is reported",
    }


def main() -> None:
    report("replay_stream", asyncio.run(run()))


if __name__ == "__main__":
    main()
