"""Webhook fan-out to 10 local endpoints, against raw httpx POSTs to the same endpoints.

Target: >= 0.6 of the raw rate. The fan-out is measured end to end: events published to
RabbitMQ, consumed by integration_svc (one delivery intent per event and endpoint, in the
projection's transaction), claimed by the dispatcher, signed, POSTed (SSRF check and pinned
address included) and marked delivered. The baseline POSTs the same number of bodies to the
same receivers with the same concurrency (10 clients x ENDPOINT_CONCURRENCY), nothing else.
The receivers run in their own process. Runs interleaved A B A B.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg

from bench.harness import free_port, median, temp_database, temp_vhost, write_result
from integration_svc import endpoints
from integration_svc.endpoints import Endpoint
from integration_svc.main import IntegrationWorker, init_db
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import new_secret
from servicekit.eventstore import connection_kwargs
from tests.support.effects import envelope
from tests.support.history import publish

ENDPOINTS = 10
EVENTS = 1000  # per round: 10,000 deliveries
ROUNDS = int(__import__("os").environ.get("BENCH_ROUNDS", "3"))
ENDPOINT_CONCURRENCY = 8


@contextlib.contextmanager
def receivers(ports: list[int]) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.receiver", *map(str, ports)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def raw_posts(urls: list[str], bodies: list[bytes]) -> float:
    """POST every body to every URL, ENDPOINT_CONCURRENCY at a time per URL."""

    async def one_endpoint(url: str) -> None:
        async with httpx.AsyncClient(
            limits=httpx.Limits(max_connections=ENDPOINT_CONCURRENCY), trust_env=False
        ) as client:
            pending = iter(bodies)

            async def worker() -> None:
                for body in pending:
                    response = await client.post(
                        url, content=body, headers={"content-type": "application/json"}
                    )
                    response.raise_for_status()

            await asyncio.gather(*(worker() for _ in range(ENDPOINT_CONCURRENCY)))

    started = time.perf_counter()
    await asyncio.gather(*(one_endpoint(url) for url in urls))
    return len(urls) * len(bodies) / (time.perf_counter() - started)


async def fan_out(worker: IntegrationWorker, amqp_url: str, round_: int) -> float:
    messages = [
        envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=p)
        for p in range(round_ * EVENTS + 1, (round_ + 1) * EVENTS + 1)
    ]
    before = worker.dispatcher.status.delivered
    started = time.perf_counter()
    await publish(amqp_url, messages)
    while worker.dispatcher.status.delivered - before < EVENTS * ENDPOINTS:
        await asyncio.sleep(0.005)
    return EVENTS * ENDPOINTS / (time.perf_counter() - started)


async def run() -> dict[str, object]:
    ports = [free_port() for _ in range(ENDPOINTS)]
    urls = [f"http://127.0.0.1:{port}/hook" for port in ports]
    with temp_database("integration") as db, temp_vhost() as amqp_url, receivers(ports):
        settings = IntegrationSettings(
            database_url=db,
            amqp_url=amqp_url,
            allow_loopback=True,
            endpoint_concurrency=ENDPOINT_CONCURRENCY,
            endpoint_rate_per_second=100_000,  # a policy, not what is measured here
            consumer_prefetch=500,
            log_level="WARNING",
        )
        await asyncio.to_thread(init_db, settings)
        with psycopg.connect(**connection_kwargs(db), autocommit=True) as conn:
            for i, url in enumerate(urls):
                endpoints.add(conn, Endpoint(f"ep{i}", url, ("#",), new_secret()))
        sample = [
            envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=1)[2]
        ] * EVENTS
        worker = IntegrationWorker(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        while not worker.ready():
            await asyncio.sleep(0.05)
        await raw_posts(urls, sample[:50])  # warm both paths up
        raw, fanned = [], []
        for round_ in range(ROUNDS):
            raw.append(await raw_posts(urls, sample))
            fanned.append(await fan_out(worker, amqp_url, round_))
        stop.set()
        await task
        with psycopg.connect(**connection_kwargs(db)) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) "
                "FROM webhook_deliveries"
            ).fetchone()
        assert row is not None and row[0] == row[1] == ROUNDS * EVENTS * ENDPOINTS, row
    return {
        "benchmark": f"webhook fan-out of {EVENTS} events to {ENDPOINTS} local endpoints "
        "(publish -> delivered) vs raw httpx POSTs of the same count",
        "baseline_posts_per_s": median(raw),
        "deliveries_per_s": median(fanned),
        "ratio": round(median(fanned) / median(raw), 3),
        "rounds": {"raw": [round(r, 1) for r in raw], "fan_out": [round(f, 1) for f in fanned]},
        "target": "ratio >= 0.6",
    }


def main() -> None:
    result = asyncio.run(run())
    write_result("webhooks", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
