"""Operating projections: status, replay, republish, the dead-letter queues and reports."""

from __future__ import annotations

import asyncio
import csv
import functools
import importlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar

import aio_pika
import aiormq
import psycopg
import typer
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from esctl.console import choose, err, fail, out, require_dependencies
from servicekit import amqp
from servicekit.amqp import broker_address
from servicekit.eventstore import connection_kwargs
from servicekit.projection import Projection, ProjectionStore
from servicekit.settings import ServiceSettings
from shared_contracts.names import dead_letter_queue, live_queue

T = TypeVar("T")

# Services whose consumer is a projection (rebuildable with `esctl replay`).
PROJECTIONS = ("reporting_svc", "notify_svc", "integration_svc")
# Every consuming service (each has `<service>.q` and `<service>.dlq`).
CONSUMERS = ("user_svc", *PROJECTIONS)
PRODUCERS = ("auth_svc", "user_svc")

projections_app = typer.Typer(help="Projections: position and lag.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead-letter queues: inspect and repair.", no_args_is_help=True)


@dataclass(frozen=True)
class ProjectionService:
    name: str
    settings: ServiceSettings
    projection: Projection


def projection_service(name: str) -> ProjectionService:
    choose(name, PROJECTIONS, "projection")
    main = importlib.import_module(f"{name}.main")
    settings = main.SETTINGS()
    return ProjectionService(name, settings, main.projection(settings))


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
        raise fail(f"PostgreSQL: {_first_line(exc)}") from None


async def _ignore_stop(
    fn: Callable[[ProjectionService], Awaitable[T]], service: ProjectionService, _: asyncio.Event
) -> T:
    return await fn(service)


# -- replay and republish -------------------------------------------------------------------


def replay(
    projection: Annotated[
        str, typer.Argument(help="The projection to rebuild, e.g. reporting_svc")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Rebuild, then report differences; do not swap.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an interrupted rebuild and start over.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 1000,
    stall_seconds: Annotated[
        float,
        typer.Option(
            help="Give up when, this long after reading past the stream's end as it was, "
            "positions the live read model had then applied are still missing."
        ),
    ] = 30.0,
) -> None:
    """Rebuild a projection from events.history; the old read model serves until the swap."""
    from servicekit import telemetry
    from servicekit.replay import Progress as ReplayProgress
    from servicekit.replay import Replay, ReplayError

    require_dependencies()
    service = projection_service(projection)
    telemetry.configure_tracing("esctl.replay")  # replay spans link to the original traces
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("applied {task.fields[applied]}"),
        TextColumn("{task.fields[behind]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = bar.add_task(f"replay {projection}", total=None, applied=0, behind="")
    start: list[int] = []

    def show(progress: ReplayProgress) -> None:
        if not start:
            start.append(max(progress.offset, -1))
        total = max(progress.end - start[0], 0)
        bar.update(
            task,
            total=total or None,
            completed=max(progress.offset - start[0], 0),
            applied=progress.applied,
            behind=_behind_live(progress),
            description=f"replay {projection} ({progress.phase.value}, {progress.generation})",
        )

    rebuild = Replay(
        service.projection,
        database_url=service.settings.database_url,
        amqp_url=service.settings.amqp_url,
        dry_run=dry_run,
        restart=restart,
        batch_size=batch_size,
        stall_seconds=stall_seconds,
        on_progress=show,
    )
    try:
        with bar:
            result = run_async(rebuild.run)
    except ReplayError as exc:
        raise fail(str(exc)) from None
    p = result.progress
    if result.interrupted:
        err.print(
            f"interrupted at stream offset {p.offset} ({p.applied} events applied into "
            f"{p.generation}); run `esctl replay {projection}` again to resume"
        )
        raise typer.Exit(130)
    summary = f"{p.applied} events applied, {p.skipped} skipped, {p.failed} parked"
    if dry_run:
        out.print(f"dry run: rebuilt {p.generation} ({summary}); live is {result.previous}")
        if not result.differences:
            out.print("[green]no differences[/green]: the rebuilt read model equals the live one")
        for diff in result.differences:
            out.print(
                f"{diff.table}: {diff.only_live} rows only in live, "
                f"{diff.only_rebuilt} only in the rebuild"
            )
            for side, row in diff.examples:
                out.print(f"  {side}: {row}")
        if result.differences:
            raise typer.Exit(3)
        return
    out.print(f"[green]✓[/green] {projection} now serves {p.generation} ({summary})")


def _behind_live(progress: Any) -> str:
    """How far the rebuild is behind the live edge: stream messages, and live positions."""
    parts = [f"{progress.behind_edge} to the stream's end"] if progress.behind_edge else []
    parts += [f"{producer} {n} behind live" for producer, n in sorted(progress.behind.items())]
    return ", ".join(parts) or "at the live edge"


def republish(
    producer: Annotated[str, typer.Argument(help="auth_svc or user_svc")],
    from_position: Annotated[
        int, typer.Option("--from", min=1, help="First position of the producer to republish.")
    ],
) -> None:
    """Refill events.history from the producer's own store (after retention removed history)."""
    from servicekit.relay import Republished
    from servicekit.relay import republish as refill

    require_dependencies()
    choose(producer, PRODUCERS, "producer")
    relay_module = importlib.import_module(f"{producer}.relay")
    settings = importlib.import_module(f"{producer}.settings")
    config = next(
        getattr(settings, n)() for n in ("AuthSettings", "UserSettings") if hasattr(settings, n)
    )
    factory = next(getattr(relay_module, n) for n in dir(relay_module) if n.startswith("relay_"))
    try:
        relay = factory(config)
    except Exception as exc:
        raise fail(f"{producer}: cannot open its event store: {exc}") from None
    with Progress(
        TextColumn("[bold]republish"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("republish", total=None)

        def show(r: Republished) -> None:
            bar.update(task, total=max(r.to - r.start + 1, 1), completed=r.position - r.start + 1)

        result = run_async(lambda stop: refill(relay, from_position, on_progress=show, stop=stop))
    out.print(
        f"republished {result.published} events of {producer} (positions {from_position}.."
        f"{result.position}) into events.history as run {result.run}"
    )


# -- status ---------------------------------------------------------------------------------


@projections_app.command("status")
def status(
    output: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Per projection and producer: applied position, producer's latest, lag, DLQ depth."""
    require_dependencies()
    choose(output, ("table", "json"), "format")
    latest = {p: _latest_position(p) for p in PRODUCERS}
    depths = run_async(lambda _: _queue_depths(CONSUMERS))
    rows: list[dict[str, Any]] = []
    for name in PROJECTIONS:
        service = projection_service(name)
        positions = run_async(functools.partial(_ignore_stop, _positions, service))
        producers = sorted({p for p in PRODUCERS if _binds(service.projection, p)} | set(positions))
        for producer in producers:
            pos = positions.get(producer)
            applied = pos.position if pos else 0
            queued, dlq = depths.get(name, (None, None))
            behind = max((latest.get(producer) or 0) - applied, 0)
            waiting = bool(queued) or behind > 0
            rows.append(
                {
                    "projection": name,
                    "producer": producer,
                    "applied": applied,
                    "latest": latest.get(producer),
                    "behind_positions": behind,
                    "queued": queued,
                    "lag_seconds": round(pos.age_seconds, 1) if pos and waiting else 0.0,
                    "last_applied_at": pos.applied_at.isoformat() if pos else None,
                    "dlq": dlq,
                }
            )
    if output == "json":
        out.print_json(json.dumps(rows))
        return
    table = Table(title="projections")
    for column in (
        "projection",
        "producer",
        "applied",
        "latest",
        "behind",
        "queued",
        "lag (s)",
        "DLQ",
    ):
        table.add_column(
            column, justify="right" if column not in ("projection", "producer") else "left"
        )
    for r in rows:
        table.add_row(
            r["projection"],
            r["producer"],
            str(r["applied"]),
            "?" if r["latest"] is None else str(r["latest"]),
            str(r["behind_positions"]),
            "-" if r["queued"] is None else str(r["queued"]),
            f"{r['lag_seconds']:.1f}",
            "-" if r["dlq"] is None else str(r["dlq"]),
        )
    out.print(table)
    out.print(
        "behind: positions between the producer's latest event and the last applied one "
        "(private and unbound events included); queued: messages waiting in the queue."
    )


def _binds(projection: Projection, producer: str) -> bool:
    from shared_contracts.names import PRODUCER_EXCHANGES

    return PRODUCER_EXCHANGES[producer] in projection.bindings


def _latest_position(producer: str) -> int | None:
    """The producer's latest notification id, read from its own database (operator view)."""
    settings_module = importlib.import_module(f"{producer}.settings")
    config = next(
        getattr(settings_module, n)()
        for n in ("AuthSettings", "UserSettings")
        if hasattr(settings_module, n)
    )
    app_module = importlib.import_module(f"{producer}.application")
    app_name = next(
        getattr(app_module, n).name
        for n in ("AuthService", "ProfileService")
        if hasattr(app_module, n)
    )
    try:
        with psycopg.connect(**connection_kwargs(config.database_url)) as conn:
            row = conn.execute(
                psycopg.sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(
                    psycopg.sql.Identifier(f"{app_name.lower()}_events")
                )
            ).fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error:
        return None


async def _positions(service: ProjectionService) -> dict[str, Any]:
    async with ProjectionStore(service.projection, service.settings.database_url) as store:
        try:
            return dict(await store.positions())
        except (LookupError, psycopg.errors.UndefinedTable):
            return {}


async def _queue_depths(services: tuple[str, ...]) -> dict[str, tuple[int | None, int | None]]:
    connection = await amqp.connect(amqp_url())
    depths: dict[str, tuple[int | None, int | None]] = {}
    async with connection:
        for service in services:
            counts: list[int | None] = []
            for queue in (live_queue(service), dead_letter_queue(service)):
                channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(queue, passive=True)
                    counts.append(int(declared.declaration_result.message_count or 0))
                    await channel.close()
                except aio_pika.exceptions.ChannelClosed:
                    counts.append(None)  # the queue does not exist yet
            depths[service] = (counts[0], counts[1])
    return depths


# -- dead letters ---------------------------------------------------------------------------


@dataclass
class DeadLetter:
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
    def reason(self) -> str:
        h = self.headers
        if "x-error-reason" in h:
            return str(h["x-error-reason"])
        return str(h.get("x-first-death-reason") or "unknown")

    @property
    def error(self) -> str:
        return str(self.headers.get("x-error") or "")

    @property
    def dead_lettered_at(self) -> datetime | None:
        h = self.headers
        if "x-dead-lettered-at" in h:
            try:
                return datetime.fromisoformat(str(h["x-dead-lettered-at"]))
            except ValueError:
                return None
        deaths = h.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            when = deaths[0].get("time")
            if isinstance(when, datetime):
                return when if when.tzinfo else when.replace(tzinfo=UTC)
        return None

    def matches(self, selector: str) -> bool:
        return selector in (self.event_id, str(self.index))


async def _with_dead_letters(
    service: str, act: Callable[[AbstractChannel, list[DeadLetter]], Awaitable[T]]
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
        letters: list[DeadLetter] = []
        while True:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            letters.append(DeadLetter(len(letters) + 1, message))
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


@dlq_app.command("list")
def dlq_list(
    service: Annotated[str, typer.Argument(help="A consuming service, e.g. reporting_svc")],
    output: Annotated[str, typer.Option("--format", help="table or json")] = "table",
) -> None:
    """Count, oldest age, and each message's reason and event type."""
    require_dependencies()
    choose(service, CONSUMERS, "service")
    choose(output, ("table", "json"), "format")

    async def act(_: AbstractChannel, letters: list[DeadLetter]) -> list[dict[str, Any]]:
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
    if output == "json":
        out.print_json(json.dumps(rows))
        return
    ages = [r["dead_lettered_at"] for r in rows if r["dead_lettered_at"]]
    oldest = _age(datetime.fromisoformat(min(ages))) if ages else "-"
    out.print(f"{dead_letter_queue(service)}: {len(rows)} messages, oldest {oldest}")
    if rows:
        table = Table()
        for column in ("#", "event_id", "event_type", "position", "reason", "age"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                str(r["index"]),
                r["event_id"],
                r["event_type"],
                str(r["position"]),
                r["reason"],
                r["age"],
            )
        out.print(table)


@dlq_app.command("show")
def dlq_show(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str, typer.Argument(help="An event_id, or the # shown by `dlq list`")],
) -> None:
    """The envelope (or raw body) and the error of one dead-lettered message."""
    require_dependencies()
    choose(service, CONSUMERS, "service")

    async def act(_: AbstractChannel, letters: list[DeadLetter]) -> dict[str, Any] | None:
        for d in letters:
            if d.matches(message):
                return {
                    "event_id": d.event_id,
                    "reason": d.reason,
                    "error": d.error,
                    "dead_lettered_at": d.dead_lettered_at.isoformat()
                    if d.dead_lettered_at
                    else None,
                    "routing_key": d.headers.get("x-original-routing-key") or d.message.routing_key,
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


def _select(letters: list[DeadLetter], message: str | None, every: bool) -> list[DeadLetter]:
    if every:
        return letters
    chosen = [d for d in letters if message is not None and d.matches(message)]
    if not chosen:
        raise fail(f"no message {message!r} in the dead-letter queue")
    return chosen[:1]


def _target(message: str | None, every: bool) -> None:
    if every == (message is not None):
        raise fail("name one message (event_id or #) or pass --all")


# Headers the broker or the dead-lettering added; a retried message starts afresh.
BROKER_HEADERS = (
    "x-death",
    "x-first-death",
    "x-last-death",
    "x-delivery-count",
    "x-error",
    "x-dead-lettered",
)


@dlq_app.command("retry")
def dlq_retry(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str | None, typer.Argument(help="An event_id or #")] = None,
    every: Annotated[bool, typer.Option("--all", help="Retry every message.")] = False,
) -> None:
    """Send one message, or all, back to the service's live queue."""
    require_dependencies()
    choose(service, CONSUMERS, "service")
    _target(message, every)

    async def act(channel: AbstractChannel, letters: list[DeadLetter]) -> int:
        chosen = _select(letters, message, every)
        for d in chosen:
            headers = {k: v for k, v in d.headers.items() if not k.startswith(BROKER_HEADERS)}
            headers["x-retried-at"] = datetime.now(UTC).isoformat()
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


@dlq_app.command("drop")
def dlq_drop(
    service: Annotated[str, typer.Argument(help="A consuming service")],
    message: Annotated[str | None, typer.Argument(help="An event_id or #")] = None,
    every: Annotated[bool, typer.Option("--all", help="Drop every message.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one message, or all, from the dead-letter queue (asks first)."""
    require_dependencies()
    choose(service, CONSUMERS, "service")
    _target(message, every)
    what = "every message" if every else f"message {message}"
    if not yes:
        if not sys.stdin.isatty():
            raise fail("refusing to drop without confirmation; pass --yes")
        typer.confirm(f"Drop {what} from {dead_letter_queue(service)}?", abort=True)

    async def act(_: AbstractChannel, letters: list[DeadLetter]) -> int:
        chosen = _select(letters, message, every)
        for d in chosen:
            await d.message.ack()
        return len(chosen)

    count = run_async(lambda _: _with_dead_letters(service, act))
    out.print(f"dropped {count} message(s) from {dead_letter_queue(service)}")


# -- reports --------------------------------------------------------------------------------


def report(
    name: Annotated[
        str, typer.Argument(help="signups, logins, locked, active-users, profile-completeness")
    ],
    since: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First day (UTC), inclusive.")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last day (UTC), inclusive.")
    ] = None,
    output: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
) -> None:
    """Print one of reporting_svc's read models."""
    from reporting_svc.reports import REPORTS, read_report
    from reporting_svc.settings import ReportingSettings

    choose(name, tuple(REPORTS), "report")
    choose(output, ("table", "json", "csv"), "format")
    if since and until and since > until:
        raise fail("--since is after --until")
    require_dependencies()
    try:
        result = read_report(
            ReportingSettings().database_url,
            name,
            since=since.date() if since else None,
            until=until.date() if until else None,
        )
    except LookupError as exc:
        raise fail(str(exc)) from None
    except psycopg.Error as exc:
        raise fail(
            f"reporting_svc's database: {_first_line(exc)} (has `esctl db init` run?)"
        ) from None
    rows = [[_plain(v) for v in row] for row in result.rows]
    if output == "json":
        out.print_json(json.dumps([dict(zip(result.columns, row, strict=True)) for row in rows]))
    elif output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(rows)
    else:
        table = Table(title=f"{name}: {REPORTS[name].summary}")
        for column in result.columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(v) for v in row))
        out.print(table)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _plain(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value
