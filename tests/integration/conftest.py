"""Fixtures shared by the integration tests (the database and vhost ones are in tests/)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from testbed.receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A loopback webhook receiver and its URL."""
    server = Receiver()
    port = await server.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
