"""Dead peers are noticed in seconds, and the settings event order depends on cannot drift.

A peer cut off without a word (no RST) is only noticed by probing: TCP keepalives and a user
timeout on both ends of every PostgreSQL session, heartbeats and keepalives on every AMQP
connection. The partitions themselves are made in tests/chaos; these tests check that every
session and connection the runtime opens carries those settings.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import psycopg
import pytest
from psycopg.rows import tuple_row

from servicekit import amqp
from servicekit.eventstore import (
    KEEPALIVE_IDLE_SECONDS,
    TCP_USER_TIMEOUT_MS,
    connection_kwargs,
    eventsourcing_env,
)
from servicekit.settings import ServiceSettings
from user_svc.application import ProfileService
from user_svc.main import init_db
from user_svc.settings import UserSettings


@pytest.fixture
def users_db(make_database: Callable[[str], str]) -> str:
    url = make_database("timeouts")
    init_db(UserSettings(database_url=url))
    return url


def server_side(conn: psycopg.Connection) -> tuple[str, str, str, str]:  # type: ignore[type-arg]
    row = (
        conn.cursor(row_factory=tuple_row)
        .execute(
            "SELECT current_setting('tcp_keepalives_idle'), "
            "current_setting('tcp_keepalives_interval'), "
            "current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')"
        )
        .fetchone()
    )
    assert row is not None
    return tuple(str(v) for v in row)  # type: ignore[return-value]


EXPECTED_SERVER_SIDE = (str(KEEPALIVE_IDLE_SECONDS), "2", "3", str(TCP_USER_TIMEOUT_MS))


def test_every_runtime_session_probes_its_peer_on_both_ends(users_db: str) -> None:
    kwargs = connection_kwargs(users_db)
    assert kwargs["keepalives"] == 1 and kwargs["tcp_user_timeout"] == TCP_USER_TIMEOUT_MS
    with psycopg.connect(**kwargs) as conn:
        assert conn.info.get_parameters()["keepalives_idle"] == str(KEEPALIVE_IDLE_SECONDS)
        assert server_side(conn) == EXPECTED_SERVER_SIDE


def test_the_event_stores_own_pool_probes_its_peer_too(users_db: str) -> None:
    """The library's connections LISTEN (the cache's subscription) and hold the events
    table lock; they get the same keepalives as ours."""
    app = ProfileService(env=eventsourcing_env(users_db, pool_size=1))
    try:
        with app.recorder.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            assert conn.info.get_parameters()["tcp_user_timeout"] == str(TCP_USER_TIMEOUT_MS)
            assert server_side(conn) == EXPECTED_SERVER_SIDE
    finally:
        app.close()


def test_the_settings_event_order_depends_on_cannot_be_turned_on(
    users_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the library's database functions, inserts skip the events table lock and the
    relay can miss events forever (shared/notes/eventsourcing.md, trap 1)."""
    env = eventsourcing_env(users_db, extra={"POSTGRES_ENABLE_DB_FUNCTIONS": "y"})
    assert env["POSTGRES_ENABLE_DB_FUNCTIONS"] == "n"
    app = ProfileService(env=env)
    try:
        datastore = app.recorder.datastore  # type: ignore[attr-defined]
        assert datastore.enable_db_functions is False
        assert app.recorder.lock_table_statements  # type: ignore[attr-defined]
    finally:
        app.close()
    # The library reads `<APP>_POSTGRES_ENABLE_DB_FUNCTIONS` before the bare name.
    with pytest.raises(ValueError, match="POSTGRES_ENABLE_DB_FUNCTIONS"):
        ProfileService(env={**env, "USERS_POSTGRES_ENABLE_DB_FUNCTIONS": "y"})


def test_a_broker_setting_names_every_node_and_negotiates_a_short_heartbeat() -> None:
    settings = ServiceSettings(
        amqp_url="amqp://guest:guest@a:5672/v, amqp://guest:guest@b:5673/v?heartbeat=3"
    )
    assert (
        settings.amqp_url
        == "amqp://guest:guest@a:5672/v?heartbeat=5,amqp://guest:guest@b:5673/v?heartbeat=3"
    )
    assert amqp.broker_address(settings.amqp_url) == "a:5672, b:5673"
    with pytest.raises(ValueError, match="not an amqp"):
        ServiceSettings(amqp_url="amqp://guest:guest@a/,http://b/")


async def test_a_client_fails_over_to_the_next_node_and_stays_there(amqp_url: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on: a node that is down
        sock.bind(("127.0.0.1", 0))
        dead = f"amqp://guest:guest@127.0.0.1:{sock.getsockname()[1]}/"
    setting = f"{dead},{amqp_url}"
    connection = await amqp.connect(setting)
    async with connection:
        assert str(connection.url).startswith(amqp_url.split("?", maxsplit=1)[0].rstrip("/"))
        underlay = connection.transport.connection  # type: ignore[union-attr]
        assert underlay.heartbeat_timeout == amqp.DEFAULT_HEARTBEAT_SECONDS
    started = asyncio.get_running_loop().time()
    again = await amqp.connect(setting)  # starts at the node that worked
    await again.close()
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_no_node_reachable_is_the_last_nodes_error() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    with pytest.raises(ConnectionError):
        await amqp.connect(",".join(f"amqp://guest:guest@127.0.0.1:{p}/" for p in ports))
