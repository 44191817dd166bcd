"""Projections: read models that apply each public event once in effect.

A projection owns a set of tables in its service's own PostgreSQL database. They live in a
*generation*: a schema `<projection>_g<N>` holding the read-model tables and three of ours:

- `_positions`: the last position applied per producer, written in the same transaction as
  the read-model change, so an event at or below it is a duplicate (acked and skipped);
- `_parked`: events dead-lettered by this projection (poison). A parked event is applied
  when it comes back (`esctl dlq retry`) even though later positions were applied meanwhile;
- `_replay`: how far a rebuild has read `events.history` (only in a generation being built).

`projection_generations` (in `public`) says which generation is live and which, if any, is
being rebuilt. The live consumer takes a shared advisory lock and reads the live generation
at the start of every batch; a replay swaps generations by updating that row under the
exclusive lock. Readers therefore always see one complete generation, and the swap is atomic.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from servicekit.eventstore import connection_kwargs
from shared_contracts.envelope import Envelope
from shared_contracts.events import CONTRACTS, ContractEvent, contract_for
from shared_contracts.names import PRODUCER_EXCHANGES

log = logging.getLogger("servicekit.projection")

Outcome = Literal["applied", "duplicate"]

CONTROL_TABLE = "projection_generations"
CONTROL_DDL = (
    f"CREATE TABLE IF NOT EXISTS public.{CONTROL_TABLE} ("
    "projection text PRIMARY KEY, live text NOT NULL, building text, "
    "generation integer NOT NULL, swapped_at timestamptz NOT NULL DEFAULT now())"
)
OWN_TABLES: dict[str, str] = {
    "_positions": "producer text PRIMARY KEY, position bigint NOT NULL, event_id uuid NOT NULL, "
    "occurred_at timestamptz NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()",
    "_parked": "producer text NOT NULL, position bigint NOT NULL, event_id uuid NOT NULL, "
    "event_type text NOT NULL, reason text NOT NULL, parked_at timestamptz NOT NULL "
    "DEFAULT now(), PRIMARY KEY (producer, position)",
    "_replay": "id boolean PRIMARY KEY DEFAULT true CHECK (id), stream_offset bigint NOT NULL, "
    "applied bigint NOT NULL DEFAULT 0, started_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now()",
}


@dataclass(frozen=True)
class Applied:
    """An event to apply: its envelope and its validated contract."""

    envelope: Envelope
    event: ContractEvent


class Transaction:
    """What a projection's `apply` works with: a cursor inside the batch's transaction."""

    def __init__(self, cursor: psycopg.AsyncCursor[Any], schema: str, *, replaying: bool) -> None:
        self.cursor = cursor
        self.schema = schema
        self.replaying = replaying  # side effects must not be recorded while rebuilding

    def table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    async def execute(self, query: str, params: Sequence[Any] | None = None) -> None:
        """Run `query` with `{name}` placeholders replaced by this generation's tables."""
        await self.cursor.execute(self.compose(query), params)

    async def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await self.cursor.executemany(self.compose(query), rows)

    def compose(self, query: str) -> sql.Composed:
        names = set(re.findall(r"\{(\w+)\}", query))
        return sql.SQL(query).format(**{n: self.table(n) for n in names})


class Projection:
    """A read model. Subclasses set the class attributes and implement `apply`.

    `tables` maps each read-model table to its column definitions; `apply` receives a whole
    batch of new events in position order per producer, and should write it with few
    statements (aggregate in memory, then `executemany`).
    """

    name: str  # the consuming service, e.g. "reporting_svc"
    bindings: dict[str, list[str]]  # producer exchange -> routing keys (event types)
    tables: dict[str, str]
    indexes: Sequence[str] = ()  # e.g. "CREATE INDEX ON {logins} (day)"
    order_by: dict[str, str] = {}  # table -> ORDER BY used when comparing generations

    async def apply(self, tx: Transaction, events: Sequence[Applied]) -> None:
        raise NotImplementedError

    def handles(self, envelope: Envelope) -> bool:
        exchange = PRODUCER_EXCHANGES.get(envelope.producer)
        keys = self.bindings.get(exchange or "", [])
        return any(topic_matches(key, envelope.event_type) for key in keys)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""
    regex = (
        re.escape(pattern)
        .replace(r"\#", "<hash>")
        .replace(r"\*", "[^.]+")
        .replace(r"\.<hash>", r"(\.[^.]+)*")
        .replace(r"<hash>\.", r"([^.]+\.)*")
        .replace("<hash>", ".*")
    )
    return re.fullmatch(regex, routing_key) is not None


def validated(envelope: Envelope) -> ContractEvent | None:
    """The envelope's contract event, or None for an unknown type or a newer version.

    Raises ValidationError when the data fails its schema.
    """
    contract = contract_for(envelope.event_type, envelope.schema_version)
    if contract is None:
        return None
    return contract.model_validate(envelope.data)


def is_newer_version(envelope: Envelope) -> bool:
    return any(t == envelope.event_type and v < envelope.schema_version for (t, v) in CONTRACTS)


def lock_key(projection: str) -> int:
    """A stable 63-bit advisory-lock key for a projection's generations."""
    digest = hashlib.blake2b(f"projection:{projection}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def generation_schema(projection: str, generation: int) -> str:
    return f"{projection}_g{generation}"


class ProjectionStore:
    """A projection's tables in its database: setup, batches, parking, generations."""

    def __init__(self, projection: Projection, database_url: str, *, pool_size: int = 2) -> None:
        self.projection = projection
        self.database_url = database_url
        self.key = lock_key(projection.name)
        self._parked_here = False  # this process parked an event (see apply_in)
        kwargs = connection_kwargs(database_url)
        self.pool = AsyncConnectionPool(
            kwargs=kwargs, min_size=1, max_size=pool_size, open=False, name=projection.name
        )

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> ProjectionStore:
        await self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- schema -------------------------------------------------------------------------

    async def setup(self) -> str:
        """Create the control table and a first live generation if there is none."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.key,))
            await conn.execute(CONTROL_DDL)
            row = await (
                await conn.execute(
                    "SELECT live FROM public.projection_generations WHERE projection = %s",
                    (self.projection.name,),
                )
            ).fetchone()
            if row is not None:
                await self._create_tables(conn, row[0])  # new tables of a newer build
                return str(row[0])
            schema = generation_schema(self.projection.name, 1)
            await self._create_tables(conn, schema)
            await conn.execute(
                "INSERT INTO public.projection_generations (projection, live, generation) "
                "VALUES (%s, %s, 1)",
                (self.projection.name, schema),
            )
            return schema

    async def _create_tables(self, conn: psycopg.AsyncConnection[Any], schema: str) -> None:
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        for name, columns in {**OWN_TABLES, **self.projection.tables}.items():
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (" + columns + ")").format(
                    sql.Identifier(schema, name)
                )
            )
        for index in self.projection.indexes:
            tx = Transaction(conn.cursor(), schema, replaying=False)
            await conn.execute(
                tx.compose(index.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
            )

    async def live_schema(self, conn: psycopg.AsyncConnection[Any]) -> str:
        row = await (
            await conn.execute(
                "SELECT live FROM public.projection_generations WHERE projection = %s",
                (self.projection.name,),
            )
        ).fetchone()
        if row is None:
            raise LookupError(f"projection {self.projection.name} has not been set up")
        return str(row[0])

    # -- applying -----------------------------------------------------------------------

    async def apply_batch(self, events: Sequence[Applied]) -> list[Outcome]:
        """Apply new events to the live generation in one transaction; report each outcome."""
        async with self.pool.connection() as conn, conn.transaction():
            # Two statements on purpose: the second one's snapshot is taken after the lock is
            # granted, so it sees a swap that committed while this batch waited.
            await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.key,))
            schema = await self.live_schema(conn)
            return await self.apply_in(conn, schema, events, replaying=False)

    async def apply_in(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[Applied],
        *,
        replaying: bool,
    ) -> list[Outcome]:
        """Apply `events` to generation `schema` within the caller's transaction."""
        cur = conn.cursor()
        tx = Transaction(cur, schema, replaying=replaying)
        await cur.execute(tx.compose("SELECT producer, position FROM {_positions} FOR UPDATE"))
        applied_at: dict[str, int] = {p: pos for p, pos in await cur.fetchall()}
        outcomes: list[Outcome] = []
        fresh: list[Applied] = []
        older: list[Applied] = []
        last: dict[str, Envelope] = {}
        for item in events:
            env = item.envelope
            if env.position > applied_at.get(env.producer, 0):
                applied_at[env.producer] = env.position
                last[env.producer] = env
                fresh.append(item)
                outcomes.append("applied")
            else:
                older.append(item)
                outcomes.append("duplicate")
        if fresh and self._parked_here:
            # Parked before its last delivery (the process may die on it): applied now, so
            # a later redelivery must be a duplicate again.
            await self._unpark(tx, fresh)
        if older:  # a parked (dead-lettered) event coming back is applied after all
            unparked = await self._unpark(tx, older)
            for i, item in enumerate(events):
                if outcomes[i] == "duplicate" and item.envelope.event_id in unparked:
                    outcomes[i] = "applied"
                    fresh.append(item)
        if not fresh:
            return outcomes
        await self.projection.apply(tx, fresh)
        await tx.executemany(
            "INSERT INTO {_positions} (producer, position, event_id, occurred_at, applied_at) "
            "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (producer) DO UPDATE SET "
            "position = excluded.position, event_id = excluded.event_id, "
            "occurred_at = excluded.occurred_at, applied_at = excluded.applied_at",
            [(p, e.position, e.event_id, e.occurred_at) for p, e in last.items()],
        )
        return outcomes

    async def _unpark(self, tx: Transaction, older: Sequence[Applied]) -> set[Any]:
        await tx.cursor.execute(
            tx.compose(
                "DELETE FROM {_parked} WHERE (producer, position) IN "
                "(SELECT * FROM unnest(%s::text[], %s::bigint[])) RETURNING event_id"
            ),
            (
                [a.envelope.producer for a in older],
                [a.envelope.position for a in older],
            ),
        )
        return {row[0] for row in await tx.cursor.fetchall()}

    async def park(self, envelope: Envelope, reason: str) -> None:
        """Remember a dead-lettered event, so that its retry is applied, not skipped."""
        self._parked_here = True
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self.key,))
            schema = await self.live_schema(conn)
            tx = Transaction(conn.cursor(), schema, replaying=False)
            await tx.execute(
                "INSERT INTO {_parked} (producer, position, event_id, event_type, reason) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (producer, position) DO UPDATE SET "
                "reason = excluded.reason, parked_at = now()",
                (
                    envelope.producer,
                    envelope.position,
                    envelope.event_id,
                    envelope.event_type,
                    reason[:500],
                ),
            )

    # -- reading ------------------------------------------------------------------------

    async def positions(self, schema: str | None = None) -> dict[str, Position]:
        async with self.pool.connection() as conn:
            schema = schema or await self.live_schema(conn)
            tx = Transaction(conn.cursor(), schema, replaying=False)
            await tx.execute("SELECT producer, position, occurred_at, applied_at FROM {_positions}")
            return {
                row[0]: Position(row[0], row[1], row[2], row[3])
                for row in await tx.cursor.fetchall()
            }

    async def positions_in(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
        """The live generation's positions, read on the caller's connection."""
        tx = Transaction(conn.cursor(), await self.live_schema(conn), replaying=False)
        await tx.execute("SELECT producer, position FROM {_positions}")
        return {str(p): int(pos) for p, pos in await tx.cursor.fetchall()}

    async def parked_count(self) -> int:
        async with self.pool.connection() as conn:
            tx = Transaction(conn.cursor(), await self.live_schema(conn), replaying=False)
            await tx.execute("SELECT count(*) FROM {_parked}")
            row = await tx.cursor.fetchone()
            return int(row[0]) if row else 0


@dataclass(frozen=True)
class Position:
    producer: str
    position: int
    occurred_at: datetime
    applied_at: datetime

    @property
    def age_seconds(self) -> float:
        return max((datetime.now(UTC) - self.occurred_at).total_seconds(), 0.0)
