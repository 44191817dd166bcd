"""The whole stack as processes (`esctl up`), driven with HTTP like a client, observed on the
exchanges like any subscriber."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from testbed.cli import esctl
from testbed.up import EsctlUp, esctl_up
from tests.support.amqp import subscribed


@pytest.fixture(scope="module")
def stack(
    make_database: Callable[[str], str], make_vhost: Callable[[], str], tmp_path_factory: Any
) -> Iterator[EsctlUp]:
    with esctl_up(make_database, make_vhost, tmp_path_factory.mktemp("e2e")) as running:
        yield running


def register_and_login(stack: EsctlUp, email: str, password: str) -> dict[str, str]:
    with httpx.Client() as client:
        r = client.post(
            f"{stack.auth}/auth/register",
            json={"email": email, "password": password, "display_name": "Ada"},
        )
        assert r.status_code == 201, r.text
        r = client.post(f"{stack.auth}/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        return dict(r.json())


async def test_a_full_scenario_publishes_contracts_and_never_leaks_a_secret(stack: EsctlUp) -> None:
    password = "correct horse battery"
    email = f"ada-{time.time_ns()}@example.com"
    async with (
        subscribed(stack.amqp_url, "auth.events") as auth_events,
        subscribed(stack.amqp_url, "user.events") as user_events,
    ):
        tokens = register_and_login(stack, email, password)
        bearer = {"authorization": f"Bearer {tokens['access_token']}"}
        registered = await auth_events.wait_for(2)
        assert [b["event_type"] for b in registered[:2]] == [
            "auth.account.registered",
            "auth.account.login_succeeded",
        ]
        envelope = registered[0]
        assert envelope["producer"] == "auth_svc"
        assert envelope["schema_version"] == 1
        assert envelope["data"]["email"] == email
        user_id = envelope["data"]["user_id"]

        async with httpx.AsyncClient() as client:
            # The consumer created the profile from the event (GET would create it otherwise).
            created = await user_events.wait_for(1)
            assert created[0]["event_type"] == "user.profile.created"
            assert created[0]["data"]["display_name"] == "Ada"
            r = await client.get(f"{stack.users}/users/me", headers=bearer)
            assert r.status_code == 200
            assert r.json()["user_id"] == user_id
            etag = r.headers["etag"]
            r = await client.patch(
                f"{stack.users}/users/me",
                headers={**bearer, "if-match": etag},
                json={"bio": "Analyst", "timezone": "Europe/London"},
            )
            assert r.status_code == 200, r.text
            updated = await user_events.wait_for(2)
            assert updated[1]["event_type"] == "user.profile.updated"
            assert set(updated[1]["data"]["changed"]) == {"bio", "timezone"}

            r = await client.post(
                f"{stack.auth}/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
            )
            assert r.status_code == 200
            refreshed = r.json()
            r = await client.post(
                f"{stack.auth}/auth/password",
                headers={"authorization": f"Bearer {refreshed['access_token']}"},
                json={"current_password": password, "new_password": "another good one"},
            )
            assert r.status_code == 204
            r = await client.post(
                f"{stack.auth}/auth/logout", json={"refresh_token": refreshed["refresh_token"]}
            )
            assert r.status_code == 204
            bad = await client.post(
                f"{stack.auth}/auth/login", json={"email": email, "password": "wrong password"}
            )
            assert bad.status_code == 401
        every = await auth_events.wait_for(5)
        assert "auth.account.password_changed" in [b["event_type"] for b in every]
        assert "auth.account.login_failed" in [b["event_type"] for b in every]

    secrets = [
        password,
        "another good one",
        "$argon2",
        tokens["refresh_token"],
        refreshed["refresh_token"],
        "PRIVATE KEY",
    ]
    for message in auth_events.messages + user_events.messages:
        text = message.body.decode() + json.dumps(message.headers or {}, default=str)
        for secret in secrets:
            assert secret not in text


async def test_a_profile_is_created_once_whether_the_event_or_the_request_comes_first(
    stack: EsctlUp,
) -> None:
    tokens = register_and_login(stack, f"bo-{time.time_ns()}@example.com", "long enough pw")
    bearer = {"authorization": f"Bearer {tokens['access_token']}"}
    async with httpx.AsyncClient() as client:
        first = await client.get(f"{stack.users}/users/me", headers=bearer)
        assert first.status_code == 200
        # Whatever happened first, there is exactly one profile, with the registered name.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = await client.get(f"{stack.users}/users/me", headers=bearer)
            if r.json()["display_name"] == "Ada":
                break
            await _sleep(0.1)
        assert r.json()["display_name"] == "Ada"
        assert r.json()["user_id"] == first.json()["user_id"]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def esctl_json(stack: EsctlUp, *args: str) -> Any:
    result = esctl(*args, "--format", "json", env={**stack.env, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_reports_and_projection_status_follow_the_api(stack: EsctlUp) -> None:
    before = esctl_json(stack, "report", "signups")
    register_and_login(stack, f"rep-{time.time_ns()}@example.com", "correct horse battery")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = esctl_json(stack, "report", "signups")
        if sum(r["accounts"] for r in after) == sum(r["accounts"] for r in before) + 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the sign-up never reached the report: {after}")
    assert after[-1]["day"] == datetime.now(UTC).date().isoformat()
    logins = esctl_json(stack, "report", "logins")
    assert logins[-1]["succeeded"] >= 1
    status = {
        (r["projection"], r["producer"]): r for r in esctl_json(stack, "projections", "status")
    }
    auth = status[("reporting_svc", "auth_svc")]
    assert auth["applied"] >= 2 and auth["latest"] >= auth["applied"]
    assert auth["dlq"] == 0
