"""Fixtures shared by every test tier.

Integration tests use the real PostgreSQL and RabbitMQ of this machine, isolated per run:
each run gets its own databases (t_<run>_<name>) and its own RabbitMQ vhost, and removes
only what it created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from servicekit.eventstore import drop_database
from testbed.scratch import RUN_ID, new_database, new_vhost, remove_vhost


@pytest.fixture(scope="session")
def run_id() -> str:
    return RUN_ID


@pytest.fixture(scope="session")
def make_database() -> Iterator[Callable[[str], str]]:
    """Create a fresh database for this run; returns its URL. Dropped at the end."""
    created: list[str] = []

    def make(name: str) -> str:
        created.append(new_database(name))
        return created[-1]

    yield make
    for url in created:
        drop_database(url)


@pytest.fixture(scope="session")
def make_vhost() -> Iterator[Callable[[], str]]:
    """Create a fresh RabbitMQ vhost for this run; returns an AMQP URL. Deleted at the end."""
    created: list[str] = []

    def make() -> str:
        created.append(new_vhost())
        return created[-1]

    yield make
    for url in created:
        remove_vhost(url)


@pytest.fixture(scope="session")
def amqp_url(make_vhost: Callable[[], str]) -> str:
    """One vhost shared by the run's tests that do not need a private one."""
    return make_vhost()
