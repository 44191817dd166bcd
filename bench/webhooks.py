"""Webhook fan-out to 10 local endpoints, against raw httpx POSTs to the same endpoints.

Target: >= 0.6 of the raw rate. The fan-out is measured end to end: events published to
RabbitMQ, consumed by integration_svc (one delivery intent per event and endpoint, in the
projection's transaction), claimed by the dispatcher, signed, POSTed (SSRF check and pinned
address included) and marked delivered. integration_svc runs as in production: its own
process (`esctl consume integration_svc`, on uvloop); its /status gives the count delivered.
The baseline POSTs the same number of bodies to the same receivers with the same concurrency
(10 clients x ENDPOINT_CONCURRENCY), nothing else, from one process on uvloop too. The
receivers run in their own process. Runs interleaved A B A B.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg

from bench.harness import process, report, temp_database, temp_vhost, versus
from integration_svc import endpoints
from integration_svc.endpoints import Endpoint
from integration_svc.main import init_db
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import new_secret
from servicekit.eventstore import connection_kwargs
from servicekit.process import run_on_uvloop
from testbed.cli import ESCTL
from testbed.events import envelope
from testbed.history import publish
from testbed.ports import free_port

ENDPOINTS = 10
EVENTS = 1000  # per round: 10,000 deliveries
ROUNDS = int(__import__("os").environ.get("BENCH_ROUNDS", "5"))
ENDPOINT_CONCURRENCY = 8


@contextlib.contextmanager
def receivers(ports: list[int]) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.receiver", *map(str, ports)],
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


async def delivered(status: httpx.AsyncClient) -> int:
    count: int = (await status.get("/status")).json()["dispatcher"]["delivered"]
    return count


async def fan_out(status: httpx.AsyncClient, amqp_url: str, round_: int) -> float:
    messages = [
        envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=p)
        for p in range(round_ * EVENTS + 1, (round_ + 1) * EVENTS + 1)
    ]
    before = await delivered(status)
    started = time.perf_counter()
    await publish(amqp_url, messages)
    while await delivered(status) - before < EVENTS * ENDPOINTS:
        await asyncio.sleep(0.02)
    return EVENTS * ENDPOINTS / (time.perf_counter() - started)


async def run() -> dict[str, object]:
    ports = [free_port() for _ in range(ENDPOINTS)]
    urls = [f"http://127.0.0.1:{port}/hook" for port in ports]
    with temp_database("integration") as db, temp_vhost() as amqp_url, receivers(ports):
        consumer_port = free_port()
        env = {
            "INTEGRATION_DATABASE_URL": db,
            "AMQP_URL": amqp_url,
            "INTEGRATION_ALLOW_LOOPBACK": "true",
            "INTEGRATION_ENDPOINT_CONCURRENCY": str(ENDPOINT_CONCURRENCY),
            # A policy, not what is measured here.
            "INTEGRATION_ENDPOINT_RATE_PER_SECOND": "100000",
            "INTEGRATION_CONSUMER_PREFETCH": "500",
            "INTEGRATION_CONSUMER_PORT": str(consumer_port),
            "LOG_LEVEL": "WARNING",
        }
        settings = IntegrationSettings(database_url=db, amqp_url=amqp_url)
        await asyncio.to_thread(init_db, settings)
        with psycopg.connect(**connection_kwargs(db), autocommit=True) as conn:
            for i, url in enumerate(urls):
                endpoints.add(conn, Endpoint(f"ep{i}", url, ("#",), new_secret()))
        sample = [
            envelope("auth.account.login_succeeded", uuid.uuid4(), version=1, position=1)[2]
        ] * EVENTS
        raw, fanned = [], []
        with process(
            [*ESCTL, "consume", "integration_svc"],
            env,
            f"http://127.0.0.1:{consumer_port}/health/ready",
        ):
            status = httpx.AsyncClient(base_url=f"http://127.0.0.1:{consumer_port}")
            await raw_posts(urls, sample[:50])  # warm both paths up
            for round_ in range(ROUNDS):
                raw.append(await raw_posts(urls, sample))
                fanned.append(await fan_out(status, amqp_url, round_))
            await status.aclose()
        with psycopg.connect(**connection_kwargs(db)) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) "
                "FROM webhook_deliveries"
            ).fetchone()
        assert row is not None and row[0] == row[1] == ROUNDS * EVENTS * ENDPOINTS, row
    return {
        "benchmark": f"webhook fan-out of {EVENTS} events to {ENDPOINTS} local endpoints "
        "(publish -> delivered) vs raw httpx POSTs of the same count",
        **versus(
            ("baseline_posts_per_s", raw), ("deliveries_per_s", fanned), target="ratio >= 0.6"
        ),
        "rounds": {"raw": [round(r, 1) for r in raw], "fan_out": [round(f, 1) for f in fanned]},
    }


def main() -> None:
    report("webhooks", run_on_uvloop(run()))


if __name__ == "__main__":
    main()
