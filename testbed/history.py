"""A generated history of public events from both producers, and the reports it must yield.

The expected reports are computed here in plain Python, independently of reporting_svc's
projection, so that a test compares the projection against a second implementation.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aio_pika

from servicekit.amqp import declare_producer_exchange
from shared_contracts.envelope import event_id_for
from shared_contracts.events import PROFILE_FIELDS
from shared_contracts.names import PRODUCER_EXCHANGES

START = datetime(2026, 3, 1, tzinfo=UTC)
SPAN_SECONDS = 10 * 86400  # a history spreads over about ten days


@dataclass
class History:
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    last_position: dict[str, int] = field(default_factory=dict)

    def bodies(self) -> list[tuple[str, str, bytes]]:
        """(exchange, routing key, body) in publication order."""
        return [
            (PRODUCER_EXCHANGES[e["producer"]], e["event_type"], json.dumps(e).encode())
            for e in self.envelopes
        ]

    def prefix(self, count: int) -> History:
        """The first `count` envelopes, as a history of their own."""
        envelopes = self.envelopes[:count]
        last: dict[str, int] = {}
        for env in envelopes:
            last[env["producer"]] = env["position"]
        return History(envelopes, last)

    def expected(self) -> dict[str, list[tuple[Any, ...]]]:
        return expected_reports(self.envelopes)


def generate(events: int, *, seed: int = 7, users: int | None = None) -> History:
    """About `events` envelopes: registrations, logins, lockouts, password and profile changes.

    Positions grow per producer with gaps (private events take positions too); the two
    producers' events are interleaved as they would be on the wire.
    """
    rng = random.Random(seed)
    users = users or max(events // 8, 1)
    history = History()
    positions = {"auth_svc": 0, "user_svc": 0}
    versions: dict[uuid.UUID, int] = defaultdict(int)
    profile_versions: dict[uuid.UUID, int] = defaultdict(int)
    profiles: dict[uuid.UUID, dict[str, str | None]] = {}
    registered: list[uuid.UUID] = []
    failures: Counter[uuid.UUID] = Counter()
    clock = START

    def emit(producer: str, event_type: str, user: uuid.UUID, data: dict[str, Any]) -> None:
        nonlocal clock
        clock += timedelta(seconds=rng.randint(1, max(2 * SPAN_SECONDS // events, 2)))
        positions[producer] += rng.choice((1, 1, 1, 2))
        table = versions if producer == "auth_svc" else profile_versions
        table[user] += 1
        history.envelopes.append(
            {
                "event_id": str(event_id_for(producer, user, table[user])),
                "event_type": event_type,
                "schema_version": 1,
                "occurred_at": clock.isoformat().replace("+00:00", "Z"),
                "producer": producer,
                "aggregate_id": str(user),
                "aggregate_version": table[user],
                "position": positions[producer],
                "correlation_id": str(uuid.uuid4()),
                "causation_id": None,
                "data": {"user_id": str(user), **data},
            }
        )
        history.last_position[producer] = positions[producer]

    while len(history.envelopes) < events:
        roll = rng.random()
        if not registered or (roll < 0.12 and len(registered) < users):
            user = uuid.UUID(int=rng.getrandbits(128))
            registered.append(user)
            emit("auth_svc", "auth.account.registered", user, {"email": f"{user.hex[:12]}@x.io"})
            state = {
                f: (f"{f}-{rng.randint(0, 9)}" if rng.random() < 0.4 else None)
                for f in PROFILE_FIELDS
            }
            profiles[user] = state
            emit("user_svc", "user.profile.created", user, {"email": None, **state})
            continue
        user = rng.choice(registered)
        if roll < 0.55:
            failures[user] = 0
            emit("auth_svc", "auth.account.login_succeeded", user, {})
        elif roll < 0.75:
            failures[user] += 1
            emit(
                "auth_svc",
                "auth.account.login_failed",
                user,
                {"consecutive_failures": failures[user]},
            )
            if failures[user] >= 3:
                emit(
                    "auth_svc",
                    "auth.account.locked",
                    user,
                    {
                        "locked_until": (clock + timedelta(minutes=15)).isoformat(),
                        "failed_attempts": failures[user],
                    },
                )
                failures[user] = 0
        elif roll < 0.8:
            emit("auth_svc", "auth.account.password_changed", user, {})
        else:
            name = rng.choice(PROFILE_FIELDS)
            value = None if rng.random() < 0.3 else f"{name}-{rng.randint(0, 99)}"
            profiles[user][name] = value
            emit(
                "user_svc",
                "user.profile.updated",
                user,
                {"email": None, **profiles[user], "changed": [name]},
            )
    return history


def expected_reports(envelopes: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
    signups: Counter[date] = Counter()
    logins: dict[date, list[int]] = defaultdict(lambda: [0, 0])
    locks: dict[date, Counter[str]] = defaultdict(Counter)
    active: dict[date, set[str]] = defaultdict(set)
    created: dict[str, date] = {}
    state: dict[str, dict[str, Any]] = {}
    for env in envelopes:
        day = datetime.fromisoformat(env["occurred_at"]).date()
        user = env["data"]["user_id"]
        kind = env["event_type"]
        if kind == "auth.account.registered":
            signups[day] += 1
            active[day].add(user)
        elif kind == "auth.account.login_succeeded":
            logins[day][0] += 1
            active[day].add(user)
        elif kind == "auth.account.login_failed":
            logins[day][1] += 1
        elif kind == "auth.account.locked":
            locks[day][user] += 1
        elif kind == "auth.account.password_changed":
            active[day].add(user)
        elif kind.startswith("user.profile."):
            created.setdefault(user, day)
            state[user] = env["data"]
            if kind == "user.profile.updated":
                active[day].add(user)
    total = len(state)
    completeness = []
    for f in PROFILE_FIELDS:
        with_field = sum(1 for s in state.values() if s.get(f))
        # PostgreSQL's round() takes a tie away from zero (314/320 = 0.98125 -> 0.9813);
        # Decimal's default, half to even, made 0.9812 and failed a chaos case in CI.
        share = (
            (Decimal(with_field) / Decimal(total)).quantize(Decimal("0.0001"), ROUND_HALF_UP)
            if total
            else 0
        )
        completeness.append((f, with_field, total, share))
    return {
        "signups": sorted(signups.items()),
        "logins": sorted((d, ok, bad) for d, (ok, bad) in logins.items()),
        "locked": sorted((d, sum(c.values()), len(c)) for d, c in locks.items()),
        "active-users": sorted((d, len(u)) for d, u in active.items()),
        "profile-completeness": completeness,
    }


async def publish(amqp_url: str, bodies: list[tuple[str, str, bytes]]) -> None:
    """Publish like a relay: persistent, confirmed, to each producer's exchange."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchanges = {
            name: await declare_producer_exchange(channel, name)
            for name in sorted({exchange for exchange, _, _ in bodies})
        }
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    exchanges[exchange].publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=key,
                    )
                    for exchange, key, body in bodies[start : start + 500]
                )
            )
