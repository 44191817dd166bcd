"""Access tokens, the JWKS and key rotation, verified the way other services verify them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from auth_svc.application import AuthService
from auth_svc.keys import (
    KeyStore,
    activation_delay,
    create_signing_keys_table,
    list_keys,
    rotate_signing_key,
)
from auth_svc.main import create_app
from auth_svc.settings import AuthSettings
from servicekit.eventstore import connection_kwargs
from servicekit.tokens import InvalidToken, PublicKey, TokenVerifier, parse_jwks
from testbed.auth import auth_database, cheap_auth_settings
from tests.support.api import EMAIL, PASSWORD, login, register
from tests.support.attacks import b64url, hs256, unsigned_jwt

QUICK_KEYS = {"keys_refresh_seconds": 0.2}  # rotations seen within a test


@pytest.fixture
def settings(make_database: Callable[[str], str]) -> AuthSettings:
    return auth_database(make_database("auth"), **QUICK_KEYS)


@pytest.fixture
def client(settings: AuthSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        register(c)
        yield c


def key_store(client: TestClient) -> KeyStore:
    keys: KeyStore = client.app.state.key_store  # type: ignore[attr-defined]
    return keys


def verifier_from_jwks(client: TestClient, settings: AuthSettings) -> TokenVerifier:
    """What another service does: verify with the published keys only."""
    published = parse_jwks(client.get("/auth/.well-known/jwks.json").json())

    async def lookup(kid: str) -> PublicKey | None:
        return published.get(kid)

    return TokenVerifier(lookup, issuer=settings.issuer, audience=settings.audience)


def change_password_with(client: TestClient, token: str) -> Any:
    """A Bearer-protected call that succeeds (204) only with a valid token."""
    return client.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": PASSWORD},
        headers={"Authorization": f"Bearer {token}"},
    )


def valid_claims(client: TestClient, settings: AuthSettings, **changes: Any) -> dict[str, Any]:
    token = login(client)["access_token"]
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    claims.update(changes)
    return claims


# --- the JWKS and real tokens -----------------------------------------------------------


def test_the_jwks_publishes_the_signing_key_without_private_parts(client: TestClient) -> None:
    response = client.get("/auth/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 1
    key = keys[0]
    assert key["kty"] == "RSA"
    assert key["alg"] == "RS256"
    assert key["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()
    token = login(client)["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]


def test_an_access_token_verifies_with_the_jwks_and_carries_the_claims(
    client: TestClient, settings: AuthSettings
) -> None:
    token = login(client)["access_token"]
    claims = asyncio.run(verifier_from_jwks(client, settings).verify(token))
    assert claims.iss == settings.issuer
    assert claims.aud == settings.audience
    assert claims.email == EMAIL
    assert claims.exp - claims.iat == settings.access_token_ttl_seconds
    assert claims.jti
    auth: AuthService = client.app.state.auth_service  # type: ignore[attr-defined]
    assert claims.sub == auth.account_id_for(EMAIL)
    assert change_password_with(client, token).status_code == 204


def test_each_token_has_its_own_jti(client: TestClient) -> None:
    a = jwt.decode(login(client)["access_token"], options={"verify_signature": False})
    b = jwt.decode(login(client)["access_token"], options={"verify_signature": False})
    assert a["jti"] != b["jti"]


def forged_tokens(client: TestClient, settings: AuthSettings) -> dict[str, str]:
    keys = key_store(client)
    kid = keys.current_kid()
    now = int(time.time())
    claims = valid_claims(client, settings)
    genuine = login(client)["access_token"]
    head, _payload, signature = genuine.split(".")
    tampered_claims = {**jwt.decode(genuine, options={"verify_signature": False})}
    tampered_claims["sub"] = str(uuid.uuid4())
    public_pem = keys.public_keys()[kid].encode()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": keys.sign({**claims, "iat": now - 4000, "exp": now - 3000}),
        "wrong audience": keys.sign({**claims, "aud": "someone-else"}),
        "wrong issuer": keys.sign({**claims, "iss": "evil"}),
        "tampered": f"{head}.{b64url(json.dumps(tampered_claims).encode())}.{signature}",
        "alg none": unsigned_jwt({"alg": "none", "typ": "JWT", "kid": kid}, claims) + ".",
        "HS256 with the public key": hs256({"typ": "JWT", "kid": kid}, claims, public_pem),
        "unknown kid": jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "nope"}),
        "foreign key, known kid": jwt.encode(
            claims, stranger, algorithm="RS256", headers={"kid": kid}
        ),
        "no kid": jwt.encode(claims, stranger, algorithm="RS256"),
        "garbage": "not.a.token",
    }


def test_forged_or_stale_tokens_are_rejected_with_401(
    client: TestClient, settings: AuthSettings
) -> None:
    verifier = verifier_from_jwks(client, settings)
    for name, token in forged_tokens(client, settings).items():
        response = change_password_with(client, token)
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"].startswith("Bearer"), name
        with pytest.raises(InvalidToken):
            asyncio.run(verifier.verify(token))


# --- rotation ---------------------------------------------------------------------------


def test_rotation_keeps_the_old_key_published_and_its_tokens_valid(
    client: TestClient, settings: AuthSettings
) -> None:
    old_token = login(client)["access_token"]
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    new_kid = rotate_signing_key(settings)
    assert new_kid != old_kid
    time.sleep(settings.keys_refresh_seconds + 0.1)
    published = {k["kid"] for k in client.get("/auth/.well-known/jwks.json").json()["keys"]}
    assert published == {old_kid, new_kid}

    time.sleep(activation_delay(settings))
    new_token = login(client)["access_token"]
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid

    verifier = verifier_from_jwks(client, settings)
    for token in (old_token, new_token):
        assert asyncio.run(verifier.verify(token)).email == EMAIL
    for token in (old_token, new_token):  # both keys verify at auth_svc's own routes
        listed = client.get("/auth/sessions", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200
    # A password change ends every session: the other key's token is refused after it.
    assert change_password_with(client, new_token).status_code == 204
    assert change_password_with(client, old_token).status_code == 401
    assert set(key_store(client).public_keys()) == {old_kid, new_kid}

    listed = {k.kid: k for k in list_keys(settings)}
    assert listed[new_kid].signing
    assert listed[new_kid].published
    assert not listed[old_kid].signing
    assert listed[old_kid].published


def test_a_new_key_is_published_before_it_signs(
    make_database: Callable[[str], str],
) -> None:
    settings = auth_database(make_database("auth"), keys_refresh_seconds=30)
    with TestClient(create_app(settings)) as client:
        register(client)
        keys = key_store(client)
        old_kid = keys.current_kid()
        new_kid = keys.rotate()
        assert keys.current_kid() == old_kid
        published = {k["kid"] for k in client.get("/auth/.well-known/jwks.json").json()["keys"]}
        assert published == {old_kid, new_kid}


def test_a_retired_key_leaves_the_jwks_once_its_last_token_expired(
    make_database: Callable[[str], str],
) -> None:
    settings = auth_database(
        make_database("auth"), **QUICK_KEYS, access_token_ttl_seconds=1, key_grace_seconds=0
    )
    with TestClient(create_app(settings)) as client:
        old_kid = key_store(client).current_kid()
        new_kid = rotate_signing_key(settings)
        time.sleep(activation_delay(settings) + 1.3)
        published = {k["kid"] for k in client.get("/auth/.well-known/jwks.json").json()["keys"]}
        assert published == {new_kid}
        listed = {k.kid: k for k in list_keys(settings)}
        assert not listed[old_kid].published


def test_processes_starting_together_agree_on_one_signing_key(
    make_database: Callable[[str], str],
) -> None:
    settings = cheap_auth_settings(make_database("auth"), **QUICK_KEYS)
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        create_signing_keys_table(conn)
    stores = [KeyStore(settings) for _ in range(5)]
    try:
        with ThreadPoolExecutor(max_workers=5) as pool:
            list(pool.map(lambda s: s.open(), stores))
        assert len({s.current_kid() for s in stores}) == 1
        assert len(list_keys(settings)) == 1
    finally:
        for s in stores:
            s.close()


# --- password hash upgrades -------------------------------------------------------------


def test_a_login_upgrades_a_hash_made_with_weaker_parameters(
    make_database: Callable[[str], str],
) -> None:
    weak = auth_database(make_database("auth"), **QUICK_KEYS)
    with TestClient(create_app(weak)) as client:
        register(client)
    strong = weak.model_copy(update={"argon2_time_cost": 2})
    with TestClient(create_app(strong)) as client:
        login(client)
        auth: AuthService = client.app.state.auth_service  # type: ignore[attr-defined]
        account_id = auth.account_id_for(EMAIL)
        assert account_id is not None
        assert "$argon2id$v=19$m=1024,t=2" in auth.get_account(account_id).password_hash
        names = [
            type(auth.mapper.to_domain_event(n)).__name__
            for n in auth.recorder.select_notifications(start=1, limit=100)
        ]
        assert names[-2:] == ["PasswordRehashed", "LoginSucceeded"]
        login(client)
        names_after = [
            type(auth.mapper.to_domain_event(n)).__name__
            for n in auth.recorder.select_notifications(start=1, limit=100)
        ]
        assert names_after.count("PasswordRehashed") == 1
