"""reporting_svc's configuration: one typed object read from `REPORTING_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import ServiceSettings


class ReportingSettings(ServiceSettings):
    """Every field is read from `REPORTING_<FIELD>` (e.g. `REPORTING_DATABASE_URL`)."""

    model_config = SettingsConfigDict(
        env_prefix="REPORTING_", extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="Interface the health server binds to.")
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/reporting",
        description="PostgreSQL URL of reporting_svc's own database (its read models).",
    )
    consumer_port: int = Field(
        default=8121, description="Port of the consumer's health and metrics server."
    )
    consumer_prefetch: int = Field(
        default=1000, ge=1, description="AMQP prefetch: the most events applied in one batch."
    )
    consumer_delivery_limit: int = Field(
        default=5, ge=2, description="Failed deliveries before a message is dead-lettered."
    )
