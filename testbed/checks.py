"""The checks that nothing was lost: the event stores, the exchanges, every
projection and every effect agree with what the clients were told; and the time until a new
write is seen end to end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika

import registry
from shared_contracts.envelope import event_id_for
from shared_contracts.names import dead_letter_queue
from testbed.audit import Audit
from testbed.effects import (
    MAIL_DOMAIN,
    WEBHOOK_EVENTS,
    Effects,
    Registration,
    check_effects,
    effect_seen,
)
from testbed.load import Ledger, LoadGenerator
from testbed.stack import DLQ_SERVICES, Stack

# -- the checks ---------------------------------------------------------------------------


@dataclass
class StoreEvent:
    producer: str
    position: int
    event_id: str
    event_type: str
    data: dict[str, Any]


def read_store(stack: Stack, producer: str) -> list[StoreEvent]:
    """Every public event in a producer's own event store (read directly, not via a proxy),
    as its relay maps them."""
    service = registry.service(producer)
    assert service.relay is not None
    relay = service.relay(stack.settings_of(producer))
    app, to_contract = relay.app, relay.to_contract
    events: list[StoreEvent] = []
    try:
        position = 0
        while True:
            page = app.recorder.select_notifications(
                start=position, limit=1000, inclusive_of_start=False
            )
            if not page:
                break
            for notification in page:
                event = app.mapper.to_domain_event(notification)
                contract = to_contract(event)
                if contract is not None:
                    events.append(
                        StoreEvent(
                            producer,
                            notification.id,
                            str(
                                event_id_for(
                                    producer, event.originator_id, event.originator_version
                                )
                            ),
                            contract.event_type,
                            contract.model_dump(mode="json"),
                        )
                    )
            position = page[-1].id
    finally:
        app.close()
    return events


async def dlq_depths(amqp_url: str) -> dict[str, int]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        depths = {}
        for service in DLQ_SERVICES:
            queue = await channel.declare_queue(dead_letter_queue(service), passive=True)
            depths[service] = int(queue.declaration_result.message_count or 0)
        return depths


@dataclass
class Verdict:
    """The outcome of one full check; `problems` is empty when every guarantee held."""

    problems: list[str]
    projected: int = 0  # this ledger's registrations counted by reporting_svc and profiled
    effects: Effects = field(default_factory=Effects)  # mails and webhooks


async def check_everything(stack: Stack, audit: Audit, ledgers: list[Ledger]) -> Verdict:
    """Event stores, exchanges and projections agree with what clients were told."""
    from reporting_svc.reports import REPORTS, read_report
    from testbed.history import expected_reports
    from user_svc.main import profile_service

    problems: list[str] = []
    auth_events = await asyncio.to_thread(read_store, stack, "auth_svc")
    user_events = await asyncio.to_thread(read_store, stack, "user_svc")
    stored = auth_events + user_events

    registered: dict[str, list[StoreEvent]] = defaultdict(list)
    logins: Counter[str] = Counter()
    created: Counter[str] = Counter()
    bio: dict[str, str | None] = {}
    bios_ever: set[str] = set()
    for ev in auth_events:
        if ev.event_type == "auth.account.registered":
            registered[ev.data["email"]].append(ev)
        elif ev.event_type == "auth.account.login_succeeded":
            logins[ev.data["user_id"]] += 1
    for ev in user_events:
        if ev.event_type == "user.profile.created":
            created[ev.data["user_id"]] += 1
        bio[ev.data["user_id"]] = ev.data.get("bio")
        if ev.data.get("bio"):
            bios_ever.add(ev.data["bio"])

    # 1. The event stores: every accepted write exactly once, no rejected one.
    for ledger in ledgers:
        problems += [f"{ledger.tag}: unexpected answer {u}" for u in ledger.unexpected[:5]]
        if ledger.unresolved:
            problems.append(f"{ledger.tag}: {ledger.unresolved} writes never got an answer")
        mine = {e: evs for e, evs in registered.items() if e.startswith(f"{ledger.tag}-")}
        if set(mine) != set(ledger.users):
            problems.append(
                f"{ledger.tag}: registrations stored {len(mine)} != accepted {len(ledger.users)}"
            )
        for email, user_id in ledger.users.items():
            evs = registered.get(email, [])
            if len(evs) != 1:
                problems.append(f"{ledger.tag}: {email} registered {len(evs)} times")
            elif user_id and evs[0].data["user_id"] != user_id:
                problems.append(f"{ledger.tag}: {email} stored with another user id")
            owner = user_id or (evs[0].data["user_id"] if evs else "")
            if created[owner] != 1:
                problems.append(f"{ledger.tag}: {email} has {created[owner]} profiles")
        for user_id, accepted in ledger.logins.items():
            most = accepted + ledger.ambiguous_logins[user_id]
            if not accepted <= logins[user_id] <= most:
                problems.append(
                    f"{ledger.tag}: {user_id} logins stored {logins[user_id]}, "
                    f"accepted {accepted} (+{ledger.ambiguous_logins[user_id]} unanswered)"
                )
        for user_id, last in ledger.bios.items():
            if bio.get(user_id) != last:
                problems.append(f"{ledger.tag}: {user_id} bio {bio.get(user_id)!r} != {last!r}")
        if leaked := ledger.rejected_bios & bios_ever:
            problems.append(f"{ledger.tag}: rejected edits were stored: {sorted(leaked)[:3]}")

    # 2. The exchanges: every stored public event published (at least once), nothing else.
    published = {(e["producer"], e["event_id"]): e for e in audit.snapshot()}
    store_ids = {(e.producer, e.event_id) for e in stored}
    if missing := store_ids - set(published):
        problems.append(f"{len(missing)} stored events never reached an exchange")
    if extra := set(published) - store_ids:
        problems.append(f"{len(extra)} published events are in no event store")
    for ev in stored:
        env = published.get((ev.producer, ev.event_id))
        if env and (env["position"], env["event_type"]) != (ev.position, ev.event_type):
            problems.append(f"{ev.event_id} published with another position or type")
            break

    # 3. reporting_svc: its reports equal those computed independently from the events.
    envelopes = sorted(published.values(), key=lambda e: (e["producer"], e["position"]))
    expected = expected_reports(envelopes)
    for name in REPORTS:
        report = await asyncio.to_thread(read_report, stack.direct_db["reporting"], name)
        if report.rows != expected[name]:
            problems.append(f"report {name}: {report.rows[:3]} != expected {expected[name][:3]}")

    # 4. user_svc's consumer has seen every registration (its tracked position).
    profiles = profile_service(stack.settings_of("user_svc"))
    try:
        tracked = profiles.tracked_position("auth_svc")
    finally:
        profiles.close()
    last_registration = max((e.position for evs in registered.values() for e in evs), default=0)
    if tracked < last_registration:
        problems.append(f"user_svc consumer at {tracked}, registrations up to {last_registration}")

    # 5. notify_svc and integration_svc: one welcome intent and one webhook delivery per
    # stored registration (and per subscribed profile edit), each sent, and nothing else.
    subscribed_types = set(WEBHOOK_EVENTS)
    effects = await asyncio.to_thread(
        check_effects,
        notify_db=stack.direct_db["notify"],
        integration_db=stack.direct_db["integration"],
        maildir=stack.maildir,
        sink=stack.sink,
        secret=stack.webhook_secret,
        registrations=[
            Registration(
                ev.event_id, ev.data["email"], ev.data["user_id"], ev.data.get("display_name")
            )
            for evs in registered.values()
            for ev in evs
        ],
        subscribed={e.event_id: e.event_type for e in stored if e.event_type in subscribed_types},
        ledgers=[(lg.tag, lg.users, lg.rejected_bios) for lg in ledgers],
    )
    problems += effects.problems

    # 6. Nothing parked in a dead-letter queue.
    depths = await dlq_depths(stack.rabbit.url())
    if any(depths.values()):
        problems.append(f"dead-lettered: {depths}")

    projected = 0
    if ledgers:
        ledger = ledgers[-1]
        signed = {
            e["data"]["email"] for e in envelopes if e["event_type"] == "auth.account.registered"
        }
        projected = (
            sum(
                1
                for email in ledger.users
                if email in signed and created[registered[email][0].data["user_id"]] == 1
            )
            if not problems
            else 0
        )
    return Verdict(problems, projected, effects)


async def until_no_problems(
    check: Callable[[], Awaitable[Verdict]], timeout: float
) -> tuple[Verdict, float]:
    """Poll `check` until it finds no problem or `timeout` passes; (verdict, seconds)."""
    started = time.monotonic()
    while True:
        verdict = await check()
        elapsed = time.monotonic() - started
        if not verdict.problems or elapsed > timeout:
            return verdict, elapsed
        await asyncio.sleep(0.5)


async def end_to_end_recovery(
    stack: Stack, audit: Audit, ledger: Ledger, since: float, timeout: float
) -> float:
    """Seconds from `since` until a new registration is accepted, published, applied by
    user_svc's and reporting_svc's consumers, and its welcome mail and webhook are out, with
    every process ready: the system works again, untouched."""
    from notify_svc.intents import message_id
    from notify_svc.projection import WELCOME
    from reporting_svc.reports import read_report

    load = LoadGenerator(stack, ledger, give_up_after=timeout)
    try:
        deadline = since + timeout
        email = f"{ledger.tag}-probe-{uuid.uuid4().hex[:6]}@example.com"
        if await load.register(email) is None:
            raise AssertionError(f"the probe registration failed\n{stack.log_tail()}")
        seen = "the probe was never published"
        while time.monotonic() < deadline:
            env = audit.find("auth.account.registered", email)
            if env is not None:
                seen = "published, but not every process was ready"
            if env is not None and not await asyncio.to_thread(stack.not_ready):
                signups = await asyncio.to_thread(
                    read_report, stack.direct_db["reporting"], "signups"
                )
                total = sum(row[1] for row in signups.rows)
                registrations = sum(
                    1 for e in audit.snapshot() if e["event_type"] == "auth.account.registered"
                )
                profile = await _profile_exists(stack, env["data"]["user_id"])
                event_id = env["event_id"]
                mail = message_id(uuid.UUID(event_id), WELCOME, MAIL_DOMAIN)
                sent = await asyncio.to_thread(
                    effect_seen, stack.maildir, stack.sink, event_id, mail
                )
                if total >= registrations and profile and sent:
                    return time.monotonic() - since
                seen = (
                    f"published; signups counted {total} of {registrations} registrations, "
                    f"profile {'made' if profile else 'missing'}, "
                    f"mail and webhook {'out' if sent else 'not out'}"
                )
            await asyncio.sleep(0.2)
    finally:
        await load.aclose()
    raise AssertionError(
        f"not recovered {timeout:.0f}s after the fault; last seen: {seen}; "
        f"not ready: {stack.not_ready()}\n" + stack.log_tail()
    )


async def _profile_exists(stack: Stack, user_id: str) -> bool:
    from user_svc.main import profile_service

    def created() -> bool:
        app = profile_service(stack.settings_of("user_svc"))
        try:
            return app.public_profile(uuid.UUID(user_id)) is not None
        finally:
            app.close()

    return await asyncio.to_thread(created)
