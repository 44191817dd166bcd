"""Password guessing: a lock per account, and no timing difference that reveals accounts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx

from tests.security.conftest import LOCKOUT_THRESHOLD, Services, new_account, running_services
from tests.support.attacks import login_attempts

TIMING_SAMPLES = 25


def test_lockout_is_per_account(services: Services) -> None:
    alice = new_account(services.auth_url)
    bob = new_account(services.auth_url)
    guesses = login_attempts(services.auth_url, alice.email, "wrong guess", LOCKOUT_THRESHOLD + 2)
    assert [r.status_code for r in guesses] == [401] * LOCKOUT_THRESHOLD + [423, 423]
    assert 0 < int(guesses[-1].headers["retry-after"]) <= 900

    with httpx.Client(base_url=services.auth_url, timeout=10) as http:
        # Alice is locked even with her real password...
        right = http.post("/auth/login", json={"email": alice.email, "password": alice.password})
        assert right.status_code == 423
        assert right.headers["content-type"].startswith("application/problem+json")
        # ...Bob is not, and his own failures count from zero.
        bob_fails = login_attempts(
            services.auth_url, bob.email, "wrong guess", LOCKOUT_THRESHOLD - 1, client=http
        )
        assert [r.status_code for r in bob_fails] == [401] * (LOCKOUT_THRESHOLD - 1)
        ok = http.post("/auth/login", json={"email": bob.email, "password": bob.password})
        assert ok.status_code == 200, ok.text
        # Bob's success reset his count: as many failures again do not lock him.
        again = login_attempts(
            services.auth_url, bob.email, "wrong guess", LOCKOUT_THRESHOLD - 1, client=http
        )
        assert {r.status_code for r in again} == {401}
        # Alice's valid access token still works: the lock stops logins, not sessions.
        me = http.get(f"{services.users_url}/users/me", headers=alice.bearer)
        assert me.status_code == 200


def test_an_unknown_email_is_never_locked_and_answers_like_a_wrong_password(
    services: Services,
) -> None:
    """A 423 for an address would tell the attacker it exists."""
    known = new_account(services.auth_url)
    unknown = login_attempts(
        services.auth_url, "nobody-here@example.com", "wrong guess", LOCKOUT_THRESHOLD + 2
    )
    assert {r.status_code for r in unknown} == {401}
    wrong = login_attempts(services.auth_url, known.email, "wrong guess", 1)[0]

    def shape(response: httpx.Response) -> tuple[object, ...]:
        body = response.json()
        body.pop("request_id")
        headers = {
            k for k in response.headers if k not in ("date", "x-request-id", "content-length")
        }
        return response.status_code, tuple(sorted(body.items())), tuple(sorted(headers))

    assert shape(unknown[0]) == shape(wrong)


def test_login_takes_as_long_for_an_unknown_email_as_for_a_wrong_password(
    make_database: Callable[[str], str],
) -> None:
    """The dummy hash is verified for unknown e-mails. Production argon2 parameters, so that
    the hash dominates; samples interleaved and compared by median, so that a busy machine
    slows both sides alike."""
    with running_services(
        make_database,
        argon2_time_cost=2,
        argon2_memory_kib=19456,
        lockout_threshold=10 * TIMING_SAMPLES,
    ) as services:
        known = new_account(services.auth_url)
        unknown_email = "nobody-at-all@example.com"
        times: dict[str, list[float]] = {"unknown": [], "wrong": [], "no hash": []}
        with httpx.Client(base_url=services.auth_url, timeout=10) as http:
            http.post("/auth/login", json={"email": unknown_email, "password": "warm up"})
            for _ in range(TIMING_SAMPLES):
                for kind, email, password in (
                    ("unknown", unknown_email, "wrong guess"),
                    ("wrong", known.email, "wrong guess"),
                ):
                    started = time.perf_counter()
                    response = http.post("/auth/login", json={"email": email, "password": password})
                    times[kind].append(time.perf_counter() - started)
                    assert response.status_code == 401
            # A baseline of what no hash at all costs: an invalid body, rejected before it.
            for _ in range(TIMING_SAMPLES):
                started = time.perf_counter()
                response = http.post("/auth/login", json={"email": "not-an-email", "password": "x"})
                times["no hash"].append(time.perf_counter() - started)
                assert response.status_code == 422

    unknown = statistics.median(times["unknown"])
    wrong = statistics.median(times["wrong"])
    no_hash = statistics.median(times["no hash"])
    hash_cost = wrong - no_hash
    print(
        f"login medians: unknown e-mail {unknown * 1000:.1f} ms, wrong password "
        f"{wrong * 1000:.1f} ms, no hash {no_hash * 1000:.1f} ms"
    )
    # The hash must be what the time is made of, or the comparison below proves nothing.
    assert hash_cost > 0.005, f"argon2 too cheap to compare: {hash_cost * 1000:.1f} ms"
    # Without the dummy hash, an unknown e-mail would answer about `hash_cost` sooner.
    assert abs(unknown - wrong) < 0.35 * hash_cost, (
        f"unknown e-mail {unknown * 1000:.1f} ms vs wrong password {wrong * 1000:.1f} ms "
        f"(a hash costs {hash_cost * 1000:.1f} ms)"
    )
