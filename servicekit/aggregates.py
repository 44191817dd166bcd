"""Commands on one aggregate: one turn at a time in a process, retried with backoff across.

Optimistic concurrency resolves writers on one aggregate: the loser of a race gets an
IntegrityError, reloads and tries again. Between replicas that is right, and rare. Inside
one process it is a storm: 64 requests on one profile all load the same version, one wins,
63 retry, 62 lose again, and requests give up after twenty rounds (the 500s of issue 14).

So a process takes commands on one aggregate in turns (`Combiner`): a thread that finds the
aggregate free runs, in one turn, every command that queued for it meanwhile, in arrival
order, on one loaded aggregate, with one save. The others wait for their result; nobody
loses a race inside the process. What still conflicts (another replica saved in between) is
retried with full-jitter exponential backoff (`Backoff`, `retry_conflicts`), and a conflict
that outlasts every attempt is a 503 problem with `Retry-After` (`Contended`), never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from eventsourcing.persistence import IntegrityError
from prometheus_client import Counter, Histogram

from servicekit.problems import Problem

K = TypeVar("K")
C = TypeVar("C")
R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger("servicekit.aggregates")

TURN_COMMANDS = Histogram(
    "aggregate_turn_commands",
    "Commands run in one turn on one aggregate (one load, one save), by application",
    ["app"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
CONFLICTS = Counter(
    "aggregate_write_conflicts_total",
    "Saves that lost to a concurrent writer (another process) and were retried, by application",
    ["app"],
)
CONTENDED = Counter(
    "aggregate_write_contended_total",
    "Commands refused with 503 after every retry lost to a concurrent writer, by application",
    ["app"],
)


class Contended(Problem):
    """Every attempt lost to a concurrent writer: retry a moment later (503, `Retry-After`)."""

    status = 503
    title = "Service unavailable"

    def __init__(self, what: str, *, retry_after_seconds: int = 1) -> None:
        super().__init__(
            f"{what} is being changed by other writers at this moment; retry shortly.",
            headers={"Retry-After": str(retry_after_seconds)},
        )


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniformly up to base·2ⁿ (capped)."""

    attempts: int = 8
    base_seconds: float = 0.005
    max_seconds: float = 0.25

    def delays(self) -> Iterator[float]:
        """One delay before each attempt after the first."""
        for n in range(self.attempts - 1):
            yield random.uniform(0, min(self.max_seconds, self.base_seconds * 2**n))  # noqa: S311


def retry_conflicts(
    attempt: Callable[[], T],
    *,
    app: str,
    what: str,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`attempt()` again, after a jittered pause, whenever it raises IntegrityError.

    `attempt` loads, decides and saves; it must be safe to run again (the aggregate reloaded).
    Raises `Contended` when the last attempt loses too.
    """
    delays = backoff.delays()
    while True:
        try:
            return attempt()
        except IntegrityError:
            CONFLICTS.labels(app).inc()
            delay = next(delays, None)
            if delay is None:
                CONTENDED.labels(app).inc()
                log.warning("gave up writing %s after %d conflicts", what, backoff.attempts)
                raise Contended(what) from None
            sleep(delay)


@dataclass
class _Slot(Generic[C, R]):
    command: C
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


@dataclass
class _Turns(Generic[C, R]):
    """One aggregate's queue and its turn; kept only while someone is waiting on it."""

    turn: threading.Lock = field(default_factory=threading.Lock)
    queue: list[_Slot[C, R]] = field(default_factory=list)
    users: int = 0


class Combiner(Generic[K, C, R]):
    """Runs the commands on one key (an aggregate id) in turns, combining those that queue.

    `run(key, commands)` gets the commands queued for `key` since the last turn (at most
    `max_batch`), in arrival order, and returns one result per command: a value, or an
    exception to raise in that command's caller only. An exception raised by `run` itself
    goes to every caller of the turn. Calls on other keys never wait for each other.
    """

    def __init__(
        self,
        run: Callable[[K, Sequence[C]], Sequence[R | BaseException]],
        *,
        app: str,
        max_batch: int = 64,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._turn_size = TURN_COMMANDS.labels(app)
        self._guard = threading.Lock()
        self._keys: dict[K, _Turns[C, R]] = {}

    def submit(self, key: K, command: C) -> R:
        """The command's result, after its turn; raises what `run` gave for it."""
        (outcome,) = self.submit_many(key, [command])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit_many(self, key: K, commands: Sequence[C]) -> list[R | BaseException]:
        """Each command's result or refusal, in order, after the turns that ran them."""
        slots: list[_Slot[C, R]] = [_Slot(c) for c in commands]
        with self._guard:
            turns = self._keys.get(key)
            if turns is None:
                turns = self._keys[key] = _Turns()
            turns.queue.extend(slots)
            turns.users += 1
        try:
            while not slots[-1].done:
                with turns.turn:
                    if slots[-1].done:  # a turn that ran while we waited took our commands
                        break
                    with self._guard:
                        batch = turns.queue[: self._max_batch]
                        del turns.queue[: self._max_batch]
                    self._take_turn(key, batch)
        finally:
            with self._guard:
                turns.users -= 1
                if turns.users == 0:
                    del self._keys[key]
        return [s.error if s.error is not None else s.result for s in slots]  # type: ignore[misc]

    def _take_turn(self, key: K, batch: list[_Slot[C, R]]) -> None:
        self._turn_size.observe(len(batch))
        try:
            results = self._run(key, [s.command for s in batch])
        except BaseException as exc:  # noqa: BLE001 - every caller of the turn gets it
            for s in batch:
                s.error, s.done = exc, True
            return
        if len(results) != len(batch):  # a bug in `run`: say so to every caller
            error = RuntimeError(f"{len(results)} results for {len(batch)} commands")
            for s in batch:
                s.error, s.done = error, True
            return
        for s, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                s.error = result
            else:
                s.result = result
            s.done = True


class Gathering(Generic[K, C, R]):
    """Requests on the event loop, gathered per key and handed to a `Combiner` in one call.

    A sync Combiner alone puts every waiting request on its own worker thread: 64 requests
    on one profile are 64 threads contending for the GIL around each database round trip of
    the turn (measured: 2 commands per turn, about 200 edits/s). Here they wait as futures on
    the loop; one worker thread per key carries everything queued since its last call. Sync
    callers (a consumer's thread, tests) still use the Combiner itself: both take its turns.
    """

    def __init__(self, combiner: Combiner[K, C, R], *, max_batch: int = 64) -> None:
        self._combiner = combiner
        self._max_batch = max_batch
        self._queues: dict[K, list[tuple[C, asyncio.Future[R]]]] = {}
        self._carriers: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, command: C) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = []
            carrier = asyncio.create_task(self._carry(key, queue))
            self._carriers.add(carrier)
            carrier.add_done_callback(self._carriers.discard)
        queue.append((command, future))
        return await future

    async def _carry(self, key: K, queue: list[tuple[C, asyncio.Future[R]]]) -> None:
        try:
            while queue:
                batch = queue[: self._max_batch]
                del queue[: self._max_batch]
                try:
                    outcomes = await asyncio.to_thread(
                        self._combiner.submit_many, key, [c for c, _ in batch]
                    )
                except BaseException as exc:  # noqa: BLE001 - every waiter of the call gets it
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            del self._queues[key]
            for _, future in queue:  # only when cancelled itself: nothing may wait forever
                if not future.done():
                    future.set_exception(RuntimeError("the turn was cancelled"))
