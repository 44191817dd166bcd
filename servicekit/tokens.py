"""Local verification of access tokens against auth_svc's public keys (JWKS).

No shared secret: only RS256 with a key whose `kid` auth_svc publishes is accepted, which
rules out `alg: none` and RS256/HS256 confusion. Unknown `kid`s trigger one JWKS refetch,
rate-limited so that garbage tokens cannot make us hammer auth_svc. A token whose session
(`sid`) has ended is refused once `RevokedSessions` has heard of it (`auth.session.revoked`,
see servicekit.revocations), with no call to auth_svc.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2PasswordBearer
from fastapi.security.utils import get_authorization_scheme_param
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError

from servicekit.problems import Problem
from shared_contracts.tokens import ACCESS_TOKEN_ALGORITHM, AccessTokenClaims

KID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age=(\d{1,9})")
PublicKey = Any
KeyLookup = Callable[[str], Awaitable[PublicKey | None]]


class InvalidToken(Problem):
    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class JwksKeys:
    """Public keys fetched from a JWKS URL, cached, refetched on an unknown `kid` or when old.

    "Old" is the JWKS response's `Cache-Control: max-age` (at most `max_age_seconds`): a key
    that auth_svc stops publishing stops verifying here as soon as that, not minutes later.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age_seconds: float = 300.0,
        min_refetch_seconds: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.max_age = max_age_seconds
        self.min_refetch = min_refetch_seconds
        self._client = client or httpx.AsyncClient(timeout=5.0)
        self._keys: dict[str, PublicKey] = {}
        self._fetched_at = float("-inf")
        self._fresh_for = max_age_seconds
        self._lock = asyncio.Lock()

    async def __call__(self, kid: str) -> PublicKey | None:
        now = time.monotonic()
        if kid in self._keys and now - self._fetched_at < self._fresh_for:
            return self._keys[kid]
        if now - self._fetched_at >= self.min_refetch:
            async with self._lock:
                if time.monotonic() - self._fetched_at >= self.min_refetch:
                    await self._refetch()
        return self._keys.get(kid)

    def known(self, kid: str) -> bool:
        return kid in self._keys

    async def _refetch(self) -> None:
        try:
            response = await self._client.get(self.url)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError):
            # Keep serving the keys we have; a later call will try again.
            self._fetched_at = time.monotonic()
            return
        self._keys = parse_jwks(document)
        self._fresh_for = self._max_age_of(response.headers.get("cache-control", ""))
        self._fetched_at = time.monotonic()

    def _max_age_of(self, cache_control: str) -> float:
        found = _MAX_AGE.search(cache_control)
        return self.max_age if found is None else min(self.max_age, float(found.group(1)))

    async def aclose(self) -> None:
        await self._client.aclose()


def parse_jwks(document: dict[str, Any]) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for jwk in document.get("keys", []):
        kid = jwk.get("kid")
        if jwk.get("kty") != "RSA" or not isinstance(kid, str) or not KID_PATTERN.match(kid):
            continue
        if jwk.get("alg", ACCESS_TOKEN_ALGORITHM) != ACCESS_TOKEN_ALGORITHM:
            continue
        keys[kid] = RSAAlgorithm.from_jwk(jwk)
    return keys


class RevokedSessions:
    """Session ids whose access tokens are refused, each kept until the longest access-token
    lifetime has passed since its revocation (no token of it can be alive after that)."""

    def __init__(self, keep_seconds: float = 900.0, *, max_entries: int = 1_000_000) -> None:
        self.keep_seconds = keep_seconds
        self.max_entries = max_entries
        self._until: OrderedDict[uuid.UUID, float] = OrderedDict()
        self._lock = threading.Lock()

    def revoke(self, session_id: uuid.UUID, *, at: float | None = None) -> None:
        now = time.time()
        until = (at if at is not None else now) + self.keep_seconds
        with self._lock:
            self._until.pop(session_id, None)
            self._until[session_id] = until
            while self._until and (
                len(self._until) > self.max_entries or next(iter(self._until.values())) < now
            ):
                self._until.popitem(last=False)

    def __contains__(self, session_id: object) -> bool:
        until = self._until.get(session_id) if isinstance(session_id, uuid.UUID) else None
        return until is not None and until >= time.time()

    def __len__(self) -> int:
        return len(self._until)


class TokenVerifier:
    """Verifies bearer tokens; remembers recently verified ones until they expire. With
    `revoked`, a token of an ended session is refused, even one already remembered."""

    def __init__(
        self,
        keys: KeyLookup,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 5,
        cache_size: int = 10_000,
        revoked: RevokedSessions | None = None,
    ) -> None:
        self._keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self._cache: OrderedDict[str, AccessTokenClaims] = OrderedDict()
        self._cache_size = cache_size
        self.revoked = revoked

    async def verify(self, token: str) -> AccessTokenClaims:
        claims = await self._remembered_or_verified(token)
        if self.revoked is not None and claims.sid is not None and claims.sid in self.revoked:
            raise InvalidToken("The session of this token has ended.")
        return claims

    async def _remembered_or_verified(self, token: str) -> AccessTokenClaims:
        cached = self._cache.get(token)
        if cached is not None:
            if cached.exp + self.leeway > time.time():
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        claims = await self._verify(token)
        self._cache[token] = claims
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def forget(self) -> None:
        """Drop remembered tokens (after key removal, for instance)."""
        self._cache.clear()

    async def _verify(self, token: str) -> AccessTokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("The token is malformed.") from None
        if header.get("alg") != ACCESS_TOKEN_ALGORITHM:
            raise InvalidToken("The token's algorithm is not accepted.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not KID_PATTERN.match(kid):
            raise InvalidToken("The token has no valid key id.")
        key = await self._keys(kid)
        if key is None:
            raise InvalidToken("The token was signed by an unknown key.")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ACCESS_TOKEN_ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("The token has expired.") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("The token is not meant for this service.") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("The token is not valid yet.") from None
        except jwt.PyJWTError:
            raise InvalidToken("The token is invalid.") from None
        try:
            return AccessTokenClaims.model_validate(payload)
        except ValidationError:
            raise InvalidToken("The token's claims are invalid.") from None


# How a route asks for the caller: `user: CurrentUser`. Both security schemes read the same
# `Authorization: Bearer` header; declaring both lets Swagger UI offer the password form
# (`POST /auth/token`, its public path) and pasting a token.
PASSWORD_FLOW = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)
BEARER = HTTPBearer(auto_error=False, description="An access token issued by auth_svc.")


async def current_user(
    request: Request,
    token: Annotated[str | None, Depends(PASSWORD_FLOW)],
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> AccessTokenClaims:
    """The verified claims of the request's access token (401 without a valid one), checked
    by the app's `state.token_verifier`. `async def`: a sync dependency would cost a
    threadpool hop per request."""
    return await authenticated(request)


CurrentUser = Annotated[AccessTokenClaims, Depends(current_user)]


async def authenticated(request: Request) -> AccessTokenClaims:
    """`current_user` for a hot route that takes only the request: FastAPI solving the
    dependency and its two security schemes cost a third of `GET /users/me`'s CPU. Such a
    route declares `openapi_extra=BEARER_SECURITY`, so its document says the same."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("Missing bearer token: send 'Authorization: Bearer <token>'.")
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.verify(token)


# The security requirement FastAPI writes for a route that depends on `current_user`.
BEARER_SECURITY: dict[str, Any] = {"security": [{"OAuth2PasswordBearer": []}, {"HTTPBearer": []}]}
