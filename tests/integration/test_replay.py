"""Blue/green replay from events.history, and repairing poison messages with `esctl dlq`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

from reporting_svc.projection import ReportingProjection
from reporting_svc.settings import ReportingSettings
from servicekit.eventstore import connection_kwargs
from servicekit.messages import IncomingEvent
from servicekit.projection import Transaction
from servicekit.replay import Progress, Replay, ReplayResult
from testbed import cli, projections
from testbed.history import generate, publish
from testbed.projections import (
    assert_reports_match,
    consuming,
    positions,
    publish_and_catch_up,
    wait_caught_up,
)


@pytest.fixture
def settings(
    make_database: Callable[[str], str], make_vhost: Callable[[], str]
) -> ReportingSettings:
    return ReportingSettings(database_url=make_database("replay"), amqp_url=make_vhost())


def replay(
    settings: ReportingSettings, *, stop_after: int | None = None, **options: Any
) -> Callable[[], Any]:
    stop = asyncio.Event()

    def progress(p: Progress) -> None:
        if stop_after is not None and p.applied >= stop_after:
            stop.set()

    rebuild = Replay(
        ReportingProjection(),
        database_url=settings.database_url,
        amqp_url=settings.amqp_url,
        batch_size=200,
        idle_seconds=0.5,
        stall_seconds=10,
        on_progress=progress,
        **options,
    )
    return lambda: rebuild.run(stop)


def live_generation(settings: ReportingSettings) -> str:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        live = projections.live_generation(conn, ReportingProjection.name)
    assert live is not None
    return live


async def test_replay_while_live_events_arrive_swaps_in_an_equal_read_model(
    settings: ReportingSettings,
) -> None:
    history = generate(8_000, seed=21)
    bodies = history.bodies()
    async with consuming(settings, prefetch=200):
        await publish_and_catch_up(settings, history.prefix(4_000))
        before = live_generation(settings)
        rebuild = asyncio.create_task(replay(settings)())
        await publish(settings.amqp_url, bodies[4_000:])  # keeps arriving during the replay
        result: ReplayResult = await asyncio.wait_for(rebuild, timeout=120)
        assert result.swapped and not result.interrupted
        await wait_caught_up(settings, history)
    assert live_generation(settings) == result.progress.generation != before
    await assert_reports_match(settings, history)


async def test_an_interrupted_replay_resumes_and_ends_with_the_same_result(
    settings: ReportingSettings,
) -> None:
    history = generate(6_000, seed=8)
    async with consuming(settings):
        await publish_and_catch_up(settings, history)
        first = await replay(settings, stop_after=2_000)()
        assert first.interrupted and not first.swapped
        assert 2_000 <= first.progress.applied < 5_000
        second = await replay(settings)()
        assert second.progress.resumed
        assert second.progress.generation == first.progress.generation
        assert second.swapped
        # Resumed where it stopped: nothing read twice, so nothing skipped as a duplicate.
        assert second.progress.skipped == 0
        assert second.progress.applied == len(history.envelopes)
    await assert_reports_match(settings, history)


async def test_dry_run_reports_differences_without_swapping(settings: ReportingSettings) -> None:
    history = generate(2_000, seed=4)
    async with consuming(settings):
        await publish_and_catch_up(settings, history)
    live = live_generation(settings)
    clean = await replay(settings, dry_run=True)()
    assert not clean.swapped and clean.differences == []
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        conn.execute(
            psycopg.sql.SQL("UPDATE {} SET accounts = accounts + 1 WHERE day = %s").format(
                psycopg.sql.Identifier(live, "signups")
            ),
            (history.expected()["signups"][0][0],),
        )
    drifted = await replay(settings, dry_run=True)()
    assert not drifted.swapped
    assert [(d.table, d.only_live, d.only_rebuilt) for d in drifted.differences] == [
        ("signups", 1, 1)
    ]
    assert live_generation(settings) == live


class Breakable(ReportingProjection):
    """ReportingProjection that cannot apply one chosen event until it is fixed."""

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.broken = True

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        if self.broken and any(str(e.envelope.event_id) == self.poison for e in events):
            raise RuntimeError("cannot apply this event (simulated bug)")
        await super().apply(tx, events)


def esctl(settings: ReportingSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url,
        "REPORTING_DATABASE_URL": settings.database_url,
        "NO_COLOR": "1",
        "COLUMNS": "200",
    }
    return cli.esctl(*args, env=env)


async def test_poison_goes_to_the_dlq_the_rest_is_applied_and_a_retry_after_the_fix_applies_it(
    settings: ReportingSettings,
) -> None:
    history = generate(1_500, seed=13)
    poison = history.envelopes[700]
    projection = Breakable(poison["event_id"])
    async with consuming(settings, prefetch=100, projection=projection):
        await publish_and_catch_up(settings, history)  # the events after the poison are applied
        listed = await asyncio.to_thread(
            esctl, settings, "dlq", "list", "reporting_svc", "--format", "json"
        )
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)
        assert [(d["event_id"], d["reason"]) for d in letters] == [
            (poison["event_id"], "handler failed")
        ]
        shown = await asyncio.to_thread(
            esctl, settings, "dlq", "show", "reporting_svc", poison["event_id"]
        )
        assert "simulated bug" in json.loads(shown.stdout)["error"]
        projection.broken = False  # the fix is deployed
        retried = await asyncio.to_thread(
            esctl, settings, "dlq", "retry", "reporting_svc", poison["event_id"]
        )
        assert retried.returncode == 0, retried.stderr
        for _ in range(100):
            try:
                await assert_reports_match(settings, history)
                break
            except AssertionError:
                await asyncio.sleep(0.1)
        await assert_reports_match(settings, history)
    after = await asyncio.to_thread(
        esctl, settings, "dlq", "list", "reporting_svc", "--format", "json"
    )
    assert json.loads(after.stdout) == []
    assert await positions(settings) == history.last_position


def test_cli_errors_are_one_line_with_a_non_zero_exit(settings: ReportingSettings) -> None:
    cases = [
        ("replay", "nope_svc"),
        ("dlq", "list", "nope_svc"),
        ("report", "nope"),
        ("report", "signups", "--since", "2026-13-45"),
        ("republish", "nope_svc", "--from", "1"),
        ("dlq", "retry", "reporting_svc"),
    ]
    for args in cases:
        result = esctl(settings, *args)
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr, args
        assert result.stderr.strip(), args


def test_no_broker_is_a_clear_error(settings: ReportingSettings) -> None:
    dead = settings.model_copy(update={"amqp_url": "amqp://guest:guest@127.0.0.1:1/"})
    result = esctl(dead, "projections", "status")
    assert result.returncode != 0
    assert "RabbitMQ is not reachable at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


async def test_ctrl_c_stops_the_cli_replay_which_then_resumes(settings: ReportingSettings) -> None:
    history = generate(3_000, seed=17)
    async with consuming(settings):
        await publish_and_catch_up(settings, history)
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url,
        "REPORTING_DATABASE_URL": settings.database_url,
        "NO_COLOR": "1",
    }
    argv = [*cli.ESCTL, "replay", "reporting_svc", "--batch-size", "1"]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for _ in range(300):
        if await asyncio.to_thread(replayed_so_far, settings) >= 200:
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 130, stderr.decode()
    assert "run `esctl replay reporting_svc` again to resume" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    halfway = await asyncio.to_thread(replayed_so_far, settings)
    assert 200 <= halfway < len(history.envelopes)

    done = await asyncio.to_thread(esctl, settings, "replay", "reporting_svc")
    assert done.returncode == 0, done.stderr
    assert "now serves reporting_svc_g2" in done.stdout
    await assert_reports_match(settings, history)


def replayed_so_far(settings: ReportingSettings) -> int:
    """Events applied by the rebuild in progress (0 before it has started)."""
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        row = conn.execute("SELECT building FROM projection_generations").fetchone()
        if row is None or row[0] is None:
            return 0
        try:
            applied = conn.execute(
                psycopg.sql.SQL("SELECT applied FROM {}").format(
                    psycopg.sql.Identifier(row[0], "_replay")
                )
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
        return int(applied[0]) if applied else 0


async def test_dlq_drop_asks_first_then_removes_only_what_it_names(
    settings: ReportingSettings,
) -> None:
    history = generate(50, seed=2)
    async with consuming(settings, prefetch=10):
        await publish(
            settings.amqp_url,
            [
                ("auth.events", "auth.account.registered", b"{not json"),
                ("auth.events", "auth.account.registered", b'{"event_id": "x"}'),
                *history.bodies(),
            ],
        )
        await wait_caught_up(settings, history)  # the bad ones did not stop the rest
    listed = json.loads(esctl(settings, "dlq", "list", "reporting_svc", "--format", "json").stdout)
    assert [d["reason"] for d in listed] == ["malformed envelope", "malformed envelope"]

    refused = esctl(settings, "dlq", "drop", "reporting_svc", "1")  # no terminal, no --yes
    assert refused.returncode != 0 and "pass --yes" in refused.stderr
    assert (
        len(json.loads(esctl(settings, "dlq", "list", "reporting_svc", "--format", "json").stdout))
        == 2
    )

    dropped = esctl(settings, "dlq", "drop", "reporting_svc", "1", "--yes")
    assert dropped.returncode == 0, dropped.stderr
    left = json.loads(esctl(settings, "dlq", "list", "reporting_svc", "--format", "json").stdout)
    assert len(left) == 1
    assert esctl(settings, "dlq", "drop", "reporting_svc", "--all", "--yes").returncode == 0
    assert (
        json.loads(esctl(settings, "dlq", "list", "reporting_svc", "--format", "json").stdout) == []
    )
    await assert_reports_match(settings, history)
