"""The local gateway (HAProxy rendered from compose/kong.yml), hit the way a client hits Kong.

The whole stack runs as `esctl up`. Each test talks to the gateway from its own loopback
address, so per-IP rate limits of one test never leak into another.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.kong import load_kong
from servicekit.eventstore import connection_kwargs
from testbed.cli import esctl
from testbed.up import EsctlUp, esctl_up
from tests.support.amqp import subscribed
from tests.support.api import bearer

KONG_YML = Path(__file__).parents[2] / "compose" / "kong.yml"


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path_factory: Any
) -> Iterator[EsctlUp]:
    work = tmp_path_factory.mktemp("gateway")
    with esctl_up(make_database, make_vhost, work, LOG_LEVEL="DEBUG") as running:
        yield running


def sign_up(stack: EsctlUp) -> tuple[str, str]:
    """Register and log in directly at auth_svc: (user id, access token)."""
    email = f"gw-{uuid.uuid4().hex[:10]}@example.com"
    body = {"email": email, "password": "gateway password", "display_name": "Gia"}
    registered = httpx.post(f"{stack.auth}/auth/register", json=body, timeout=10)
    assert registered.status_code == 201, registered.text
    login = httpx.post(
        f"{stack.auth}/auth/login", json={"email": email, "password": body["password"]}, timeout=10
    )
    assert login.status_code == 200, login.text
    return registered.json()["user_id"], login.json()["access_token"]


def signing_keys(stack: EsctlUp) -> list[tuple[str, str]]:
    """(kid, private key PEM), newest first, read from auth_svc's own database."""
    with psycopg.connect(**connection_kwargs(stack.env["AUTH_DATABASE_URL"])) as conn:
        rows = conn.execute(
            "SELECT kid, private_key_pem FROM signing_keys ORDER BY activates_at DESC"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def token(kid: str, private_key: Any, user_id: str, *, expires_in: int) -> str:
    now = int(time.time())
    claims = {
        "iss": "auth_svc",
        "aud": "eskit",
        "sub": user_id,
        "iat": now - 1,
        "exp": now + expires_in,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": kid})


def test_only_the_public_api_is_routed(stack: EsctlUp) -> None:
    with stack.client("127.0.0.11") as client:
        jwks = client.get("/auth/.well-known/jwks.json")
        assert jwks.status_code == 200
        assert jwks.json()["keys"]
        for path in ("/metrics", "/health/ready", "/", "/reporting"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.json()["message"] == "no Route matched with those values"
    assert httpx.get(f"{stack.status}/health/ready").status_code == 200
    assert "haproxy_" in httpx.get(f"{stack.status}/metrics").text


def test_guarded_routes_reject_missing_bad_and_expired_tokens_like_kong(stack: EsctlUp) -> None:
    user_id, valid = sign_up(stack)
    kid, pem = signing_keys(stack)[0]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    current = load_pem_private_key(pem.encode(), password=None)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with stack.client("127.0.0.12") as client:
        missing = client.get("/users/me")
        assert missing.status_code == 401
        assert missing.json()["message"] == "Unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")

        unknown_key = client.get(
            "/users/me", headers=bearer(token("not-a-key", stranger, user_id, expires_in=60))
        )
        assert unknown_key.status_code == 401
        assert unknown_key.json()["message"] == "No credentials found for given 'kid'"

        forged = client.get(
            "/users/me", headers=bearer(token(kid, stranger, user_id, expires_in=60))
        )
        assert forged.status_code == 401
        assert forged.json()["message"] == "Invalid signature"

        expired = client.get(
            "/users/me", headers=bearer(token(kid, current, user_id, expires_in=-30))
        )
        assert expired.status_code == 401
        assert expired.json() == {"exp": "token expired"}

        garbage = client.get("/users/me", headers=bearer("not.a.jwt"))
        assert garbage.status_code == 401

        hs256 = jwt.encode(
            {"sub": user_id, "exp": int(time.time()) + 60}, "s" * 32, "HS256", headers={"kid": kid}
        )
        assert client.get("/users/me", headers=bearer(hs256)).json()["message"] == (
            "Invalid algorithm"
        )

        ok = client.get("/users/me", headers=bearer(valid))
        assert ok.status_code == 200, ok.text
        assert ok.json()["user_id"] == user_id
        # /auth/password is guarded at the edge too; the rest of /auth is not.
        assert client.post("/auth/password", json={}).status_code == 401
        assert client.post("/auth/logout", json={"refresh_token": "x"}).status_code == 204


def test_a_burst_on_the_credential_routes_is_limited_per_ip(stack: EsctlUp) -> None:
    kong = load_kong(KONG_YML)
    route = next(
        r for s in kong["services"] for r in s["routes"] if r["name"] == "auth-credentials"
    )
    limit = next(p for p in route["plugins"] if p["name"] == "rate-limiting")["config"]["minute"]
    with stack.client("127.0.0.13") as client:
        first = client.post("/auth/login", json={})
        if int(first.headers["ratelimit-reset"]) < 5:  # do not straddle two windows
            time.sleep(int(first.headers["ratelimit-reset"]) + 0.2)
            first = client.post("/auth/login", json={})
        assert first.status_code == 422  # reached auth_svc
        assert first.headers["ratelimit-limit"] == str(limit)
        assert first.headers["ratelimit-remaining"] == str(limit - 1)
        statuses = [client.post("/auth/login", json={}).status_code for _ in range(limit)]
        assert statuses[: limit - 1] == [422] * (limit - 1)
        blocked = client.post("/auth/register", json={})  # the same strict bucket
        assert blocked.status_code == 429
        assert blocked.json()["message"] == "API rate limit exceeded"
        assert 0 < int(blocked.headers["retry-after"]) <= 60
        assert blocked.headers["ratelimit-remaining"] == "0"
        # Looser elsewhere: the JWKS is still served to this address.
        jwks = client.get("/auth/.well-known/jwks.json")
        assert jwks.status_code == 200
        assert int(jwks.headers["ratelimit-limit"]) > limit
    with stack.client("127.0.0.14") as other:
        assert other.post("/auth/login", json={}).status_code == 422


def test_an_oversized_body_is_refused_at_the_edge(stack: EsctlUp) -> None:
    with stack.client("127.0.0.15") as client:
        big = client.post(
            "/auth/refresh",
            content=b'{"refresh_token":"' + b"x" * (64 * 1024) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413
        assert big.json()["message"] == "Request size limit exceeded"  # Kong's body, not ours
        small = client.post("/auth/refresh", json={"refresh_token": "x" * 100})
        assert small.status_code == 401


async def test_the_request_id_is_kept_or_made_and_reaches_the_service_and_its_logs(
    stack: EsctlUp,
) -> None:
    with stack.client("127.0.0.16") as client:
        made = client.post("/auth/refresh", json={})
        generated = made.headers["x-request-id"]
        assert uuid.UUID(generated)
        assert made.json()["request_id"] == generated  # the problem+json of auth_svc

        sent = f"client-{uuid.uuid4().hex}"
        kept = client.post("/auth/refresh", json={}, headers={"x-request-id": sent})
        assert kept.headers["x-request-id"] == sent
        assert kept.json()["request_id"] == sent

        async with subscribed(stack.env["AMQP_URL"], "auth.events") as events:
            rid = f"register-{uuid.uuid4().hex}"
            email = f"rid-{uuid.uuid4().hex[:8]}@example.com"
            r = client.post(
                "/auth/register",
                json={"email": email, "password": "long enough pw"},
                headers={"x-request-id": rid},
            )
            assert r.status_code == 201, r.text
            bodies = await events.wait_for(1)
        assert [b["correlation_id"] for b in bodies if b["data"].get("email") == email] == [rid]

    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not lines:
        for raw in stack.log.read_text(errors="replace").splitlines():
            if sent in raw and raw.startswith("{"):
                lines.append(json.loads(raw))
        await asyncio.sleep(0.1)
    assert any(
        line["service"] == "auth_svc"
        and line["request_id"] == sent
        and "/auth/refresh" in line["message"]
        for line in lines
    ), lines


def test_a_rotated_key_works_at_once_and_the_old_one_until_its_tokens_expire(
    stack: EsctlUp,
) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    user_id, old_token = sign_up(stack)
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    rotated = esctl("keys", "rotate", env=stack.env, timeout=30)
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split()[-1]
    assert new_kid != old_kid
    # auth_svc signs with the new key once every replica publishes it (~1 s here).
    deadline = time.monotonic() + 10
    new_token = old_token
    while time.monotonic() < deadline:
        _, new_token = sign_up(stack)
        if jwt.get_unverified_header(new_token)["kid"] == new_kid:
            break
        time.sleep(0.2)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    with stack.client("127.0.0.17") as client:
        assert client.get("/users/me", headers=bearer(new_token)).status_code == 200
        assert client.get("/users/me", headers=bearer(old_token)).status_code == 200
        old_pem = dict(signing_keys(stack))[old_kid]
        old_key = load_pem_private_key(old_pem.encode(), password=None)
        lapsed = client.get(
            "/users/me", headers=bearer(token(old_kid, old_key, user_id, expires_in=-1))
        )
        assert lapsed.status_code == 401
        assert lapsed.json() == {"exp": "token expired"}
