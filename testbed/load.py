"""Clients under load, and the ledger of what they were told: accepted and
rejected writes, retries, latencies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from testbed.stack import Stack

RETRYABLE = {429, 500, 502, 503, 504}


# -- the load generator and its ledger ----------------------------------------------------


@dataclass
class Ledger:
    """What the clients were told: accepted (2xx) and rejected writes, retries, latencies."""

    tag: str
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    retries: int = 0
    unresolved: int = 0  # gave up before a definitive answer (the check then fails)
    users: dict[str, str] = field(default_factory=dict)  # email -> user_id (registered)
    recovered_registrations: int = 0  # 409 after a failed try: an earlier try committed
    logins: Counter[str] = field(default_factory=Counter)  # user_id -> accepted logins
    ambiguous_logins: Counter[str] = field(default_factory=Counter)  # failed, may have landed
    bios: dict[str, str] = field(default_factory=dict)  # user_id -> last accepted bio
    rejected_bios: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)  # route -> failed attempts
    requests: Counter[str] = field(default_factory=Counter)  # route -> attempts


PASSWORD = "chaos password 1"


class LoadGenerator:
    """Clients that register, log in and edit their profile through the REST APIs, retrying
    whatever failed without a definitive answer (transport errors, 5xx) as a client would."""

    def __init__(self, stack: Stack, ledger: Ledger, *, give_up_after: float = 90.0) -> None:
        self.auth = stack.auth
        self.users = stack.users
        self.ledger = ledger
        self.give_up_after = give_up_after
        self.client = httpx.AsyncClient(timeout=10)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _request(
        self, method: str, base: str, path: str, **kwargs: Any
    ) -> tuple[httpx.Response | None, int]:
        """The first definitive response, and how many attempts failed before it."""
        route, url = f"{method} {path}", f"{base}{path}"
        failures = 0
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            started = time.perf_counter()
            self.ledger.requests[route] += 1
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.TransportError:
                response = None
            self.ledger.latencies[route].append(time.perf_counter() - started)
            if response is not None and response.status_code not in RETRYABLE:
                return response, failures
            failures += 1
            self.ledger.retries += 1
            self.ledger.errors[route] += 1
            await asyncio.sleep(0.2)
        return None, failures

    async def _post_auth(
        self, path: str, body: dict[str, str]
    ) -> tuple[httpx.Response | None, int]:
        return await self._request("POST", self.auth, path, json=body)

    async def _patch_bio(
        self, token: str, bio: str, *, if_match: str | None = None
    ) -> tuple[httpx.Response | None, int]:
        headers = {"authorization": f"Bearer {token}"}
        if if_match is not None:
            headers["if-match"] = if_match
        return await self._request(
            "PATCH", self.users, "/users/me", headers=headers, json={"bio": bio}
        )

    async def register(self, email: str) -> str | None:
        """Register; the user id once the account certainly exists (None if never)."""
        ledger = self.ledger
        ledger.sent += 1
        response, failures = await self._post_auth(
            "/auth/register", {"email": email, "password": PASSWORD, "display_name": ledger.tag}
        )
        if response is None:
            ledger.unresolved += 1
            return None
        if response.status_code == 201:
            ledger.accepted += 1
            ledger.users[email] = response.json()["user_id"]
            return ledger.users[email]
        if response.status_code == 409 and failures:
            # An earlier attempt committed but its answer was lost: accepted, exactly once.
            ledger.accepted += 1
            ledger.recovered_registrations += 1
            ledger.users[email] = ""  # the id comes with the first login
            return ""
        ledger.unexpected.append(f"register {email}: {response.status_code} {response.text}")
        return None

    async def login(self, email: str) -> str | None:
        """Log in; the access token (None if never)."""
        ledger = self.ledger
        ledger.sent += 1
        response, failures = await self._post_auth(
            "/auth/login", {"email": email, "password": PASSWORD}
        )
        if response is None or response.status_code != 200:
            ledger.unresolved += response is None
            if response is not None:
                ledger.unexpected.append(f"login {email}: {response.status_code}")
            return None
        token = str(response.json()["access_token"])
        user_id = str(jwt.decode(token, options={"verify_signature": False})["sub"])
        ledger.users[email] = ledger.users.get(email) or user_id
        ledger.accepted += 1
        ledger.logins[user_id] += 1
        ledger.ambiguous_logins[user_id] += failures
        return token

    async def edit_bio(self, token: str, user_id: str, bio: str) -> None:
        ledger = self.ledger
        ledger.sent += 1
        response, _ = await self._patch_bio(token, bio)
        if response is None:
            ledger.unresolved += 1
        elif response.status_code == 200:
            ledger.accepted += 1
            ledger.bios[user_id] = bio
        else:
            ledger.unexpected.append(f"patch {user_id}: {response.status_code} {response.text}")

    async def read_profile(self, token: str) -> None:
        response, _ = await self._request(
            "GET", self.users, "/users/me", headers={"authorization": f"Bearer {token}"}
        )
        if response is None or response.status_code != 200:
            self.ledger.unexpected.append(f"read: {response and response.status_code}")

    async def rejected_writes(self, email: str, token: str, user_id: str) -> None:
        """Writes the services must refuse, leaving no trace: a taken e-mail, a stale If-Match."""
        ledger = self.ledger
        ledger.sent += 2
        response, _ = await self._post_auth(
            "/auth/register", {"email": email, "password": PASSWORD, "display_name": "impostor"}
        )
        if response is not None and response.status_code == 409:
            ledger.rejected += 1
        else:
            ledger.unexpected.append(f"taken e-mail accepted? {response and response.status_code}")
        bio = f"rejected-{uuid.uuid4().hex[:8]}"
        ledger.rejected_bios.add(bio)
        response, _ = await self._patch_bio(token, bio, if_match='"999999"')
        if response is not None and response.status_code == 412:
            ledger.rejected += 1
        else:
            ledger.unexpected.append(
                f"stale If-Match accepted? {response and response.status_code}"
            )

    async def one_user(self, index: int) -> str | None:
        """A new user's session: register, log in, edit; every 5th also tries rejected writes.

        Returns the e-mail once registered."""
        email = f"{self.ledger.tag}-{index}-{uuid.uuid4().hex[:6]}@example.com"
        if await self.register(email) is None:
            return None
        token = await self.login(email)
        if token is None:
            return email
        user_id = self.ledger.users[email]
        await self.edit_bio(token, user_id, f"bio-{index}-{uuid.uuid4().hex[:6]}")
        if index % 5 == 0:
            await self.rejected_writes(email, token, user_id)
        return email

    async def run(
        self,
        seconds: float,
        *,
        concurrency: int = 4,
        pause: float = 0.05,
        until: asyncio.Event | None = None,
    ) -> None:
        """New users, `concurrency` at a time, for `seconds` (or until `until` is set; each
        user's session is finished first)."""
        deadline = time.monotonic() + seconds
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.monotonic() < deadline and not (until and until.is_set()):
                await self.one_user(next(counter))
                await asyncio.sleep(pause)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
