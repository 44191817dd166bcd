"""`esctl gateway`: the commands of the `gateway` package (kong.yml credentials, local gateway)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway import runner
from gateway.kong import (
    dump_k8s_credentials,
    dump_kong,
    load_kong,
    published_keys_reader,
    with_credentials,
)
from gateway.kong_schema import validate_file
from gateway.runner import haproxy_missing
from gateway.settings import GatewaySettings

__all__ = ["app", "haproxy_missing"]  # `esctl up` checks haproxy_missing() before it starts

app = typer.Typer(help="The Kong gateway config and the local gateway.", no_args_is_help=True)


@app.command("render")
def render(
    config: Annotated[
        Path | None, typer.Option(help="Kong declarative file (default: GATEWAY_CONFIG).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of printing.")] = None,
    k8s: Annotated[
        bool, typer.Option("--k8s", help="Kong Ingress Controller Secrets + KongConsumer instead.")
    ] = False,
    namespace: Annotated[str, typer.Option(help="Namespace of the --k8s objects.")] = "eskit",
) -> None:
    """Fill kong.yml's jwt credentials from auth_svc's published keys (run after a rotation)."""
    try:
        store = published_keys_reader()
    except Exception as exc:
        print(
            f"error: could not read auth_svc's keys: {exc} (has `esctl db init` run?)",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    try:
        keys = store.public_keys()
    finally:
        store.close()
    kong = load_kong(config or GatewaySettings().config)
    if k8s:
        text = dump_k8s_credentials(kong, keys, namespace=namespace)
    else:
        text = dump_kong(with_credentials(kong, keys))
    if out is None:
        sys.stdout.write(text)
    else:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except OSError as exc:
            print(f"error: could not write {out}: {exc.strerror or exc}", file=sys.stderr)
            raise typer.Exit(1) from None
        print(
            f"wrote {out} with {len(keys)} credential(s): {', '.join(sorted(keys))}",
            file=sys.stderr,
        )


@app.command("validate")
def validate(
    config: Annotated[
        Path | None, typer.Option(help="Kong declarative file (default: GATEWAY_CONFIG).")
    ] = None,
    db: Annotated[
        bool, typer.Option("--db", help="Kong runs with a database (default: DB-less).")
    ] = False,
) -> None:
    """Check kong.yml against Kong 3.9's schema (gateway/kong39.py): one line per error."""
    path = config or GatewaySettings().config
    problems = validate_file(path, dbless=not db)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)
    print(f"{path}: valid for Kong 3.9", file=sys.stderr)


@app.command("run")
def run() -> None:
    """Run the local gateway (HAProxy rendered from kong.yml); reload it when keys change."""
    status = runner.run()
    if status:
        raise typer.Exit(status)
