"""`esctl erasure status <user_id>`: per service, whether a person's erasure is done.

Each service is asked in its own database, with its own settings (`*_DATABASE_URL`):

- the event stores (auth_svc, user_svc): the person's key in `personal_keys` is destroyed
  (`wrapped IS NULL AND erased_at IS NOT NULL`), and for auth_svc the account's deletion is
  stored (an `Account.Deleted` event);
- the projections (reporting_svc, notify_svc, integration_svc): `public.erasures` has the
  person, swept (their dead letters, maildir copies or webhook bodies are gone too).

Exit code 0 when every service is done, 1 while any is pending, 2 for a malformed id or a
database that cannot be reached.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any

import psycopg
import typer

import registry
from esctl.console import fail, first_line, out
from esctl.console import table as console_table
from servicekit.eventstore import connection_kwargs
from servicekit.service import Role, Service

app = typer.Typer(help="Erasure (right to be forgotten): where it stands.", no_args_is_help=True)

ACCOUNT_DELETED_TOPIC = "%:Account.Deleted"  # auth_svc.domain's stored event
AUTH_EVENTS_TABLE = "auth_events"  # auth_svc's event store (application name "auth")


@dataclass(frozen=True)
class ServiceErasure:
    service: str
    done: bool
    at: datetime | None
    detail: str

    def row(self) -> dict[str, Any]:
        found = asdict(self)
        found["at"] = self.at.isoformat() if self.at else None
        return found


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> Any:
    try:
        with conn.transaction():
            return conn.execute(query, params).fetchone()
    except psycopg.errors.UndefinedTable:
        return "missing"


def key_destroyed(service: str, conn: psycopg.Connection[Any], user: uuid.UUID) -> ServiceErasure:
    row = _one(
        conn, "SELECT wrapped IS NULL, erased_at FROM personal_keys WHERE subject = %s", (user,)
    )
    if row == "missing":
        return ServiceErasure(service, False, None, "no personal_keys table (run esctl db init)")
    if row is None:
        return ServiceErasure(service, False, None, "no key for this person here")
    if not (row[0] and row[1] is not None):
        return ServiceErasure(service, False, None, "the person's key is not destroyed yet")
    return ServiceErasure(service, True, row[1], "key destroyed")


def account_deleted(conn: psycopg.Connection[Any], user: uuid.UUID) -> bool:
    row = _one(
        conn,
        f"SELECT 1 FROM {AUTH_EVENTS_TABLE} WHERE originator_id = %s AND topic LIKE %s",  # noqa: S608
        (user, ACCOUNT_DELETED_TOPIC),
    )
    return row not in (None, "missing")


def projection_erased(
    service: str, conn: psycopg.Connection[Any], user: uuid.UUID
) -> ServiceErasure:
    row = _one(conn, "SELECT erased_at, swept_at FROM public.erasures WHERE user_id = %s", (user,))
    if row == "missing":
        return ServiceErasure(service, False, None, "no erasures table (run esctl db init)")
    if row is None:
        return ServiceErasure(service, False, None, "auth.account.deleted not applied yet")
    if row[1] is None:
        return ServiceErasure(
            service, False, None, f"applied at {row[0].isoformat()}; sweep pending"
        )
    return ServiceErasure(service, True, row[1], "erased and swept")


def erasure_of(service: Service[Any], user: uuid.UUID) -> ServiceErasure | None:
    """The service's answer, or None if it keeps nothing about people."""
    settings = service.settings()
    url = getattr(settings, "database_url", None)
    stores = any(p.role is Role.RELAY for p in service.processes)
    if url is None or not (stores or service.projection is not None):
        return None
    try:
        conn = psycopg.connect(**{**connection_kwargs(url), "connect_timeout": 5})
    except psycopg.OperationalError as exc:
        raise fail(f"{service.name}'s database is unreachable: {first_line(exc)}", 2) from None
    with conn:
        if service.projection is not None:
            return projection_erased(service.name, conn, user)
        found = key_destroyed(service.name, conn, user)
        if service.name == "auth_svc" and found.done and not account_deleted(conn, user):
            return ServiceErasure(service.name, False, None, "key destroyed; account not deleted")
        return found


@app.command("status")
def status(
    user_id: Annotated[str, typer.Argument(help="The person's user id (a UUID).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per service: done (with when) or pending. Exit code 0 all done, 1 pending."""
    try:
        user = uuid.UUID(user_id)
    except ValueError:
        raise fail(f"not a user id: {user_id!r} (expected a UUID)", 2) from None
    results = [r for s in registry.SERVICES if (r := erasure_of(s, user)) is not None]
    complete = all(r.done for r in results)
    if as_json:
        out.print_json(
            json.dumps(
                {"user_id": str(user), "done": complete, "services": [r.row() for r in results]}
            )
        )
    else:
        table = console_table("service", "status", "at", "detail", title=f"erasure of {user}")
        for r in results:
            table.add_row(
                r.service,
                "[green]done[/green]" if r.done else "[yellow]pending[/yellow]",
                r.at.isoformat(timespec="seconds") if r.at else "-",
                r.detail,
            )
        out.print(table)
    raise typer.Exit(0 if complete else 1)
