"""Forged, stale and replayed tokens sent to the services directly, over HTTP.

Each must get a 401 problem+json, never a 5xx and never the victim's data. The attacks live
in tests/support/attacks.py so that the gateway's tests can send the same ones through it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import jwt

from auth_svc.keys import rotate_signing_key
from tests.security.conftest import Services, new_account, running_services
from tests.support.attacks import (
    AUTH_ROUTES,
    JWKS_PATH,
    USER_ROUTES,
    attack_routes,
    fetch_jwks,
    flaws,
    forged_tokens,
    replay_refresh_after_rotation,
    signer_from_database,
)


def test_forged_and_stale_tokens_are_refused_by_user_svc(services: Services) -> None:
    victim = new_account(services.auth_url)
    with httpx.Client(base_url=services.users_url, timeout=10) as http:
        before = http.get("/users/me", headers=victim.bearer)
        assert before.status_code == 200, before.text
        signer = signer_from_database(services.auth_settings.database_url)
        tokens = forged_tokens(victim.access_token, fetch_jwks(services.auth_url), signer=signer)
        assert len(tokens) >= 25

        outcomes = attack_routes(services.users_url, tokens, USER_ROUTES, client=http)

        assert flaws(outcomes) == []
        assert all(o.www_authenticate and o.www_authenticate.startswith("Bearer") for o in outcomes)
        after = http.get("/users/me", headers=victim.bearer)
        assert after.json() == before.json(), "a refused PATCH changed the profile"
        # The signer is trusted: the same claims, properly signed, are accepted.
        control = signer(jwt.decode(victim.access_token, options={"verify_signature": False}))
        assert http.get("/users/me", headers={"Authorization": f"Bearer {control}"}).is_success


def test_forged_and_stale_tokens_cannot_change_a_password(services: Services) -> None:
    victim = new_account(services.auth_url)
    signer = signer_from_database(services.auth_settings.database_url)
    tokens = forged_tokens(victim.access_token, fetch_jwks(services.auth_url), signer=signer)

    outcomes = attack_routes(services.auth_url, tokens, AUTH_ROUTES)

    assert flaws(outcomes) == []
    with httpx.Client(base_url=services.auth_url, timeout=10) as http:
        still = http.post("/auth/login", json={"email": victim.email, "password": victim.password})
    assert still.status_code == 200, "the password changed"


def test_a_refresh_token_replayed_after_rotation_is_refused_and_kills_its_family(
    services: Services,
) -> None:
    account = new_account(services.auth_url)
    outcomes = replay_refresh_after_rotation(services.auth_url, account.refresh_token)
    assert [o.status for o in outcomes] == [401, 401]
    assert flaws(outcomes) == []


def test_a_token_of_a_key_removed_from_the_jwks_is_refused(
    make_database: Callable[[str], str],
) -> None:
    """The old key leaves the JWKS once its last token has expired. Once the JWKS's own
    cache lifetime has passed, nothing it signs is accepted, even by a verifier that cached
    the JWKS while the key was in it (user_svc used to trust a cached JWKS for 5 minutes)."""
    ttl = 2
    with running_services(
        make_database, access_token_ttl_seconds=ttl, key_grace_seconds=0
    ) as services:
        account = new_account(services.auth_url)
        old_kid = jwt.get_unverified_header(account.access_token)["kid"]
        with httpx.Client(timeout=10) as http:
            # user_svc learns the old key while it is published.
            me = http.get(f"{services.users_url}/users/me", headers=account.bearer)
            assert me.status_code == 200, me.text
            rotate_signing_key(services.auth_settings)
            deadline = time.monotonic() + 15
            while old_kid in {k["kid"] for k in fetch_jwks(services.auth_url, http)["keys"]}:
                assert time.monotonic() < deadline, "the retired key never left the JWKS"
                time.sleep(0.2)
            # A verifier may keep a JWKS as long as its response allows, and no longer.
            cache_control = http.get(f"{services.auth_url}{JWKS_PATH}").headers["cache-control"]
            max_age = int(re.search(r"max-age=(\d+)", cache_control).group(1))  # type: ignore[union-attr]
            assert max_age <= 60
            time.sleep(max_age + 0.3)
            now = int(time.time())
            claims = jwt.decode(account.access_token, options={"verify_signature": False})
            retired = signer_from_database(services.auth_settings.database_url, kid=old_kid)
            token = retired({**claims, "iat": now, "exp": now + 600, "jti": "after-removal"})

            outcomes = attack_routes(
                services.users_url, {"key removed from the JWKS": token}, USER_ROUTES, client=http
            ) + attack_routes(
                services.auth_url, {"key removed from the JWKS": token}, AUTH_ROUTES, client=http
            )

            assert flaws(outcomes) == []
            # The new key works everywhere.
            fresh = new_account(services.auth_url)
            assert jwt.get_unverified_header(fresh.access_token)["kid"] != old_kid
            ok = http.get(f"{services.users_url}/users/me", headers=fresh.bearer)
            assert ok.status_code == 200, ok.text
