"""Token, session and login attacks as an outsider sends them: over HTTP, to any base URL.

The security tests run them against auth_svc and user_svc directly; the gateway's tests can
run the very same attacks through the gateway by passing its base URL instead.

Most forgeries need nothing but a genuine access token and the public JWKS, which is all a
real attacker has. A few (expired, not yet valid, wrong audience...) need a signature that
the target would otherwise accept: the caller passes a `Signer` holding a trusted private
key (tests read it from auth_svc's database with `signer_from_database`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

Signer = Callable[[dict[str, Any]], str]
JWKS_PATH = "/auth/.well-known/jwks.json"
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Route:
    """A route that must refuse any request without a valid access token."""

    method: str
    path: str
    json: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


USER_ROUTES: tuple[Route, ...] = (
    Route("GET", "/users/me"),
    Route("PATCH", "/users/me", {"bio": "written by an attacker"}),
    Route("GET", f"/users/{uuid.UUID(int=1)}"),
)
AUTH_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/auth/password",
        {"current_password": "whatever it is", "new_password": "chosen by an attacker"},
    ),
)


@dataclass(frozen=True)
class Outcome:
    """What one attack got back from one route."""

    attack: str
    route: str
    status: int
    content_type: str
    body: str
    www_authenticate: str | None = None
    sent: Sequence[str] = field(default=(), repr=False)

    def flaw(self, *, expected_status: int = 401) -> str | None:
        """Why this answer is not a clean refusal (None when it is)."""
        where = f"{self.attack} -> {self.route}"
        if self.status != expected_status:
            return f"{where}: status {self.status} (expected {expected_status}): {self.body[:300]}"
        if not self.content_type.startswith(PROBLEM_JSON):
            return f"{where}: content-type {self.content_type!r} is not {PROBLEM_JSON}"
        try:
            problem = json.loads(self.body)
        except ValueError:
            return f"{where}: the body is not JSON: {self.body[:300]}"
        if not isinstance(problem, dict) or problem.get("status") != expected_status:
            return f"{where}: the problem's status is not {expected_status}: {self.body[:300]}"
        if not problem.get("title") or not problem.get("detail"):
            return f"{where}: the problem has no title or detail: {self.body[:300]}"
        for secret in self.sent:
            if secret and secret in self.body:
                return f"{where}: the answer echoes what was sent"
        return None


def flaws(outcomes: Iterable[Outcome], *, expected_status: int = 401) -> list[str]:
    """Every outcome that is not a clean refusal, described; empty when all are."""
    return [f for o in outcomes if (f := o.flaw(expected_status=expected_status)) is not None]


# --- building tokens ----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unsigned_jwt(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """`header.claims` without the signature part (append `.` and a signature)."""
    return f"{_segment(header)}.{_segment(claims)}"


def hs256(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    signing_input = unsigned_jwt({**header, "alg": "HS256"}, claims)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def fetch_jwks(auth_url: str, client: httpx.Client | None = None) -> dict[str, Any]:
    with _client(client) as http:
        response = http.get(auth_url.rstrip("/") + JWKS_PATH)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def public_key_pem(jwks: Mapping[str, Any], kid: str) -> bytes:
    """The PEM of a published key: what the RS256/HS256 confusion uses as an HMAC secret."""
    for jwk in jwks.get("keys", []):
        if jwk.get("kid") == kid:
            key = RSAAlgorithm.from_jwk(jwk)
            assert isinstance(key, rsa.RSAPublicKey)
            return key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
    msg = f"kid {kid!r} is not in the JWKS"
    raise LookupError(msg)


def forged_tokens(
    genuine: str, jwks: Mapping[str, Any], *, signer: Signer | None = None
) -> dict[str, str]:
    """Tokens that must all be refused, by name, derived from a genuine access token.

    Without `signer`, only what an outsider can forge from public material. With it, also
    well-signed tokens whose claims must be refused (expired, not yet valid, wrong audience).
    """
    header = jwt.get_unverified_header(genuine)
    claims: dict[str, Any] = jwt.decode(genuine, options={"verify_signature": False})
    kid = header["kid"]
    head, _, signature = genuine.split(".")
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker_jwk = json.loads(RSAAlgorithm.to_jwk(attacker.public_key()))
    pem = public_key_pem(jwks, kid)
    someone_else = {**claims, "sub": str(uuid.uuid4())}
    now = int(time.time())

    def by_attacker(extra_header: Mapping[str, Any], payload: Mapping[str, Any] = claims) -> str:
        return jwt.encode(dict(payload), attacker, algorithm="RS256", headers=dict(extra_header))

    tokens = {
        "alg none": unsigned_jwt({"alg": "none", "typ": "JWT", "kid": kid}, claims) + ".",
        "alg None, genuine signature kept": unsigned_jwt({"alg": "None", "kid": kid}, claims)
        + f".{signature}",
        "RS256->HS256 with the public key PEM": hs256({"typ": "JWT", "kid": kid}, claims, pem),
        "RS256->HS256 with the PEM, no newline": hs256({"kid": kid}, claims, pem.strip()),
        "tampered payload: another subject": f"{head}.{_segment(someone_else)}.{signature}",
        "tampered payload: a later expiry": f"{head}.{_segment({**claims, 'exp': now + 86_400})}"
        f".{signature}",
        "stripped signature": f"{head}.{genuine.split('.')[1]}.",
        "two parts only": f"{head}.{genuine.split('.')[1]}",
        "kid is a file path, HMAC with empty key": hs256(
            {"kid": "../../../../../../dev/null"}, claims, b""
        ),
        "kid is an absolute file path": by_attacker({"kid": "/etc/passwd"}),
        "kid is a URL": by_attacker({"kid": "http://127.0.0.1:9/jwks.json"}),
        "kid is SQL": by_attacker({"kid": "x' OR '1'='1"}),
        "jku points at the attacker's JWKS": by_attacker(
            {"kid": kid, "jku": "http://127.0.0.1:9/jwks.json"}
        ),
        "x5u points at the attacker's certificate": by_attacker(
            {"kid": kid, "x5u": "http://127.0.0.1:9/cert.pem"}
        ),
        "embedded jwk header": by_attacker({"kid": kid, "jwk": attacker_jwk}),
        "attacker key under the real kid": by_attacker({"kid": kid}),
        "attacker key, no kid": by_attacker({}),
        "garbage": "not.a.token",
    }
    if signer is not None:
        fresh = {**claims, "jti": uuid.uuid4().hex}
        tokens |= {
            "expired": signer({**fresh, "iat": now - 7200, "exp": now - 3600}),
            "not yet valid (nbf)": signer({**fresh, "nbf": now + 3600}),
            "issued in the future (iat)": signer({**fresh, "iat": now + 3600, "exp": now + 7200}),
            "wrong audience": signer({**fresh, "aud": "another-api"}),
            "no audience": signer({k: v for k, v in fresh.items() if k != "aud"}),
            "wrong issuer": signer({**fresh, "iss": "https://evil.example"}),
            "no expiry": signer({k: v for k, v in fresh.items() if k != "exp"}),
            "subject is not a user id": signer({**fresh, "sub": "admin"}),
        }
    return tokens


# --- sending them -------------------------------------------------------------------------------


def attack_routes(
    base_url: str,
    tokens: Mapping[str, str],
    routes: Sequence[Route],
    *,
    client: httpx.Client | None = None,
) -> list[Outcome]:
    """Present every token as a Bearer token on every route of `base_url`."""
    outcomes = []
    with _client(client) as http:
        for name, token in tokens.items():
            for route in routes:
                response = http.request(
                    route.method,
                    base_url.rstrip("/") + route.path,
                    json=route.json,
                    headers={"Authorization": f"Bearer {token}"},
                )
                outcomes.append(_outcome(name, str(route), response, sent=[token]))
    return outcomes


def replay_refresh_after_rotation(
    base_url: str, refresh_token: str, *, client: httpx.Client | None = None
) -> list[Outcome]:
    """Rotate `refresh_token` once (must succeed), then replay it, then try its successor.

    Both later attempts must be refused: the replay spends the whole family, so the token
    the legitimate rotation produced is dead too.
    """
    url = base_url.rstrip("/") + "/auth/refresh"
    with _client(client) as http:
        rotated = http.post(url, json={"refresh_token": refresh_token})
        if rotated.status_code != 200:
            msg = f"the first refresh should succeed, got {rotated.status_code}: {rotated.text}"
            raise AssertionError(msg)
        successor = rotated.json()["refresh_token"]
        replay = http.post(url, json={"refresh_token": refresh_token})
        after = http.post(url, json={"refresh_token": successor})
    return [
        _outcome("refresh token replayed after rotation", "POST /auth/refresh", replay),
        _outcome("its successor, after the replay", "POST /auth/refresh", after),
    ]


def login_attempts(
    base_url: str,
    email: str,
    password: str,
    count: int,
    *,
    client: httpx.Client | None = None,
) -> list[httpx.Response]:
    """`count` logins in a row with the same credentials (a brute-force run)."""
    with _client(client) as http:
        return [
            http.post(
                base_url.rstrip("/") + "/auth/login", json={"email": email, "password": password}
            )
            for _ in range(count)
        ]


def _outcome(
    name: str, route: str, response: httpx.Response, *, sent: Sequence[str] = ()
) -> Outcome:
    return Outcome(
        attack=name,
        route=route,
        status=response.status_code,
        content_type=response.headers.get("content-type", ""),
        body=response.text,
        www_authenticate=response.headers.get("www-authenticate"),
        sent=tuple(sent),
    )


class _client:
    """Use the caller's client, or a short-lived one of our own."""

    def __init__(self, client: httpx.Client | None) -> None:
        self._given = client
        self._own: httpx.Client | None = None

    def __enter__(self) -> httpx.Client:
        if self._given is not None:
            return self._given
        self._own = httpx.Client(timeout=10.0)
        return self._own

    def __exit__(self, *_: object) -> None:
        if self._own is not None:
            self._own.close()


# --- the privileged part: a trusted key, for the tests only -------------------------------------


def signer_from_database(auth_database_url: str, kid: str | None = None) -> Signer:
    """Sign with a key from auth_svc's `signing_keys` table: the current one, or `kid`
    (a retired key works too, so that a test can forge a token of a key no longer published).
    """
    with psycopg.connect(auth_database_url, connect_timeout=5) as conn:
        if kid is None:
            row = conn.execute(
                "SELECT kid, private_key_pem FROM signing_keys WHERE retired_at IS NULL"
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT kid, private_key_pem FROM signing_keys WHERE kid = %s", (kid,)
            ).fetchone()
    if row is None:
        msg = f"no signing key {kid or '(current)'} in {auth_database_url}"
        raise LookupError(msg)
    key_id, pem = row
    private = serialization.load_pem_private_key(pem.encode(), password=None)

    def sign(claims: dict[str, Any]) -> str:
        return jwt.encode(claims, private, algorithm="RS256", headers={"kid": key_id})

    return sign
