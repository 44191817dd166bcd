"""integration_svc's configuration: one typed object read from `INTEGRATION_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import ConsumerSettings


class IntegrationSettings(ConsumerSettings):
    """Every field is read from `INTEGRATION_<FIELD>` (e.g. `INTEGRATION_WEBHOOKS_FILE`)."""

    model_config = SettingsConfigDict(
        env_prefix="INTEGRATION_", extra="ignore", populate_by_name=True
    )

    port: int = Field(
        default=8104,
        description="Reserved for an HTTP API; integration_svc has none "
        "(health: INTEGRATION_CONSUMER_PORT).",
    )
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/integration",
        description="PostgreSQL URL of integration_svc's own database (endpoints, deliveries).",
    )
    db_pool_size: int = Field(default=4, ge=2, description="Connections of the dispatcher.")
    consumer_port: int = Field(
        default=8141, description="Port of the consumer's health and metrics server."
    )
    webhooks_file: str | None = Field(
        default=None,
        description="YAML file of endpoints (url, events, secret), synced at start. "
        "Unset: only endpoints added with `esctl webhooks add`.",
    )
    allow_loopback: bool = Field(
        default=False,
        description="Development only: allow endpoints on loopback addresses, over plain http.",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="Allow private, shared and link-local addresses (never cloud metadata).",
    )
    allowed_networks: str = Field(
        default="",
        description="Comma-separated CIDRs allowed whatever their kind, e.g. `10.20.0.0/16`.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Bound on resolving and connecting to an endpoint."
    )
    request_timeout_seconds: float = Field(
        default=15.0, gt=0, description="Bound on one whole delivery attempt (send and answer)."
    )
    endpoint_concurrency: int = Field(
        default=4, ge=1, description="Requests in flight at once per endpoint."
    )
    endpoint_rate_per_second: float = Field(
        default=50.0, gt=0, description="Most requests per second per endpoint (token bucket)."
    )
    breaker_failures: int = Field(
        default=5, ge=1, description="Failures in a row that open an endpoint's circuit breaker."
    )
    breaker_cooldown_seconds: float = Field(
        default=30.0, gt=0, description="Pause of an open breaker before one probe is sent."
    )
    retry_initial_seconds: float = Field(
        default=5.0, gt=0, description="Delay before the first retry; doubles each attempt."
    )
    retry_max_interval_seconds: float = Field(
        default=3600.0, gt=0, description="Longest delay between two attempts."
    )
    retry_window_seconds: float = Field(
        default=86400.0,
        gt=0,
        description="After this long (from the event, or a redelivery) a delivery is failed.",
    )
    dispatch_batch: int = Field(
        default=500, ge=1, description="Most deliveries claimed in one query."
    )
    dispatch_poll_seconds: float = Field(
        default=2.0, gt=0, description="Longest wait for new deliveries when no NOTIFY arrives."
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long a claimed delivery is reserved; after a crash it is resent then.",
    )
