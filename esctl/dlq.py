"""`esctl dlq`: a consuming service's dead-letter queue, inspected and repaired."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import aio_pika
import typer
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from esctl.console import (
    FormatOption,
    OutputFormat,
    amqp_url,
    consumers,
    fail,
    out,
    require_dependencies,
    run_async,
    service_named,
)
from esctl.console import table as console_table
from servicekit import amqp, messages
from shared_contracts.names import dead_letter_queue, live_queue

T = TypeVar("T")

app = typer.Typer(help="Dead-letter queues: inspect and repair.", no_args_is_help=True)


@dataclass
class Letter:
    index: int
    message: AbstractIncomingMessage

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})

    @property
    def envelope(self) -> dict[str, Any] | None:
        try:
            body = json.loads(self.message.body)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    @property
    def event_id(self) -> str:
        env = self.envelope or {}
        return str(env.get("event_id") or self.message.message_id or "?")

    @property
    def event_type(self) -> str:
        return str((self.envelope or {}).get("event_type") or "?")

    @property
    def dead_letter(self) -> messages.DeadLetter:
        return messages.DeadLetter.read(self.headers)

    @property
    def reason(self) -> str:
        return self.dead_letter.reason

    @property
    def error(self) -> str:
        return self.dead_letter.error

    @property
    def dead_lettered_at(self) -> datetime | None:
        at = self.dead_letter.at
        return None if at.timestamp() == 0 else at

    def matches(self, selector: str) -> bool:
        return selector in (self.event_id, str(self.index))


async def _with_dead_letters(
    service: str, act: Callable[[AbstractChannel, list[Letter]], Awaitable[T]]
) -> T:
    """Fetch every message of `<service>.dlq` unacked, let `act` settle some, return the rest.

    Messages left unsettled go back to the queue when the channel closes, in their order.
    """
    connection = await amqp.connect(amqp_url())
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(dead_letter_queue(service), passive=True)
        except aio_pika.exceptions.ChannelClosed:
            raise fail(f"{service} has no dead-letter queue yet (its consumer never ran)") from None
        letters: list[Letter] = []
        while True:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            letters.append(Letter(len(letters) + 1, message))
        result = await act(channel, letters)
        await channel.close()
        return result


def _age(when: datetime | None) -> str:
    if when is None:
        return "?"
    seconds = max((datetime.now(UTC) - when).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@app.command("list")
def dlq_list(
    service: Annotated[str, typer.Argument(help="A consuming service, e.g. reporting_svc")],
    output: FormatOption = OutputFormat.table,
    limit: Annotated[
        int, typer.Option(min=0, help="Rows shown, from the oldest; 0 shows every one.")
    ] = 20,
) -> None:
    """Count, oldest age, and the first rows: each message's reason and event type."""
    require_dependencies()
    service_named(service, consumers(), "service")

    async def act(_: AbstractChannel, letters: list[Letter]) -> list[dict[str, Any]]:
        return [
            {
                "index": d.index,
                "event_id": d.event_id,
                "event_type": d.event_type,
                "position": (d.envelope or {}).get("position"),
                "reason": d.reason,
                "dead_lettered_at": d.dead_lettered_at.isoformat() if d.dead_lettered_at else None,
                "age": _age(d.dead_lettered_at),
            }
            for d in letters
        ]

    rows = run_async(lambda _: _with_dead_letters(service, act))
    shown = rows[:limit] if limit else rows
    if output is OutputFormat.json:
        out.print_json(json.dumps(shown))
        return
    ages = [r["dead_lettered_at"] for r in rows if r["dead_lettered_at"]]
    oldest = _age(datetime.fromisoformat(min(ages))) if ages else "-"
    out.print(f"{dead_letter_queue(service)}: {len(rows)} messages, oldest {oldest}")
    if shown:
        table = console_table("#", "event_id", "event_type", "position", "reason", "age", keys=2)
        for r in shown:
            table.add_row(
                str(r["index"]),
                r["event_id"],
                r["event_type"],
                str(r["position"]),
                r["reason"],
                r["age"],
            )
        out.print(table)
    if len(shown) < len(rows):
        out.print(f"... {len(rows) - len(shown)} more: --limit 0 shows every one")


@app.command("show")
def dlq_show(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str, typer.Argument(help="An event_id, or the # shown by `dlq list`")],
) -> None:
    """The envelope (or raw body) and the error of one dead-lettered message."""
    require_dependencies()
    service_named(service, consumers(), "service")

    async def act(_: AbstractChannel, letters: list[Letter]) -> dict[str, Any] | None:
        for d in letters:
            if d.matches(message):
                return {
                    "event_id": d.event_id,
                    "reason": d.reason,
                    "error": d.error,
                    "dead_lettered_at": d.dead_lettered_at.isoformat()
                    if d.dead_lettered_at
                    else None,
                    "routing_key": d.dead_letter.routing_key or d.message.routing_key,
                    "envelope": d.envelope,
                    "body": None
                    if d.envelope is not None
                    else d.message.body.decode(errors="replace"),
                }
        return None

    found = run_async(lambda _: _with_dead_letters(service, act))
    if found is None:
        raise fail(f"no message {message!r} in {dead_letter_queue(service)}")
    out.print_json(json.dumps(found, default=str))


def _select(letters: list[Letter], message: str | None, every: bool) -> list[Letter]:
    if every:
        return letters
    chosen = [d for d in letters if message is not None and d.matches(message)]
    if not chosen:
        raise fail(f"no message {message!r} in the dead-letter queue")
    return chosen[:1]


def _target(message: str | None, every: bool) -> None:
    if every == (message is not None):
        raise fail("name one message (event_id or #) or pass --all")


@app.command("retry")
def dlq_retry(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str | None, typer.Argument(help="An event_id or #")] = None,
    every: Annotated[bool, typer.Option("--all", help="Retry every message.")] = False,
) -> None:
    """Send one message, or all, back to the service's live queue."""
    require_dependencies()
    service_named(service, consumers(), "service")
    _target(message, every)

    async def act(channel: AbstractChannel, letters: list[Letter]) -> int:
        chosen = _select(letters, message, every)
        for d in chosen:
            headers = messages.retry_headers(d.headers)
            await channel.default_exchange.publish(  # confirmed
                aio_pika.Message(
                    d.message.body,
                    headers=headers,
                    content_type=d.message.content_type,
                    message_id=d.message.message_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=live_queue(service),
            )
            await d.message.ack()
        return len(chosen)

    count = run_async(lambda _: _with_dead_letters(service, act))
    out.print(f"retried {count} message(s) into {live_queue(service)}")


@app.command("drop")
def dlq_drop(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str | None, typer.Argument(help="An event_id or #")] = None,
    every: Annotated[bool, typer.Option("--all", help="Drop every message.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one message, or all, from the dead-letter queue (asks first)."""
    require_dependencies()
    service_named(service, consumers(), "service")
    _target(message, every)
    what = "every message" if every else f"message {message}"
    if not yes:
        if not sys.stdin.isatty():
            raise fail("refusing to drop without confirmation; pass --yes")
        typer.confirm(f"Drop {what} from {dead_letter_queue(service)}?", abort=True)

    async def act(_: AbstractChannel, letters: list[Letter]) -> int:
        chosen = _select(letters, message, every)
        for d in chosen:
            await d.message.ack()
        return len(chosen)

    count = run_async(lambda _: _with_dead_letters(service, act))
    out.print(f"dropped {count} message(s) from {dead_letter_queue(service)}")
