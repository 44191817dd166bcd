"""Outages at the edges: a lost database is a 503 problem (never a 500), and a worker that
was healthy retries its next failure at once, not after the backoff of an outage long past."""

from __future__ import annotations

import asyncio
import itertools
import logging

import eventsourcing.persistence
import psycopg
import psycopg_pool
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from servicekit.problems import install_problem_handlers
from servicekit.supervise import supervise


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection refused"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
        psycopg.InterfaceError("the connection is closed"),
        eventsourcing.persistence.OperationalError("server closed the connection"),
        eventsourcing.persistence.InterfaceError("the connection is lost"),
    ],
    ids=type,
)
def test_a_lost_database_is_a_503_problem_with_retry_after(error: Exception) -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/sync")
    def sync_route() -> None:
        raise error

    @app.get("/async")
    async def async_route() -> None:
        raise error

    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/sync", "/async"):
        response = client.get(path)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["status"] == 503 and "database" in body["detail"]
        assert str(error) not in response.text  # nothing internal leaks


async def test_a_worker_that_ran_healthy_retries_its_next_failure_without_the_old_backoff() -> None:
    """Five quick failures grow the backoff; a long healthy run resets it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failures: list[float] = []
    healthy = 0.3

    async def attempt(_: asyncio.Event) -> None:
        failures.append(loop.time())
        if len(failures) == 6:
            await asyncio.sleep(healthy)  # a healthy run, then the connection is lost
        if len(failures) == 8:
            stop.set()
        raise ConnectionError("lost")

    await supervise(
        stop,
        attempt,
        on_failure=lambda _: None,
        expected=(ConnectionError,),
        log=logging.getLogger("test"),
        what="worker",
        max_backoff=10.0,
        initial_backoff=0.01,
        healthy_after=healthy,
    )
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert gaps[3] > gaps[0] * 4  # backing off: 0.01, 0.02, 0.04, 0.08, ...
    assert gaps[6] < gaps[4]  # after the healthy run: 0.01 again, not 0.32
