"""Blue/green rebuild of a projection from `events.history`.

A replay builds a fresh generation (schema `<projection>_g<N+1>`) from the retained stream,
never reading another service's database, while the live generation keeps serving and its
consumer keeps applying new events. The stream offset reached is committed with each batch,
so a replay interrupted by Ctrl-C or a crash resumes where it stopped. Once the new
generation has read the whole stream and holds every position the live one has applied, the
swap happens under the projection's exclusive advisory lock: the live consumer's next batch
goes to the new generation, which skips what it already has as duplicates.

A live system never goes quiet, so nothing here waits for silence: once the rebuilt
generation has caught up with the live one's positions (checked after every batch), the
replay tries to swap, and the swap re-checks under the lock. A replay that reaches what was
the end of the stream and still lacks positions the live generation had applied then has
found a gap in the stream (a stall), decided from offsets and positions alone.

An event the live generation has parked (dead-lettered, not applied) is not history: the
replay applies it as new, recording its effects, keyed by (event_id, effect), once.

Retention: when the stream no longer starts at offset 0, the start of a producer's history
may be gone. The replay then needs, per producer, a complete refill made by `esctl republish
<producer> --from 1` (messages carrying `x-republish-*` headers) and reads in two phases:
first those refills, then the live messages that followed them.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from servicekit import generations, native_stream, stream, telemetry
from servicekit.generations import Difference, Generations, ReplayError
from servicekit.messages import (
    IncomingEvent,
    Outcome,
    validated,
)
from servicekit.projection import (
    Decided,
    Projection,
    ProjectionStore,
    Transaction,
)
from shared_contracts.envelope import Envelope

log = logging.getLogger("servicekit.replay")

__all__ = ["Difference", "Phase", "Progress", "Replay", "ReplayError", "ReplayResult"]

REPLAY_OFFSET = Gauge("replay_stream_offset", "Stream offset a replay has applied", ["projection"])
REPLAY_END = Gauge("replay_stream_end", "Last stream offset seen by a replay", ["projection"])
REPLAY_PROGRESS = Gauge(
    "replay_progress_ratio", "Share of the stream a replay has applied (0 to 1)", ["projection"]
)
REPLAY_APPLIED = Counter(
    "replay_events_applied_total",
    "Events a replay applied to the generation it builds",
    ["projection"],
)


MAX_LINKS = 128  # span links per replay batch: OpenTelemetry's default SpanLimits


class Phase(enum.Enum):
    REFILLS = "refills"  # reading `esctl republish` refills of a truncated stream
    READING = "reading"  # reading the stream up to the live edge


@dataclass
class Progress:
    generation: str
    resumed: bool
    offset: int = -1  # last stream offset applied
    end: int = -1  # last stream offset known to exist: the live edge
    applied: int = 0
    skipped: int = 0
    failed: int = 0
    phase: Phase = Phase.READING
    protocol: str = ""  # how events.history is read: the native stream protocol, or AMQP
    # Per producer, how many positions the live generation has decided beyond the rebuilt
    # one (when last checked); empty once caught up.
    behind: dict[str, int] = field(default_factory=dict)

    @property
    def behind_edge(self) -> int:
        """Stream messages between what was applied and the live edge."""
        return max(self.end - self.offset, 0)


@dataclass
class ReplayResult:
    progress: Progress
    swapped: bool
    previous: str | None = None
    differences: list[Difference] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _Watch:
    """The live generation's positions at `at`, and the stream's end read just after.

    Every event the live generation had decided by then was in the stream by `end`, so a
    rebuild that has read past `end` and still lacks one of those positions (for longer
    than the stall bound after `reached`, for replication to settle) has found a gap in
    the stream.
    """

    at: float
    live: dict[str, int]
    end: int
    reached: float | None = None  # when the rebuild first read past `end`


class Replay:
    """One rebuild. Construct, then `await run(stop)`."""

    def __init__(
        self,
        projection: Projection,
        *,
        database_url: str,
        amqp_url: str,
        stream_port: int | None = native_stream.DEFAULT_STREAM_PORT,
        dry_run: bool = False,
        restart: bool = False,
        batch_size: int = 1000,
        idle_seconds: float = 1.0,
        stall_seconds: float = 30.0,
        linger_seconds: float = 0.02,
        watch_seconds: float = 5.0,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.projection = projection
        self.store = ProjectionStore(projection, database_url)
        self.generations = Generations(self.store)
        self.amqp_url = amqp_url
        self.stream_port = stream_port  # None: AMQP 0.9.1 only
        self.dry_run = dry_run
        self.restart = restart
        self.batch_size = batch_size
        self.idle = idle_seconds
        self.stall = stall_seconds
        self.linger = linger_seconds
        self.watch_every = watch_seconds
        self._queue_since: int | None = None  # see ProjectionStore.queue_since
        self.on_progress = on_progress or (lambda _: None)

    async def run(self, stop: asyncio.Event) -> ReplayResult:
        async with self.store:
            await self.store.setup()
            progress = await self._begin()
            self.on_progress(progress)
            reading = native_stream.history_reader(self.amqp_url, self.stream_port)
            async with reading as (history, _):
                progress.protocol = history.protocol
                log.info(
                    "replay reads events.history",
                    extra={"projection": self.projection.name, "protocol": history.protocol},
                )
                first = await stream.first_offset(history)
                watch = await self._watch(history)  # also the first sight of the live edge
                progress.end = watch.end
                refills: dict[str, stream.Refill] = {}
                phase, start = 0, progress.offset + 1
                if first is not None and first > 0:
                    live = await self.store.positions()
                    try:
                        refills = await stream.find_refills(
                            history, progress.end, self.projection, set(live), self.idle
                        )
                    except stream.RefillMissing as exc:
                        raise ReplayError(str(exc)) from None
                    start = min((r.start for r in refills.values()), default=first)
                    progress.phase = Phase.REFILLS
                    until = max((r.last for r in refills.values()), default=-1)
                    if until >= start:
                        await self._read(
                            history, progress, stop, start, refills, phase=1, until=until
                        )
                    phase = 2
                    progress.phase = Phase.READING
                if not stop.is_set():
                    result = await self._read(
                        history, progress, stop, start, refills, phase=phase, watch=watch
                    )
                    if result is not None:
                        return result
                return ReplayResult(progress, swapped=False, interrupted=True)

    # -- generations --------------------------------------------------------------------

    async def _begin(self) -> Progress:
        """The generation being built: resumed if one exists, else a fresh one."""
        self._queue_since = await self.store.queue_since()
        building = await self.generations.begin(restart=self.restart)
        return Progress(
            building.schema, building.resumed, offset=building.offset, applied=building.applied
        )

    async def _finish(self, progress: Progress) -> ReplayResult | None:
        """Swap (or, for a dry run, compare) if the rebuilt generation has caught up.

        None: the live generation moved ahead meanwhile; read on. Events this rebuild parked
        although the live generation applied them are tried once more first (a fix may have
        been deployed); if one still fails, Generations.swap refuses with ReplayError.
        """
        await self._retry_parked(progress)
        swap = await self.generations.swap(progress.generation, dry_run=self.dry_run)
        if swap is None:
            return None
        return ReplayResult(
            progress, swapped=swap.swapped, previous=swap.previous, differences=swap.differences
        )

    async def _retry_parked(self, progress: Progress) -> None:
        """Apply again what this rebuild parked and the live generation has applied (a fix
        may have been deployed since); each one that still fails stays parked."""
        async with self.store.pool.connection() as conn, conn.transaction():
            live_schema = await self.store.live_schema(conn)
            rows = await generations.parked_here_applied_there(
                conn, progress.generation, live_schema, with_envelopes=True
            )
            if not rows:
                return
            live = await self.store.decided_in(conn)
            for *_, body in rows:
                if body is None:
                    continue  # parked by a build that did not keep envelopes
                envelope = Envelope.model_validate(body)
                try:
                    event = validated(envelope)
                except ValidationError:
                    continue
                if event is not None:
                    await self._apply_events(
                        conn, progress, live, [(-1, IncomingEvent(envelope, event))], phase=0
                    )

    # -- reading the stream ------------------------------------------------------------

    async def _read(
        self,
        history: stream.HistoryReader,
        progress: Progress,
        stop: asyncio.Event,
        start: int,
        refills: dict[str, stream.Refill],
        *,
        phase: int,
        until: int | None = None,
        watch: _Watch | None = None,
    ) -> ReplayResult | None:
        """Apply the stream from offset `start` (phase 0, 1 or 2).

        Phase 1 (refills) ends at offset `until`. Phases 0 and 2 end with the swap, tried
        after every batch once the rebuilt generation has caught up: the result. None when
        stopped, or when phase 1 is done.
        """
        subscribing = history.subscribe(max(start, 0), prefetch=self.batch_size * 2)
        async with subscribing as subscription:
            while not stop.is_set():
                # Nothing new within `idle`: an empty batch, and the checks below anyway.
                batch = await subscription.take(self.batch_size, self.idle, self.linger)
                if batch:
                    await self._apply(batch, progress, refills, phase)
                if phase == 1:
                    self.on_progress(progress)
                    if progress.offset >= (until or 0):
                        return None
                    continue
                result, watch = await self._try_finish(history, progress, watch)
                self.on_progress(progress)
                if result is not None:
                    return result
        return None

    async def _watch(
        self, history: stream.HistoryReader, live: dict[str, int] | None = None
    ) -> _Watch:
        """The live generation's positions (given, or read now), then the stream's end."""
        at = asyncio.get_running_loop().time()
        if live is None:
            live = {p: v.position for p, v in (await self.store.positions()).items()}
        return _Watch(at, live, await stream.end_offset(history))

    async def _try_finish(
        self, history: stream.HistoryReader, progress: Progress, watch: _Watch | None
    ) -> tuple[ReplayResult | None, _Watch | None]:
        """Swap if caught up; otherwise keep a watch on the live edge to detect a stall."""
        async with self.store.pool.connection() as conn:
            live = await self.store.live_schema(conn)
            behind = await generations.behind(conn, live, progress.generation)
            live_positions = await generations.positions(conn, live)
        progress.behind = {p: want - have for p, have, want in behind}
        if not behind:
            result = await self._finish(progress)
            return result, None if result is None else watch
        now = asyncio.get_running_loop().time()
        if watch is None:
            watch = await self._watch(history, live_positions)
            progress.end = max(progress.end, watch.end)
            if watch.end < 0 <= progress.end:
                # Nothing read from the last chunk in time (a busy host) although the stream
                # holds messages: no edge to judge a stall by. Watch again after the next batch.
                return None, None
            return None, watch
        if progress.offset < watch.end:
            return None, watch
        if watch.reached is None:
            watch.reached = now
        rebuilt = {p: have for p, have, _ in behind}
        lacking = [
            (p, rebuilt.get(p, want), want)
            for p, want in watch.live.items()
            if rebuilt.get(p, want) < want
        ]
        if not lacking:  # read past the watched edge with nothing missing: watch anew
            return None, None if now - watch.at >= self.watch_every else watch
        if now - watch.reached < self.stall:
            return None, watch
        raise ReplayError(
            "the rebuilt generation lacks positions the live one has applied ("
            + ", ".join(f"{p}: {have} < {want}" for p, have, want in lacking)
            + f") although it has read events.history past where they should be (offset "
            f"{watch.end}); the stream does not hold them. Refill it with `esctl republish "
            "<producer> --from <position>` and run the replay again."
        )

    async def _apply(
        self,
        batch: Sequence[stream.HistoryMessage],
        progress: Progress,
        refills: dict[str, stream.Refill],
        phase: int,
    ) -> None:
        """Apply a batch within a span of a new trace that links to each event's own trace.

        Not a child: a rebuild next month is not part of the request that caused the event,
        but whoever looks at either should find the other.
        """
        # The first MAX_LINKS: a span keeps no more (OpenTelemetry's default limit drops
        # the rest), and parsing a traceparent for each of 1,000 messages cost about 8% of
        # a replay's time, profiled.
        links: list[telemetry.Link] = []
        for message in batch:
            link = telemetry.link_to(message.traceparent)
            if link is not None:
                links.append(link)
                if len(links) >= MAX_LINKS:
                    break
        span = telemetry.start_span(
            f"replay {self.projection.name}",
            parent=telemetry.Context(),
            kind=telemetry.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": "events.history",
                "messaging.batch.message_count": len(batch),
                "eskit.projection": self.projection.name,
                "eskit.generation": progress.generation,
                "eskit.stream_offset.first": batch[0].offset,
                "eskit.stream_offset.last": batch[-1].offset,
            },
            links=links,
        )
        with telemetry.use_span(span):
            await self._apply_batch(batch, progress, refills, phase)

    async def _apply_batch(
        self,
        batch: Sequence[stream.HistoryMessage],
        progress: Progress,
        refills: dict[str, stream.Refill],
        phase: int,
    ) -> None:
        """Apply a batch in stream order, in one transaction with the offset reached.

        What the projection cannot apply, or what fails its schema, is parked where it
        stands, before anything later of its producer: parked after a later event, it would
        look decided and be lost.
        """
        items: list[tuple[int, IncomingEvent | tuple[Envelope, str]]] = []
        for message in batch:
            offset = message.offset
            progress.end = max(progress.end, offset)
            envelope = stream.wanted(message, offset, refills, phase, self.projection)
            if envelope is None:
                progress.skipped += 1
                continue
            try:
                event = validated(envelope)
            except ValidationError as exc:
                items.append((offset, (envelope, f"data failed its schema: {exc}"[:500])))
                continue
            if event is None:
                progress.skipped += 1
                continue
            items.append((offset, IncomingEvent(envelope, event)))
        last = batch[-1].offset
        outcomes: list[Outcome] = []
        parked = 0
        async with self.store.pool.connection() as conn, conn.transaction():
            live = await self.store.decided_in(conn)
            for is_event, run in itertools.groupby(
                items, key=lambda i: isinstance(i[1], IncomingEvent)
            ):
                chunk = list(run)
                if is_event:
                    events = [(o, e) for o, e in chunk if isinstance(e, IncomingEvent)]
                    done, failed = await self._apply_events(conn, progress, live, events, phase)
                    outcomes += done
                    parked += failed
                    continue
                for _, (envelope, reason) in chunk:  # type: ignore[misc]
                    await self.store.park_in(conn, progress.generation, envelope, reason)
                    parked += 1
            tx = Transaction(conn.cursor(), progress.generation, replaying=True)
            applied = sum(1 for o in outcomes if o == "applied")
            await tx.execute(
                "UPDATE {_replay} SET stream_offset = %s, applied = applied + %s, "
                "updated_at = now()",
                (last, applied),
            )
        progress.failed += parked
        progress.applied += applied
        progress.skipped += len(outcomes) - applied
        progress.offset = last
        REPLAY_OFFSET.labels(self.projection.name).set(last)
        REPLAY_END.labels(self.projection.name).set(progress.end)
        REPLAY_PROGRESS.labels(self.projection.name).set(
            min((last + 1) / (progress.end + 1), 1.0) if progress.end >= 0 else 0.0
        )
        REPLAY_APPLIED.labels(self.projection.name).inc(applied)

    async def _apply_events(
        self,
        conn: psycopg.AsyncConnection[Any],
        progress: Progress,
        live: Decided,
        events: Sequence[tuple[int, IncomingEvent]],
        phase: int,
    ) -> tuple[list[Outcome], int]:
        """A run of valid events: together, or one by one to park the one that fails."""
        try:
            async with conn.transaction():
                return await self._apply_split(conn, progress.generation, live, events, phase), 0
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except Exception:  # noqa: BLE001 - find the event that fails, park it, go on
            log.info("a replay batch failed; applying it one event at a time")
        outcomes: list[Outcome] = []
        parked = 0
        for offset, item in events:
            try:
                async with conn.transaction():
                    outcomes += await self._apply_split(
                        conn, progress.generation, live, [(offset, item)], phase
                    )
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception as exc:  # noqa: BLE001
                log.error(
                    "replay could not apply an event; parked",
                    extra={"event_id": str(item.envelope.event_id), "error": str(exc)[:500]},
                )
                reason = f"handler failed: {type(exc).__name__}: {exc}"
                await self.store.park_in(conn, progress.generation, item.envelope, reason)
                parked += 1
        return outcomes, parked

    async def _apply_split(
        self,
        conn: psycopg.AsyncConnection[Any],
        generation: str,
        live: Decided,
        events: Sequence[tuple[int, IncomingEvent]],
        phase: int,
    ) -> list[Outcome]:
        """Apply as history what the live generation has applied, the rest as new events.

        An event the live generation has not applied yet (above its position) is new to this
        projection: its side effects are recorded now, keyed by (event_id, effect), so that
        it does not matter whether the live consumer records them too before the swap, or
        skips the event as a duplicate after it. An event the live generation parked is new
        too: its effects were never recorded. History also is what the stream held before
        the live queue existed (`queue_since`): the live consumer never saw it, and a new
        projection must not act on a backlog. Where that offset is unknown (a queue an older
        build declared) or the stream is a refill (phase 1), a producer the live generation
        has never applied anything from is all history instead.
        """
        since = self._queue_since if phase != 1 else None

        def history(offset: int, envelope: Envelope) -> bool:
            if live.applied(envelope):
                return True
            if since is not None:
                return offset < since
            return envelope.producer not in live.positions

        outcomes: list[Outcome] = []
        # In stream order, one run of history or of new events at a time: a parked event
        # is new between two history ones, and must be applied before the later one.
        for replaying, run in itertools.groupby(events, key=lambda e: history(e[0], e[1].envelope)):
            outcomes += await self.store.apply_in(
                conn, generation, [e for _, e in run], replaying=replaying
            )
        return outcomes
