"""integration_svc's configuration: one typed object read from `INTEGRATION_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import DispatchSettings, consumer_health_port, no_http_port


class IntegrationSettings(DispatchSettings):
    """Every field is read from `INTEGRATION_<FIELD>` (e.g. `INTEGRATION_WEBHOOKS_FILE`)."""

    model_config = SettingsConfigDict(
        env_prefix="INTEGRATION_", extra="ignore", populate_by_name=True
    )

    port: int = no_http_port(8104, "integration_svc", health="INTEGRATION_CONSUMER_PORT")
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/integration",
        description="PostgreSQL URL of integration_svc's own database (endpoints, deliveries).",
    )
    db_pool_size: int = Field(default=4, ge=2, description="Connections of the dispatcher.")
    consumer_port: int = consumer_health_port(8141)
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
    breaker_failures: int = DispatchSettings.breaker_threshold(
        "Failures in a row that open an endpoint's circuit breaker."
    )
    breaker_cooldown_seconds: float = DispatchSettings.breaker_cooldown(
        "Pause of an open breaker before one probe is sent."
    )
    retry_initial_seconds: float = DispatchSettings.first_retry_delay(5.0)
    retry_window_seconds: float = DispatchSettings.retry_window(
        "After this long (from the event, or a redelivery) a delivery is failed."
    )
    dispatch_batch: int = Field(
        default=500, ge=1, description="Most deliveries claimed in one query."
    )
    dispatch_poll_seconds: float = DispatchSettings.dispatch_poll(
        "Longest wait for new deliveries when no NOTIFY arrives."
    )
    lease_seconds: float = DispatchSettings.claim_lease(
        "How long a claimed delivery is reserved; after a crash it is resent then."
    )
