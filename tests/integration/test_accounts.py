"""Accounts a product can ship (issue 16), against a real PostgreSQL database: e-mail
verification, password reset, sessions, discovery and password screening.

Links are read the way notify_svc reads them: from the published contract's sealed field,
opened with notify_svc's private key. Nothing here reaches into auth_svc's state for a token.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from auth_svc.application import AuthService
from auth_svc.contracts import to_contract
from auth_svc.main import create_app
from auth_svc.settings import AuthSettings
from servicekit.sealing import Opener, new_key_pair
from shared_contracts.events import (
    AccountRegistered,
    ContractEvent,
    EmailVerificationRequested,
    EmailVerified,
    PasswordReset,
    PasswordResetRequested,
    SessionRevoked,
)
from testbed.auth import auth_database
from tests.support.api import EMAIL, PASSWORD, assert_problem, bearer, login, register

PRIVATE_KEY, PUBLIC_KEY = new_key_pair()
OPENER = Opener([PRIVATE_KEY])
NEW_PASSWORD = "a different good one"


def ready_settings(database_url: str, **overrides: Any) -> AuthSettings:
    return auth_database(
        database_url,
        **{"lockout_threshold": 3, "link_sealing_public_key": PUBLIC_KEY, **overrides},
    )


@pytest.fixture
def database(make_database: Callable[[str], str]) -> str:
    return make_database("auth")


@pytest.fixture
def client(database: str) -> Iterator[TestClient]:
    with TestClient(create_app(ready_settings(database))) as c:
        yield c


def service(client: TestClient) -> AuthService:
    auth: AuthService = client.app.state.auth_service  # type: ignore[attr-defined]
    return auth


def published(client: TestClient) -> list[ContractEvent]:
    """Every contract the relay would publish, in order."""
    auth = service(client)
    contracts = [
        to_contract(auth.mapper.to_domain_event(n))
        for n in auth.recorder.select_notifications(start=1, limit=10_000)
    ]
    return [c for c in contracts if c is not None]


def token_of(sealed: str | None) -> str:
    """The token of a sealed link, as notify_svc opens it."""
    assert sealed is not None
    link = OPENER.open(sealed)
    page, _, token = link.partition("#token=")
    assert page.startswith("http") and token
    return token


def verification_token(client: TestClient, user_id: str) -> str:
    for event in reversed(published(client)):
        if isinstance(event, EmailVerificationRequested) and str(event.user_id) == user_id:
            return token_of(event.link_sealed)
        if isinstance(event, AccountRegistered) and str(event.user_id) == user_id:
            return token_of(event.verification_link_sealed)
    raise AssertionError("no verification link was published")


def reset_token(client: TestClient, user_id: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in reversed(published(client)):
            if isinstance(event, PasswordResetRequested) and str(event.user_id) == user_id:
                return token_of(event.link_sealed)
        time.sleep(0.05)
    raise AssertionError("no reset link was published")


def claims(access_token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    return decoded


# --- e-mail verification ----------------------------------------------------------------


def test_registration_is_unverified_and_the_link_verifies_it_once(client: TestClient) -> None:
    user_id = register(client)["user_id"]
    assert claims(login(client)["access_token"])["email_verified"] is False
    token = verification_token(client, user_id)
    assert len(token) >= 43  # 256 random bits at least, base64url

    assert client.post("/auth/email/verify", json={"token": token}).status_code == 204
    assert claims(login(client)["access_token"])["email_verified"] is True
    verified = [e for e in published(client) if isinstance(e, EmailVerified)]
    assert [(str(e.user_id), e.email) for e in verified] == [(user_id, EMAIL)]

    again = assert_problem(client.post("/auth/email/verify", json={"token": token}), 400)
    assert again["type"].endswith("invalid-link-token")


@pytest.mark.parametrize(
    "garbage", ["", "x", "A" * 67, "!" * 70, "a" * 600, str(uuid.uuid4())], ids=repr
)
def test_any_bad_verification_token_is_one_400_or_422_and_changes_nothing(
    client: TestClient, garbage: str
) -> None:
    register(client)
    before = len(published(client))
    response = client.post("/auth/email/verify", json={"token": garbage})
    assert_problem(response, 422 if not garbage or len(garbage) > 512 else 400)
    assert len(published(client)) == before


def test_a_tampered_verification_token_is_refused(client: TestClient) -> None:
    user_id = register(client)["user_id"]
    token = verification_token(client, user_id)
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert_problem(client.post("/auth/email/verify", json={"token": tampered}), 400)


def test_resend_replaces_the_link_and_is_rate_limited(database: str) -> None:
    with TestClient(create_app(ready_settings(database, resend_limit=2))) as client:
        user_id = register(client)["user_id"]
        first = verification_token(client, user_id)
        headers = bearer(login(client)["access_token"])
        assert client.post("/auth/email/verify/resend", headers=headers).status_code == 204
        second = verification_token(client, user_id)
        assert second != first
        assert client.post("/auth/email/verify/resend", headers=headers).status_code == 204
        limited = client.post("/auth/email/verify/resend", headers=headers)
        assert_problem(limited, 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert_problem(client.post("/auth/email/verify", json={"token": first}), 400)
        assert (
            client.post(
                "/auth/email/verify", json={"token": verification_token(client, user_id)}
            ).status_code
            == 204
        )
        assert_problem(client.post("/auth/email/verify/resend"), 401)


def test_required_verification_refuses_an_unverified_login_with_a_distinct_403(
    database: str,
) -> None:
    with TestClient(create_app(ready_settings(database, require_verified_email=True))) as client:
        user_id = register(client)["user_id"]
        refused = client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
        body = assert_problem(refused, 403)
        assert body["type"].endswith("email-not-verified")
        wrong = client.post("/auth/login", json={"email": EMAIL, "password": "wrong password"})
        assert_problem(wrong, 401)  # the password is still checked first
        token = verification_token(client, user_id)
        assert client.post("/auth/email/verify", json={"token": token}).status_code == 204
        assert claims(login(client)["access_token"])["email_verified"] is True


# --- password reset ------------------------------------------------------------------------


def test_forgot_answers_the_same_for_known_and_unknown_addresses(client: TestClient) -> None:
    register(client)
    known = client.post("/auth/password/forgot", json={"email": EMAIL})
    unknown = client.post("/auth/password/forgot", json={"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 202
    strip = lambda r: {k: v for k, v in r.json().items() if k != "request_id"}  # noqa: E731
    assert strip(known) == strip(unknown)
    assert_problem(client.post("/auth/password/forgot", json={"email": "not an address"}), 422)


def test_reset_spends_the_token_revokes_every_session_and_lifts_a_lockout(
    client: TestClient,
) -> None:
    user_id = register(client)["user_id"]
    sessions = [login(client), login(client)]
    for _ in range(3):
        client.post("/auth/login", json={"email": EMAIL, "password": "wrong password"})
    assert_problem(client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD}), 423)

    assert client.post("/auth/password/forgot", json={"email": EMAIL}).status_code == 202
    token = reset_token(client, user_id)
    done = client.post("/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert done.status_code == 204, done.text

    for pair in sessions:
        refresh = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert_problem(refresh, 401)
    assert login(client, password=NEW_PASSWORD)["token_type"] == "bearer"  # no lock left
    assert_problem(client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD}), 401)
    events = published(client)
    assert [type(e) for e in events].count(PasswordReset) == 1
    revoked = {e.session_id for e in events if isinstance(e, SessionRevoked)}
    assert revoked == {uuid.UUID(claims(p["access_token"])["sid"]) for p in sessions}

    replay = client.post("/auth/password/reset", json={"token": token, "new_password": "x" * 20})
    assert assert_problem(replay, 400)["type"].endswith("invalid-link-token")
    assert login(client, password=NEW_PASSWORD)


def test_a_reset_link_expires(database: str) -> None:
    with TestClient(create_app(ready_settings(database, reset_ttl_seconds=60))) as client:
        user_id = register(client)["user_id"]
        client.post("/auth/password/forgot", json={"email": EMAIL})
        token = reset_token(client, user_id)
        auth = service(client)
        later = auth._clock() + __import__("datetime").timedelta(seconds=61)
        auth._clock = lambda: later
        expired = client.post(
            "/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert_problem(expired, 400)


def test_a_reset_needs_a_good_new_password_and_keeps_the_token_when_refused(
    client: TestClient,
) -> None:
    user_id = register(client)["user_id"]
    client.post("/auth/password/forgot", json={"email": EMAIL})
    token = reset_token(client, user_id)
    common = client.post(
        "/auth/password/reset", json={"token": token, "new_password": "password123"}
    )
    assert assert_problem(common, 422)["type"].endswith("password-too-common")
    short = client.post("/auth/password/reset", json={"token": token, "new_password": "short"})
    assert_problem(short, 422)
    ok = client.post("/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD})
    assert ok.status_code == 204


def test_forgot_is_rate_limited_per_address_and_per_ip_alike_for_unknown_ones(
    database: str,
) -> None:
    settings = ready_settings(database, forgot_limit_per_address=2, forgot_limit_per_ip=7)
    with TestClient(create_app(settings)) as client:
        register(client)
        for email in (EMAIL, "nobody@example.com"):
            statuses = [
                client.post("/auth/password/forgot", json={"email": email}).status_code
                for _ in range(3)
            ]
            assert statuses == [202, 202, 429]
        # Six so far from this IP: every request counts toward its limit, refused or not.
        codes = [
            client.post("/auth/password/forgot", json={"email": f"u{i}@example.com"}).status_code
            for i in range(2)
        ]
        assert codes == [202, 429]


# --- sessions ------------------------------------------------------------------------------


def test_sessions_list_where_each_login_came_from_and_end_one_by_one(client: TestClient) -> None:
    register(client)
    phone = client.post(
        "/auth/login",
        json={"email": EMAIL, "password": PASSWORD},
        headers={"user-agent": "phone/1.0", "x-forwarded-for": "203.0.113.7"},
    ).json()
    laptop = client.post(
        "/auth/login",
        json={"email": EMAIL, "password": PASSWORD},
        headers={"user-agent": "laptop/2.0", "x-forwarded-for": "198.51.100.2, 127.0.0.1"},
    ).json()
    listed = client.get("/auth/sessions", headers=bearer(laptop["access_token"]))
    assert listed.status_code == 200
    sessions = {s["user_agent"]: s for s in listed.json()["sessions"]}
    assert set(sessions) == {"phone/1.0", "laptop/2.0"}
    # The test client's peer is not a trusted proxy, so X-Forwarded-For is not believed.
    assert sessions["phone/1.0"]["client_ip"] == "testclient"
    assert sessions["laptop/2.0"]["current"] is True
    assert sessions["phone/1.0"]["current"] is False
    assert sessions["laptop/2.0"]["id"] == claims(laptop["access_token"])["sid"]

    phone_sid = sessions["phone/1.0"]["id"]
    ended = client.delete(f"/auth/sessions/{phone_sid}", headers=bearer(laptop["access_token"]))
    assert ended.status_code == 204
    assert_problem(
        client.post("/auth/refresh", json={"refresh_token": phone["refresh_token"]}), 401
    )
    again = client.delete(f"/auth/sessions/{phone_sid}", headers=bearer(laptop["access_token"]))
    assert_problem(again, 404)
    assert_problem(
        client.delete("/auth/sessions/not-a-uuid", headers=bearer(laptop["access_token"])), 422
    )

    refreshed = client.post("/auth/refresh", json={"refresh_token": laptop["refresh_token"]})
    assert claims(refreshed.json()["access_token"])["sid"] == sessions["laptop/2.0"]["id"]
    assert (
        client.post("/auth/logout-all", headers=bearer(laptop["access_token"])).status_code == 204
    )
    dead = client.post("/auth/refresh", json={"refresh_token": refreshed.json()["refresh_token"]})
    assert_problem(dead, 401)
    reasons = [e.reason for e in published(client) if isinstance(e, SessionRevoked)]
    assert reasons == ["ended", "logout_all"]


def test_only_a_trusted_gateway_is_believed_about_the_client_ip() -> None:
    from starlette.requests import Request

    from auth_svc.api import client_ip

    def request(peer: str, forwarded: str | None) -> Request:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return Request({"type": "http", "client": (peer, 1234), "headers": headers})

    trusted = ["127.0.0.1/32", "10.0.0.0/8"]
    assert client_ip(request("127.0.0.1", "203.0.113.9"), trusted) == "203.0.113.9"
    # A client's own X-Forwarded-For entry before the gateway's is not believed.
    assert client_ip(request("10.1.2.3", "6.6.6.6, 203.0.113.9"), trusted) == "203.0.113.9"
    assert client_ip(request("192.0.2.1", "203.0.113.9"), trusted) == "192.0.2.1"
    assert client_ip(request("127.0.0.1", "garbage"), trusted) == "127.0.0.1"
    assert client_ip(request("127.0.0.1", None), trusted) == "127.0.0.1"


# --- discovery -----------------------------------------------------------------------------


def test_discovery_configures_an_independent_jose_client(database: str) -> None:
    """PyJWT's PyJWKClient fetches the JWKS from the discovered `jwks_uri` over real HTTP and
    verifies an access token with the discovered issuer and algorithms."""
    import uvicorn

    from testbed.ports import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(ready_settings(database)), host="127.0.0.1", port=port)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=base) as http:
            register(http)
            access = login(http)["access_token"]
            config = http.get("/auth/.well-known/openid-configuration").json()
        assert config["jwks_uri"] == f"{base}/auth/.well-known/jwks.json"
        assert config["token_endpoint"] == f"{base}/auth/token"
        assert {"sub", "sid", "email_verified", "exp"} <= set(config["claims_supported"])
        signing_key = jwt.PyJWKClient(config["jwks_uri"]).get_signing_key_from_jwt(access)
        verified = jwt.decode(
            access,
            signing_key.key,
            algorithms=config["id_token_signing_alg_values_supported"],
            issuer=config["issuer"],
            audience="eskit",
        )
        assert verified["email"] == EMAIL
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- password screening --------------------------------------------------------------------


@pytest.mark.parametrize("common", ["password123", "Qwerty123", "iloveyou"])
def test_a_common_password_is_refused_everywhere_a_password_is_set(
    client: TestClient, common: str
) -> None:
    body = assert_problem(
        client.post("/auth/register", json={"email": EMAIL, "password": common}), 422
    )
    assert body["type"].endswith("password-too-common")
    register(client)
    access = login(client)["access_token"]
    change = client.post(
        "/auth/password",
        headers=bearer(access),
        json={"current_password": PASSWORD, "new_password": common},
    )
    assert_problem(change, 422)


class FakeHibp(http.server.BaseHTTPRequestHandler):
    """The range API: `/range/<5 hex>` answers `SUFFIX:COUNT` lines. Records what it saw."""

    breached: set[str] = set()
    seen: list[str] = []
    delay = 0.0

    def do_GET(self) -> None:
        FakeHibp.seen.append(self.path)
        time.sleep(FakeHibp.delay)
        prefix = self.path.rsplit("/", 1)[-1]
        lines = ["0000000000000000000000000000000000A:0"]  # padding
        for password in FakeHibp.breached:
            digest = hashlib.sha1(password.encode(), usedforsecurity=False).hexdigest().upper()
            if digest.startswith(prefix):
                lines.append(f"{digest[5:]}:42")
        body = "\r\n".join(lines).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hibp() -> Iterator[str]:
    FakeHibp.breached, FakeHibp.seen, FakeHibp.delay = {"breached but long"}, [], 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHibp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/range/"
    finally:
        server.shutdown()


def test_the_hibp_check_sends_only_a_prefix_and_refuses_a_breached_password(
    database: str, hibp: str
) -> None:
    settings = ready_settings(database, hibp_enabled=True, hibp_url=hibp)
    with TestClient(create_app(settings)) as client:
        refused = client.post(
            "/auth/register", json={"email": EMAIL, "password": "breached but long"}
        )
        assert_problem(refused, 422)
        register(client)
    digest = hashlib.sha1(b"breached but long", usedforsecurity=False).hexdigest().upper()
    assert FakeHibp.seen[0] == f"/range/{digest[:5]}"
    assert all(len(path.rsplit("/", 1)[-1]) == 5 for path in FakeHibp.seen)


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_slow_hibp_fails_open_or_closed_as_configured(
    database: str, hibp: str, fail_open: bool
) -> None:
    FakeHibp.delay = 1.0
    settings = ready_settings(
        database,
        hibp_enabled=True,
        hibp_url=hibp,
        hibp_timeout_seconds=0.2,
        hibp_fail_open=fail_open,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/auth/register", json={"email": EMAIL, "password": PASSWORD})
        if fail_open:
            assert response.status_code == 201
        else:
            assert_problem(response, 503)
