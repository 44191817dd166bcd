"""One user never reads or changes another's private data; errors never show internals."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx

from tests.security.conftest import Services, new_account

PUBLIC_FIELDS = {"user_id", "display_name", "bio", "locale", "timezone", "avatar_url"}
# What an answer must never contain: a traceback, SQL, a driver or an internal address.
LEAK = re.compile(
    r"Traceback|File \"|line \d+, in|\.py\b|psycopg|sqlalchemy|eventsourcing|pydantic_core"
    r"|\bSELECT\b|\bINSERT\b|\bUPDATE\s+\w+\s+SET\b|\bFROM\s+\w+_events\b|pg_advisory"
    r"|postgres(?:ql)?://|amqp://|127\.0\.0\.1|localhost|/work/|site-packages",
    re.IGNORECASE,
)


def test_a_user_sees_only_the_public_fields_of_another(services: Services) -> None:
    alice = new_account(services.auth_url, display_name="Alice")
    bob = new_account(services.auth_url, display_name="Bob")
    with httpx.Client(base_url=services.users_url, timeout=10) as http:
        bob_private = http.patch(
            "/users/me", headers=bob.bearer, json={"bio": "bob's bio", "timezone": "Europe/Paris"}
        )
        assert bob_private.status_code == 200, bob_private.text

        seen = http.get(f"/users/{bob.user_id}", headers=alice.bearer)

    assert seen.status_code == 200, seen.text
    assert set(seen.json()) == PUBLIC_FIELDS
    assert seen.json()["bio"] == "bob's bio"
    assert bob.email not in seen.text
    assert "etag" not in seen.headers
    assert "version" not in seen.json()


def test_a_user_cannot_change_another_users_profile(services: Services) -> None:
    alice = new_account(services.auth_url)
    bob = new_account(services.auth_url)
    with httpx.Client(base_url=services.users_url, timeout=10) as http:
        before = http.get("/users/me", headers=bob.bearer)
        assert before.status_code == 200
        hijack = {"display_name": "pwned by alice"}
        attempts = {
            "PATCH /users/{bob}": http.patch(
                f"/users/{bob.user_id}", headers=alice.bearer, json=hijack
            ),
            "PUT /users/{bob}": http.put(
                f"/users/{bob.user_id}", headers=alice.bearer, json=hijack
            ),
            "DELETE /users/{bob}": http.delete(f"/users/{bob.user_id}", headers=alice.bearer),
            "PATCH /users/me naming bob": http.patch(
                "/users/me", headers=alice.bearer, json={**hijack, "user_id": bob.user_id}
            ),
            "PATCH /users/me changing the e-mail": http.patch(
                "/users/me", headers=alice.bearer, json={"email": bob.email}
            ),
            "PATCH /users/me?user_id=bob": http.patch(
                f"/users/me?user_id={bob.user_id}", headers=alice.bearer, json={}
            ),
            "PATCH /users/me with X-User-Id: bob": http.patch(
                "/users/me",
                headers={
                    **alice.bearer,
                    "X-User-Id": bob.user_id,
                    "X-Consumer-Custom-Id": bob.user_id,
                },
                json={"bio": "alice's own"},
            ),
        }
        after = http.get("/users/me", headers=bob.bearer)
        alice_now = http.get("/users/me", headers=alice.bearer).json()

    statuses = {name: r.status_code for name, r in attempts.items()}
    assert statuses == {
        "PATCH /users/{bob}": 405,
        "PUT /users/{bob}": 405,
        "DELETE /users/{bob}": 405,
        "PATCH /users/me naming bob": 422,
        "PATCH /users/me changing the e-mail": 422,
        # Query and headers are ignored: the token alone says whose profile this is.
        "PATCH /users/me?user_id=bob": 200,
        "PATCH /users/me with X-User-Id: bob": 200,
    }
    assert attempts["PATCH /users/me?user_id=bob"].json()["user_id"] == alice.user_id
    assert after.json() == before.json(), "bob's profile changed"
    assert alice_now["user_id"] == alice.user_id
    assert alice_now["email"] == alice.email
    assert alice_now["bio"] == "alice's own"


def _bad_requests(account_bearer: dict[str, str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(service, method, path, request kwargs): malformed, hostile or nonsensical input."""
    j = {"content-type": "application/json"}
    deep = "[" * 5000 + "]" * 5000
    return [
        ("auth", "POST", "/auth/register", {"content": b'{"email": ', "headers": j}),
        ("auth", "POST", "/auth/register", {"content": b"\xff\xfe\x00", "headers": j}),
        ("auth", "POST", "/auth/register", {"content": deep, "headers": j}),
        ("auth", "POST", "/auth/register", {"content": "1e999999", "headers": j}),
        (
            "auth",
            "POST",
            "/auth/register",
            {"json": {"email": "x@example.com' OR 1=1--", "password": "12345678"}},
        ),
        (
            "auth",
            "POST",
            "/auth/register",
            {
                "content": '{"email":"u@example.com","password":"12345678",'
                '"display_name":"\\ud800"}',
                "headers": j,
            },
        ),
        (
            "auth",
            "POST",
            "/auth/register",
            {"json": {"email": "n@example.com", "password": "12345678", "display_name": "a\x00b"}},
        ),
        ("auth", "POST", "/auth/login", {"content": b"email=a&password=b", "headers": j}),
        (
            "auth",
            "POST",
            "/auth/login",
            {"json": {"email": "a@example.com", "password": "x" * 10_000}},
        ),
        (
            "auth",
            "POST",
            "/auth/login",
            {"content": '{"email":"a@b.co","password":"\\udfff"}', "headers": j},
        ),
        ("auth", "POST", "/auth/token", {"data": {"username": "\x00", "password": "x"}}),
        (
            "auth",
            "POST",
            "/auth/token",
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        ),
        ("auth", "POST", "/auth/refresh", {"json": {"refresh_token": "A" * 512}}),
        ("auth", "POST", "/auth/refresh", {"json": {"refresh_token": "AQ" + "A" * 86}}),
        ("auth", "POST", "/auth/refresh", {"json": {"refresh_token": "%00../../etc/passwd"}}),
        (
            "auth",
            "POST",
            "/auth/password",
            {"json": {"current_password": 1, "new_password": []}, "headers": account_bearer},
        ),
        ("auth", "GET", "/auth/../../etc/passwd", {}),
        ("auth", "GET", "/auth/%00", {}),
        ("auth", "TRACE", "/auth/login", {}),
        (
            "users",
            "PATCH",
            "/users/me",
            {"content": '{"bio":"\\ud800"}', "headers": {**j, **account_bearer}},
        ),
        ("users", "PATCH", "/users/me", {"json": {"bio": "a\x00b"}, "headers": account_bearer}),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"display_name": "x" * 101}, "headers": account_bearer},
        ),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"locale": "x-" * 3000}, "headers": account_bearer},
        ),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"timezone": "../../../etc/localtime"}, "headers": account_bearer},
        ),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"avatar_url": "javascript:alert(1)"}, "headers": account_bearer},
        ),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"avatar_url": "http://[::1"}, "headers": account_bearer},
        ),
        ("users", "PATCH", "/users/me", {"content": deep, "headers": {**j, **account_bearer}}),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"bio": "x"}, "headers": {**account_bearer, "if-match": '"' + "9" * 40 + '"'}},
        ),
        (
            "users",
            "PATCH",
            "/users/me",
            {"json": {"bio": "x"}, "headers": {**account_bearer, "if-match": 'W/"1", "x", *, "'}},
        ),
        ("users", "GET", "/users/%00", {"headers": account_bearer}),
        ("users", "GET", "/users/" + "1" * 5000, {"headers": account_bearer}),
        ("users", "GET", f"/users/{uuid.uuid4()}", {"headers": account_bearer}),
        (
            "users",
            "GET",
            "/users/00000000-0000-0000-0000-000000000000'--",
            {"headers": account_bearer},
        ),
        ("users", "GET", "/users/me", {"headers": {"Authorization": "Bearer " + "a" * 30_000}}),
        ("users", "GET", "/users/me", {"headers": {"Authorization": "Bearer W10.W10.W10"}}),
        (
            "users",
            "GET",
            "/users/me",
            {"headers": {"Authorization": "Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6W119.e30.e30"}},
        ),
    ]


def test_bad_input_gets_a_problem_that_reveals_no_internals(services: Services) -> None:
    account = new_account(services.auth_url)
    bases = {"auth": services.auth_url, "users": services.users_url}
    failures = []
    # A fresh connection each time: one request's failure cannot hide behind another's.
    for service, method, path, kwargs in _bad_requests(account.bearer):
        with httpx.Client(base_url=bases[service], timeout=10) as http:
            response = http.request(method, path, **kwargs)
        where = f"{method} {service}{path[:60]}"
        if response.status_code >= 500:
            failures.append(f"{where}: {response.status_code} {response.text[:200]}")
        elif response.status_code < 400:
            failures.append(f"{where}: accepted ({response.status_code})")
        elif not response.headers.get("content-type", "").startswith("application/problem+json"):
            failures.append(f"{where}: not problem+json: {response.headers.get('content-type')}")
        elif leak := LEAK.search(response.text + str(response.headers)):
            failures.append(f"{where}: leaks {leak.group(0)!r}: {response.text[:300]}")
    assert failures == []


def test_the_leak_pattern_recognises_what_it_must() -> None:
    for leaked in [
        'Traceback (most recent call last):\n  File "/srv/app.py", line 3, in f',
        "psycopg.errors.UniqueViolation: duplicate key",
        "SELECT kid, private_key_pem FROM signing_keys",
        "could not connect to postgresql://postgres@db:5432/auth",
        "connection to 127.0.0.1:5672 refused",
    ]:
        assert LEAK.search(leaked), leaked
    assert not LEAK.search('{"title":"Unprocessable content","detail":"bio: must be text"}')
