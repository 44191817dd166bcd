"""A state machine over the consumer, the projection store and the replay, checked every step.

hypothesis drives random sequences of what production does to a projection: events published
(and re-sent by a relay), batches delivered and handled, connections lost before the acks
arrive, the process dying mid-batch, a handler failing (or killing the process) on one event
until a fix is deployed, dead letters retried, and replays rebuilding a generation from the
stream (interrupted, resumed, restarted) and swapping it in while all of that goes on. The
broker is a model (tests.support.fake_broker); the consumer's `_process`, the ProjectionStore,
the Replay's `_begin`/`_apply`/`_finish`, both real projections (reporting_svc's and
notify_svc's, side by side in one database) and PostgreSQL are real. Each example starts from
empty schemas in the test's own database.

After every step, for each projection:
- what the consumer acked is applied in the live generation, what it dead-lettered or never
  saw is not, and an event it acked is never dead-lettered afterwards;
- every read-model table of the live generation, and of the generation being built, equals
  a fold written here of exactly the events that generation has applied, and the generation
  being built has applied exactly what its replay read and could apply;
- every parked event can still be recovered: a copy is in the DLQ or in the live queue;
- an event that killed the consumer `delivery_limit` times is dead-lettered, not handled again;
- mail intents: one per (event_id, effect), one for every event the live generation has
  applied, none for an event no generation ever applied.
Once everything is delivered, retried and rebuilt, every event is applied, and each mail is
intended exactly once.

A failure shrinks to a short sequence of steps (`state.step(action=consume(k=2, ...))`); the
regression tests at the end replay such sequences, with the same checks after every step.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from notify_svc.intents import DDL as INTENTS_DDL
from notify_svc.projection import LOCKED, PASSWORD_CHANGED, WELCOME, NotificationProjection
from reporting_svc.projection import ReportingProjection
from servicekit.consumer import Consumer, ProjectionHandler
from servicekit.eventstore import connection_kwargs
from servicekit.messages import IncomingEvent
from servicekit.projection import Projection, ProjectionStore, Transaction
from servicekit.replay import Progress, Replay, ReplayError
from servicekit.stream import HistoryMessage
from shared_contracts.envelope import Envelope
from shared_contracts.events import PROFILE_FIELDS
from shared_contracts.names import PRODUCER_EXCHANGES
from testbed.history import generate
from tests.support.fake_broker import FakeIncomingMessage, FakeQueue, Stored

UNUSED_AMQP = "amqp://guest:guest@127.0.0.1:9/never-connected"
DELIVERY_LIMIT = 2
REPORTING, NOTIFY = ReportingProjection.name, NotificationProjection.name
SERVICES = (REPORTING, NOTIFY)
EFFECTS = {
    "auth.account.registered": WELCOME,
    "auth.account.password_changed": PASSWORD_CHANGED,
    "auth.account.locked": LOCKED,
}


class ProcessDied(BaseException):
    """kill -9 in the middle of a handler: nothing after it runs, its transaction is lost."""


# -- faults ---------------------------------------------------------------------------------


@dataclass
class Faults:
    """Bugs in the deployed build of a service, shared by its consumer and its replays."""

    failing: set[uuid.UUID] = field(default_factory=set)  # apply raises for these
    killing: set[uuid.UUID] = field(default_factory=set)  # the process dies applying these
    die_once: bool = False  # the next apply is killed (an OOM kill, a node drained)
    killed: set[uuid.UUID] = field(default_factory=set)  # being applied when it last died

    def check(self, events: Sequence[IncomingEvent]) -> None:
        ids = {item.envelope.event_id for item in events}
        if self.die_once or ids & self.killing:
            self.die_once, self.killed = False, ids
            raise ProcessDied("killed while applying a batch")
        if ids & self.failing:
            raise RuntimeError("the handler has a bug for this event")

    def clear(self) -> None:
        self.failing.clear()
        self.killing.clear()


class FaultyReporting(ReportingProjection):
    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        self.faults.check(events)
        await super().apply(tx, events)


class FaultyNotifications(NotificationProjection):
    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        self.faults.check(events)
        await super().apply(tx, events)


# -- the events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    index: int  # in the history: producer position order
    raw: dict[str, Any]
    envelope: Envelope
    body: bytes

    @property
    def id(self) -> uuid.UUID:
        return self.envelope.event_id

    @property
    def day(self) -> date:
        return self.envelope.occurred_at.date()

    @property
    def user(self) -> uuid.UUID:
        return uuid.UUID(self.raw["data"]["user_id"])

    @property
    def kind(self) -> str:
        return self.envelope.event_type

    def __repr__(self) -> str:
        e = self.envelope
        return f"<#{self.index} {e.producer}@{e.position} {e.event_type} v{e.aggregate_version}>"


def events_of(seed: int, count: int) -> list[Event]:
    history = generate(count, seed=seed, users=max(count // 4, 2))
    return [
        Event(i, raw, Envelope.model_validate(raw), json.dumps(raw).encode())
        for i, raw in enumerate(history.envelopes)
    ]


# -- reference folds, written independently of the projections ------------------------------


def reporting_tables(events: Sequence[Event]) -> dict[str, list[tuple[Any, ...]]]:
    signups: Counter[date] = Counter()
    logins: dict[date, list[int]] = {}
    locks: Counter[tuple[date, uuid.UUID]] = Counter()
    active: set[tuple[date, uuid.UUID]] = set()
    profiles: dict[uuid.UUID, tuple[date, int, dict[str, Any]]] = {}
    for e in sorted(events, key=lambda e: e.index):
        if e.kind == "auth.account.registered":
            signups[e.day] += 1
            active.add((e.day, e.user))
        elif e.kind == "auth.account.login_succeeded":
            logins.setdefault(e.day, [0, 0])[0] += 1
            active.add((e.day, e.user))
        elif e.kind == "auth.account.login_failed":
            logins.setdefault(e.day, [0, 0])[1] += 1
        elif e.kind == "auth.account.locked":
            locks[(e.day, e.user)] += 1
        elif e.kind == "auth.account.password_changed":
            active.add((e.day, e.user))
        elif e.kind.startswith("user.profile."):
            version = e.envelope.aggregate_version
            first, newest, data = profiles.get(e.user, (e.day, 0, {}))
            if version > newest:
                newest, data = version, e.raw["data"]
            profiles[e.user] = (min(first, e.day), newest, data)
            if e.kind == "user.profile.updated":
                active.add((e.day, e.user))
    return {
        "signups": sorted(signups.items()),
        "logins": sorted((d, ok, bad) for d, (ok, bad) in logins.items()),
        "locks": sorted((d, u, n) for (d, u), n in locks.items()),
        "activity": sorted(active),
        "profiles": sorted(
            (user, created, *(bool(data.get(f)) for f in PROFILE_FIELDS), version)
            for user, (created, version, data) in profiles.items()
        ),
    }


REPORTING_COLUMNS = {
    "signups": "day, accounts",
    "logins": "day, succeeded, failed",
    "locks": "day, user_id, locks",
    "activity": "day, user_id",
    "profiles": f"user_id, created_on, {', '.join(PROFILE_FIELDS)}, version",
}


def notify_tables(events: Sequence[Event]) -> dict[str, list[tuple[Any, ...]]]:
    """recipients: the account's columns from the newest registration, the profile's from the
    newest profile version (profiles in these histories carry no email)."""
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e.index):
        version, data = e.envelope.aggregate_version, e.raw["data"]
        blank = dict.fromkeys(
            ("email", "registered_name", "display_name", "locale", "timezone"), None
        )
        if e.kind == "auth.account.registered":
            row = rows.setdefault(e.user, {**blank, "profile": False})
            if version > (row.get("account_version") or 0):
                row.update(
                    email=data["email"],
                    registered_name=data.get("display_name"),
                    account_version=version,
                )
        elif e.kind.startswith("user.profile."):
            row = rows.setdefault(e.user, {**blank, "profile": False})
            if version > (row.get("profile_version") or 0):
                row.update(
                    profile=True,
                    display_name=data.get("display_name"),
                    locale=data.get("locale"),
                    timezone=data.get("timezone"),
                    profile_version=version,
                    email=row["email"] or data.get("email"),
                )
    return {
        "recipients": sorted(
            (
                user,
                r["email"],
                r["registered_name"],
                r["profile"],
                r["display_name"],
                r["locale"],
                r["timezone"],
                r.get("account_version"),
                r.get("profile_version"),
            )
            for user, r in rows.items()
        )
    }


NOTIFY_COLUMNS = {
    "recipients": "user_id, email, registered_name, profile, display_name, locale, timezone, "
    "account_version, profile_version"
}


# -- the model ------------------------------------------------------------------------------


class Status(enum.Enum):
    """What the consumer has said about an event, for the live generation."""

    UNSEEN = "never handled"
    APPLIED = "acked"
    PARKED = "parked (dead-lettered, or failed in the replay that swapped)"
    UNKNOWN = "in a batch that died before its ack"


@dataclass
class Side:
    """One consuming service: its queue, its consumer process, its replay, and the model."""

    name: str
    faults: Faults
    make: Callable[[Faults], Projection]
    fold: Callable[[Sequence[Event]], dict[str, list[tuple[Any, ...]]]]
    columns: dict[str, str]
    queue: FakeQueue
    projection: Projection
    store: ProjectionStore | None = None
    consumer: Consumer | None = None
    status: dict[int, Status] = field(default_factory=dict)  # by event index, once published
    replay: Replay | None = None
    progress: Progress | None = None
    building: bool = False
    rebuilt_applied: set[int] = field(default_factory=set)
    rebuilt_parked: set[int] = field(default_factory=set)
    rebuilt_offset: int = -1
    ever_applied: set[int] = field(default_factory=set)  # by any generation, ever
    # Per event: how often the consumer process died applying it since it was last parked.
    deaths: Counter[uuid.UUID] = field(default_factory=Counter)

    def handles(self, event: Event) -> bool:
        return self.projection.handles(event.envelope)


ENDINGS = (
    "acked",
    "acked",
    "acked",
    "flap before handling",
    "process dies mid-batch",
    *(
        f"connection lost after {n} acks or publishes, {how}"
        for n in range(3)
        for how in ("unnoticed", "noticed")
    ),
)


@dataclass(frozen=True)
class Step:
    """One rule call, printed as the call a regression test makes: `consume(k=2, ...)`."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def call(name: str, **args: st.SearchStrategy[Any]) -> st.SearchStrategy[Step]:
    return st.fixed_dictionaries(args).map(lambda drawn: Step(name, tuple(drawn.items())))


# One rule draws every step, so that hypothesis's swarm testing (which switches whole rules
# off for an example) never switches off publishing or consuming; duplicates weigh.
STEPS = st.one_of(
    call("consume", k=st.integers(1, 8), ending=st.sampled_from(ENDINGS)),
    call("publish", n=st.integers(1, 4)),
    call("consume", k=st.integers(1, 8), ending=st.sampled_from(ENDINGS)),
    call("handler_breaks_on", back=st.integers(0, 100), kills=st.booleans()),
    call("replay_reads", k=st.integers(0, 6)),
    call("relay_resends", n=st.integers(1, 3)),
    call("dlq_retry", pick=st.integers(0, 100), every=st.booleans()),
    call("consume", k=st.integers(1, 8), ending=st.sampled_from(ENDINGS)),
    call("replay_begins"),
    call("fix_is_deployed"),
    call("publish", n=st.integers(1, 4)),
    call("replay_is_interrupted"),
    call("replay_restarts"),
    call("everything_settles"),
)


class ProjectionMachine(RuleBasedStateMachine):
    def __init__(self, database_url: str) -> None:
        super().__init__()
        self.url = database_url
        self.started = False
        self.loop = asyncio.new_event_loop()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.events: list[Event] = []
        self.next = 0  # the next event of the history to publish
        self.stream: list[tuple[int, HistoryMessage]] = []  # (event index, message)
        self.sides: dict[str, Side] = {}
        self.by_message_id: dict[str, int] = {}

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    # -- set-up -------------------------------------------------------------------------

    @initialize(seed=st.integers(0, 10_000), count=st.integers(8, 24))
    def start(self, seed: int, count: int) -> None:
        self.events = events_of(seed, count)
        self.by_message_id = {str(e.id): e.index for e in self.events}
        self.conn = self.run(
            psycopg.AsyncConnection.connect(**connection_kwargs(self.url), autocommit=True)
        )
        self.run(self._wipe())
        self.started = True
        for statement in INTENTS_DDL:
            self.run(self.conn.execute(statement))
        for name, make, fold, columns in (
            (REPORTING, FaultyReporting, reporting_tables, REPORTING_COLUMNS),
            (NOTIFY, FaultyNotifications, notify_tables, NOTIFY_COLUMNS),
        ):
            faults = Faults()
            side = Side(name, faults, make, fold, columns, FakeQueue(name), make(faults))
            self.sides[name] = side
            self._start_consumer(side)
            assert side.store is not None
            self.run(side.store.setup())
            # The live queue was declared before the first event, as the projection's
            # worker records it (servicekit.process.note_queue_since).
            self.run(side.store.note_queue_since(0))

    @rule(action=STEPS)
    def step(self, action: Step) -> None:
        getattr(self, action.name)(**dict(action.args))

    def _start_consumer(self, side: Side) -> None:
        """A new consumer process: its own pool, nothing remembered but the database."""
        if side.store is not None:
            self.run(side.store.close())
        side.store = ProjectionStore(side.projection, self.url, pool_size=2)
        self.run(side.store.open())
        side.consumer = Consumer(
            service=side.name,
            amqp_url=UNUSED_AMQP,
            bindings=side.projection.bindings,
            handler=ProjectionHandler(side.store),
            prefetch=100,
            batch_size=100,
            delivery_limit=DELIVERY_LIMIT,
            retry_delay_seconds=0.001,
            max_backoff_seconds=0.002,
        )

    async def _wipe(self) -> None:
        """A fresh start in the example's database: no generations, no intents."""
        assert self.conn is not None
        cur = await self.conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE ANY(%s)",
            ([f"{service}\\_g%" for service in SERVICES],),
        )
        for (schema,) in await cur.fetchall():
            await self.conn.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
            )
        await self.conn.execute(
            "DROP TABLE IF EXISTS public.projection_generations, public.mail_intents"
        )

    def teardown(self) -> None:
        try:
            for side in self.sides.values():
                for store in (side.store, side.replay.store if side.replay else None):
                    if store is not None:
                        self.run(store.close())
            if self.conn is not None:
                self.run(self.conn.close())
        finally:
            self.loop.close()

    # -- publishing -----------------------------------------------------------------------

    def _send(self, event: Event) -> None:
        """What a relay does: to the stream and to every queue bound to the event's type."""
        env = event.envelope
        headers = {"x-position": env.position}
        offset = len(self.stream)
        self.stream.append(
            (
                event.index,
                HistoryMessage(offset, headers, event.body, env.producer),
            )
        )
        for side in self.sides.values():
            if side.handles(event):
                side.queue.publish(
                    Stored(
                        event.body,
                        str(env.event_id),
                        env.event_type,
                        PRODUCER_EXCHANGES[env.producer],
                        headers,
                    )
                )
                side.status.setdefault(event.index, Status.UNSEEN)

    def publish(self, n: int) -> None:
        """The next events of the history, in producer position order."""
        for event in self.events[self.next : self.next + n]:
            self._send(event)
        self.next = min(self.next + n, len(self.events))

    def relay_resends(self, n: int) -> None:
        """A relay that died before recording its confirms publishes its last events again."""
        for event in self.events[max(self.next - n, 0) : self.next]:
            self._send(event)

    # -- faults ---------------------------------------------------------------------------

    def handler_breaks_on(self, back: int, kills: bool) -> None:
        """A build whose handler raises for one event, or whose process dies applying it:
        the event published `back` events before the latest one."""
        if not self.next:
            return
        event = self.events[self.next - 1 - back % self.next]
        for side in self.sides.values():
            if side.handles(event):
                (side.faults.killing if kills else side.faults.failing).add(event.id)

    def fix_is_deployed(self) -> None:
        for side in self.sides.values():
            side.faults.clear()

    def dlq_retry(self, pick: int, every: bool) -> None:
        """`esctl dlq retry` of one dead letter (or `--all`): back to the live queue's tail."""
        for side in self.sides.values():
            letters = side.queue.dead_letters
            while letters:
                side.queue.retry(pick % len(letters) if not every else 0)
                if not every:
                    break

    # -- consuming ------------------------------------------------------------------------

    def consume(self, k: int, ending: str) -> None:
        """Each consumer gets up to k messages as one batch and runs `_process` on them."""
        for side in self.sides.values():
            if side.queue.ready:
                self._consume(side, k, ending)

    def _consume(self, side: Side, k: int, ending: str) -> None:
        assert side.consumer is not None
        queue = side.queue
        batch = queue.deliver(k)
        if ending == "flap before handling":
            queue.lose_connection()
            return
        channel = queue.channel
        if ending.startswith("connection lost"):
            channel.lose_connection_after(int(ending.split()[3]), noticed="unnoticed" not in ending)
        side.faults.die_once = ending == "process dies mid-batch"
        died = failed = False
        try:
            self.run(side.consumer._process(channel, batch))
        except ProcessDied:
            died = True
        except ConnectionError:
            failed = True
        finally:
            side.faults.die_once = False
        self._record_claims(side, batch, crashed=died or failed)
        if died:
            for event_id in side.faults.killed:
                side.deaths[event_id] += 1
                # The limit counts deaths after redeliveries: the first delivery's outcome
                # cannot be told from a lost connection (servicekit.consumer).
                assert side.deaths[event_id] <= DELIVERY_LIMIT + 1, (
                    f"{side.name}: the process died {side.deaths[event_id]} times applying "
                    f"{self.events[self.by_message_id[str(event_id)]]}, delivery limit "
                    f"{DELIVERY_LIMIT}: it should have been dead-lettered instead of handled again"
                )
            self._start_consumer(side)
        if died or failed or channel.dead:
            queue.lose_connection()
        else:
            assert not channel.unacked, "the consumer left messages of a handled batch unacked"

    def _record_claims(
        self, side: Side, batch: Sequence[FakeIncomingMessage], *, crashed: bool
    ) -> None:
        for message in batch:
            index = self.by_message_id[message.message_id]
            event = self.events[index]
            current = side.status[index]
            if message.claim == "acked":
                side.status[index] = Status.APPLIED
            elif message.claim == "dead_lettered":
                assert current is not Status.APPLIED, (
                    f"{side.name}: {event} was acked before, and now dead-lettered"
                )
                side.status[index] = Status.PARKED
                side.deaths[event.id] = 0  # parking starts the count afresh
            else:
                assert crashed, f"{side.name}: {event} left unsettled by a batch that ended"
                if current is not Status.APPLIED:
                    side.status[index] = Status.UNKNOWN

    # -- replaying ------------------------------------------------------------------------

    def replay_begins(self) -> None:
        """`esctl replay`: a new generation, or the one an interrupted replay left, resumed."""
        for side in self.sides.values():
            if side.replay is None:
                self._begin_replay(side)

    def replay_restarts(self) -> None:
        """`esctl replay --restart`: the generation being built is dropped, a new one begun."""
        for side in self.sides.values():
            self._replay_dies(side)
            self._begin_replay(side, restart=True)

    def _begin_replay(self, side: Side, *, restart: bool = False) -> None:
        replay = Replay(
            side.make(side.faults), database_url=self.url, amqp_url=UNUSED_AMQP, restart=restart
        )
        self.run(replay.store.open())
        self.run(replay.store.setup())
        progress: Progress = self.run(replay._begin())
        if restart:
            side.building = False
        if side.building:
            assert progress.resumed, "a replay did not resume the generation being built"
            assert progress.offset == side.rebuilt_offset, "resumed at the wrong offset"
        else:
            assert not progress.resumed
            side.building = True
            side.rebuilt_applied, side.rebuilt_parked, side.rebuilt_offset = set(), set(), -1
        side.replay, side.progress = replay, progress

    def replay_reads(self, k: int) -> None:
        """Each replay applies its next k stream messages (none: it waited, idle), then tries
        to swap, as `Replay._read` does after every batch."""
        for side in self.sides.values():
            if side.replay is not None:
                self._replay_reads(side, k)

    def _replay_reads(self, side: Side, k: int) -> None:
        assert side.replay is not None and side.progress is not None
        start = side.rebuilt_offset + 1
        batch = self.stream[start : start + k]
        if batch:
            try:
                self.run(side.replay._apply([m for _, m in batch], side.progress, {}, 0))
            except ProcessDied:
                self._replay_dies(side)
                return
            for index, _ in batch:
                event = self.events[index]
                if not side.handles(event) or index in side.rebuilt_applied:
                    continue
                if event.id in side.faults.failing:
                    side.rebuilt_parked.add(index)
                else:
                    side.rebuilt_applied.add(index)
                    side.rebuilt_parked.discard(index)
            side.rebuilt_offset = start + len(batch) - 1
            assert side.progress.offset == side.rebuilt_offset
        self._replay_tries_swap(side)

    def _replay_tries_swap(self, side: Side) -> None:
        """`_finish`: it first tries again what the rebuild parked and the live generation
        applied; a swap that would lose such an event is refused (ReplayError)."""
        assert side.replay is not None and side.progress is not None
        applied_live = self.run(self._applied_live(side))
        retried = {i for i in side.rebuilt_parked if i in applied_live}
        fixed = {i for i in retried if self.events[i].id not in side.faults.failing}
        try:
            result = self.run(side.replay._finish(side.progress))
        except ProcessDied:
            self._replay_dies(side)
            return
        except ReplayError:
            assert retried - fixed, f"{side.name}: a replay refused to swap, losing nothing"
            side.rebuilt_applied |= fixed
            side.rebuilt_parked -= fixed
            self._replay_dies(side)  # the command exits with the error; the build stays
            return
        side.rebuilt_applied |= fixed
        side.rebuilt_parked -= fixed
        assert not (retried - fixed) or result is None, (
            f"{side.name}: swapped in a generation that lacks events the live one applied"
        )
        if result is None or not result.swapped:
            return
        for index, status in side.status.items():
            if status is Status.APPLIED or index in side.rebuilt_applied:
                side.status[index] = Status.APPLIED
            elif index in side.rebuilt_parked:
                side.status[index] = Status.PARKED
            else:
                side.status[index] = Status.UNSEEN
        side.deaths.clear()  # crashes are counted in the generation, and this one is new
        side.building = False
        self._replay_dies(side)  # done: the process exits

    async def _applied_live(self, side: Side) -> set[int]:
        """The events the live generation has applied (decided, not parked): what a crashed
        batch committed is known only to the database."""
        assert side.store is not None
        async with side.store.pool.connection() as conn:
            decided = await side.store.decided_in(conn)
        return {
            index
            for index in side.status
            if side.handles(self.events[index]) and decided.applied(self.events[index].envelope)
        }

    def replay_is_interrupted(self) -> None:
        """Ctrl-C or a crash between batches; the generation being built stays."""
        for side in self.sides.values():
            self._replay_dies(side)

    def _replay_dies(self, side: Side) -> None:
        if side.replay is not None:
            self.run(side.replay.store.close())
        side.replay = side.progress = None

    # -- everything settles ---------------------------------------------------------------

    def everything_settles(self) -> None:
        """Fixes deployed, every dead letter retried, every queue drained, every replay done:
        then every event is applied once, and each mail intended exactly once."""
        for side in self.sides.values():
            side.faults.clear()
            for _ in range(10):
                while side.queue.dead_letters:
                    side.queue.retry(0)
                if not side.queue.ready:
                    break
                self._consume(side, 100, "acked")
            assert not side.queue.ready and not side.queue.dead_letters, "did not settle"
            if side.building:
                if side.replay is None:
                    self._begin_replay(side)
                self._replay_reads(side, len(self.stream))
                assert not side.building, f"{side.name}: the replay did not swap at the end"
            for index, status in sorted(side.status.items()):
                assert status is Status.APPLIED, f"{side.name}: {self.events[index]} {status}"
        self.check()
        _, intents = self.run(self._snapshot())
        expected = {
            (e.id, EFFECTS[e.kind])
            for e in self.events[: self.next]
            if e.kind in EFFECTS and self.sides[NOTIFY].handles(e)
        }
        assert set(intents) == expected, "after everything settled, mail intents differ"

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def generations_hold_exactly_what_was_applied(self) -> None:
        if self.started:
            self.check()

    def check(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        generations, intents = await self._snapshot()
        for side in self.sides.values():
            self._check_side(side, *generations[side.name])
        self._check_intents(self.sides[NOTIFY], generations[NOTIFY][0], intents)

    async def _snapshot(
        self,
    ) -> tuple[dict[str, tuple[Generation, Generation | None]], list[tuple[uuid.UUID, str]]]:
        """Every generation of both projections, and the intents, in two round trips."""
        assert self.conn is not None
        cur = await self.conn.execute(
            "SELECT projection, live, building FROM public.projection_generations"
        )
        names = {p: (live, building) for p, live, building in await cur.fetchall()}
        queries: list[sql.Composable] = [
            sql.SQL("SELECT event_id, effect FROM public.mail_intents")
        ]
        for side in self.sides.values():
            for schema in names[side.name]:
                if schema is not None:
                    queries += Generation.queries(schema, side.columns)
        async with self.conn.pipeline():
            cursors = [await self.conn.execute(q) for q in queries]
        results = [await c.fetchall() for c in cursors]
        intents = [(r[0], r[1]) for r in results.pop(0)]
        generations: dict[str, tuple[Generation, Generation | None]] = {}
        for side in self.sides.values():
            live, building = names[side.name]
            read = [
                Generation.of(schema, side.columns, results) if schema else None
                for schema in (live, building)
            ]
            assert read[0] is not None
            generations[side.name] = (read[0], read[1])
        return generations, intents

    def _decided(self, side: Side, gen: Generation) -> tuple[set[int], set[int]]:
        """The published events generation `gen` has applied, and those it has parked."""
        for producer, position in gen.parked:
            assert position <= gen.positions.get(producer, 0), (
                f"{gen.schema}: parked {producer}@{position} above its producer's position"
            )
        applied, parked = set(), set()
        for index in side.status:
            env = self.events[index].envelope
            if (env.producer, env.position) in gen.parked:
                parked.add(index)
            elif env.position <= gen.positions.get(env.producer, 0):
                applied.add(index)
        return applied, parked

    def _check_tables(self, side: Side, gen: Generation, applied: set[int], what: str) -> None:
        expected = side.fold([self.events[i] for i in applied])
        for table, rows in expected.items():
            extra = [r for r in gen.tables[table] if r not in rows]
            missing = [r for r in rows if r not in gen.tables[table]]
            assert gen.tables[table] == rows, (
                f"{side.name}: {table} of {what} {gen.schema} differs from the fold of events "
                f"{sorted(applied)}: rows not expected {extra}, rows missing {missing}"
            )

    def _check_side(self, side: Side, live: Generation, building: Generation | None) -> None:
        assert (building is not None) == side.building, (
            f"{side.name}: the generation being built is "
            f"{building.schema if building else None}, the model says {side.building}"
        )
        applied, parked = self._decided(side, live)
        side.ever_applied |= applied
        for index, status in sorted(side.status.items()):
            event = self.events[index]
            if status is Status.APPLIED:
                assert index in applied, (
                    f"{side.name}: {event} was acked, yet {live.schema} has not applied it"
                    + (" (it is parked there)" if index in parked else "")
                )
            elif status in (Status.PARKED, Status.UNSEEN):
                assert index not in applied, f"{side.name}: {event} {status.value}, yet applied"
        self._check_tables(side, live, applied, "the live generation")
        copies = Counter(
            self.by_message_id[m.message_id] for m in (*side.queue.ready, *side.queue.dead_letters)
        )
        for index in sorted(parked):
            assert copies[index] > 0, (
                f"{side.name}: {self.events[index]} is parked in {live.schema}, and no copy of "
                "it is left in the DLQ or the live queue: nothing will ever apply it"
            )
        if building is None:
            return
        rebuilt, rebuilt_parked = self._decided(side, building)
        for index in sorted(side.rebuilt_applied ^ rebuilt):
            event, read_it = self.events[index], index in side.rebuilt_applied
            assert not read_it or index in rebuilt, (
                f"{side.name}: the replay read {event}, yet {building.schema} has not applied it"
            )
            assert read_it, (
                f"{side.name}: {building.schema} counts {event} as applied (its position is "
                "past it, and it is not parked), but the replay "
                + ("failed to apply it" if index in side.rebuilt_parked else "never read it")
            )
        assert rebuilt_parked == side.rebuilt_parked, (
            f"{side.name}: {building.schema} parked "
            f"{[self.events[i] for i in sorted(rebuilt_parked)]}, the replay failed to apply "
            f"{[self.events[i] for i in sorted(side.rebuilt_parked)]}"
        )
        side.ever_applied |= rebuilt
        self._check_tables(side, building, rebuilt, "the generation being built")

    def _check_intents(
        self, side: Side, live: Generation, intents: list[tuple[uuid.UUID, str]]
    ) -> None:
        assert len(intents) == len(set(intents)), "a mail intent recorded twice"
        applied, _ = self._decided(side, live)
        by_id = {e.id: e for e in self.events}
        for event_id, effect in intents:
            event = by_id[event_id]
            assert effect == EFFECTS.get(event.kind), f"{event}: intent {effect}"
            assert event.index in side.ever_applied, f"{event}: mail intended, never applied"
        for index in sorted(applied):
            event = self.events[index]
            if event.kind in EFFECTS:
                assert (event.id, EFFECTS[event.kind]) in intents, (
                    f"{event} is applied in {live.schema}, yet its {EFFECTS[event.kind]} mail "
                    "was never intended"
                )


@dataclass
class Generation:
    """What one generation holds: positions, parked events, read-model rows."""

    schema: str
    positions: dict[str, int]
    parked: set[tuple[str, int]]
    tables: dict[str, list[tuple[Any, ...]]]

    @staticmethod
    def queries(schema: str, columns: dict[str, str]) -> list[sql.Composable]:
        own = [
            sql.SQL("SELECT producer, position FROM {}").format(sql.Identifier(schema, t))
            for t in ("_positions", "_parked")
        ]
        tables = []
        for table, names in columns.items():
            cols = sql.SQL(", ").join(sql.Identifier(n.strip()) for n in names.split(","))
            tables.append(
                sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
                    cols, sql.Identifier(schema, table), cols
                )
            )
        return own + tables

    @classmethod
    def of(
        cls, schema: str, columns: dict[str, str], results: list[list[tuple[Any, ...]]]
    ) -> Generation:
        """Built from (and consuming) the results of `queries`, in order."""
        positions = {str(p): int(n) for p, n in results.pop(0)}
        parked = {(str(p), int(n)) for p, n in results.pop(0)}
        tables = {table: [tuple(r) for r in results.pop(0)] for table in columns}
        return cls(schema, positions, parked, tables)


# -- the property ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(make_database: Callable[[str], str]) -> str:
    """One database for the module: each example and each test starts from empty schemas."""
    return make_database("projection_sm")


def test_any_interleaving_of_deliveries_crashes_retries_and_replays_keeps_read_models_exact(
    database: str,
) -> None:
    run_state_machine_as_test(
        lambda: ProjectionMachine(database),
        settings=settings(
            max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "40")),  # more: search harder
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- regression tests: shrunk sequences, replayed with the same checks after every step ------


class Checked:
    """A machine whose every rule call is followed by the invariants."""

    def __init__(self, machine: ProjectionMachine) -> None:
        self._machine = machine

    def __getattr__(self, name: str) -> Callable[..., None]:
        method = getattr(self._machine, name)

        def checked(*args: Any, **kwargs: Any) -> None:
            method(*args, **kwargs)
            self._machine.check()

        return checked


@contextmanager
def machine(database: str, *, seed: int, count: int) -> Iterator[Checked]:
    state = ProjectionMachine(database)
    try:
        state.start(seed=seed, count=count)
        state.check()
        yield Checked(state)
    finally:
        state.teardown()


# The history of seed 0: #0 auth_svc@2 auth.account.registered, #1 user_svc@1
# user.profile.created, #2 auth_svc@3 auth.account.password_changed, then logins.


def test_a_redelivered_batch_holding_two_copies_of_one_event_is_handled(
    database: str,
) -> None:
    """A relay re-sends #0 (at-least-once), a flap returns both copies, redelivered: counting
    their attempts must not fail. It fails in `ProjectionStore.attempts` with
    CardinalityViolation (ON CONFLICT DO UPDATE cannot affect row a second time), before the
    handler runs, so the batch is never acked: the consumer reconnects, gets the same batch
    and fails again, forever, and every message behind it waits."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=1)
        m.relay_resends(n=1)
        m.consume(k=2, ending="flap before handling")
        m.consume(k=2, ending="acked")


def test_two_copies_of_a_parked_event_in_one_batch_are_applied_once(
    database: str,
) -> None:
    """#0 fails and is dead-lettered; the connection goes before the broker gets the ack, so
    #0 comes back to the live queue, and a retry after the fix adds the DLQ's copy. Both are
    at or below the position and parked: `apply_in` unparks #0 once but applies every copy,
    so the signup is counted twice."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=1)
        m.handler_breaks_on(back=0, kills=False)
        m.consume(k=1, ending="connection lost after 1 acks or publishes, unnoticed")
        m.fix_is_deployed()
        m.dlq_retry(pick=0, every=False)
        m.consume(k=2, ending="acked")


def test_dead_letters_of_a_re_sent_event_retried_together_are_applied_once(
    database: str,
) -> None:
    """The same double count by another road: a relay re-sends #0, both copies are
    dead-lettered while the handler fails, and `esctl dlq retry --all` after the fix puts
    both in one batch."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=1)
        m.relay_resends(n=1)
        m.handler_breaks_on(back=0, kills=False)
        m.consume(k=2, ending="acked")
        m.fix_is_deployed()
        m.dlq_retry(pick=0, every=True)
        m.consume(k=2, ending="acked")


def test_a_replay_never_swaps_in_a_generation_that_lacks_an_event_the_live_one_applied(
    database: str,
) -> None:
    """The live generation applied #0 and #1. A new build's handler fails on #0, so the
    replay parks #0 in the generation it builds, reads #1, and swaps: positions alone say it
    has caught up. The new live generation has #0 parked, with no copy left in any queue:
    the signup (and the recipient) are gone for good, and nothing says so."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=2)
        m.consume(k=2, ending="acked")
        m.handler_breaks_on(back=1, kills=False)
        m.replay_begins()
        m.replay_reads(k=2)


def test_a_registration_still_queued_when_a_replay_swaps_gets_its_welcome_mail(
    database: str,
) -> None:
    """#0 is published while notify_svc's consumer has applied nothing from auth_svc yet. The
    replay applies it as history (`_apply_split`: a producer the live generation never
    applied is all history, so that a new deployment does not mail the whole backlog) and
    swaps; the consumer then skips #0 as a duplicate. The welcome mail is never intended,
    although #0 reached notify_svc's live queue and was never mailed."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=1)
        m.replay_begins()
        m.replay_reads(k=1)


def test_an_event_that_kills_the_process_is_dead_lettered_after_delivery_limit_deaths(
    database: str,
) -> None:
    """With a delivery limit of 2, #0 kills the consumer on its first delivery (not counted:
    only redeliveries are), on the second (counted once) and on the third (counted twice,
    "died 1 time", so handled again): three deaths, and the dead letter then says "died 2
    times"."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=1)
        m.handler_breaks_on(back=0, kills=True)
        m.consume(k=1, ending="acked")
        m.consume(k=1, ending="acked")
        m.consume(k=1, ending="acked")


def test_an_event_a_replay_cannot_apply_is_parked_even_when_later_ones_share_its_batch(
    database: str,
) -> None:
    """The replay reads #0, #1, #2 in one batch; the handler fails on #0. `_one_by_one`
    applies #1 and #2, and only then parks #0: `park_in` finds auth_svc's position (3, from
    #2) past #0's (2), takes #0 for decided, and parks nothing. The rebuilt generation then
    counts #0 as applied, without its effects, and no retry can ever bring it back."""
    with machine(database, seed=0, count=8) as m:
        m.publish(n=4)
        m.consume(k=4, ending="acked")
        m.handler_breaks_on(back=3, kills=False)
        m.replay_begins()
        m.replay_reads(k=3)


def test_an_event_that_kills_the_process_after_a_handler_failure_is_still_dead_lettered(
    database: str,
) -> None:
    """Found by the state machine in CI. #1 kills the consumer three times and is parked,
    but the connection is lost before its dead letter is published, so the broker delivers
    it once more. Parking used to reset its crash count, and it was then handled (and killed
    the process) a fourth time, past the delivery limit of 2: it must be dead-lettered."""
    with machine(database, seed=0, count=8) as m:
        m.consume(k=1, ending="acked")
        m.publish(n=2)
        m.consume(k=1, ending="acked")
        m.handler_breaks_on(back=0, kills=False)
        m.handler_breaks_on(back=0, kills=False)
        m.handler_breaks_on(back=0, kills=False)
        m.handler_breaks_on(back=0, kills=True)
        m.consume(k=1, ending="acked")
        m.consume(k=1, ending="acked")
        m.consume(k=1, ending="acked")
        m.consume(k=1, ending="connection lost after 0 acks or publishes, unnoticed")
        m.consume(k=1, ending="acked")
