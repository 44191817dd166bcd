"""auth_svc's configuration: one typed object read from `AUTH_*` environment variables."""

from __future__ import annotations

import base64
import binascii
import hashlib

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from servicekit.settings import PersonalDataStoreSettings, http_port, relay_health_port
from shared_contracts.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER

THIRTY_DAYS = 30 * 24 * 3600
DAY = 24 * 3600
ADDRESS_ID_KEY_BYTES = 32
# Keys the address ids where AUTH_ADDRESS_ID_KEY is unset (a development checkout): public,
# so such ids are no better than plain hashes of the address; a warning says so at start.
DEVELOPMENT_ADDRESS_ID_KEY = hashlib.sha256(b"eskit development address id key").digest()


class AuthSettings(PersonalDataStoreSettings):
    """Every field is read from `AUTH_<FIELD>` (e.g. `AUTH_LOCKOUT_THRESHOLD`)."""

    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore", populate_by_name=True)

    port: int = http_port(8101)
    relay_port: int = relay_health_port(8111)
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/auth",
        description="PostgreSQL URL of auth_svc's own database (events and signing keys).",
    )
    db_pool_size: int = Field(
        default=10, ge=1, description="Connections kept in the event store's pool."
    )
    argon2_time_cost: int = Field(
        default=2, ge=1, description="argon2id iterations (OWASP minimum: 2 with 19 MiB)."
    )
    argon2_memory_kib: int = Field(
        default=19456, ge=8, description="argon2id memory per hash in KiB (OWASP: 19456)."
    )
    argon2_parallelism: int = Field(default=1, ge=1, description="argon2id lanes.")
    argon2_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="argon2id hashes run at once in a process; more wait their turn. Unset: "
        "the CPUs the process may use (its affinity, and a cgroup CPU quota if it has one).",
    )
    lockout_threshold: int = Field(
        default=5, ge=1, description="Consecutive failed logins that lock an account."
    )
    lockout_seconds: int = Field(
        default=900, ge=1, description="How long a locked account refuses logins."
    )
    access_token_ttl_seconds: int = Field(
        default=900, ge=1, description="Lifetime of an access token (JWT)."
    )
    refresh_token_ttl_seconds: int = Field(
        default=THIRTY_DAYS,
        ge=1,
        description="Lifetime of a refresh token; each rotation issues a new one as long.",
    )
    issuer: str = Field(default=DEFAULT_ISSUER, description="`iss` claim of access tokens.")
    audience: str = Field(default=DEFAULT_AUDIENCE, description="`aud` claim of access tokens.")
    keys_refresh_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often the signing key and JWKS are re-read from the database, "
        "so a rotation done by another process is picked up.",
    )
    key_grace_seconds: int = Field(
        default=60,
        ge=0,
        description="Extra time a retired key stays in the JWKS after its last token "
        "expired (clock skew, caches).",
    )

    address_id_key: str | None = Field(
        default=None,
        description="Secret (32 bytes, base64url) that keys the ids derived from e-mail "
        "addresses (HMAC-SHA256), so an id does not reveal its address. Keep it for the life "
        "of the store: a registration keyed with another secret is not found. Unset: a public "
        "development key (a warning at start).",
    )

    @field_validator("address_id_key")
    @classmethod
    def _a_32_byte_key(cls, value: str | None) -> str | None:
        if not value:  # an empty variable is an unset one
            return None
        if len(_urlsafe_b64decode(value)) != ADDRESS_ID_KEY_BYTES:
            msg = f"AUTH_ADDRESS_ID_KEY must be {ADDRESS_ID_KEY_BYTES} bytes in base64url"
            raise ValueError(msg)
        return value

    @property
    def address_id_secret(self) -> bytes:
        if self.address_id_key is None:
            return DEVELOPMENT_ADDRESS_ID_KEY
        return _urlsafe_b64decode(self.address_id_key)

    # --- e-mail verification, password reset, sessions -------------------------------------
    require_verified_email: bool = Field(
        default=False,
        description="Refuse logins of accounts whose e-mail address is not verified "
        "(403 problem `email-not-verified`).",
    )
    link_sealing_public_key: str | None = Field(
        default=None,
        description="notify_svc's X25519 public key (base64url; `python -m servicekit.sealing` "
        "makes a pair): verification and reset links are sealed to it. Unset: no link is "
        "mailed (a warning at start).",
    )
    verify_email_url: str = Field(
        default="http://localhost:3000/verify-email",
        description="Page of the front-end that confirms an address; the link appends "
        "`#token=...`.",
    )
    reset_password_url: str = Field(
        default="http://localhost:3000/reset-password",
        description="Page of the front-end that sets a new password; the link appends "
        "`#token=...`.",
    )
    verification_ttl_seconds: int = Field(
        default=DAY, ge=60, description="Lifetime of an e-mail verification link."
    )
    reset_ttl_seconds: int = Field(
        default=1800, ge=60, description="Lifetime of a password reset link (single use)."
    )
    resend_limit: int = Field(
        default=3, ge=1, description="Verification mails one account may ask for per hour."
    )
    forgot_limit_per_address: int = Field(
        default=3,
        ge=1,
        description="`POST /auth/password/forgot` requests per address per 15 minutes "
        "(counted alike for unknown addresses).",
    )
    forgot_limit_per_ip: int = Field(
        default=20,
        ge=1,
        description="`POST /auth/password/forgot` requests per client IP per 15 minutes.",
    )
    reset_links_per_second: float = Field(
        default=20.0,
        gt=0,
        description="Pace of the background worker that issues reset links (per process); "
        "requests beyond its backlog of 1000 are dropped.",
    )
    token_attempts_per_ip: int = Field(
        default=20,
        ge=1,
        description="Verification and reset token attempts per client IP per 15 minutes.",
    )
    trusted_proxies: list[str] = Field(
        default=["127.0.0.1/32", "::1/128"],
        description="Networks of the gateway (JSON list of CIDRs): only from these is "
        "`X-Forwarded-For` believed for the client IP (sessions, rate limits).",
    )
    hibp_enabled: bool = Field(
        default=False,
        description="Also refuse passwords found in Have I Been Pwned's range API (only a "
        "5-character SHA-1 prefix leaves the service).",
    )
    hibp_url: str = Field(
        default="https://api.pwnedpasswords.com/range/",
        description="Base URL of the HIBP range API; the prefix is appended.",
    )
    hibp_timeout_seconds: float = Field(
        default=2.0, gt=0, description="Bound on one HIBP range request."
    )
    hibp_fail_open: bool = Field(
        default=True,
        description="When HIBP cannot be reached in time: accept the password (true) or "
        "refuse it with a 503 problem (false).",
    )


def _urlsafe_b64decode(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        msg = "not base64url"
        raise ValueError(msg) from None
