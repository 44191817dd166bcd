"""A fault case: load, the fault, the recovery, then every check."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from testbed.audit import Audit
from testbed.checks import Verdict, check_everything, end_to_end_recovery, eventually
from testbed.load import Ledger, LoadGenerator
from testbed.stack import Stack

# -- a fault that lasts until the system has recovered -----------------------------------


@dataclass
class FaultCase:
    """What `run_fault` saw: `recovery` from the fault's start if it lasted, else from its
    end."""

    ledger: Ledger
    verdict: Verdict
    recovery: float
    catch_up: float
    suppressed: int

    def summary(self, stack: Stack, audit: Audit) -> str:
        ledger, verdict = self.ledger, self.verdict
        restarts = {p.name: p.restarts for p in stack.procs.values() if p.restarts}
        return (
            f"[chaos] {ledger.tag}: sent={ledger.sent} accepted={ledger.accepted} "
            f"rejected={ledger.rejected} retried={ledger.retries} "
            f"projected={verdict.projected} mailed={verdict.effects.mails} "
            f"webhooks={verdict.effects.webhooks} duplicates suppressed={self.suppressed} "
            f"exchange duplicates(total)={audit.duplicates()} "
            f"resent(total) mails={verdict.effects.mail_copies} "
            f"webhooks={verdict.effects.webhook_copies} "
            f"recovery={self.recovery:.1f}s "
            f"catch-up={self.catch_up:.1f}s restarts={restarts}"
        )


async def run_fault(
    stack: Stack,
    audit: Audit,
    tag: str,
    *,
    begin: Callable[[], None],
    end: Callable[[], None] | None = None,
    load_seconds: float = 6.0,
    fault_after: float = 2.0,
    recovery_bound: float = 30.0,
    catch_up_bound: float = 45.0,
    diagnose: Callable[[], str] | None = None,
) -> FaultCase:
    """Load for `load_seconds`; after `fault_after` s, `begin()` the fault.

    Without `end`, `begin` is the whole fault (a restart, a kill, a cut undone): recovery is
    timed from its return. With `end`, the fault is KEPT: a new registration must go end to
    end within `recovery_bound` s of the fault's start while it lasts; then `end()` undoes it
    (always, even when recovery failed or `begin` failed half-way: `end` must be
    idempotent). Then every check must hold within `catch_up_bound` s. `diagnose()`, if
    given, says what it sees when recovery fails (the fault still on)."""
    ledger = Ledger(tag=tag)
    duplicates_before = await asyncio.to_thread(stack.duplicates_suppressed)
    load = LoadGenerator(stack, ledger)
    traffic = asyncio.create_task(load.run(load_seconds))
    try:
        await asyncio.sleep(fault_after)
        try:
            fault_began = time.monotonic()
            await asyncio.to_thread(begin)
            since = fault_began if end is not None else time.monotonic()
            try:
                recovery = await end_to_end_recovery(stack, audit, ledger, since, recovery_bound)
            except AssertionError as exc:
                if diagnose is None:
                    raise
                seen = await asyncio.to_thread(_diagnosis, diagnose)
                raise AssertionError(f"{exc}\n--- while the fault lasted:\n{seen}") from None
            await traffic
        finally:
            if end is not None:
                await asyncio.to_thread(end)
    finally:
        with contextlib.suppress(Exception):
            await traffic
        await load.aclose()
    verdict, catch_up = await eventually(
        lambda: check_everything(stack, audit, [ledger]), catch_up_bound
    )
    suppressed = await asyncio.to_thread(stack.duplicates_suppressed) - duplicates_before
    return FaultCase(ledger, verdict, recovery, catch_up, suppressed)


def _diagnosis(diagnose: Callable[[], str]) -> str:
    try:
        return diagnose()
    except Exception as exc:  # a diagnosis must not hide the failure it explains
        return f"(diagnosis failed: {type(exc).__name__}: {exc})"


def database_sessions(stack: Stack, database: str) -> str:
    """Every session on one of the stack's databases: client, state, waits, age, query."""
    from servicekit.eventstore import connection_kwargs

    kwargs = connection_kwargs(stack.direct_db[database])
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, client_addr, state, wait_event_type, wait_event, "
            "round(extract(epoch FROM now() - state_change))::int, left(query, 80) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return "\n".join(" | ".join(str(v) for v in row) for row in rows)
