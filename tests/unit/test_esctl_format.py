"""esctl's tables stay readable at 80 columns, and every list command takes --format."""

from __future__ import annotations

from rich.console import Console
from typer.main import get_command

from esctl.console import OutputFormat
from esctl.main import app
from esctl.projections import status_table


def rendered(table: object, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def test_projections_status_keeps_every_name_whole_at_80_columns() -> None:
    rows = [
        {
            "projection": name,
            "producer": producer,
            "applied": 123456,
            "latest": 123470,
            "behind_positions": 14,
            "queued": 3,
            "lag_seconds": 12.5,
            "dlq": 366,
        }
        for name in ("reporting_svc", "integration_svc", "notify_svc")
        for producer in ("auth_svc", "user_svc")
    ]
    lines = rendered(status_table(rows))
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text
    for name in ("reporting_svc", "integration_svc", "notify_svc", "auth_svc", "user_svc"):
        assert name in text
    assert "123470" in text


def test_every_list_command_takes_format_table_or_json() -> None:
    root = get_command(app)
    listing = {
        ("projections", "status"),
        ("dlq", "list"),
        ("keys", "list"),
        ("webhooks", "list"),
        ("webhooks", "deliveries"),
        ("broker", "policies"),
    }
    for group, name in listing:
        command = root.commands[group].commands[name]  # type: ignore[attr-defined]
        option = next(p for p in command.params if "--format" in p.opts)
        assert list(option.type.choices) == ["table", "json"], (group, name)
        assert option.default in (OutputFormat.table, "table")
    report = next(p for p in root.commands["report"].params if "--format" in p.opts)
    assert list(report.type.choices) == ["table", "json", "csv"]
