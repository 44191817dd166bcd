"""RS256 signing keys, kept in auth_svc's own database (table `signing_keys`).

Exactly one key is not retired at any time (a unique partial index says so). A rotation
inserts the next key with `activates_at` a little in the future and retires the current one
at that same instant: every process publishes the new key in its JWKS before any process signs
with it, so a verifier never sees a `kid` that no JWKS lists. A retired key stays published
until its last token has expired (access-token TTL + grace).

The private key never leaves this module: callers ask `KeyStore.sign(claims)`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from auth_svc.settings import AuthSettings
from servicekit.eventstore import connection_kwargs
from servicekit.tokens import PublicKey
from shared_contracts.tokens import ACCESS_TOKEN_ALGORITHM

RSA_KEY_BITS = 2048
# Serialises key creation and rotation across processes (any constant bigint).
KEYS_ADVISORY_LOCK = 0x6175_7468_6B65_7973  # "authkeys"

SIGNING_KEYS_DDL = """
CREATE TABLE IF NOT EXISTS signing_keys (
    kid text PRIMARY KEY,
    private_key_pem text NOT NULL,
    public_key_pem text NOT NULL,
    public_jwk jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    activates_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS signing_keys_one_current
    ON signing_keys ((true)) WHERE retired_at IS NULL;
"""

_SELECT_PUBLISHED = """
SELECT kid, public_key_pem, public_jwk, created_at, activates_at, retired_at,
       CASE WHEN retired_at IS NULL OR retired_at > now() THEN private_key_pem END
           AS private_key_pem
FROM signing_keys
WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => %s)
ORDER BY activates_at DESC
"""


class NoSigningKey(RuntimeError):
    """The database holds no usable signing key: run `esctl db init` (or `esctl keys rotate`)."""


@dataclass(frozen=True)
class KeyInfo:
    """What `esctl keys list` shows about a key (never the private part)."""

    kid: str
    created_at: datetime
    activates_at: datetime
    retired_at: datetime | None
    published: bool
    signing: bool


@dataclass(frozen=True)
class _Key:
    kid: str
    public_key: PublicKey
    public_key_pem: str
    jwk: dict[str, Any]
    activates_at: datetime
    retired_at: datetime | None
    private_key: Any | None  # only for keys that sign now or will sign soon


# --- key material ---------------------------------------------------------------------------


def _new_key_row() -> dict[str, Any]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    kid = _thumbprint(jwk)
    jwk.update(kid=kid, alg=ACCESS_TOKEN_ALGORITHM, use="sig")
    return {"kid": kid, "private": private_pem, "public": public_pem, "jwk": json.dumps(jwk)}


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint: a stable, url-safe key id derived from the key itself."""
    canonical = json.dumps(
        {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# --- database operations (shared by the KeyStore and the CLI) -------------------------------


def create_signing_keys_table(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEYS_ADVISORY_LOCK,))
        conn.execute(SIGNING_KEYS_DDL)


def ensure_signing_key(conn: psycopg.Connection[Any]) -> None:
    """Create the first key if there is none; safe when several processes start together."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEYS_ADVISORY_LOCK,))
        row = conn.execute("SELECT 1 FROM signing_keys WHERE retired_at IS NULL").fetchone()
        if row is None:
            _insert_key(conn, activate_after_seconds=0.0)


def rotate(conn: psycopg.Connection[Any], *, activate_after_seconds: float) -> str:
    """Make a new key the signer after `activate_after_seconds`; retire the current one then."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEYS_ADVISORY_LOCK,))
        conn.execute(
            "UPDATE signing_keys SET retired_at = now() + make_interval(secs => %s) "
            "WHERE retired_at IS NULL",
            (activate_after_seconds,),
        )
        return _insert_key(conn, activate_after_seconds=activate_after_seconds)


def _insert_key(conn: psycopg.Connection[Any], *, activate_after_seconds: float) -> str:
    row = _new_key_row()
    conn.execute(
        "INSERT INTO signing_keys (kid, private_key_pem, public_key_pem, public_jwk, activates_at)"
        " VALUES (%s, %s, %s, %s::jsonb, now() + make_interval(secs => %s))",
        (row["kid"], row["private"], row["public"], row["jwk"], activate_after_seconds),
    )
    kid: str = row["kid"]
    return kid


@contextmanager
def _connect(settings: AuthSettings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        yield conn


def init_signing_keys(settings: AuthSettings) -> None:
    """Create the table and a first key (part of `init_db`)."""
    with _connect(settings) as conn:
        create_signing_keys_table(conn)
        ensure_signing_key(conn)


def activation_delay(settings: AuthSettings) -> float:
    """Seconds between a rotation and the new key's first signature: two refresh periods.

    Every auth_svc replica re-reads the keys once per period, and the local gateway (or an
    operator's `esctl gateway render`) must have reloaded with the new key before any token
    signed by it reaches the edge; one period alone left the gateway racing auth_svc."""
    return 2 * settings.keys_refresh_seconds


def rotate_signing_key(settings: AuthSettings) -> str:
    """`esctl keys rotate`: the new key's kid. Running services sign with it
    `activation_delay` later, after every one of them has published it."""
    with _connect(settings) as conn:
        return rotate(conn, activate_after_seconds=activation_delay(settings))


def list_keys(settings: AuthSettings) -> list[KeyInfo]:
    """`esctl keys list`: every key, newest first, without private material."""
    keep = settings.access_token_ttl_seconds + settings.key_grace_seconds
    with _connect(settings) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT kid, created_at, activates_at, retired_at, now() AS db_now "
            "FROM signing_keys ORDER BY activates_at DESC"
        ).fetchall()
    infos = []
    for r in rows:
        now = r["db_now"]
        retired = r["retired_at"]
        infos.append(
            KeyInfo(
                kid=r["kid"],
                created_at=r["created_at"],
                activates_at=r["activates_at"],
                retired_at=retired,
                published=retired is None or (now - retired).total_seconds() < keep,
                signing=r["activates_at"] <= now and (retired is None or retired > now),
            )
        )
    return infos


# --- the in-process view --------------------------------------------------------------------


class KeyStore:
    """The signing key and the published keys, cached and re-read every
    `keys_refresh_seconds` (so a rotation by another process is picked up)."""

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            kwargs=connection_kwargs(settings.database_url),
            min_size=1,
            max_size=2,
            open=False,
            name="auth-signing-keys",
        )
        self._keys: list[_Key] = []
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def open(self) -> None:
        """Connect, create the first key if there is none, load the keys."""
        self._pool.open(wait=True, timeout=10)
        with self._pool.connection() as conn:
            ensure_signing_key(conn)
        self.reload()

    def close(self) -> None:
        self._pool.close()

    # --- reading ----------------------------------------------------------------------------

    def reload(self) -> None:
        keep = self._settings.access_token_ttl_seconds + self._settings.key_grace_seconds
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(_SELECT_PUBLISHED, (keep,)).fetchall()
        # A key's material never changes under its kid: parse only keys not yet known
        # (loading an RSA private key checks it, tens of milliseconds of CPU, which a reload
        # every few seconds would otherwise spend on the request that triggers it).
        known = {k.kid: k for k in self._keys}
        keys = []
        for r in rows:
            jwk = r["public_jwk"]
            seen = known.get(r["kid"])
            private = None
            if r["private_key_pem"] is not None:
                private = (
                    seen.private_key
                    if seen is not None and seen.private_key is not None
                    else serialization.load_pem_private_key(
                        r["private_key_pem"].encode(), password=None
                    )
                )
            keys.append(
                _Key(
                    kid=r["kid"],
                    public_key=seen.public_key if seen else RSAAlgorithm.from_jwk(jwk),
                    public_key_pem=r["public_key_pem"],
                    jwk=jwk,
                    activates_at=r["activates_at"],
                    retired_at=r["retired_at"],
                    private_key=private,
                )
            )
        with self._lock:
            self._keys = keys
            self._loaded_at = time.monotonic()

    def _stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self._settings.keys_refresh_seconds

    def _fresh_keys(self) -> list[_Key]:
        if self._stale():
            try:
                self.reload()
            except psycopg.Error:
                if not self._keys:
                    raise
                # The database is unreachable: keep signing with the keys read moments ago
                # (rotations are rare and old keys stay valid), so a login whose event is
                # already saved does not fail; try again after the refresh interval.
                with self._lock:
                    self._loaded_at = time.monotonic()
        return self._keys

    def _signer(self) -> _Key:
        now = datetime.now(UTC)
        for key in self._fresh_keys():  # newest activation first
            if key.private_key is None or key.activates_at > now:
                continue
            if key.retired_at is None or key.retired_at > now:
                return key
        raise NoSigningKey(NoSigningKey.__doc__)

    def current_kid(self) -> str:
        return self._signer().kid

    def sign(self, claims: dict[str, Any]) -> str:
        """An RS256 JWT of `claims` with the current key's `kid` in the header."""
        key = self._signer()
        assert key.private_key is not None
        return jwt.encode(
            claims, key.private_key, algorithm=ACCESS_TOKEN_ALGORITHM, headers={"kid": key.kid}
        )

    def jwks(self) -> dict[str, Any]:
        """Every key that may still verify a live token (or will sign soon)."""
        return {"keys": [dict(k.jwk) for k in self._fresh_keys()]}

    def public_keys(self) -> dict[str, str]:
        """kid -> public key PEM of every published key (e.g. for Kong's jwt credentials)."""
        return {k.kid: k.public_key_pem for k in self._fresh_keys()}

    async def lookup(self, kid: str) -> PublicKey | None:
        """A `servicekit.tokens.KeyLookup`: the public key for `kid`, re-reading the
        database (off the event loop) when the cache is old or the kid is unknown."""
        key = self._find(kid)
        # An unknown kid re-reads at most once a second, so garbage cannot flood the DB.
        known_but_old = key is not None and self._stale()
        unknown = key is None and time.monotonic() - self._loaded_at >= 1.0
        if known_but_old or unknown:
            await asyncio.to_thread(self.reload)
            key = self._find(kid)
        return key

    def _find(self, kid: str) -> PublicKey | None:
        for key in self._keys:
            if key.kid == kid:
                return key.public_key
        return None

    # --- writing ----------------------------------------------------------------------------

    def rotate(self) -> str:
        """Start a rotation now; returns the new kid (it signs after `activation_delay`)."""
        with self._pool.connection() as conn:
            kid = rotate(conn, activate_after_seconds=activation_delay(self._settings))
        self.reload()
        return kid
