"""`esctl db`: each service's database and tables."""

from __future__ import annotations

import typer

import registry
from esctl import broker
from esctl.console import fail, out, require_dependencies

app = typer.Typer(help="Databases.", no_args_is_help=True)


@app.command("init")
def init(delivery_limit: broker.DeliveryLimitOption = None) -> None:
    """Create each service's database and tables, and the broker's policies (idempotent)."""
    require_dependencies()
    for service in registry.SERVICES:
        try:
            service.init_db(service.settings())
        except Exception as exc:
            raise fail(f"{service.name}: could not initialise its database: {exc}") from None
        out.print(f"[green]✓[/green] {service.name} database ready")
    broker.apply_policies(delivery_limit)
