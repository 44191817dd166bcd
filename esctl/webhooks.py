"""`esctl webhooks`: integration_svc's endpoints and its delivery log."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import psycopg
import typer
from rich.table import Table

from esctl.console import FormatOption, OutputFormat, fail, out
from integration_svc import bindings, deliveries, endpoints
from integration_svc.egress import RefusedURL, UnresolvedURL, resolve
from integration_svc.endpoints import Endpoint, EndpointError
from integration_svc.main import policy
from integration_svc.settings import IntegrationSettings
from integration_svc.signing import mask, new_secret
from servicekit.eventstore import connection_kwargs
from servicekit.messages import TRANSIENT_ERRORS

T = TypeVar("T")

app = typer.Typer(
    help="Outbound webhooks (integration_svc): endpoints and the delivery log.",
    no_args_is_help=True,
)

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _settings() -> IntegrationSettings:
    try:
        return IntegrationSettings()
    except Exception as exc:
        raise fail(f"invalid INTEGRATION_* settings: {exc}") from None


@contextmanager
def _database(settings: IntegrationSettings) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(**connection_kwargs(settings.database_url), autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(
            f"cannot reach integration_svc's database: {first} (run `esctl db init`)"
        ) from None
    with conn:
        try:
            yield conn
        except psycopg.errors.UndefinedTable:
            raise fail(
                "integration_svc's database is not initialised (run `esctl db init`)"
            ) from None


def _rebinding(
    conn: psycopg.Connection[Any], settings: IntegrationSettings, change: Callable[[], T]
) -> T:
    """`change`, with integration_svc.q bound to match before it commits (bindings)."""
    try:
        return bindings.changing_endpoints(conn, settings.amqp_url, change)
    except psycopg.Error:
        raise  # the database's own errors: `_database` says them
    except TRANSIENT_ERRORS as exc:
        raise fail(
            f"cannot reach RabbitMQ to bind integration_svc.q ({type(exc).__name__}: {exc}); "
            "nothing was changed"
        ) from None


@app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="https:// URL that receives the events.")],
    event: Annotated[
        list[str] | None,
        typer.Option("--event", "-e", help="Event type or topic pattern (repeatable); default #."),
    ] = None,
    endpoint_id: Annotated[
        str | None, typer.Option("--id", help="A name for the endpoint; generated if omitted.")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(help="whsec_<base64> signing secret; a new one is generated if omitted."),
    ] = None,
) -> None:
    """Subscribe a URL to events. The URL is checked against the SSRF rules now and at
    every delivery."""
    settings = _settings()
    generated = secret is None
    endpoint = Endpoint(
        id=endpoint_id or f"ep_{uuid.uuid4().hex[:10]}",
        url=url,
        events=tuple(event or ["#"]),
        secret=secret or new_secret(),
    )
    try:
        rules = policy(settings)
        endpoints.validated(endpoint, rules)
        asyncio.run(resolve(url, rules, dns_timeout=settings.connect_timeout_seconds))
    except (EndpointError, RefusedURL, UnresolvedURL, ValueError) as exc:
        raise fail(str(exc)) from None
    with _database(settings) as conn:
        try:
            _rebinding(conn, settings, lambda: endpoints.add(conn, endpoint))
        except EndpointError as exc:
            raise fail(str(exc)) from None
    out.print(f"added endpoint {endpoint.id} -> {url} for {', '.join(endpoint.events)}")
    if generated:
        out.print(f"signing secret (shown once, keep it for the receiver): {endpoint.secret}")


@app.command("list")
def list_(output: FormatOption = OutputFormat.table) -> None:
    """List the endpoints (secrets masked)."""
    with _database(_settings()) as conn:
        rows = endpoints.list_endpoints(conn)
    if output is OutputFormat.json:
        listed = [
            {
                "id": e.id,
                "url": e.url,
                "events": list(e.events),
                "source": e.source,
                "secret": mask(e.secret),
            }
            for e in rows
        ]
        out.print_json(json.dumps(listed))
        return
    table = Table()
    for column in ("id", "url", "events", "source", "secret"):
        table.add_column(column)
    for e in rows:
        table.add_row(e.id, e.url, ", ".join(e.events), e.source, mask(e.secret))
    out.print(table)


@app.command("remove")
def remove(endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id.")]) -> None:
    """Remove an endpoint; its pending deliveries are marked failed."""
    settings = _settings()
    with _database(settings) as conn:
        try:
            source, dropped = _rebinding(
                conn, settings, lambda: endpoints.remove(conn, endpoint_id)
            )
        except EndpointError as exc:
            raise fail(str(exc)) from None
    out.print(f"removed endpoint {endpoint_id} ({dropped} pending deliveries failed)")
    if source == "file":
        out.print("it came from INTEGRATION_WEBHOOKS_FILE: remove it there too, or it returns")


@app.command("deliveries")
def deliveries_(
    failed: Annotated[bool, typer.Option("--failed", help="Only failed deliveries.")] = False,
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most recent N.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    output: FormatOption = OutputFormat.table,
) -> None:
    """The delivery log, most recent first."""
    with _database(_settings()) as conn:
        rows = deliveries.list_deliveries(conn, failed=failed, endpoint=endpoint, limit=limit)
    if output is OutputFormat.json and not as_json:
        out.print_json(json.dumps([r.__dict__ for r in rows], default=str))
        return
    if as_json:
        for r in rows:
            out.print_json(json.dumps(r.__dict__, default=str), indent=None)
        return
    table = Table()
    for column in ("id", "event", "type", "endpoint", "status", "attempts", "last", "when"):
        table.add_column(column)
    for r in rows:
        last = r.last_error or (f"HTTP {r.last_status}" if r.last_status else "")
        when = r.delivered_at or (r.next_attempt_at if r.status == "pending" else r.created_at)
        table.add_row(
            str(r.id),
            str(r.event_id),
            r.event_type,
            r.endpoint_id,
            r.status,
            str(r.attempts),
            last[:80],
            f"{when:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table)


@app.command("redeliver")
def redeliver(
    delivery: Annotated[
        int | None, typer.Argument(help="A delivery id (see `deliveries`).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Every delivery created since: ISO date/time, or 30m, 2h, 1d ago."),
    ] = None,
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint's.")] = None,
) -> None:
    """Send deliveries again on purpose (same webhook-id, a fresh retry window)."""
    if (delivery is None) == (since is None):
        raise fail("give either a delivery id or --since")
    start = _since(since) if since is not None else None
    with _database(_settings()) as conn:
        try:
            ids = deliveries.redeliver(conn, delivery=delivery, since=start, endpoint=endpoint)
        except deliveries.PurgedDelivery as exc:
            raise fail(str(exc)) from None
    if delivery is not None and not ids:
        raise fail(f"no delivery {delivery} to send again (unknown, or still pending)")
    out.print(f"{len(ids)} deliveries queued again")


def _since(value: str) -> datetime:
    match = DURATION.match(value.strip())
    if match:
        amount, unit = match.groups()
        return datetime.now(UTC) - timedelta(**{UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"--since {value!r}: expected an ISO date/time or 30m, 2h, 1d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
