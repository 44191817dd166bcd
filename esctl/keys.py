"""`esctl keys`: auth_svc's token signing keys."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from esctl.console import FormatOption, OutputFormat, fail, out, require_dependencies

app = typer.Typer(help="auth_svc's token signing keys.", no_args_is_help=True)


@app.command("rotate")
def rotate() -> None:
    """Make a new signing key; old keys stay published until their last token expires."""
    from auth_svc.keys import rotate_signing_key
    from auth_svc.settings import AuthSettings

    require_dependencies()
    try:
        kid = rotate_signing_key(AuthSettings())
    except Exception as exc:
        raise fail(f"could not rotate: {exc} (has `esctl db init` run?)") from None
    out.print(f"new signing key {kid}")


@app.command("list")
def list_(output: FormatOption = OutputFormat.table) -> None:
    """List signing keys: which signs, which are still published."""
    from auth_svc.keys import list_keys
    from auth_svc.settings import AuthSettings

    require_dependencies()
    try:
        keys = list_keys(AuthSettings())
    except Exception as exc:
        raise fail(f"could not list keys: {exc} (has `esctl db init` run?)") from None
    if output is OutputFormat.json:
        rows = [
            {
                "kid": key.kid,
                "created_at": key.created_at.isoformat(),
                "retired_at": key.retired_at.isoformat() if key.retired_at else None,
                "signing": key.signing,
                "published": key.published,
            }
            for key in keys
        ]
        out.print_json(json.dumps(rows))
        return
    table = Table()
    for column in ("kid", "created", "retired", "signing", "published"):
        table.add_column(column)
    for key in keys:
        table.add_row(
            key.kid,
            f"{key.created_at:%Y-%m-%d %H:%M:%S}",
            f"{key.retired_at:%Y-%m-%d %H:%M:%S}" if key.retired_at else "",
            "yes" if key.signing else "",
            "yes" if key.published else "",
        )
    out.print(table)
