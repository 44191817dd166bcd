"""The reports an operator reads (`esctl report <name>`), queried from the live generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from reporting_svc.projection import ReportingProjection
from servicekit.eventstore import connection_kwargs
from servicekit.projection import LIVE_GENERATION, SHARED_LOCK, lock_key
from shared_contracts.events import PROFILE_FIELDS


@dataclass(frozen=True)
class Report:
    name: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True)
class ReportSpec:
    summary: str
    columns: tuple[str, ...]
    query: str  # {table} placeholders; %(since)s and %(until)s bound (inclusive, may be NULL)


# `{days}` in a query: the day column within --since/--until (inclusive, either may be NULL).
DAYS = (
    "(%(since)s::date IS NULL OR day >= %(since)s) "
    "AND (%(until)s::date IS NULL OR day <= %(until)s)"
)

REPORTS: dict[str, ReportSpec] = {
    "signups": ReportSpec(
        "Accounts registered per day.",
        ("day", "accounts"),
        "SELECT day, accounts FROM {signups} WHERE {days} ORDER BY day",
    ),
    "logins": ReportSpec(
        "Successful and failed logins per day.",
        ("day", "succeeded", "failed"),
        "SELECT day, succeeded, failed FROM {logins} WHERE {days} ORDER BY day",
    ),
    "locked": ReportSpec(
        "Account lockouts per day: lockouts and distinct accounts.",
        ("day", "lockouts", "accounts"),
        "SELECT day, sum(locks)::bigint, count(*) FROM {locks} WHERE {days} "
        "GROUP BY day ORDER BY day",
    ),
    "active-users": ReportSpec(
        "Daily active users: accounts that registered, logged in, or changed their password "
        "or profile that day.",
        ("day", "users"),
        "SELECT day, count(*) FROM {activity} WHERE {days} GROUP BY day ORDER BY day",
    ),
    "profile-completeness": ReportSpec(
        "Share of profiles with each optional field set (profiles created in the range).",
        ("field", "profiles_with_field", "profiles", "share"),
        " UNION ALL ".join(
            f"SELECT '{f}', count(*) FILTER (WHERE {f}), count(*), "  # noqa: S608
            f"round(coalesce(avg({f}::int), 0), 4) FROM {{profiles}} "
            "WHERE (%(since)s::date IS NULL OR created_on >= %(since)s) "
            "AND (%(until)s::date IS NULL OR created_on <= %(until)s)"
            for f in PROFILE_FIELDS
        ),
    ),
}


class UnknownReport(LookupError):
    pass


def read_report(
    database_url: str,
    name: str,
    *,
    since: date | None = None,
    until: date | None = None,
    connect: Callable[..., psycopg.Connection[Any]] = psycopg.connect,
) -> Report:
    """Run report `name` against the live generation of the read models."""
    spec = REPORTS.get(name)
    if spec is None:
        raise UnknownReport(f"unknown report {name!r}; expected one of: {', '.join(REPORTS)}")
    with connect(**connection_kwargs(database_url), autocommit=False) as conn:
        conn.execute(SHARED_LOCK, (lock_key(ReportingProjection.name),))  # see SHARED_LOCK
        row = conn.execute(LIVE_GENERATION, (ReportingProjection.name,)).fetchone()
        if row is None:
            raise LookupError("reporting_svc's database is not initialised (run `esctl db init`)")
        schema = str(row[0])
        tables = {t: sql.Identifier(schema, t) for t in ReportingProjection.tables}
        query = sql.SQL(spec.query).format(days=sql.SQL(DAYS), **tables)
        rows = conn.execute(query, {"since": since, "until": until}).fetchall()
    return Report(name, spec.columns, [tuple(r) for r in rows])
