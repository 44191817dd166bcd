"""Webhook endpoints: a URL, event-type patterns and a secret, from YAML or `esctl webhooks`.

Both sources end up in `public.webhook_endpoints`, which the projection reads for each batch
and the dispatcher for each delivery. The YAML file is synced when the consumer starts: its
endpoints are added or updated, and the ones removed from it are removed from the table.
Patterns are AMQP topic patterns over event types (`auth.account.*`, `user.#`, `#`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from integration_svc.egress import EgressPolicy, parse
from integration_svc.signing import secret_key

ENDPOINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PATTERN = re.compile(r"^(#|\*|[a-z0-9_]+)(\.(#|\*|[a-z0-9_]+))*$")


class EndpointError(ValueError):
    """An endpoint definition that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    events: tuple[str, ...]
    secret: str
    source: str = "cli"

    def __repr__(self) -> str:  # secrets never reach a log line or a traceback
        return f"Endpoint(id={self.id!r}, url={self.url!r}, events={self.events!r})"


class EndpointSpec(BaseModel):
    """One entry of the YAML file."""

    model_config = ConfigDict(extra="forbid")

    id: str
    url: str
    events: list[str] = Field(default_factory=lambda: ["#"], min_length=1)
    secret: str | None = None
    secret_env: str | None = None  # the name of a variable holding the secret

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_id(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        return check_patterns(value)


def check_id(value: str) -> str:
    if not ENDPOINT_ID.match(value):
        raise EndpointError(f"invalid endpoint id {value!r}: letters, digits, '_', '.', '-'")
    return value


def check_patterns(patterns: Sequence[str]) -> list[str]:
    bad = [p for p in patterns if not PATTERN.match(p)]
    if bad or not patterns:
        raise EndpointError(
            f"invalid event pattern(s) {', '.join(map(repr, bad)) or '(none)'}: "
            "use event types or topic patterns such as auth.account.* or user.#"
        )
    return list(patterns)


def load_file(path: str, policy: EgressPolicy) -> list[Endpoint]:
    """The endpoints of a YAML file, every one checked; EndpointError says what is wrong."""
    try:
        document: Any = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise EndpointError(f"cannot read webhooks file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise EndpointError(f"webhooks file {path} is not valid YAML: {exc}") from None
    entries = (document or {}).get("endpoints", []) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise EndpointError(f"webhooks file {path}: expected `endpoints:` with a list")
    endpoints: list[Endpoint] = []
    for i, entry in enumerate(entries):
        try:
            spec = EndpointSpec.model_validate(entry)
        except (ValidationError, EndpointError) as exc:
            raise EndpointError(f"webhooks file {path}, endpoint {i + 1}: {_first(exc)}") from None
        secret = spec.secret
        if spec.secret_env:
            secret = os.environ.get(spec.secret_env)
            if not secret:
                raise EndpointError(f"endpoint {spec.id}: variable {spec.secret_env} is not set")
        if not secret:
            raise EndpointError(f"endpoint {spec.id}: set `secret` or `secret_env`")
        endpoints.append(
            validated(Endpoint(spec.id, spec.url, tuple(spec.events), secret, "file"), policy)
        )
    ids = [e.id for e in endpoints]
    if len(set(ids)) != len(ids):
        raise EndpointError(f"webhooks file {path}: endpoint ids must be unique")
    return endpoints


def validated(endpoint: Endpoint, policy: EgressPolicy) -> Endpoint:
    """Static checks of an endpoint (DNS is checked at each delivery)."""
    check_id(endpoint.id)
    check_patterns(endpoint.events)
    try:
        secret_key(endpoint.secret)
    except ValueError as exc:
        raise EndpointError(f"endpoint {endpoint.id}: {exc}") from None
    try:
        parse(endpoint.url, policy)
    except ValueError as exc:
        raise EndpointError(f"endpoint {endpoint.id}: {exc}") from None
    return endpoint


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}" if where else str(error["msg"])
    return str(exc)


DDL = (
    "CREATE TABLE IF NOT EXISTS public.webhook_endpoints ("
    "id text PRIMARY KEY, url text NOT NULL, events text[] NOT NULL, secret text NOT NULL, "
    "source text NOT NULL DEFAULT 'cli', created_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now())",
)


async def sync_file(conn: psycopg.AsyncConnection[Any], endpoints: Sequence[Endpoint]) -> None:
    """Make the table's file endpoints equal to `endpoints` (CLI endpoints are kept)."""
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM public.webhook_endpoints WHERE source = 'file' AND id <> ALL(%s)",
            ([e.id for e in endpoints],),
        )
        for e in endpoints:
            await conn.execute(
                "INSERT INTO public.webhook_endpoints (id, url, events, secret, source) "
                "VALUES (%s, %s, %s, %s, 'file') ON CONFLICT (id) DO UPDATE SET "
                "url = excluded.url, "
                "events = excluded.events, secret = excluded.secret, source = 'file', "
                "updated_at = now()",
                (e.id, e.url, list(e.events), e.secret),
            )


async def load_all(conn: psycopg.AsyncConnection[Any]) -> list[Endpoint]:
    """Every endpoint, for the dispatcher."""
    cur = await conn.execute(
        "SELECT id, url, events, secret, source FROM public.webhook_endpoints ORDER BY id"
    )
    return [Endpoint(r[0], r[1], tuple(r[2]), r[3], r[4]) for r in await cur.fetchall()]


def add(conn: psycopg.Connection[Any], endpoint: Endpoint) -> None:
    """Insert an endpoint (already validated); EndpointError when its id is taken."""
    try:
        conn.execute(
            "INSERT INTO public.webhook_endpoints (id, url, events, secret, source) "
            "VALUES (%s, %s, %s, %s, %s)",
            (endpoint.id, endpoint.url, list(endpoint.events), endpoint.secret, endpoint.source),
        )
    except psycopg.errors.UniqueViolation:
        raise EndpointError(f"an endpoint {endpoint.id!r} exists already") from None


def remove(conn: psycopg.Connection[Any], endpoint_id: str) -> tuple[str, int]:
    """Delete an endpoint; its pending deliveries are failed. (source, deliveries failed)."""
    row = conn.execute(
        "DELETE FROM public.webhook_endpoints WHERE id = %s RETURNING source", (endpoint_id,)
    ).fetchone()
    if row is None:
        raise EndpointError(f"no endpoint {endpoint_id!r}")
    cur = conn.execute(
        "UPDATE public.webhook_deliveries SET status = 'failed', last_error = 'endpoint removed' "
        "WHERE endpoint_id = %s AND status = 'pending'",
        (endpoint_id,),
    )
    return str(row[0]), cur.rowcount


def list_endpoints(conn: psycopg.Connection[Any]) -> list[Endpoint]:
    rows = conn.execute(
        "SELECT id, url, events, secret, source FROM public.webhook_endpoints ORDER BY id"
    ).fetchall()
    return [Endpoint(r[0], r[1], tuple(r[2]), r[3], r[4]) for r in rows]
