"""Attacks on the links of issue 16 (verification and reset tokens), against auth_svc on a real
PostgreSQL database: a token of one purpose used for the other (as is, or with its purpose byte
rewritten), a reset token pointed at another account, a spent token replayed, and `forgot`
timing for known and unknown addresses. Each refusal is the one 400 ("invalid or expired")
and changes nothing: the victim's password, sessions and own links keep working.

Tokens are read as notify_svc reads them: from the published contract's sealed field.
"""

from __future__ import annotations

import base64
import statistics
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from auth_svc.application import AuthService
from auth_svc.contracts import to_contract
from auth_svc.main import create_app
from servicekit.sealing import Opener, new_key_pair
from shared_contracts.events import (
    AccountRegistered,
    ContractEvent,
    PasswordReset,
    PasswordResetRequested,
)
from testbed.auth import auth_database
from tests.support.api import PASSWORD, assert_problem, login, register

PRIVATE_KEY, PUBLIC_KEY = new_key_pair()
OPENER = Opener([PRIVATE_KEY])
NEW_PASSWORD = "a different good one"
ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture
def client(make_database: Callable[[str], str]) -> Iterator[TestClient]:
    settings = auth_database(
        make_database("auth"),
        link_sealing_public_key=PUBLIC_KEY,
        forgot_limit_per_address=10_000,
        forgot_limit_per_ip=10_000,
        token_attempts_per_ip=10_000,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def published(client: TestClient) -> list[ContractEvent]:
    auth: AuthService = client.app.state.auth_service  # type: ignore[attr-defined]
    contracts = [
        to_contract(auth.mapper.to_domain_event(n))
        for n in auth.recorder.select_notifications(start=1, limit=10_000)
    ]
    return [c for c in contracts if c is not None]


def token_of(sealed: str | None) -> str:
    assert sealed is not None
    return OPENER.open(sealed).partition("#token=")[2]


def verification_token(client: TestClient, user_id: str) -> str:
    for event in published(client):
        if isinstance(event, AccountRegistered) and str(event.user_id) == user_id:
            return token_of(event.verification_link_sealed)
    raise AssertionError("no verification link was published")


def reset_token(client: TestClient, email: str, user_id: str) -> str:
    """Ask for a reset link and read the new one (issued in the background)."""

    def links() -> list[str | None]:
        return [
            e.link_sealed
            for e in published(client)
            if isinstance(e, PasswordResetRequested) and str(e.user_id) == user_id
        ]

    before = len(links())
    assert client.post("/auth/password/forgot", json={"email": email}).status_code == 202
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if len(found := links()) > before:
            return token_of(found[-1])
        time.sleep(0.05)
    raise AssertionError("no reset link was published")


def rewritten(token: str, *, purpose: int | None = None, account: str | None = None) -> str:
    """`token` with its purpose byte or its account id replaced (its random part kept)."""
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    if purpose is not None:
        raw[1] = purpose
    if account is not None:
        raw[2:18] = uuid.UUID(account).bytes
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def refused(response: object) -> None:
    body = assert_problem(response, 400)  # type: ignore[arg-type]
    assert body["type"].endswith("invalid-link-token")


def resets(client: TestClient) -> int:
    return sum(isinstance(e, PasswordReset) for e in published(client))


def test_a_verification_token_does_not_reset_the_password(client: TestClient) -> None:
    user_id = register(client)["user_id"]
    session = login(client)
    token = verification_token(client, user_id)
    for attempt in (token, rewritten(token, purpose=2)):
        refused(
            client.post(
                "/auth/password/reset", json={"token": attempt, "new_password": NEW_PASSWORD}
            )
        )
    assert resets(client) == 0
    assert login(client)  # the old password still logs in
    assert client.post("/auth/refresh", json={"refresh_token": session["refresh_token"]}).is_success
    # Nothing was spent: the link still verifies the address.
    assert client.post("/auth/email/verify", json={"token": token}).status_code == 204


def test_a_reset_token_does_not_verify_the_address(client: TestClient) -> None:
    user_id = register(client)["user_id"]
    token = reset_token(client, "ada@example.com", user_id)
    for attempt in (token, rewritten(token, purpose=1)):
        refused(client.post("/auth/email/verify", json={"token": attempt}))
    assert login(client)["access_token"]
    verified = [e for e in published(client) if type(e).__name__ == "EmailVerified"]
    assert verified == []
    # Nothing was spent: the link still resets the password.
    ok = client.post("/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert ok.status_code == 204


def test_a_reset_token_cannot_reset_another_account(client: TestClient) -> None:
    alice = register(client, ALICE)["user_id"]
    bob = register(client, BOB)["user_id"]
    bob_session = login(client, BOB)
    bobs_own = reset_token(client, BOB, bob)
    alices = reset_token(client, ALICE, alice)

    # Alice's token pointed at Bob's account: same random part, Bob's id.
    for attempt in (rewritten(alices, account=bob), rewritten(bobs_own, account=alice)):
        refused(
            client.post(
                "/auth/password/reset", json={"token": attempt, "new_password": NEW_PASSWORD}
            )
        )
    assert resets(client) == 0
    assert login(client, BOB, PASSWORD)
    assert client.post(
        "/auth/refresh", json={"refresh_token": bob_session["refresh_token"]}
    ).is_success

    # Alice's own token resets Alice only, once.
    done = client.post("/auth/password/reset", json={"token": alices, "new_password": NEW_PASSWORD})
    assert done.status_code == 204
    assert login(client, ALICE, NEW_PASSWORD)
    assert login(client, BOB, PASSWORD)
    replayed = client.post("/auth/password/reset", json={"token": alices, "new_password": "x" * 24})
    refused(replayed)
    assert login(client, ALICE, NEW_PASSWORD)
    # Bob's own link was never touched by any of it.
    ok = client.post("/auth/password/reset", json={"token": bobs_own, "new_password": NEW_PASSWORD})
    assert ok.status_code == 204
    assert [str(e.user_id) for e in published(client) if isinstance(e, PasswordReset)] == [
        alice,
        bob,
    ]


def test_a_spent_reset_token_stays_spent_after_newer_links(client: TestClient) -> None:
    user_id = register(client)["user_id"]
    first = reset_token(client, "ada@example.com", user_id)
    assert (
        client.post(
            "/auth/password/reset", json={"token": first, "new_password": NEW_PASSWORD}
        ).status_code
        == 204
    )
    second = reset_token(client, "ada@example.com", user_id)
    refused(client.post("/auth/password/reset", json={"token": first, "new_password": "y" * 24}))
    assert login(client, "ada@example.com", NEW_PASSWORD)
    assert (
        client.post(
            "/auth/password/reset", json={"token": second, "new_password": "z" * 24}
        ).status_code
        == 204
    )


def test_forgot_takes_as_long_for_a_known_address_as_for_an_unknown_one(client: TestClient) -> None:
    """Interleaved samples (known, unknown, unknown, known, ...), compared by their medians with a
    generous bound: a coarse guard against a lookup or a mail on the answer's path. The fine
    measure, under load, is `bench/forgot.py`."""
    for i in range(8):
        register(client, f"known{i}@example.com")
    for _ in range(5):  # warm up both paths
        client.post("/auth/password/forgot", json={"email": "known0@example.com"})
        client.post("/auth/password/forgot", json={"email": "nobody0@example.com"})
    samples: dict[str, list[float]] = {"known": [], "unknown": []}
    rounds = 40
    for i in range(rounds):
        order = ("known", "unknown") if i % 2 == 0 else ("unknown", "known")
        for kind in order:
            address = f"{kind}{i % 8}@example.com" if kind == "known" else f"nobody{i}@example.com"
            started = time.perf_counter()
            r = client.post("/auth/password/forgot", json={"email": address})
            samples[kind].append(time.perf_counter() - started)
            assert r.status_code == 202
    known, unknown = (statistics.median(samples[k]) for k in ("known", "unknown"))
    print(f"\nforgot medians: known {known * 1000:.2f} ms, unknown {unknown * 1000:.2f} ms")
    # Generous (a shared, loaded host), yet tight enough to catch the link issued on the answer's
    # path: done synchronously, it gave medians of 28 ms (known) against 12 ms (unknown).
    assert known < 1.5 * unknown + 0.003, samples
    assert unknown < 1.5 * known + 0.003, samples
