"""user_svc's configuration: one typed object read from `USER_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import (
    DELIVERY_LIMIT,
    PersonalDataStoreSettings,
    consumer_health_port,
    http_port,
    relay_health_port,
)
from shared_contracts.tokens import DEFAULT_AUDIENCE, DEFAULT_ISSUER


class UserSettings(PersonalDataStoreSettings):
    """Every field is read from `USER_<FIELD>` (e.g. `USER_DATABASE_URL`)."""

    model_config = SettingsConfigDict(env_prefix="USER_", extra="ignore", populate_by_name=True)

    port: int = http_port(8102)
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/users",
        description="PostgreSQL URL of user_svc's own database (the profile event store).",
    )
    relay_port: int = relay_health_port(8112)
    consumer_port: int = consumer_health_port(8113)
    consumer_prefetch: int = Field(default=100, description="AMQP prefetch of the consumer.")
    consumer_delivery_limit: int = Field(default=5, description=DELIVERY_LIMIT)
    db_pool_size: int = Field(
        default=10,
        ge=1,
        description="Connections kept in the event store's pool for request handlers. Two "
        "more are added for the cache's subscription (it pins one to LISTEN, one to read).",
    )
    db_max_overflow: int = Field(
        default=10, ge=0, description="Extra connections opened under load beyond the pool."
    )
    db_lock_timeout_seconds: int = Field(
        default=5, ge=1, description="How long a write waits for the events table lock."
    )
    jwks_url: str = Field(
        default="http://127.0.0.1:8101/auth/.well-known/jwks.json",
        description="auth_svc's JWKS: the public keys that verify access tokens.",
    )
    issuer: str = Field(default=DEFAULT_ISSUER, description="Expected `iss` of access tokens.")
    audience: str = Field(default=DEFAULT_AUDIENCE, description="Expected `aud` of access tokens.")
    follow_session_revocations: bool = Field(
        default=True,
        description="Follow `auth.session.revoked` on the broker and refuse the access tokens "
        "of ended sessions (each API process binds its own exclusive queue).",
    )
    revoked_session_keep_seconds: int = Field(
        default=960,
        ge=1,
        description="How long a revoked session id is remembered: at least auth_svc's "
        "access-token lifetime plus clock skew.",
    )
    token_cache_size: int = Field(
        default=10_000, ge=0, description="Verified access tokens remembered until they expire."
    )
    profile_cache_size: int = Field(
        default=100_000,
        ge=1,
        description="Profiles kept in memory for GET /users/me and GET /users/{id}.",
    )
    cache_retry_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Pause before the cache re-subscribes to the event store after a failure.",
    )
