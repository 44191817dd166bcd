"""esctl fails clearly: a one-line error naming what is wrong and how to fix it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import aio_pika

from shared_contracts.events import CONTRACTS
from shared_contracts.names import dead_letter_queue
from testbed import cli
from tests.integration.test_consumer import envelope


def esctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return cli.esctl(*args, env={**os.environ, **env})


def test_up_without_a_broker_names_host_and_port_and_how_to_start_it() -> None:
    result = esctl("up", AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode != 0
    assert "RabbitMQ is not reachable at 127.0.0.1:1" in result.stderr
    assert "rabbitmq-server -detached" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_db_init_without_a_database_server_names_host_and_port() -> None:
    result = esctl("db", "init", AUTH_DATABASE_URL="postgresql://postgres@127.0.0.1:1/auth")
    assert result.returncode != 0
    assert "PostgreSQL is not reachable at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unknown_service_is_a_one_line_error() -> None:
    result = esctl("relay", "nope_svc")
    assert result.returncode != 0
    assert "unknown producer 'nope_svc'" in result.stderr
    assert "Traceback" not in result.stderr


def test_contracts_export_writes_schemas_and_asyncapi(tmp_path: Path) -> None:
    result = esctl("contracts", "export", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in tmp_path.iterdir()}
    assert "asyncapi.json" in names
    assert "auth.account.registered.v1.json" in names
    # One schema per contract and version, and the AsyncAPI document.
    assert names == {f"{t}.v{v}.json" for t, v in CONTRACTS} | {"asyncapi.json"}


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = esctl("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"esctl {version('eskit')}"


def test_an_unknown_format_is_a_usage_error_naming_the_choices() -> None:
    result = esctl("projections", "status", "--format", "xml")
    assert result.returncode == 2
    assert "'xml' is not one of 'table', 'json'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_dlq_list_shows_the_count_and_the_first_rows(make_vhost: Callable[[], str]) -> None:
    url = make_vhost()

    async def fill() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                dead_letter_queue("reporting_svc"),
                durable=True,
                arguments={"x-queue-type": "quorum"},
            )
            for position in range(1, 26):
                body = json.dumps(envelope(position)).encode()
                await channel.default_exchange.publish(
                    aio_pika.Message(body), routing_key=queue.name
                )

    asyncio.run(fill())
    shown = esctl("dlq", "list", "reporting_svc", "--limit", "5", AMQP_URL=url, COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    assert "reporting_svc.dlq: 25 messages" in shown.stdout
    assert "... 20 more" in shown.stdout
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    listed = esctl("dlq", "list", "reporting_svc", "--format", "json", AMQP_URL=url)
    positions = [r["position"] for r in json.loads(listed.stdout)]
    assert len(positions) == 20
    assert set(positions) <= set(range(1, 26))
    every = esctl("dlq", "list", "reporting_svc", "--format", "json", "--limit", "0", AMQP_URL=url)
    assert len(json.loads(every.stdout)) == 25
