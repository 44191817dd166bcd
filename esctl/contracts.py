"""`esctl contracts`: the public event contracts as documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from esctl.console import out

app = typer.Typer(help="Public event contracts.", no_args_is_help=True)


@app.command("export")
def export(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write into.")] = Path(
        "contracts"
    ),
) -> None:
    """Write a JSON Schema per event type and version, and an AsyncAPI 3.0 document."""
    from shared_contracts.schema import asyncapi_document, json_schemas

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (out_dir / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    (out_dir / "asyncapi.json").write_text(
        json.dumps(asyncapi_document(), indent=2, sort_keys=True) + "\n"
    )
    out.print(f"wrote {len(json_schemas()) + 1} documents to {out_dir}/")
