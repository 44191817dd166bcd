"""A projection's generations: building a new one beside the live one, and swapping.

A generation is a schema `<projection>_g<N>` holding the read model and its positions (see
servicekit.projection). `projection_generations` says which one is live and which, if any,
is being built. A swap happens in one transaction under the projection's exclusive advisory
lock (everyone who reads a generation holds it shared): the row is updated and the old
generation dropped together, so a reader always sees one whole generation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from servicekit.projection import ProjectionStore, Transaction, generation_schema

log = logging.getLogger("servicekit.generations")


class ReplayError(Exception):
    """A replay cannot go on; the message says why and what to do."""


@dataclass
class Difference:
    table: str
    only_live: int
    only_rebuilt: int
    examples: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)


@dataclass(frozen=True)
class Building:
    """The generation being built: a fresh one, or one an interrupted replay left."""

    schema: str
    resumed: bool
    offset: int = -1  # last stream offset applied into it
    applied: int = 0


@dataclass(frozen=True)
class Swap:
    """What a swap (or a dry run's comparison) came to."""

    previous: str  # the generation that was live
    swapped: bool
    differences: list[Difference] = field(default_factory=list)


class Generations:
    """The generations of one projection, in its store's database."""

    def __init__(self, store: ProjectionStore) -> None:
        self.store = store
        self.name = store.projection.name

    async def begin(self, *, restart: bool) -> Building:
        """The generation being built: resumed if one exists (dropped first on `restart`),
        else a fresh one."""
        async with self.store.pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT live, building, generation FROM public.projection_generations "
                    "WHERE projection = %s FOR UPDATE",
                    (self.name,),
                )
            ).fetchone()
            assert row is not None
            live, building, generation = str(row[0]), row[1], int(row[2])
            if building and restart:
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(building))
                )
                building = None
            if building:
                tx = Transaction(conn.cursor(), building, replaying=True)
                await tx.execute("SELECT stream_offset, applied FROM {_replay}")
                state = await tx.cursor.fetchone()
                if state:
                    return Building(building, True, int(state[0]), int(state[1]))
                return Building(building, resumed=True)
            generation += 1
            building = generation_schema(self.name, generation)
            if building == live:  # cannot happen unless edited by hand
                raise ReplayError(f"generation {building} is live")
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(building))
            )
            await self.store._create_tables(conn, building)
            tx = Transaction(conn.cursor(), building, replaying=True)
            await tx.execute("INSERT INTO {_replay} (stream_offset) VALUES (-1)")
            await conn.execute(
                "UPDATE public.projection_generations SET building = %s, generation = %s "
                "WHERE projection = %s",
                (building, generation, self.name),
            )
            return Building(building, resumed=False)

    async def swap(self, rebuilt: str, *, dry_run: bool) -> Swap | None:
        """Swap `rebuilt` in (or, for a dry run, compare it) if it has caught up.

        None: the live generation has decided positions `rebuilt` has not; read on. If
        `rebuilt` parked an event the live generation applied, swapping would lose it (no
        copy is left to retry): ReplayError, and the live generation keeps serving.
        """
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.store.key,))
            live = await self.store.live_schema(conn)
            if await behind(conn, live, rebuilt):
                return None
            lost = await parked_here_applied_there(conn, rebuilt, live)
            if lost:
                producer, position, event_id, reason = lost[0]
                raise ReplayError(
                    f"the rebuild cannot apply {len(lost)} event(s) that the live read model "
                    f"has applied (the first: {event_id}, {producer} position {position}: "
                    f"{reason}); swapping would lose them, so the live generation keeps "
                    f"serving. Fix the projection, then run `esctl replay "
                    f"{self.name}` again: it resumes and tries them again."
                )
            if dry_run:
                return Swap(
                    live, swapped=False, differences=await self.compare(conn, live, rebuilt)
                )
            await conn.execute(
                "UPDATE public.projection_generations SET live = building, building = NULL, "
                "swapped_at = now() WHERE projection = %s",
                (self.name,),
            )
            # In the same transaction: whoever reads the live generation under the shared
            # lock (the consumer, the mail dispatcher) never finds it dropped under them.
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(live))
            )
        log.info(
            "replay swapped generations",
            extra={"projection": self.name, "live": rebuilt, "old": live},
        )
        return Swap(live, swapped=True)

    async def compare(
        self, conn: psycopg.AsyncConnection[Any], live: str, rebuilt: str
    ) -> list[Difference]:
        diffs = []
        for table in self.store.projection.tables:
            a, b = sql.Identifier(live, table), sql.Identifier(rebuilt, table)
            only_live = await (
                await conn.execute(
                    sql.SQL("SELECT * FROM {} EXCEPT ALL SELECT * FROM {}").format(a, b)
                )
            ).fetchall()
            only_rebuilt = await (
                await conn.execute(
                    sql.SQL("SELECT * FROM {} EXCEPT ALL SELECT * FROM {}").format(b, a)
                )
            ).fetchall()
            if only_live or only_rebuilt:
                examples = [("live", tuple(r)) for r in only_live[:3]]
                examples += [("rebuilt", tuple(r)) for r in only_rebuilt[:3]]
                diffs.append(Difference(table, len(only_live), len(only_rebuilt), examples))
        return diffs


async def behind(
    conn: psycopg.AsyncConnection[Any], live: str, rebuilt: str
) -> list[tuple[str, int, int]]:
    """Producers whose position in `rebuilt` is below the one in `live`."""
    rows = await (
        await conn.execute(
            sql.SQL(
                "SELECT l.producer, coalesce(r.position, 0), l.position FROM {} l "
                "LEFT JOIN {} r USING (producer) WHERE coalesce(r.position, 0) < l.position"
            ).format(sql.Identifier(live, "_positions"), sql.Identifier(rebuilt, "_positions"))
        )
    ).fetchall()
    return [(str(p), int(have), int(want)) for p, have, want in rows]


async def parked_here_applied_there(
    conn: psycopg.AsyncConnection[Any], rebuilt: str, live: str, *, with_envelopes: bool = False
) -> list[tuple[Any, ...]]:
    """Events parked in `rebuilt` that `live` has applied (decided, and not parked there)."""
    extra = sql.SQL(", r.envelope" if with_envelopes else "")
    rows = await (
        await conn.execute(
            sql.SQL(
                "SELECT r.producer, r.position, r.event_id, r.reason{} FROM {} r "
                "JOIN {} l USING (producer) WHERE r.position <= l.position AND NOT EXISTS "
                "(SELECT 1 FROM {} k WHERE k.producer = r.producer AND k.position = r.position) "
                "ORDER BY r.producer, r.position"
            ).format(
                extra,
                sql.Identifier(rebuilt, "_parked"),
                sql.Identifier(live, "_positions"),
                sql.Identifier(live, "_parked"),
            )
        )
    ).fetchall()
    return [tuple(r) for r in rows]


async def positions(conn: psycopg.AsyncConnection[Any], schema: str) -> dict[str, int]:
    rows = await (
        await conn.execute(
            sql.SQL("SELECT producer, position FROM {}").format(
                sql.Identifier(schema, "_positions")
            )
        )
    ).fetchall()
    return {str(p): int(pos) for p, pos in rows}
