"""`esctl projections status`, `esctl replay` and `esctl republish`: a projection's
position, its rebuild from events.history, and refilling that stream."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import aio_pika
import psycopg
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import registry
from esctl.console import (
    FormatOption,
    OutputFormat,
    amqp_url,
    consumers,
    err,
    fail,
    out,
    require_dependencies,
    run_async,
    service_named,
)
from esctl.console import table as console_table
from servicekit import amqp
from servicekit.projection import Projection, ProjectionStore
from servicekit.replay import Progress as ReplayProgress
from servicekit.service import Role, Service
from servicekit.settings import ServiceSettings
from shared_contracts.names import dead_letter_queue, live_queue

T = TypeVar("T")

app = typer.Typer(help="Projections: position and lag.", no_args_is_help=True)


@dataclass(frozen=True)
class ProjectionService:
    name: str
    settings: ServiceSettings
    projection: Projection


def projection_service(name: str) -> ProjectionService:
    service = service_named(name, registry.projections(), "projection")
    assert service.projection is not None
    settings = service.settings()
    return ProjectionService(name, settings, service.projection(settings))


async def _ignore_stop(
    fn: Callable[[ProjectionService], Awaitable[T]], service: ProjectionService, _: asyncio.Event
) -> T:
    return await fn(service)


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
        stream_port=service.settings.amqp_stream_port,
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


def _behind_live(progress: ReplayProgress) -> str:
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
    service = service_named(producer, registry.with_role(Role.RELAY), "producer")
    assert service.relay is not None
    try:
        relay = service.relay(service.settings())
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


@app.command("status")
def status(
    output: FormatOption = OutputFormat.table,
) -> None:
    """Per projection and producer: applied position, producer's latest, lag, DLQ depth."""
    require_dependencies()
    producers = registry.with_role(Role.RELAY)
    latest = {p.name: _latest_position(p) for p in producers}
    depths = run_async(lambda _: _queue_depths([s.name for s in consumers()]))
    rows: list[dict[str, Any]] = []
    for name in registry.names(registry.projections()):
        service = projection_service(name)
        positions = run_async(functools.partial(_ignore_stop, _positions, service))
        bound = {p.name for p in producers if _binds(service.projection, p.name)}
        names = sorted(bound | set(positions))
        for producer in names:
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
    if output is OutputFormat.json:
        out.print_json(json.dumps(rows))
        return
    out.print(status_table(rows))
    out.print(
        "behind: positions between the producer's latest event and the last applied one "
        "(private and unbound events included); queued: messages waiting in the queue."
    )


def status_table(rows: list[dict[str, Any]]) -> Table:
    """`projections status` as a table that fits 80 columns with every name whole."""
    table = console_table(
        "projection", "producer", "applied", "latest", "behind", "queued", "lag (s)", "DLQ", keys=2
    )
    for column in table.columns[2:]:
        column.justify = "right"
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
    return table


def _binds(projection: Projection, producer: str) -> bool:
    from shared_contracts.names import PRODUCER_EXCHANGES

    return PRODUCER_EXCHANGES[producer] in projection.bindings


def _latest_position(producer: Service[Any]) -> int | None:
    """The producer's latest notification id, read from its own event store (operator view)."""
    assert producer.relay is not None
    try:
        store = producer.relay(producer.settings()).app
    except Exception:
        return None
    try:
        return int(store.recorder.max_notification_id() or 0)
    except Exception:
        return None
    finally:
        store.close()


async def _positions(service: ProjectionService) -> dict[str, Any]:
    async with ProjectionStore(service.projection, service.settings.database_url) as store:
        try:
            return dict(await store.positions())
        except (LookupError, psycopg.errors.UndefinedTable):
            return {}


async def _queue_depths(services: list[str]) -> dict[str, tuple[int | None, int | None]]:
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
