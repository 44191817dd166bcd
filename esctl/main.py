"""`esctl`: run and operate the stack."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from esctl import gateway, operate, stack, webhooks
from esctl.console import choose, err, fail, out, require_dependencies
from esctl.operate import CONSUMERS, PRODUCERS, PROJECTIONS

app = typer.Typer(help="Run and operate the eskit stack.", no_args_is_help=True)
db_app = typer.Typer(help="Databases.", no_args_is_help=True)
keys_app = typer.Typer(help="auth_svc's token signing keys.", no_args_is_help=True)
contracts_app = typer.Typer(help="Public event contracts.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(contracts_app, name="contracts")
app.add_typer(gateway.app, name="gateway")
app.add_typer(operate.projections_app, name="projections")
app.add_typer(operate.dlq_app, name="dlq")
app.add_typer(webhooks.app, name="webhooks")
app.command()(operate.replay)
app.command()(operate.republish)
app.command()(operate.report)

REST_SERVICES = ("auth_svc", "user_svc")
DATABASES = ("auth_svc", "user_svc", *PROJECTIONS)


@db_app.command("init")
def db_init() -> None:
    """Create each service's database and tables (idempotent)."""
    require_dependencies()
    for service in DATABASES:
        module = importlib.import_module(f"{service}.main")
        try:
            module.init_db()
        except Exception as exc:
            raise fail(f"{service}: could not initialise its database: {exc}") from None
        out.print(f"[green]✓[/green] {service} database ready")


@app.command()
def serve(service: Annotated[str, typer.Argument(help="auth_svc or user_svc")]) -> None:
    """Run one REST service (uvicorn), logging as the stack does."""
    import uvicorn

    from servicekit.logs import configure_logging

    choose(service, REST_SERVICES, "service")
    module = importlib.import_module(f"{service}.main")
    settings = importlib.import_module(f"{service}.settings")
    config = next(
        getattr(settings, n)() for n in ("AuthSettings", "UserSettings") if hasattr(settings, n)
    )
    configure_logging(service, level=config.log_level, fmt=config.log_format)
    uvicorn.run(
        module.create_app,
        factory=True,
        host=config.host,
        port=config.port,
        log_config=None,
        access_log=False,
        workers=None,
    )


@app.command()
def relay(producer: Annotated[str, typer.Argument(help="auth_svc or user_svc")]) -> None:
    """Run a producer's relay (event store -> its exchange)."""
    choose(producer, PRODUCERS, "producer")
    importlib.import_module(f"{producer}.relay").main()


@app.command()
def consume(
    service: Annotated[
        str, typer.Argument(help="user_svc, reporting_svc, notify_svc or integration_svc")
    ],
) -> None:
    """Run a service's consumer (its queue -> its handler)."""
    choose(service, CONSUMERS, "consumer")
    importlib.import_module(f"{service}.consumer").main()


@app.command()
def up(
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 60.0,
    with_gateway: Annotated[
        bool, typer.Option("--gateway/--no-gateway", help="Also run the local gateway.")
    ] = True,
    trace: Annotated[
        bool,
        typer.Option("--trace", help="Print the tree of spans of each request, across processes."),
    ] = False,
) -> None:
    """Run the whole stack on this machine; Ctrl-C stops it."""
    require_dependencies()
    if with_gateway and (problem := gateway.haproxy_missing()):
        raise fail(f"{problem}, or run `esctl up --no-gateway`")
    db_init()
    procs = stack.processes() + ([stack.gateway_process()] if with_gateway else [])
    env = dict(os.environ)
    if sys.stderr.isatty():
        env.setdefault("LOG_FORMAT", "console")
    tracing = _start_tracing(env) if trace else None
    children: list[tuple[stack.Process, subprocess.Popen[bytes]]] = []
    busy = [p for p in procs if stack.reachable(p.host, p.port, timeout=0.3)]
    if busy:
        raise fail(
            "ports already in use: "
            + ", ".join(f"{p.host}:{p.port} ({p.name})" for p in busy)
            + ". Stop what listens there, or set AUTH_PORT / USER_PORT / *_RELAY_PORT."
        )
    stopping = False

    def stop_all(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        for proc in procs:
            children.append((proc, subprocess.Popen(proc.argv, env=env)))
        _wait_ready(children, ready_timeout, lambda: stopping)
        _print_urls(procs)
        while not stopping:
            for proc, child in children:
                if child.poll() is not None:
                    raise fail(f"{proc.name} exited with code {child.returncode}")
            time.sleep(0.5)
        err.print("stopping…")
    finally:
        _stop_children(children)
        if tracing is not None:
            for part in tracing:
                part.stop()


def _start_tracing(env: dict[str, str]) -> tuple[Any, Any]:
    """A span receiver for the children (set in `env`) and a printer of each request's tree."""
    from esctl.trace import SpanReceiver, TracePrinter

    printer = TracePrinter(lambda text: out.print(text, markup=False, highlight=False)).start()
    receiver = SpanReceiver(on_spans=printer.add).start()
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    env.pop("OTEL_SDK_DISABLED", None)
    env["OTEL_TRACES_EXPORTER"] = "otlp"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
    return receiver, printer  # stopped in this order: the children flush first


def _wait_ready(
    children: list[tuple[stack.Process, subprocess.Popen[bytes]]],
    timeout: float,
    stopping: Any,
) -> None:
    deadline = time.monotonic() + timeout
    pending = {proc.name: proc for proc, _ in children}
    with httpx.Client(timeout=2.0) as client:
        while pending and not stopping():
            for proc, child in children:
                if child.poll() is not None:
                    raise fail(f"{proc.name} exited with code {child.returncode} while starting")
            for name, proc in list(pending.items()):
                try:
                    if client.get(f"{proc.url}/health/ready").status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise fail(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
            time.sleep(0.2)


def _print_urls(procs: list[stack.Process]) -> None:
    table = Table(title="eskit is running (Ctrl-C stops it)")
    table.add_column("process")
    table.add_column("url")
    table.add_column("what")
    for proc in procs:
        what = f"REST API, docs at {proc.url}/docs" if proc.public else "health and metrics"
        what = proc.what or what
        table.add_row(proc.name, proc.url, what)
    out.print(table)


def _stop_children(children: list[tuple[stack.Process, subprocess.Popen[bytes]]]) -> None:
    for _, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for _, child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@contracts_app.command("export")
def contracts_export(
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


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Make a new signing key; old keys stay published until their last token expires."""
    from auth_svc.keys import rotate_signing_key
    from auth_svc.settings import AuthSettings

    require_dependencies()
    try:
        kid = rotate_signing_key(AuthSettings())
    except Exception as exc:
        raise fail(f"could not rotate: {exc} (has `esctl db init` run?)") from None
    out.print(f"new signing key {kid}")


@keys_app.command("list")
def keys_list() -> None:
    """List signing keys: which signs, which are still published."""
    from auth_svc.keys import list_keys
    from auth_svc.settings import AuthSettings

    require_dependencies()
    try:
        keys = list_keys(AuthSettings())
    except Exception as exc:
        raise fail(f"could not list keys: {exc} (has `esctl db init` run?)") from None
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
