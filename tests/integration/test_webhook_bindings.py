"""integration_svc.q is bound to what its endpoints subscribe to, not to every event: real
RabbitMQ (its bindings listed by rabbitmqctl), real PostgreSQL, the CLI as users run it."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aio_pika
import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from esctl.webhooks import app as webhooks_cli
from integration_svc import bindings, endpoints
from integration_svc.endpoints import Endpoint
from integration_svc.main import IntegrationWorker, init_db, policy
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import new_secret
from servicekit.amqp import declare_consumer_queues
from servicekit.eventstore import connection_kwargs
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS
from testbed.events import envelope, eventually, running
from testbed.history import publish
from testbed.receiver import Receiver
from tests.support.integration import integration_settings_in

QUEUE = "integration_svc.q"
DELETED = "auth.account.deleted"


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> IntegrationSettings:
    return integration_settings_in(make_database, make_vhost, "integration_bindings")


def queue_bindings(settings: IntegrationSettings) -> set[tuple[str, str]]:
    """(exchange, routing key) of every binding of integration_svc.q, as the broker has them."""
    vhost = unquote(settings.amqp_url.split("?")[0].rsplit("/", 1)[1])
    listed = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_bindings",
            "-p",
            vhost,
            "source_name",
            "destination_name",
            "routing_key",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = [line.split("\t") for line in listed.splitlines() if line.count("\t") == 2]
    return {(source, key) for source, destination, key in rows if destination == QUEUE and source}


def both(*keys: str) -> set[tuple[str, str]]:
    return {(exchange, key) for exchange in (AUTH_EVENTS, USER_EVENTS) for key in keys}


def seed(settings: IntegrationSettings, endpoint_id: str, url: str, *events: str) -> None:
    """An endpoint written to the table directly, as before the consumer first starts."""
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        endpoints.add(conn, Endpoint(endpoint_id, url, events, new_secret()))


def cli_env(settings: IntegrationSettings) -> dict[str, str]:
    return {
        "INTEGRATION_DATABASE_URL": settings.database_url,
        "INTEGRATION_ALLOW_LOOPBACK": "true",
        "AMQP_URL": settings.amqp_url,
    }


def runner_add(settings: IntegrationSettings, url: str, *events: str) -> Any:
    args = ["add", url, "--id", "crm"]
    for event in events:
        args += ["-e", event]
    return CliRunner().invoke(webhooks_cli, args, env=cli_env(settings))


def test_the_routing_keys_are_the_endpoints_patterns_and_the_deletion() -> None:
    assert bindings.wanted_keys([["user.profile.*"], ["auth.account.password_changed"]]) == {
        "user.profile.*",
        "auth.account.password_changed",
        DELETED,
    }
    assert bindings.wanted_keys([]) == {DELETED}
    assert bindings.wanted_keys([["user.#"], ["#"]]) == {"#"}
    # What was bound and is no longer wanted is unbound; `#` always (older builds bound it).
    assert bindings.plan([["user.#"]], ["auth.#", "user.#", DELETED]) == (
        [DELETED, "user.#"],
        ["#", "auth.#"],
    )
    assert bindings.plan([["#"]], []) == (["#"], [])


async def test_the_queue_receives_only_what_endpoints_subscribe_to(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    server, base = receiver
    seed(settings, "crm", f"{base}/crm", "user.profile.*")
    # An older build's queue, bound to everything.
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_consumer_queues(channel, "integration_svc", {AUTH_EVENTS: ["#"]})
    assert ("auth.events", "#") in queue_bindings(settings)

    worker = IntegrationWorker(settings)
    async with running(worker):
        assert queue_bindings(settings) == both("user.profile.*", DELETED)
        user = uuid.uuid4()
        await publish(
            settings.amqp_url,
            [
                envelope("auth.account.login_succeeded", user, version=2, position=2),
                envelope("user.profile.updated", user, version=2, position=2),
            ],
        )
        await eventually(lambda: len(server.requests) == 1, what="the profile's webhook")
        await eventually(lambda: worker.consumer.status.handled >= 1, what="the consumer")
    # The login never reached the queue: the consumer handled the profile event alone.
    assert worker.consumer.status.handled == 1
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        recorded = {r[0] for r in conn.execute("SELECT routing_key FROM webhook_bindings")}
    assert recorded == {"user.profile.*", DELETED}


async def test_an_endpoint_added_while_the_consumer_runs_gets_the_next_event_at_once(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    """The CLI binds the queue before its insert commits, so the event published right after
    `esctl webhooks add` returns is routed; `remove` unbinds what no endpoint wants."""
    server, base = receiver
    runner = CliRunner()
    worker = IntegrationWorker(settings)
    async with running(worker):
        assert queue_bindings(settings) == both(DELETED)
        added = await asyncio.to_thread(  # the CLI runs its own event loop
            runner.invoke,
            webhooks_cli,
            ["add", f"{base}/locks", "--id", "locks", "-e", "auth.account.password_changed"],
            env=cli_env(settings),
        )
        assert added.exit_code == 0, added.output
        await publish(
            settings.amqp_url,
            [envelope("auth.account.password_changed", uuid.uuid4(), version=3, position=3)],
        )
        await eventually(lambda: len(server.requests) == 1, what="the first event after add")
        assert queue_bindings(settings) == both("auth.account.password_changed", DELETED)
        removed = await asyncio.to_thread(
            runner.invoke, webhooks_cli, ["remove", "locks"], env=cli_env(settings)
        )
        assert removed.exit_code == 0, removed.output
        assert queue_bindings(settings) == both(DELETED)


async def test_a_consumer_that_cannot_read_its_endpoints_binds_everything_until_it_can(
    settings: IntegrationSettings, receiver: tuple[Receiver, str]
) -> None:
    """A superset is safe (the projection delivers only what endpoints match); a subset
    would lose events. The next change of endpoints narrows it again."""
    _, base = receiver
    with psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True) as conn:
        conn.execute("DROP TABLE webhook_bindings")  # as a database of an older build
    async with running(IntegrationWorker(settings)):
        assert queue_bindings(settings) >= both("#")
        await asyncio.to_thread(init_db, settings)  # `esctl db init` after the upgrade
        added = await asyncio.to_thread(runner_add, settings, f"{base}/crm", "user.#")
        assert added.exit_code == 0, added.output
        assert queue_bindings(settings) == both("user.#", DELETED)


def test_without_a_broker_the_cli_changes_nothing_and_says_why(
    settings: IntegrationSettings,
) -> None:
    env = {**cli_env(settings), "AMQP_URL": "amqp://guest:guest@127.0.0.1:9/"}
    result = CliRunner().invoke(
        webhooks_cli, ["add", "http://127.0.0.1:9/x", "--id", "crm"], env=env
    )
    assert result.exit_code == 1, result.output
    assert "cannot reach RabbitMQ" in result.output and "nothing was changed" in result.output
    assert "Traceback" not in result.output
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        assert conn.execute("SELECT count(*) FROM webhook_endpoints").fetchone() == (0,)


async def test_the_webhooks_file_is_synced_with_the_bindings_at_start(
    settings: IntegrationSettings, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    _, base = receiver
    secret = new_secret()

    def from_file(*events: str) -> list[Endpoint]:
        path = tmp_path / "webhooks.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "endpoints": [
                        {
                            "id": "crm",
                            "url": f"{base}/crm",
                            "events": list(events),
                            "secret": secret,
                        }
                    ]
                }
            )
        )
        return endpoints.load_file(str(path), policy(settings))

    async with running(IntegrationWorker(settings, from_file("auth.account.password_changed"))):
        assert queue_bindings(settings) == both("auth.account.password_changed", DELETED)
    async with running(IntegrationWorker(settings, from_file("user.#"))):
        assert queue_bindings(settings) == both("user.#", DELETED)
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        rows = conn.execute("SELECT id, events, source FROM webhook_endpoints").fetchall()
    assert rows == [("crm", ["user.#"], "file")]
