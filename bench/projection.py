"""reporting_svc's projection against raw aio-pika, in the same run (interleaved A B A B).

1. Catching up a 50,000-event backlog in `reporting_svc.q`, against raw aio-pika consuming
   the same bodies from a quorum queue with the same arguments, acking each message.
   Target: >= 0.6 of the raw rate.
2. Replaying 50,000 events from `events.history` into a fresh generation, against raw
   consumption of the same stream from its first offset. Target: >= 0.6.
3. End to end at 100 events/s: `POST /auth/register` -> auth_svc's store -> relay -> exchange
   -> queue -> projection committed, against raw publish -> consume on the same broker.
   Target: p99 <= 60 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx

from bench.harness import (
    median,
    percentile,
    process,
    report,
    temp_database,
    temp_vhost,
    uvicorn_argv,
)
from reporting_svc.main import init_db
from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.amqp import declare_consumer_queues
from servicekit.consumer import Consumer, ProjectionHandler
from servicekit.messages import IncomingEvent, Outcome
from servicekit.process import run_projection
from servicekit.projection import ProjectionStore
from servicekit.replay import Progress, Replay
from testbed.cli import ESCTL
from testbed.history import generate, publish
from testbed.ports import free_port

EVENTS = 50_000
ROUNDS = 2
PREFETCH = 1000
WARM_UP = 200  # registrations sent before measuring end-to-end latency


async def raw_queue_consume(amqp_url: str, bodies: Sequence[tuple[str, str, bytes]]) -> float:
    """Raw aio-pika: a quorum queue like ours, the same bodies, one ack per message."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        name = f"raw-{uuid.uuid4().hex[:6]}"
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-single-active-consumer": True},
        )
        await publish_to_queue(channel, name, [b for _, _, b in bodies])
        elapsed = await seconds_to_ack(queue, len(bodies))
        await queue.delete(if_unused=False, if_empty=False)
    return len(bodies) / elapsed


async def seconds_to_ack(queue: aio_pika.abc.AbstractQueue, count: int, **consume: Any) -> float:
    """Seconds from subscribing to `queue` to having acked `count` messages, one by one."""
    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen == count:
            done.set()

    started = time.perf_counter()
    await queue.consume(on_message, **consume)
    await done.wait()
    return time.perf_counter() - started


async def publish_to_queue(
    channel: aio_pika.abc.AbstractChannel, queue: str, bodies: list[bytes]
) -> None:
    for i in range(0, len(bodies), 1000):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue,
                )
                for b in bodies[i : i + 1000]
            )
        )


async def projection_catch_up(amqp_url: str, bodies: Sequence[tuple[str, str, bytes]]) -> float:
    """The reporting projection draining the same backlog from its own queue."""
    with temp_database(f"catchup{uuid.uuid4().hex[:4]}") as db:
        settings = ReportingSettings(database_url=db, amqp_url=amqp_url)
        await asyncio.to_thread(init_db, settings)
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            service = f"bench_{uuid.uuid4().hex[:6]}"
            queue = await declare_consumer_queues(channel, service, ReportingProjection.bindings)
            await publish(amqp_url, list(bodies))
            store = ProjectionStore(ReportingProjection(), db)
            consumer = Consumer(
                service=service,
                amqp_url=amqp_url,
                bindings=ReportingProjection.bindings,
                handler=ProjectionHandler(store),
                prefetch=PREFETCH,
                batch_size=PREFETCH,
            )
            stop = asyncio.Event()
            started = time.perf_counter()
            task = asyncio.create_task(run_projection(consumer, store, stop))
            while consumer.status.handled < len(bodies):
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            await queue.delete(if_unused=False, if_empty=False)
    return len(bodies) / elapsed


async def raw_stream_consume(amqp_url: str, count: int) -> float:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2 * PREFETCH)
        stream = await channel.declare_queue(
            "events.history", durable=True, arguments={"x-queue-type": "stream"}
        )
        return count / await seconds_to_ack(stream, count, arguments={"x-stream-offset": "first"})


async def replay_rate(amqp_url: str, count: int) -> float:
    with temp_database(f"replay{uuid.uuid4().hex[:4]}") as db:
        await asyncio.to_thread(init_db, ReportingSettings(database_url=db))
        stop = asyncio.Event()
        finished: list[float] = []

        def on_progress(p: Progress) -> None:
            if p.applied >= count and not finished:
                finished.append(time.perf_counter())
                stop.set()

        rebuild = Replay(
            ReportingProjection(),
            database_url=db,
            amqp_url=amqp_url,
            batch_size=PREFETCH,
            on_progress=on_progress,
        )
        started = time.perf_counter()
        await rebuild.run(stop)
        return count / (finished[0] - started)


class Timed(ProjectionHandler):
    """Notes when each registration's batch has committed."""

    def __init__(self, store: ProjectionStore, committed: dict[str, float]) -> None:
        super().__init__(store)
        self.committed = committed
        self.handed: dict[str, float] = {}  # when the batch reached the handler

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]:
        handed = time.perf_counter()
        outcomes = await super().handle(events)
        now = time.perf_counter()
        for item in events:
            user = str(item.event.user_id)  # type: ignore[attr-defined]
            self.committed[user] = now
            self.handed.setdefault(user, handed)
        return outcomes


@dataclass
class Stages:
    """Seconds per registration: the whole chain, and where the time went."""

    total: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)  # request sent -> 201 received
    delivery: list[float] = field(default_factory=list)  # 201 -> batch handed to projection
    apply: list[float] = field(default_factory=list)  # handed -> committed


async def end_to_end(amqp_url: str, seconds: int = 10) -> Stages:
    """POST /auth/register at 100/s; seconds from sending the request to the commit."""
    from auth_svc.main import init_db as init_auth
    from testbed.auth import cheap_auth_settings

    with temp_database("e2eauth") as auth_db, temp_database("e2erep") as rep_db:
        await asyncio.to_thread(init_auth, cheap_auth_settings(auth_db))
        settings = ReportingSettings(database_url=rep_db, amqp_url=amqp_url)
        await asyncio.to_thread(init_db, settings)
        port, relay_port = free_port(), free_port()
        env = {
            "AUTH_DATABASE_URL": auth_db,
            "AUTH_ARGON2_TIME_COST": "1",
            "AUTH_ARGON2_MEMORY_KIB": "1024",
            "AUTH_RELAY_PORT": str(relay_port),
            "AMQP_URL": amqp_url,
            "LOG_LEVEL": "WARNING",
        }
        committed: dict[str, float] = {}
        store = ProjectionStore(ReportingProjection(), rep_db)
        timed = Timed(store, committed)
        consumer = Consumer(
            service="reporting_svc",
            amqp_url=amqp_url,
            bindings=ReportingProjection.bindings,
            handler=timed,
            prefetch=PREFETCH,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_projection(consumer, store, stop))
        while consumer.status.role != "consuming":
            await asyncio.sleep(0.05)
        with (
            process(
                uvicorn_argv("auth_svc.main:create_app", port),
                env,
                f"http://127.0.0.1:{port}/health/ready",
            ),
            process(
                [*ESCTL, "relay", "auth_svc"],
                env,
                f"http://127.0.0.1:{relay_port}/health/ready",
            ),
        ):
            sent: dict[str, float] = {}
            answered: dict[str, float] = {}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

                async def register(i: int) -> None:
                    started = time.perf_counter()
                    r = await client.post(
                        "/auth/register",
                        json={"email": f"e2e{i}@example.com", "password": "long enough pw"},
                    )
                    r.raise_for_status()
                    user = r.json()["user_id"]
                    answered[user] = time.perf_counter()
                    sent[user] = started

                async def at_100_per_second(first: int, count: int) -> None:
                    tasks = []
                    for i in range(first, first + count):
                        tasks.append(asyncio.create_task(register(i)))
                        await asyncio.sleep(0.01)
                    await asyncio.gather(*tasks)

                # Warm-up, not measured: pools fill, caches load, code paths get hot.
                await at_100_per_second(0, WARM_UP)
                while not set(sent) <= set(committed):
                    await asyncio.sleep(0.01)
                sent.clear()
                await at_100_per_second(WARM_UP, 100 * seconds)
            deadline = time.perf_counter() + 30
            while not set(sent) <= set(committed) and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
        stop.set()
        await task
    stages = Stages()
    for user, started in sent.items():
        if user in committed:
            stages.total.append(committed[user] - started)
            stages.http.append(answered[user] - started)
            stages.delivery.append(timed.handed[user] - answered[user])
            stages.apply.append(committed[user] - timed.handed[user])
    return stages


async def raw_latency(amqp_url: str, count: int = 1000) -> list[float]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        arrived: dict[int, float] = {}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived[int(message.body)] = time.perf_counter()
            await message.ack()

        await queue.consume(on_message)
        sent: dict[int, float] = {}
        for i in range(count):
            sent[i] = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )
            await asyncio.sleep(0.01)
        while len(arrived) < count:
            await asyncio.sleep(0.01)
    return [arrived[i] - sent[i] for i in sent]


def stage_percentiles(stages: Stages) -> dict[str, dict[str, float]]:
    return {
        name: {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99)}
        for name, values in (
            ("http", stages.http),
            ("relay_broker_consumer", stages.delivery),
            ("apply_commit", stages.apply),
        )
    }


async def e2e_only() -> dict[str, object]:
    with temp_vhost() as amqp_url:
        raw_lat = await raw_latency(amqp_url)
        e2e = await end_to_end(amqp_url)
    return {
        "benchmark": "reporting projection: e2e at 100/s",
        **e2e_figures(raw_lat, e2e),
    }


def e2e_figures(raw_lat: list[float], e2e: Stages) -> dict[str, object]:
    return {
        "e2e_baseline_raw_publish_consume_p50_ms": round(statistics.median(raw_lat) * 1000, 2),
        "e2e_baseline_raw_publish_consume_p99_ms": percentile(raw_lat, 0.99),
        "e2e_http_to_read_model_p50_ms": round(statistics.median(e2e.total) * 1000, 2),
        "e2e_http_to_read_model_p99_ms": percentile(e2e.total, 0.99),
        "e2e_stages": stage_percentiles(e2e),
        "e2e_events": len(e2e.total),
    }


async def run() -> dict[str, object]:
    history = generate(EVENTS, seed=99)
    bodies = history.bodies()
    raw_q, proj_q, raw_s, replayed = [], [], [], []
    with temp_vhost() as amqp_url:
        for _ in range(ROUNDS):
            raw_q.append(await raw_queue_consume(amqp_url, bodies))
            proj_q.append(await projection_catch_up(amqp_url, bodies))
    with temp_vhost() as amqp_url:
        await publish(amqp_url, bodies)  # into events.history (bound to both exchanges)
        for _ in range(ROUNDS):
            raw_s.append(await raw_stream_consume(amqp_url, len(bodies)))
            replayed.append(await replay_rate(amqp_url, len(bodies)))
    with temp_vhost() as amqp_url:
        raw_lat = await raw_latency(amqp_url)
        e2e = await end_to_end(amqp_url)
    return {
        "benchmark": f"reporting projection: {EVENTS} backlog, replay of {EVENTS}, e2e at 100/s",
        "catch_up_baseline_raw_consume_per_s": median(raw_q),
        "catch_up_events_per_s": median(proj_q),
        "catch_up_ratio": round(median(proj_q) / median(raw_q), 3),
        "replay_baseline_raw_stream_per_s": median(raw_s),
        "replay_events_per_s": median(replayed),
        "replay_ratio": round(median(replayed) / median(raw_s), 3),
        **e2e_figures(raw_lat, e2e),
        "target": "catch-up and replay ratios >= 0.6; end-to-end p99 <= 60 ms",
    }


def main() -> None:
    """`python -m bench.projection` runs all three; `... e2e` only the end-to-end latency."""
    if sys.argv[1:] == ["e2e"]:
        print(json.dumps(asyncio.run(e2e_only())))
        return
    report("projection", asyncio.run(run()))


if __name__ == "__main__":
    main()
