"""reporting_svc's configuration: one typed object read from `REPORTING_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import ConsumerSettings, consumer_health_port


class ReportingSettings(ConsumerSettings):
    """Every field is read from `REPORTING_<FIELD>` (e.g. `REPORTING_DATABASE_URL`)."""

    model_config = SettingsConfigDict(
        env_prefix="REPORTING_", extra="ignore", populate_by_name=True
    )

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/reporting",
        description="PostgreSQL URL of reporting_svc's own database (its read models).",
    )
    consumer_port: int = consumer_health_port(8121)
