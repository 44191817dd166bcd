"""Fixtures shared by every test tier.

Integration tests use the real PostgreSQL and RabbitMQ of this machine, isolated per run:
each run gets its own databases (t_<run>_<name>) and its own RabbitMQ vhost, and removes
only what it created.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servicekit.eventstore import drop_database
from testbed.scratch import RUN_ID, new_database, new_vhost, remove_vhost


def pytest_configure(config: pytest.Config) -> None:
    """A temporary directory of this session's own: pytest's default (`pytest-of-<user>`)
    keeps only the three newest sessions' directories, so a second session started on the
    same machine would delete the files of one still running (a gateway's config, a
    maildir)."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix=f"eskit-tests-{RUN_ID}-")


def pytest_unconfigure(config: pytest.Config) -> None:
    base = Path(str(config.option.basetemp))
    if base.name.startswith(f"eskit-tests-{RUN_ID}-"):
        shutil.rmtree(base, ignore_errors=True)


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
