"""`esctl`: run and operate the stack. One module per command group."""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

from esctl import (
    broker,
    contracts,
    db,
    dlq,
    erasure,
    gateway,
    keys,
    projections,
    reports,
    run,
    webhooks,
)

app = typer.Typer(help="Run and operate the eskit stack.", no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"esctl {version('eskit')}")
        raise typer.Exit


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    """Run and operate the eskit stack."""


app.add_typer(db.app, name="db")
app.add_typer(broker.app, name="broker")
app.add_typer(keys.app, name="keys")
app.add_typer(contracts.app, name="contracts")
app.add_typer(gateway.app, name="gateway")
app.add_typer(projections.app, name="projections")
app.add_typer(dlq.app, name="dlq")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(erasure.app, name="erasure")
for command in (run.serve, run.relay, run.consume, run.up):
    app.command()(command)
app.command()(projections.replay)
app.command()(projections.republish)
app.command()(reports.report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
