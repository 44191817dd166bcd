"""The relay catching up a 20,000-event backlog, against raw aio-pika publishing with
confirms of the same messages in batches (same batch size, same broker, same run).

Target: >= 0.6 of the raw rate. Also measures append -> message-on-exchange latency at
100 events/s (target p99 <= 50 ms). Runs interleaved A B A B.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import aio_pika
import psycopg

from bench.harness import percentile, report, temp_database, temp_vhost, versus
from servicekit.eventstore import connection_kwargs, eventsourcing_env
from servicekit.messages import envelope_for
from servicekit.relay import Relay, create_relay_table
from testbed.producer import Member, MemberApp, to_contract

BACKLOG = 20_000
BATCH = 500
ROUNDS = 2
EXCHANGE = "bench.events"


def fill(app: MemberApp, count: int) -> None:
    for start in range(0, count, BATCH):
        app.save(*[Member.join(f"m{i}@example.com") for i in range(start, start + BATCH)])


async def raw_publish(amqp_url: str, bodies: list[bytes]) -> float:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        started = time.perf_counter()
        for i in range(0, len(bodies), BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key="auth.account.registered",
                        mandatory=False,
                    )
                    for b in bodies[i : i + BATCH]
                )
            )
        return len(bodies) / (time.perf_counter() - started)


def bench_relay(app: MemberApp, db: str, amqp_url: str, **options: int) -> Relay:
    return Relay(
        app,
        producer="bench",
        exchange=EXCHANGE,
        to_contract=to_contract,
        amqp_url=amqp_url,
        database_url=db,
        **options,
    )


async def relay_catch_up(app: MemberApp, db: str, amqp_url: str) -> float:
    with psycopg.connect(**connection_kwargs(db), autocommit=True) as conn:
        conn.execute("DELETE FROM relay_positions")
    latest = app.recorder.max_notification_id() or 0
    relay = bench_relay(app, db, amqp_url, batch_size=BATCH)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(relay.run(stop))
    while relay.status.position < latest:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    return latest / elapsed


async def latency_at_100_per_second(app: MemberApp, db: str, amqp_url: str) -> list[float]:
    """Seconds from app.save() returning to the message arriving at a subscriber."""
    relay = bench_relay(app, db, amqp_url)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    arrived: dict[str, float] = {}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived[json.loads(message.body)["data"]["email"]] = time.perf_counter()
            await message.ack()

        await queue.consume(on_message)
        while relay.status.role != "leader" or relay.status.position < (
            app.recorder.max_notification_id() or 0
        ):
            await asyncio.sleep(0.05)
        sent: dict[str, float] = {}
        for i in range(500):
            email = f"lat{i}@example.com"
            await asyncio.to_thread(app.save, Member.join(email))
            sent[email] = time.perf_counter()
            await asyncio.sleep(0.01)
        while len([e for e in sent if e in arrived]) < len(sent):
            await asyncio.sleep(0.01)
    stop.set()
    await task
    return [arrived[e] - sent[e] for e in sent]


async def run() -> dict[str, object]:
    with temp_database("relay") as db, temp_vhost() as amqp_url:
        MemberApp(env=eventsourcing_env(db, create_table=True)).close()
        create_relay_table(db)
        app = MemberApp(env=eventsourcing_env(db, pool_size=4))
        await asyncio.to_thread(fill, app, BACKLOG)
        # The baseline publishes the very bodies the relay publishes.
        notifications = app.recorder.select_notifications(start=1, limit=BACKLOG)

        bodies = []
        for n in notifications:
            event = app.mapper.to_domain_event(n)
            contract = to_contract(event)
            assert contract is not None
            bodies.append(envelope_for(event, n.id, contract).model_dump_json().encode())
        raw, relayed = [], []
        for _ in range(ROUNDS):
            raw.append(await raw_publish(amqp_url, bodies))
            relayed.append(await relay_catch_up(app, db, amqp_url))
        latencies = sorted(await latency_at_100_per_second(app, db, amqp_url))
        app.close()
    result: dict[str, object] = {
        "benchmark": f"relay catching up {BACKLOG} events vs raw aio-pika publish with confirms",
        **versus(
            ("baseline_events_per_s", raw),
            ("events_per_s", relayed),
            target="ratio >= 0.6; append->exchange p99 <= 50 ms at 100 events/s",
        ),
        "append_to_exchange_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "append_to_exchange_p99_ms": percentile(latencies, 0.99),
    }
    return result


def main() -> None:
    report("relay_backlog", asyncio.run(run()))


if __name__ == "__main__":
    main()
