"""Running the stack: one process (`serve`, `relay`, `consume`), or all of them (`up`)."""

from __future__ import annotations

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

import registry
from esctl import db, gateway, stack
from esctl.console import err, fail, out, require_dependencies, service_named
from servicekit.process import StopOnSignals
from servicekit.sealing import new_key_pair
from servicekit.service import Role
from servicekit.shredding import new_service_key


def serve(
    service: Annotated[str, typer.Argument(help="A REST service: auth_svc or user_svc")],
) -> None:
    """Run one REST service (uvicorn), logging as the stack does."""
    service_named(service, registry.with_role(Role.API), "service").run(Role.API)


def relay(
    producer: Annotated[str, typer.Argument(help="A producer: auth_svc or user_svc")],
) -> None:
    """Run a producer's relay (event store -> its exchange)."""
    service_named(producer, registry.with_role(Role.RELAY), "producer").run(Role.RELAY)


def consume(
    service: Annotated[
        str, typer.Argument(help="user_svc, reporting_svc, notify_svc or integration_svc")
    ],
) -> None:
    """Run a service's consumer (its queue -> its handler)."""
    service_named(service, registry.with_role(Role.CONSUMER), "consumer").run(Role.CONSUMER)


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
    db.init()
    procs = stack.processes() + ([stack.gateway_process()] if with_gateway else [])
    env = dict(os.environ)
    if sys.stderr.isatty():
        env.setdefault("LOG_FORMAT", "console")
    if not env.get("AUTH_LINK_SEALING_PUBLIC_KEY") and not env.get("NOTIFY_LINK_OPENING_KEYS"):
        # A key pair for this run, so verification and reset links reach the mails.
        env["NOTIFY_LINK_OPENING_KEYS"], env["AUTH_LINK_SEALING_PUBLIC_KEY"] = new_key_pair()
    for variable, key in dev_personal_data_keys().items():
        env.setdefault(variable, key)  # unless set: the stores' data stays readable across runs
    tracing = _start_tracing(env) if trace else None
    children: list[tuple[stack.Process, subprocess.Popen[bytes]]] = []
    busy = [p for p in procs if stack.reachable(p.host, p.port, timeout=0.3)]
    if busy:
        raise fail(
            "ports already in use: "
            + ", ".join(f"{p.host}:{p.port} ({p.name})" for p in busy)
            + ". Stop what listens there, or set AUTH_PORT / USER_PORT / *_RELAY_PORT."
        )
    stop = StopOnSignals()
    try:
        for proc in procs:
            children.append((proc, subprocess.Popen(proc.argv, env=env)))
        _wait_ready(children, ready_timeout, lambda: bool(stop))
        _print_urls(procs)
        while not stop:
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


DEV_KEYS_FILE = Path(".eskit") / "personal-data-keys.env"
# Also auth_svc's address id key (the same 32 random bytes): a new one on every run would
# leave the registrations of the last run unfound.
PERSONAL_DATA_KEY_VARIABLES = (
    "AUTH_PERSONAL_DATA_KEY",
    "USER_PERSONAL_DATA_KEY",
    "AUTH_ADDRESS_ID_KEY",
)


def dev_personal_data_keys(path: Path = DEV_KEYS_FILE) -> dict[str, str]:
    """The service keys `esctl up` gives auth_svc and user_svc where none is set: made on
    the first run and kept (mode 0600) in `path`, since a new key on every run would leave
    the personal fields stored by the last run unreadable."""
    keys: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip() in PERSONAL_DATA_KEY_VARIABLES and value.strip():
                keys[name.strip()] = value.strip()
    missing = [v for v in PERSONAL_DATA_KEY_VARIABLES if v not in keys]
    if missing:
        keys.update({variable: new_service_key() for variable in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.write_text("".join(f"{name}={value}\n" for name, value in sorted(keys.items())))
    return keys


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
