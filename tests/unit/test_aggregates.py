"""Commands on one aggregate take turns in a process; conflicts from elsewhere back off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from eventsourcing.persistence import IntegrityError
from fastapi import FastAPI
from fastapi.testclient import TestClient

from servicekit.aggregates import Backoff, Combiner, Contended, Gathering, retry_conflicts
from servicekit.problems import install_problem_handlers


class Recorder:
    """A `run` that notes every turn and whether two turns on one key ever overlapped."""

    def __init__(self, pause: float = 0.002) -> None:
        self.pause = pause
        self.turns: list[tuple[str, list[int]]] = []
        self.inside: dict[str, int] = {}
        self.overlapped = False
        self.guard = threading.Lock()

    def run(self, key: str, commands: Sequence[int]) -> list[int | BaseException]:
        with self.guard:
            self.inside[key] = self.inside.get(key, 0) + 1
            self.overlapped |= self.inside[key] > 1
            self.turns.append((key, list(commands)))
        time.sleep(self.pause)
        with self.guard:
            self.inside[key] -= 1
        return [ValueError(c) if c < 0 else c * 10 for c in commands]


def test_commands_on_one_key_never_overlap_and_each_caller_gets_its_own_result() -> None:
    recorder = Recorder()
    combiner: Combiner[str, int, int] = Combiner(recorder.run, app="t", max_batch=8)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda n: combiner.submit("hot", n), range(200)))
    assert results == [n * 10 for n in range(200)]
    assert not recorder.overlapped
    ran = [c for _, commands in recorder.turns for c in commands]
    assert sorted(ran) == list(range(200)), "every command ran exactly once"
    assert max(len(c) for _, c in recorder.turns) <= 8
    assert len(recorder.turns) < 200, "commands that queued were combined into turns"


def test_a_refusal_goes_to_its_caller_only() -> None:
    combiner: Combiner[str, int, int] = Combiner(Recorder().run, app="t")
    with ThreadPoolExecutor(8) as pool:
        futures = {n: pool.submit(combiner.submit, "k", n) for n in (1, -2, 3, -4, 5)}
    for n, future in futures.items():
        if n < 0:
            with pytest.raises(ValueError, match=str(n)):
                future.result()
        else:
            assert future.result() == n * 10


def test_a_failing_turn_fails_every_command_of_that_turn_and_the_key_recovers() -> None:
    broken = threading.Event()
    broken.set()

    def run(key: str, commands: Sequence[int]) -> list[int | BaseException]:
        if broken.is_set():
            raise ConnectionError("database gone")
        return list(commands)

    combiner: Combiner[str, int, int] = Combiner(run, app="t")
    with pytest.raises(ConnectionError):
        combiner.submit("k", 1)
    broken.clear()
    assert combiner.submit("k", 2) == 2


def test_keys_do_not_wait_for_each_other() -> None:
    release = threading.Event()
    entered = threading.Event()

    def run(key: str, commands: Sequence[str]) -> list[str | BaseException]:
        if key == "slow":
            entered.set()
            assert release.wait(5)
        return list(commands)

    combiner: Combiner[str, str, str] = Combiner(run, app="t")
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(combiner.submit, "slow", "a")
        assert entered.wait(5)
        assert pool.submit(combiner.submit, "fast", "b").result(timeout=5) == "b"
        release.set()
        assert slow.result(timeout=5) == "a"


def test_conflicts_are_retried_with_bounded_jitter_then_refused_with_503() -> None:
    slept: list[float] = []
    calls = 0

    def always_conflicting() -> None:
        nonlocal calls
        calls += 1
        raise IntegrityError("version taken")

    backoff = Backoff(attempts=6, base_seconds=0.01, max_seconds=0.05)
    with pytest.raises(Contended) as refused:
        retry_conflicts(
            always_conflicting, app="t", what="This thing", backoff=backoff, sleep=slept.append
        )
    assert calls == 6
    assert len(slept) == 5
    assert all(0 <= d <= min(0.05, 0.01 * 2**n) for n, d in enumerate(slept))
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "1"


def test_a_conflict_that_passes_is_invisible() -> None:
    outcomes = iter([IntegrityError("lost"), IntegrityError("lost"), None])

    def attempt() -> str:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return "saved"

    assert retry_conflicts(attempt, app="t", what="x", sleep=lambda _: None) == "saved"


def test_contended_is_a_problem_json_503_with_retry_after() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/write")
    def write() -> None:
        raise Contended("This profile")

    response = TestClient(app).post("/write")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["status"] == 503
    assert "retry" in response.json()["detail"]


async def test_requests_on_the_loop_are_carried_to_the_turn_together() -> None:
    recorder = Recorder(pause=0.01)
    combiner: Combiner[str, int, int] = Combiner(recorder.run, app="t")
    gathering = Gathering(combiner)
    results = await asyncio.gather(*(gathering.submit("hot", n) for n in range(100)))
    assert results == [n * 10 for n in range(100)]
    assert not recorder.overlapped
    assert len(recorder.turns) <= 5, "one worker call carried everything queued meanwhile"
    with pytest.raises(ValueError, match="-3"):
        await gathering.submit("hot", -3)
    assert await gathering.submit("other", 4) == 40


async def test_loop_and_thread_callers_share_the_turns_of_one_key() -> None:
    recorder = Recorder(pause=0.005)
    combiner: Combiner[str, int, int] = Combiner(recorder.run, app="t")
    gathering = Gathering(combiner)
    with ThreadPoolExecutor(4) as pool:
        from_threads = [pool.submit(combiner.submit, "k", n) for n in range(40)]
        from_loop = await asyncio.gather(*(gathering.submit("k", n) for n in range(40, 80)))
        assert [f.result() for f in from_threads] == [n * 10 for n in range(40)]
    assert from_loop == [n * 10 for n in range(40, 80)]
    assert not recorder.overlapped
