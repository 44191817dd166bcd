"""What every `esctl` command shares: the consoles, one-line errors, argument checks, and
running a coroutine with Ctrl-C and the broker's or database's failures handled."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import aio_pika
import aiormq
import psycopg
import typer
from rich import box
from rich.console import Console
from rich.table import Table

import registry
from esctl import stack
from servicekit.amqp import broker_address
from servicekit.service import Role, Service
from servicekit.settings import ServiceSettings

T = TypeVar("T")

out = Console()
err = Console(stderr=True, soft_wrap=True)


class OutputFormat(StrEnum):
    """How a list command prints its rows: a table for people, JSON for scripts."""

    table = "table"
    json = "json"


FormatOption = Annotated[
    OutputFormat, typer.Option("--format", case_sensitive=False, help="table or json")
]


def table(*columns: str, title: str | None = None, keys: int = 1) -> Table:
    """A table that stays readable at 80 columns: no vertical rules, and cells fold instead
    of being cut short; the first `keys` columns (names) are never wrapped."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, column in enumerate(columns):
        t.add_column(column, no_wrap=i < keys, overflow="fold")
    return t


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error; raise the returned Exit to leave with `code`."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def require_dependencies() -> None:
    problems = stack.dependency_problems()
    if problems:
        for line in problems:
            err.print(f"[red]error:[/red] {line}", highlight=False)
        raise typer.Exit(2)


def choose(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise fail(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")
    return value


def service_named(name: str, among: Sequence[Service[Any]], what: str) -> Service[Any]:
    """The registered service `name`, if it is one of `among` (else a one-line error)."""
    choose(name, registry.names(list(among)), what)
    return registry.service(name)


def consumers() -> list[Service[Any]]:
    """Every consuming service: each has `<service>.q` and `<service>.dlq`."""
    return registry.with_role(Role.CONSUMER)


def amqp_url() -> str:
    return ServiceSettings().amqp_url


def run_async(make: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run a coroutine; the first Ctrl-C sets its stop event, a second one aborts."""

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await make(stop)

    try:
        return asyncio.run(main())
    except (OSError, aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException) as exc:
        raise fail(f"RabbitMQ at {broker_address(amqp_url())}: {exc}") from None
    except psycopg.OperationalError as exc:
        raise fail(f"PostgreSQL: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
