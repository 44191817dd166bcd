"""esctl fails clearly: a one-line error naming what is wrong and how to fix it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testbed import cli


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
    assert len(names) == 8
