"""Fixtures shared by every test tier.

Integration tests use the real PostgreSQL and RabbitMQ of this machine, isolated per run:
each run gets its own databases (t_<run>_<name>) and its own RabbitMQ vhost, and removes
only what it created.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest

from servicekit.eventstore import drop_database, ensure_database

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1:5672")
RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def run_id() -> str:
    return RUN_ID


@pytest.fixture(scope="session")
def make_database() -> Iterator[Callable[[str], str]]:
    """Create a fresh database for this run; returns its URL. Dropped at the end."""
    created: list[str] = []
    base = PG_ADMIN_URL.rsplit("/", 1)[0]

    def make(name: str) -> str:
        url = f"{base}/t_{RUN_ID}_{name}_{uuid.uuid4().hex[:6]}"
        ensure_database(url)
        created.append(url)
        return url

    yield make
    for url in created:
        drop_database(url)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def make_vhost() -> Iterator[Callable[[], str]]:
    """Create a fresh RabbitMQ vhost for this run; returns an AMQP URL. Deleted at the end."""
    created: list[str] = []

    def make() -> str:
        vhost = f"t-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        created.append(vhost)
        return f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"

    yield make
    for vhost in created:
        try:
            _rabbitmqctl("delete_vhost", vhost)
        except subprocess.CalledProcessError:
            pass


@pytest.fixture(scope="session")
def amqp_url(make_vhost: Callable[[], str]) -> str:
    """One vhost shared by the run's tests that do not need a private one."""
    return make_vhost()
