"""`esctl report`: reporting_svc's read models as tables, JSON or CSV."""

from __future__ import annotations

import csv
import json
import sys
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any

import psycopg
import typer
from rich.table import Table

from esctl.console import choose, fail, first_line, out, require_dependencies


class ReportFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


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
    output: Annotated[
        ReportFormat, typer.Option("--format", case_sensitive=False, help="table, json or csv")
    ] = ReportFormat.table,
) -> None:
    """Print one of reporting_svc's read models."""
    from reporting_svc.reports import REPORTS, read_report
    from reporting_svc.settings import ReportingSettings

    choose(name, tuple(REPORTS), "report")
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
            f"reporting_svc's database: {first_line(exc)} (has `esctl db init` run?)"
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


def _plain(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value
