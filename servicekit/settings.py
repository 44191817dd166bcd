"""Settings shared by every service. Each service has one typed settings class built on these."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def shared(name: str, default: str) -> str:
    """A field read from an unprefixed variable (shared by all services), e.g. AMQP_URL."""
    return Field(default=default, validation_alias=AliasChoices(name))


class ServiceSettings(BaseSettings):
    """Fields every service reads. Subclasses set `env_prefix` for their own fields."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    amqp_url: str = shared("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    log_level: str = shared("LOG_LEVEL", "INFO")
    log_format: str = shared("LOG_FORMAT", "auto")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_pool_size: int = 10


class ConsumerSettings(ServiceSettings):
    """Fields of a service whose process is a consumer (a projection: no REST API)."""

    host: str = Field(default="127.0.0.1", description="Interface the health server binds to.")
    consumer_port: int = Field(
        default=8120, description="Port of the consumer's health and metrics server."
    )
    consumer_prefetch: int = Field(
        default=1000, ge=1, description="AMQP prefetch: the most events applied in one batch."
    )
    consumer_delivery_limit: int = Field(
        default=5, ge=2, description="Failed deliveries before a message is dead-lettered."
    )
