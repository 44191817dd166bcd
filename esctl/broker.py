"""`esctl broker`: the RabbitMQ policies that set what a running consumer queue may change
(delivery limit, dead-lettering), applied through the management HTTP API."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from rich.table import Table

from esctl.console import FormatOption, OutputFormat, amqp_url, consumers, fail, out, run_async
from servicekit import amqp
from servicekit.settings import ENV_FILE
from shared_contracts.names import live_queue

app = typer.Typer(help="RabbitMQ policies of the consumer queues.", no_args_is_help=True)


class PolicySettings(BaseSettings):
    """What `esctl db init` and `esctl broker apply` write, from the environment."""

    model_config = SettingsConfigDict(extra="ignore", env_file=ENV_FILE, env_file_encoding="utf-8")

    amqp_delivery_limit: int = Field(
        default=amqp.BROKER_DELIVERY_LIMIT,
        ge=1,
        description="The broker's backstop: deliveries of one message before RabbitMQ itself "
        "dead-letters it (connection losses count too, so keep it high).",
    )
    history_max_age: str = Field(
        default=amqp.HISTORY_MAX_AGE,
        pattern=amqp.MAX_AGE_SYNTAX.pattern,
        description="events.history's retention by age (RabbitMQ's max-age: 7D, 12h, 30m): "
        "the bound for personal data on the stream after an erasure.",
    )
    history_segment_bytes: int = Field(
        default=amqp.HISTORY_SEGMENT_BYTES,
        ge=1,
        description="events.history's segment size: retention drops whole segments only.",
    )
    rabbitmq_management_url: str | None = Field(
        default=None,
        description="The management HTTP API, e.g. http://rabbit:15672; by default the "
        "AMQP_URL's hosts on port 15672 with its credentials.",
    )


DeliveryLimitOption = Annotated[
    int | None,
    typer.Option(
        "--delivery-limit",
        min=1,
        help="Broker delivery limit of every consumer queue (default: AMQP_DELIVERY_LIMIT, "
        f"else {amqp.BROKER_DELIVERY_LIMIT}).",
    ),
]


def _settings() -> PolicySettings:
    try:
        return PolicySettings()
    except ValueError as exc:
        raise fail(f"invalid broker policy setting: {exc}") from None


def apply_policies(delivery_limit: int | None = None) -> None:
    """Write one policy per consumer queue into AMQP_URL's vhost, and say so."""
    settings = _settings()
    limit = delivery_limit or settings.amqp_delivery_limit
    policies = [amqp.consumer_queue_policy(s.name, delivery_limit=limit) for s in consumers()]
    policies.append(
        amqp.history_stream_policy(
            max_age=settings.history_max_age, segment_bytes=settings.history_segment_bytes
        )
    )

    async def write() -> str:
        return await amqp.apply_policies(
            amqp_url(), policies, management_url=settings.rabbitmq_management_url
        )

    try:
        vhost = run_async(lambda _: write())
    except amqp.ManagementError as exc:
        raise fail(str(exc)) from None
    out.print(
        f"[green]✓[/green] broker policies in vhost {vhost!r} (delivery limit {limit}, "
        f"events.history max-age {settings.history_max_age}): "
        + ", ".join(p.name for p in policies),
        highlight=False,
    )


@app.command("apply")
def apply(delivery_limit: DeliveryLimitOption = None) -> None:
    """Create or update the consumer queues' policies (also part of `esctl db init`).

    They take effect on running queues at once; nothing is redeclared.
    """
    apply_policies(delivery_limit)


@app.command("policies")
def policies(output: FormatOption = OutputFormat.table) -> None:
    """Per consumer queue: our policy, the one RabbitMQ applies, and x-arguments that
    override it (a queue declared by an older build)."""
    settings = _settings()

    async def read() -> list[dict[str, Any]]:
        ours = {
            p["name"]: p
            for p in await amqp.read_policies(
                amqp_url(), management_url=settings.rabbitmq_management_url
            )
        }
        rows = []
        for service in consumers():
            queue = live_queue(service.name)
            expected = amqp.consumer_queue_policy(service.name)
            found = ours.get(expected.name)
            state = await amqp.read_queue(
                amqp_url(), queue, management_url=settings.rabbitmq_management_url
            )
            definition = (found or {}).get("definition", {})
            arguments = (state or {}).get("arguments", {})
            rows.append(
                {
                    "queue": queue,
                    "policy": expected.name if found else None,
                    "delivery_limit": definition.get("delivery-limit"),
                    "dead_letter_exchange": definition.get("dead-letter-exchange"),
                    "applied_policy": (state or {}).get("policy") or None,
                    "queue_exists": state is not None,
                    "overriding_arguments": sorted(
                        k for k in arguments if k not in amqp.CONSUMER_QUEUE_ARGUMENTS
                    ),
                }
            )
        return rows

    try:
        rows = run_async(lambda _: read())
    except amqp.ManagementError as exc:
        raise fail(str(exc)) from None
    if output is OutputFormat.json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="broker policies")
    table.add_column("queue", no_wrap=True)
    table.add_column("policy", overflow="fold")
    table.add_column("limit", justify="right")
    table.add_column("dead-letter exchange", overflow="fold")
    table.add_column("x-arguments", overflow="fold")
    for r in rows:
        table.add_row(
            r["queue"],
            r["policy"] or "[red]missing[/red] (esctl broker apply)",
            "-" if r["delivery_limit"] is None else str(r["delivery_limit"]),
            r["dead_letter_exchange"] or "-",
            ", ".join(r["overriding_arguments"]) or "-",
        )
    out.print(table)
