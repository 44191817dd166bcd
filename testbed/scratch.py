"""Databases and vhosts of a run's own on the machine's shared servers, removed afterwards.

Tests and benchmarks never touch data they did not create: each gets fresh names
(`<prefix>_<run>_<name>_<random>`) and removes only those.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote

from servicekit.eventstore import drop_database, ensure_database

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1:5672")
RUN_ID = uuid.uuid4().hex[:8]


def new_database(name: str, prefix: str = "t") -> str:
    """Create a database of this run's own; its URL."""
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{prefix}_{RUN_ID}_{name}_{uuid.uuid4().hex[:6]}"
    ensure_database(url)
    return url


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def new_vhost(prefix: str = "t") -> str:
    """Create a RabbitMQ vhost of this run's own (guest may use it); its AMQP URL."""
    vhost = f"{prefix}-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return f"amqp://guest:guest@{AMQP_HOST}/{quote(vhost, safe='')}"


def remove_vhost(amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with contextlib.suppress(subprocess.CalledProcessError):
        _rabbitmqctl("delete_vhost", vhost.replace("%2F", "/"))


@contextlib.contextmanager
def scratch_database(name: str, prefix: str = "t") -> Iterator[str]:
    url = new_database(name, prefix)
    try:
        yield url
    finally:
        drop_database(url)


@contextlib.contextmanager
def scratch_vhost(prefix: str = "t") -> Iterator[str]:
    url = new_vhost(prefix)
    try:
        yield url
    finally:
        remove_vhost(url)
