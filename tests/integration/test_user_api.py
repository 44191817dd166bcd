"""The users HTTP API against a real PostgreSQL event store, with tokens signed by the test."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from servicekit.eventstore import connection_kwargs, eventsourcing_env
from servicekit.tokens import PublicKey
from shared_contracts.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER
from tests.support.api import assert_problem, bearer
from tests.support.attacks import hs256, unsigned_jwt
from user_svc.application import ProfileService
from user_svc.main import create_app, init_db
from user_svc.settings import UserSettings

KID = "test-key-1"
PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def token_keys(kid: str) -> PublicKey | None:
    return PRIVATE_KEY.public_key() if kid == KID else None


def claims(user_id: uuid.UUID, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": DEFAULT_ISSUER,
        "aud": DEFAULT_AUDIENCE,
        "sub": str(user_id),
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "email": f"{user_id.hex[:8]}@example.com",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def sign(payload: dict[str, Any], *, key: Any = PRIVATE_KEY, kid: str = KID) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def auth(user_id: uuid.UUID, **overrides: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {sign(claims(user_id, **overrides))}"}


def hs256_with_public_key_as_secret(payload: dict[str, Any]) -> str:
    """The RS256/HS256 confusion attack: HMAC keyed with the public key's PEM."""
    secret = PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hs256({"typ": "JWT", "kid": KID}, payload, secret)


def unsigned(payload: dict[str, Any]) -> str:
    return unsigned_jwt({"alg": "none", "typ": "JWT", "kid": KID}, payload) + "."


@pytest.fixture(scope="module")
def database_url(make_database: Callable[[str], str]) -> str:
    url = make_database("users_api")
    init_db(UserSettings(database_url=url))
    return url


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    app = create_app(UserSettings(database_url=database_url), token_keys=token_keys)
    with TestClient(app) as test_client:
        assert app.state.cache_follower.following.wait(10)
        yield test_client


@pytest.fixture
def user() -> uuid.UUID:
    return uuid.uuid4()


def event_count(database_url: str, user_id: uuid.UUID) -> int:
    with psycopg.connect(**connection_kwargs(database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM users_events WHERE originator_id = %s", (user_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- GET /users/me --------------------------------------------------------------------------


def test_first_get_creates_the_profile_from_the_token(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    response = client.get("/users/me", headers=auth(user, email="ada@example.com"))

    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    body = response.json()
    assert body.keys() == {
        "user_id",
        "email",
        "display_name",
        "bio",
        "locale",
        "timezone",
        "avatar_url",
        "version",
        "created_at",
        "updated_at",
    }
    assert body["user_id"] == str(user)
    assert body["email"] == "ada@example.com"
    assert body["display_name"] is None
    assert body["version"] == 1
    assert client.get("/users/me", headers=auth(user)).json() == body
    assert event_count(database_url, user) == 1


def test_concurrent_first_gets_create_exactly_one_profile(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    headers = auth(user)
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: client.get("/users/me", headers=headers), range(10)))

    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["created_at"] for r in responses}) == 1
    assert {r.json()["version"] for r in responses} == {1}
    assert event_count(database_url, user) == 1


def test_a_token_without_email_creates_a_profile_without_email(
    client: TestClient, user: uuid.UUID
) -> None:
    response = client.get("/users/me", headers=auth(user, email=None))
    assert response.status_code == 200
    assert response.json()["email"] is None


# --- tokens ---------------------------------------------------------------------------------


def _bad_tokens() -> dict[str, Callable[[uuid.UUID], dict[str, str]]]:
    return {
        "missing": lambda u: {},
        "empty bearer": lambda u: {"Authorization": "Bearer "},
        "basic scheme": lambda u: {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage": lambda u: bearer("not-a-token"),
        "three garbage parts": lambda u: bearer("aaa.bbb.ccc"),
        "expired": lambda u: bearer(
            sign(claims(u, iat=int(time.time()) - 3600, exp=int(time.time()) - 60))
        ),
        "bad signature": lambda u: bearer(sign(claims(u), key=OTHER_KEY)),
        "alg none": lambda u: bearer(unsigned(claims(u))),
        "hs256 with public key": lambda u: bearer(hs256_with_public_key_as_secret(claims(u))),
        "unknown kid": lambda u: bearer(sign(claims(u), kid="someone-else")),
        "wrong audience": lambda u: bearer(sign(claims(u, aud="another-service"))),
        "wrong issuer": lambda u: bearer(sign(claims(u, iss="evil"))),
        "subject not a uuid": lambda u: bearer(sign(claims(u, sub="admin"))),
        "no jti": lambda u: bearer(sign(claims(u, jti=None))),
    }


@pytest.mark.parametrize("kind", list(_bad_tokens()))
@pytest.mark.parametrize(
    "route", ["GET /users/me", "PATCH /users/me", f"GET /users/{uuid.uuid4()}"]
)
def test_requests_without_a_valid_token_are_refused(
    client: TestClient, database_url: str, user: uuid.UUID, kind: str, route: str
) -> None:
    method, path = route.split(" ")
    headers = _bad_tokens()[kind](user)
    response = client.request(method, path, headers=headers, json={"bio": "x"})

    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert event_count(database_url, user) == 0


# --- PATCH /users/me ------------------------------------------------------------------------


def test_patch_changes_fields_and_bumps_the_etag(client: TestClient, user: uuid.UUID) -> None:
    headers = auth(user)
    client.get("/users/me", headers=headers)

    response = client.patch(
        "/users/me",
        headers=headers,
        json={
            "display_name": "Ada",
            "bio": "Analyst",
            "locale": "en-gb",
            "timezone": "Europe/London",
            "avatar_url": "https://example.com/ada.png",
        },
    )

    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    body = response.json()
    assert body["version"] == 2
    assert body["locale"] == "en-GB"
    assert body["display_name"] == "Ada"
    assert body["updated_at"] >= body["created_at"]
    assert client.get("/users/me", headers=headers).json() == body


def test_patch_before_any_get_creates_the_profile(client: TestClient, user: uuid.UUID) -> None:
    response = client.patch("/users/me", headers=auth(user), json={"bio": "first"})
    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert response.json()["bio"] == "first"


def test_null_clears_a_field_and_absent_fields_stay(client: TestClient, user: uuid.UUID) -> None:
    headers = auth(user)
    client.patch("/users/me", headers=headers, json={"bio": "x", "timezone": "UTC"})
    body = client.patch("/users/me", headers=headers, json={"bio": None}).json()
    assert body["bio"] is None
    assert body["timezone"] == "UTC"


def test_a_patch_that_changes_nothing_keeps_the_version(
    client: TestClient, user: uuid.UUID
) -> None:
    headers = auth(user)
    first = client.patch("/users/me", headers=headers, json={"bio": "same"})
    again = client.patch("/users/me", headers=headers, json={"bio": "same"})
    empty = client.patch("/users/me", headers=headers, json={})
    assert first.headers["etag"] == again.headers["etag"] == empty.headers["etag"]


def test_if_match_with_the_current_version_succeeds(client: TestClient, user: uuid.UUID) -> None:
    headers = auth(user)
    etag = client.get("/users/me", headers=headers).headers["etag"]
    response = client.patch(
        "/users/me", headers={**headers, "If-Match": etag}, json={"bio": "conditional"}
    )
    assert response.status_code == 200
    assert response.headers["etag"] == '"2"'


def test_if_match_any_version(client: TestClient, user: uuid.UUID) -> None:
    headers = auth(user)
    response = client.patch("/users/me", headers={**headers, "If-Match": "*"}, json={"bio": "a"})
    assert response.status_code == 200
    listed = client.patch(
        "/users/me", headers={**headers, "If-Match": '"1", "2"'}, json={"bio": "b"}
    )
    assert listed.status_code == 200
    assert listed.headers["etag"] == '"3"'


@pytest.mark.parametrize("if_match", ['"1"', 'W/"2"', "2", '"abc"', ""])
def test_a_stale_or_unusable_if_match_is_a_precondition_failure(
    client: TestClient, user: uuid.UUID, if_match: str
) -> None:
    headers = auth(user)
    client.patch("/users/me", headers=headers, json={"bio": "v2"})

    response = client.patch(
        "/users/me", headers={**headers, "If-Match": if_match}, json={"bio": "lost update"}
    )

    assert_problem(response, 412)
    assert response.headers["etag"] == '"2"'
    assert client.get("/users/me", headers=headers).json()["bio"] == "v2"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("display_name", ""),
        ("display_name", "x" * 101),
        ("display_name", 42),
        ("bio", "b" * 1001),
        ("bio", ["not", "text"]),
        ("locale", "english"),
        ("locale", "en_US"),
        ("timezone", "Mars/Olympus"),
        ("avatar_url", "javascript:alert(1)"),
        ("avatar_url", "ftp://x"),
        ("avatar_url", "https://example.com/" + "a" * 2030),
    ],
)
def test_invalid_fields_are_unprocessable(
    client: TestClient, user: uuid.UUID, field: str, value: Any
) -> None:
    headers = auth(user)
    response = client.patch("/users/me", headers=headers, json={"display_name": "Ok", field: value})

    body = assert_problem(response, 422)
    assert field in {e["field"] for e in body["errors"]}
    assert client.get("/users/me", headers=headers).json()["version"] == 1


@pytest.mark.parametrize(
    "payload", [{"email": "x@example.com"}, {"nickname": "x"}, {"version": 3}, {"user_id": "x"}]
)
def test_unknown_or_read_only_fields_are_unprocessable(
    client: TestClient, user: uuid.UUID, payload: dict[str, Any]
) -> None:
    response = client.patch("/users/me", headers=auth(user), json=payload)
    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == list(payload)


@pytest.mark.parametrize("payload", ["[]", '"bio"', "null", "1"])
def test_a_body_that_is_not_an_object_is_unprocessable(
    client: TestClient, user: uuid.UUID, payload: str
) -> None:
    response = client.patch(
        "/users/me",
        headers={**auth(user), "Content-Type": "application/json"},
        content=payload,
    )
    assert_problem(response, 422)


def test_malformed_json_is_a_bad_request(client: TestClient, user: uuid.UUID) -> None:
    response = client.patch(
        "/users/me",
        headers={**auth(user), "Content-Type": "application/json"},
        content=b'{"bio": "unterminated',
    )
    assert_problem(response, 400)


def test_a_body_over_64_kib_is_too_large(client: TestClient, user: uuid.UUID) -> None:
    response = client.patch("/users/me", headers=auth(user), json={"bio": "x" * (65 * 1024)})
    assert_problem(response, 413)


def test_concurrent_patches_with_the_same_if_match_let_exactly_one_win(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    headers = auth(user)
    etag = client.get("/users/me", headers=headers).headers["etag"]
    start = threading.Barrier(20)

    def patch(i: int) -> int:
        start.wait()
        response = client.patch(
            "/users/me", headers={**headers, "If-Match": etag}, json={"bio": f"writer {i}"}
        )
        return int(response.status_code)

    with ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(patch, range(20)))

    assert statuses == [200] + [412] * 19
    assert event_count(database_url, user) == 2


def test_concurrent_patches_without_if_match_all_apply(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    headers = auth(user)
    client.get("/users/me", headers=headers)

    def patch(i: int) -> int:
        response = client.patch("/users/me", headers=headers, json={"bio": f"writer {i}"})
        return int(response.status_code)

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(patch, range(10)))

    assert statuses == [200] * 10
    assert event_count(database_url, user) == 11
    assert client.get("/users/me", headers=headers).json()["version"] == 11


# --- GET /users/{user_id} -------------------------------------------------------------------


def test_public_profile_has_no_email(client: TestClient, user: uuid.UUID) -> None:
    client.patch("/users/me", headers=auth(user), json={"display_name": "Ada", "bio": "hi"})

    response = client.get(f"/users/{user}", headers=auth(uuid.uuid4()))

    assert response.status_code == 200
    assert response.json() == {
        "user_id": str(user),
        "display_name": "Ada",
        "bio": "hi",
        "locale": None,
        "timezone": None,
        "avatar_url": None,
    }
    assert "etag" not in response.headers


def test_unknown_user_is_not_found(client: TestClient, user: uuid.UUID) -> None:
    assert_problem(client.get(f"/users/{uuid.uuid4()}", headers=auth(user)), 404)


@pytest.mark.parametrize("user_id", ["not-a-uuid", "123", "me2"])
def test_a_user_id_that_is_not_a_uuid_is_unprocessable(
    client: TestClient, user: uuid.UUID, user_id: str
) -> None:
    body = assert_problem(client.get(f"/users/{user_id}", headers=auth(user)), 422)
    assert body["errors"][0]["field"] == "path.user_id"


# --- the cache across replicas --------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_write_by_another_replica_is_visible_within_a_second(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    headers = auth(user)
    client.patch("/users/me", headers=headers, json={"bio": "before"})
    client.get(f"/users/{user}", headers=headers)
    cache = client.app.state.profiles.cache  # type: ignore[attr-defined]
    assert cache.get(user) is not None

    replica = ProfileService(env=eventsourcing_env(database_url, pool_size=2))
    try:
        replica.update(user, {"bio": "from the other replica"})
    finally:
        replica.close()

    wait_for(lambda: client.get("/users/me", headers=headers).json()["bio"] != "before", 1.0)
    mine = client.get("/users/me", headers=headers)
    assert mine.json()["bio"] == "from the other replica"
    assert mine.headers["etag"] == '"3"'
    public = client.get(f"/users/{user}", headers=headers).json()
    assert public["bio"] == "from the other replica"


def test_the_cache_recovers_after_the_database_drops_its_connections(
    client: TestClient, database_url: str, user: uuid.UUID
) -> None:
    headers = auth(user)
    client.patch("/users/me", headers=headers, json={"bio": "before"})
    follower = client.app.state.cache_follower  # type: ignore[attr-defined]
    failures = follower.failures
    dbname = connection_kwargs(database_url)["dbname"]

    with psycopg.connect(**connection_kwargs(database_url), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
    wait_for(lambda: follower.failures > failures and follower.following.is_set(), 10.0)

    replica = ProfileService(env=eventsourcing_env(database_url, pool_size=2))
    try:
        replica.update(user, {"bio": "after the outage"})
    finally:
        replica.close()
    client.get("/users/me", headers=headers)  # cached again
    replica = ProfileService(env=eventsourcing_env(database_url, pool_size=2))
    try:
        replica.update(user, {"bio": "and once more"})
    finally:
        replica.close()
    wait_for(lambda: client.get("/users/me", headers=headers).json()["bio"] == "and once more", 1.0)


# --- probes ---------------------------------------------------------------------------------


def test_ready_when_the_database_answers(client: TestClient) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == ["database"]
    assert client.get("/health/live").status_code == 200


def test_openapi_documents_every_route_with_problems(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) >= {"/users/me", "/users/{user_id}"}
    assert "412" in paths["/users/me"]["patch"]["responses"]
    assert "404" in paths["/users/{user_id}"]["get"]["responses"]
    assert "401" in paths["/users/me"]["get"]["responses"]
