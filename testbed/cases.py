"""A fault case: load, the fault, the recovery, then every check."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from testbed.audit import Audit
from testbed.checks import Verdict, check_everything, end_to_end_recovery, until_no_problems
from testbed.load import Ledger, LoadGenerator
from testbed.servers import PrivatePostgres, PrivateRabbit, PrivateRabbitCluster
from testbed.stack import Stack, running_stack

LOAD_SECONDS = 6.0
FAULT_AFTER = 2.0  # seconds into the load
# Seconds to a write seen end to end: from the start of a fault that lasts, else from its end.
RECOVERY_BOUND = 30.0
CATCH_UP_BOUND = 45.0  # seconds from the end of the load to every check passing


@dataclass
class AuditedStack:
    """The stack as processes, and the audit of what reached its exchanges."""

    stack: Stack
    audit: Audit


@contextlib.contextmanager
def audited_stack(
    postgres: PrivatePostgres, rabbit: PrivateRabbit | PrivateRabbitCluster, *, logs: str
) -> Iterator[AuditedStack]:
    """The stack on these servers (its logs in a temporary directory named `logs`...), and
    the audit of both exchanges, read directly from the broker (any node of a cluster)."""
    with tempfile.TemporaryDirectory(prefix=logs, ignore_cleanup_errors=True) as workdir:
        audit = Audit(rabbit.amqp_url_list()).start()
        try:
            with running_stack(postgres, rabbit, Path(workdir)) as stack:
                yield AuditedStack(stack, audit)
        finally:
            audit.close()


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

    def assert_held(self, stack: Stack) -> None:
        """Every check passed, the load had writes accepted and refused, and every accepted
        registration was projected and had its one mail and one webhook."""
        verdict, ledger = self.verdict, self.ledger
        assert not verdict.problems, "\n".join(verdict.problems) + "\n" + stack.log_tail()
        assert ledger.accepted > 0 and ledger.rejected > 0
        assert verdict.projected == len(ledger.users)
        assert verdict.effects.mails == verdict.effects.webhooks == len(ledger.users)


async def run_fault(
    stack: Stack,
    audit: Audit,
    tag: str,
    *,
    begin: Callable[[], None],
    end: Callable[[], None] | None = None,
    load_seconds: float = LOAD_SECONDS,
    fault_after: float = FAULT_AFTER,
    recovery_bound: float = RECOVERY_BOUND,
    catch_up_bound: float = CATCH_UP_BOUND,
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
    verdict, catch_up = await until_no_problems(
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
