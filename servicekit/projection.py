"""Projections: read models that apply each public event once in effect.

A projection owns a set of tables in its service's own PostgreSQL database. They live in a
*generation*: a schema `<projection>_g<N>` holding the read-model tables and three of ours:

- `_positions`: per producer, the highest position *decided*: applied, or parked. It is
  written in the same transaction as the read-model change;
- `_parked`: events decided but not applied: dead-lettered as poison. Every parked position
  is at or below its producer's `_positions`, so for any event at or below it, "applied" is
  exactly "not parked". A redelivery of an applied event is therefore always a duplicate,
  whatever its delivery count, and a parked event coming back (`esctl dlq retry`) is applied
  although later positions were applied meanwhile. Parking is decided in the transaction
  that moves the position, so an applied event is never parked;
- `_attempts`: how often handling an undecided event began again after a redelivery and did
  not finish (the process died): the consumer's count of crashes, apart from the broker's
  redelivery count, which also rises with every lost connection;
- `_replay`: how far a rebuild has read `events.history` (only in a generation being built).

`projection_generations` (in `public`) says which generation is live and which, if any, is
being rebuilt. The live consumer takes a shared advisory lock and reads the live generation
at the start of every batch; a replay swaps generations by updating that row under the
exclusive lock. Readers therefore always see one complete generation, and the swap is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from servicekit.eventstore import connection_kwargs, ensure_database
from servicekit.messages import IncomingEvent, Outcome
from shared_contracts.envelope import Envelope
from shared_contracts.names import PRODUCER_EXCHANGES

log = logging.getLogger("servicekit.projection")

CONTROL_TABLE = "projection_generations"
# `queue_since`: the stream offset from which events went to the live queue too (read just
# before the queue was first declared). A replay takes what came before for history: it never
# reached the live consumer, and a new projection must not act on a backlog it never saw.
CONTROL_DDL = (
    f"CREATE TABLE IF NOT EXISTS public.{CONTROL_TABLE} ("
    "projection text PRIMARY KEY, live text NOT NULL, building text, "
    "generation integer NOT NULL, swapped_at timestamptz NOT NULL DEFAULT now(), "
    "queue_since bigint)",
    f"ALTER TABLE public.{CONTROL_TABLE} ADD COLUMN IF NOT EXISTS queue_since bigint",
)
# Who has been erased here (servicekit.erasure): in `public`, outside every generation, so a
# replay (which swaps generations) never forgets an erasure.
ERASURES_DDL = (
    "CREATE TABLE IF NOT EXISTS public.erasures (user_id uuid PRIMARY KEY, "
    "erased_at timestamptz NOT NULL DEFAULT now(), swept_at timestamptz)",
    "CREATE INDEX IF NOT EXISTS erasures_unswept ON public.erasures (erased_at) "
    "WHERE swept_at IS NULL",
)
OWN_TABLES: dict[str, str] = {
    "_positions": "producer text PRIMARY KEY, position bigint NOT NULL, event_id uuid NOT NULL, "
    "occurred_at timestamptz NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()",
    "_parked": "producer text NOT NULL, position bigint NOT NULL, event_id uuid NOT NULL, "
    "event_type text NOT NULL, reason text NOT NULL, parked_at timestamptz NOT NULL "
    "DEFAULT now(), envelope jsonb, PRIMARY KEY (producer, position)",
    "_attempts": "producer text NOT NULL, position bigint NOT NULL, event_id uuid NOT NULL, "
    "attempts integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (producer, position)",
    "_replay": "id boolean PRIMARY KEY DEFAULT true CHECK (id), stream_offset bigint NOT NULL, "
    "applied bigint NOT NULL DEFAULT 0, started_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now()",
}


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
        if len(rows) == 1:  # live traffic: one row per statement is the rule, without a pipeline
            await self.cursor.execute(self.compose(query), rows[0])
        elif rows:
            await self.cursor.executemany(self.compose(query), rows)

    def compose(self, query: str) -> sql.Composed:
        return _composed(query, self.schema)


@functools.lru_cache(maxsize=1024)
def _composed(query: str, schema: str) -> sql.Composed:
    """`query` with `{name}` placeholders replaced by `schema`'s tables (the same few
    statements run for every batch: composing them once saves a share of its cost)."""
    names = set(re.findall(r"\{(\w+)\}", query))
    return sql.SQL(query).format(**{n: sql.Identifier(schema, n) for n in names})


class Projection:
    """A read model. Subclasses set the class attributes and implement `apply`.

    `tables` maps each read-model table to its column definitions; `apply` receives a whole
    batch of new events in position order per producer, and should write it with few
    statements (aggregate in memory, then `executemany`).
    """

    name: str  # the consuming service, e.g. "reporting_svc"
    bindings: dict[str, list[str]]  # producer exchange -> routing keys (event types)
    # What the consumer binds its queue to when it declares it, where that is not
    # `bindings` (integration_svc binds the rest as its endpoints want).
    queue_bindings: dict[str, list[str]] | None = None
    tables: dict[str, str]
    indexes: Sequence[str] = ()  # e.g. "CREATE INDEX ON {logins} (day)"
    # Idempotent statements that bring a generation made by an older build up to date, e.g.
    # "ALTER TABLE {profiles} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0".
    migrations: Sequence[str] = ()
    order_by: dict[str, str] = {}  # table -> ORDER BY used when comparing generations

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
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


# Whoever reads a generation (the consumer, the mail dispatcher, reports) first takes the
# projection's advisory lock shared, in its transaction, then reads which generation is live,
# in a second statement: its snapshot is taken after the lock is granted, so it sees a swap
# that committed meanwhile, and the swap (exclusive) cannot drop the tables it then reads.
SHARED_LOCK = "SELECT pg_advisory_xact_lock_shared(%s)"
LIVE_GENERATION = "SELECT live FROM public.projection_generations WHERE projection = %s"


async def live_generation(conn: psycopg.AsyncConnection[Any], projection: str) -> str | None:
    """The live generation of `projection`, under the shared lock (within a transaction)."""
    await conn.execute(SHARED_LOCK, (lock_key(projection),))
    row = await (await conn.execute(LIVE_GENERATION, (projection,))).fetchone()
    return None if row is None else str(row[0])


def lock_key(projection: str) -> int:
    """A stable 63-bit advisory-lock key for a projection's generations."""
    digest = hashlib.blake2b(f"projection:{projection}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def generation_schema(projection: str, generation: int) -> str:
    return f"{projection}_g{generation}"


def init_projection_db(database_url: str, projection: Projection, ddl: Sequence[str] = ()) -> None:
    """`esctl db init` for a projection's service: its database, the tables it keeps outside
    every generation (`ddl`: intents), and its live generation (idempotent)."""
    ensure_database(database_url)
    if ddl:
        with psycopg.connect(**connection_kwargs(database_url), autocommit=True) as conn:
            for statement in ddl:
                conn.execute(statement)

    async def setup() -> None:
        async with ProjectionStore(projection, database_url) as store:
            await store.setup()

    asyncio.run(setup())


class ProjectionStore:
    """A projection's tables in its database: setup, batches, parking, generations."""

    def __init__(self, projection: Projection, database_url: str, *, pool_size: int = 2) -> None:
        self.projection = projection
        self.database_url = database_url
        self.key = lock_key(projection.name)
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
            for statement in (*CONTROL_DDL, *ERASURES_DDL):
                await conn.execute(statement)
            row = await (await conn.execute(LIVE_GENERATION, (self.projection.name,))).fetchone()
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
        tx = Transaction(conn.cursor(), schema, replaying=False)
        await tx.execute("ALTER TABLE {_parked} ADD COLUMN IF NOT EXISTS envelope jsonb")
        for index in self.projection.indexes:
            await tx.execute(index.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
        for statement in self.projection.migrations:
            await tx.execute(statement)
        # Older builds parked events above the position; a parked event is decided.
        await tx.execute(
            "INSERT INTO {_positions} AS t (producer, position, event_id, occurred_at) "
            "SELECT DISTINCT ON (producer) producer, position, event_id, parked_at "
            "FROM {_parked} ORDER BY producer, position DESC "
            "ON CONFLICT (producer) DO UPDATE SET position = excluded.position, "
            "event_id = excluded.event_id WHERE t.position < excluded.position"
        )

    async def live_schema(self, conn: psycopg.AsyncConnection[Any]) -> str:
        row = await (await conn.execute(LIVE_GENERATION, (self.projection.name,))).fetchone()
        if row is None:
            raise LookupError(f"projection {self.projection.name} has not been set up")
        return str(row[0])

    # -- applying -----------------------------------------------------------------------

    async def apply_batch(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """Apply new events to the live generation in one transaction; report each outcome."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(SHARED_LOCK, (self.key,))  # see SHARED_LOCK
            schema = await self.live_schema(conn)
            return await self.apply_in(conn, schema, events, replaying=False)

    async def apply_in(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        events: Sequence[IncomingEvent],
        *,
        replaying: bool,
    ) -> list[Outcome]:
        """Apply `events` to generation `schema` within the caller's transaction.

        An event above its producer's position is new; at or below it, a duplicate unless
        it is parked, in which case it is unparked and applied now.
        """
        cur = conn.cursor()
        tx = Transaction(cur, schema, replaying=replaying)
        await cur.execute(tx.compose("SELECT producer, position FROM {_positions} FOR UPDATE"))
        decided: dict[str, int] = {p: pos for p, pos in await cur.fetchall()}
        outcomes: list[Outcome] = []
        fresh: list[IncomingEvent] = []
        older: list[int] = []
        last: dict[str, Envelope] = {}
        for i, item in enumerate(events):
            env = item.envelope
            if env.position > decided.get(env.producer, 0):
                decided[env.producer] = env.position
                last[env.producer] = env
                fresh.append(item)
                outcomes.append("applied")
            else:
                older.append(i)
                outcomes.append("duplicate")
        if older:  # a parked (dead-lettered) event coming back is applied after all, once
            unparked = await self._unpark(tx, [events[i] for i in older])
            for i in older:
                if events[i].envelope.event_id in unparked:
                    unparked.discard(events[i].envelope.event_id)  # a second copy: duplicate
                    outcomes[i] = "applied"
                    fresh.append(events[i])
        if not fresh:
            return outcomes
        await self.projection.apply(tx, fresh)
        await self._advance(tx, list(last.values()))
        return outcomes

    async def _advance(self, tx: Transaction, last: Sequence[Envelope]) -> None:
        """Move each producer's position up to the given envelope's."""
        await tx.executemany(
            "INSERT INTO {_positions} AS t (producer, position, event_id, occurred_at, "
            "applied_at) VALUES (%s, %s, %s, %s, now()) ON CONFLICT (producer) DO UPDATE SET "
            "position = excluded.position, event_id = excluded.event_id, "
            "occurred_at = excluded.occurred_at, applied_at = excluded.applied_at "
            "WHERE t.position < excluded.position",
            [(e.producer, e.position, e.event_id, e.occurred_at) for e in last],
        )

    async def _unpark(self, tx: Transaction, older: Sequence[IncomingEvent]) -> set[Any]:
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

    async def park(self, envelope: Envelope, reason: str) -> bool:
        """Park a poison event in the live generation before it is dead-lettered.

        False when the event is already applied: it is a duplicate, with nothing to park or
        dead-letter. A later `esctl dlq retry` of a parked event applies it.
        """
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(SHARED_LOCK, (self.key,))
            return await self.park_in(conn, await self.live_schema(conn), envelope, reason)

    async def park_in(
        self, conn: psycopg.AsyncConnection[Any], schema: str, envelope: Envelope, reason: str
    ) -> bool:
        """`park`, in generation `schema` within the caller's transaction."""
        tx = Transaction(conn.cursor(), schema, replaying=False)
        await tx.execute(
            "SELECT position FROM {_positions} WHERE producer = %s FOR UPDATE",
            (envelope.producer,),
        )
        row = await tx.cursor.fetchone()
        row_values = (
            envelope.producer,
            envelope.position,
            envelope.event_id,
            envelope.event_type,
            reason[:500],
        )
        if envelope.position > (int(row[0]) if row else 0) and await _erased(tx, envelope):
            # About a person erased here: decided, never parked nor dead-lettered (that would
            # keep their data, and a rebuild could not swap over an event it parked).
            await self._advance(tx, [envelope])
            return False
        if envelope.position > (int(row[0]) if row else 0):
            await self._advance(tx, [envelope])
            await tx.execute(
                "INSERT INTO {_parked} (producer, position, event_id, event_type, reason, "
                "envelope) VALUES (%s, %s, %s, %s, %s, %s)",
                (*row_values, envelope.model_dump_json()),
            )
            parked = True
        else:  # decided already: parked before (then kept), or applied
            await tx.execute(
                "UPDATE {_parked} SET reason = %s, parked_at = now() "
                "WHERE producer = %s AND position = %s",
                (reason[:500], envelope.producer, envelope.position),
            )
            parked = tx.cursor.rowcount > 0
        # Its crash count stays: parking comes before the dead letter is published, and if
        # that publish is lost the broker redelivers the event, which must not then be handled
        # as if it had never crashed (the state machine found it handled past the limit).
        return parked

    async def attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        """Crashed handlings of each undecided event (above its position, or parked).

        `count` records one more for each, first: the consumer is about to handle them
        again after a redelivery. Rows of events decided since are cleaned up on the way.
        """
        if not envelopes:
            return {}
        distinct = {(e.producer, e.position): e for e in envelopes}.values()  # re-sent copies
        params = (
            [e.producer for e in distinct],
            [e.position for e in distinct],
            [e.event_id for e in distinct],
        )
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(SHARED_LOCK, (self.key,))
            tx = Transaction(conn.cursor(), await self.live_schema(conn), replaying=False)
            undecided = (
                "FROM unnest(%s::text[], %s::bigint[], %s::uuid[]) AS e(producer, position, "
                "event_id) LEFT JOIN {_positions} p USING (producer) "
                "WHERE e.position > coalesce(p.position, 0) OR EXISTS (SELECT 1 FROM {_parked} k "
                "WHERE k.producer = e.producer AND k.position = e.position)"
            )
            if not count:
                peek = "SELECT a.event_id, a.attempts FROM {_attempts} a JOIN (SELECT "
                peek += f"e.producer, e.position {undecided}) u USING (producer, position)"
                await tx.execute(peek, params)
                return {r[0]: int(r[1]) for r in await tx.cursor.fetchall()}
            await tx.execute(
                "DELETE FROM {_attempts} a USING {_positions} p WHERE a.producer = p.producer "
                "AND a.position <= p.position AND NOT EXISTS (SELECT 1 FROM {_parked} k "
                "WHERE k.producer = a.producer AND k.position = a.position)"
            )
            await tx.execute(
                "INSERT INTO {_attempts} AS a (producer, position, event_id, attempts) "
                f"SELECT e.producer, e.position, e.event_id, 1 {undecided} "
                "ON CONFLICT (producer, position) DO UPDATE SET attempts = a.attempts + 1, "
                "updated_at = now() RETURNING a.event_id, a.attempts",
                params,
            )
            return {r[0]: int(r[1]) for r in await tx.cursor.fetchall()}

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

    async def decided_in(self, conn: psycopg.AsyncConnection[Any]) -> Decided:
        """The live generation's positions and parked events, in one snapshot."""
        tx = Transaction(conn.cursor(), await self.live_schema(conn), replaying=False)
        await tx.execute(
            "SELECT producer, position, false FROM {_positions} UNION ALL "
            "SELECT producer, position, true FROM {_parked}"
        )
        decided = Decided()
        for producer, position, parked in await tx.cursor.fetchall():
            if parked:
                decided.parked.add((str(producer), int(position)))
            else:
                decided.positions[str(producer)] = int(position)
        return decided

    async def queue_since(self) -> int | None:
        """The stream offset from which events also went to the live queue (None: unknown,
        the queue was declared by an older build)."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT queue_since FROM public.projection_generations WHERE projection = %s",
                    (self.projection.name,),
                )
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

    async def note_queue_since(self, offset: int) -> None:
        """Record `queue_since`, once: read the stream's end just before declaring the queue."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE public.projection_generations SET queue_since = %s "
                "WHERE projection = %s AND queue_since IS NULL",
                (offset, self.projection.name),
            )

    async def parked_count(self) -> int:
        async with self.pool.connection() as conn:
            tx = Transaction(conn.cursor(), await self.live_schema(conn), replaying=False)
            await tx.execute("SELECT count(*) FROM {_parked}")
            row = await tx.cursor.fetchone()
            return int(row[0]) if row else 0


async def _erased(tx: Transaction, envelope: Envelope) -> bool:
    """Whether the event is about a person erased in this database (servicekit.erasure)."""
    subjects = [envelope.aggregate_id]
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        subjects.append(uuid.UUID(str(envelope.data.get("user_id"))))
    await tx.cursor.execute(
        "SELECT 1 FROM public.erasures WHERE user_id = ANY(%s::uuid[])", (subjects,)
    )
    return await tx.cursor.fetchone() is not None


@dataclass
class Decided:
    """What a generation has decided: positions per producer, and the parked among them."""

    positions: dict[str, int] = field(default_factory=dict)
    parked: set[tuple[str, int]] = field(default_factory=set)

    def applied(self, envelope: Envelope) -> bool:
        """Whether this generation has applied the event (decided, and not parked)."""
        key = (envelope.producer, envelope.position)
        return envelope.position <= self.positions.get(envelope.producer, 0) and (
            key not in self.parked
        )


@dataclass(frozen=True)
class Position:
    producer: str
    position: int
    occurred_at: datetime
    applied_at: datetime

    @property
    def age_seconds(self) -> float:
        return max((datetime.now(UTC) - self.occurred_at).total_seconds(), 0.0)
