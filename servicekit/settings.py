"""Settings shared by every service. Each service has one typed settings class built on these."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servicekit.amqp import DEFAULT_HEARTBEAT_SECONDS, amqp_urls, with_heartbeat


def shared(name: str, default: Any, **constraints: Any) -> Any:
    """A field read from an unprefixed variable (shared by all services), e.g. AMQP_URL."""
    return Field(default=default, validation_alias=AliasChoices(name), **constraints)


class ServiceSettings(BaseSettings):
    """Fields every service reads. Subclasses set `env_prefix` for their own fields."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    # One node, or the nodes of a cluster separated by commas (clients fail over between them).
    amqp_url: str = shared("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    amqp_heartbeat_seconds: int = shared(
        "AMQP_HEARTBEAT_SECONDS", DEFAULT_HEARTBEAT_SECONDS, ge=1, le=60
    )
    log_level: str = shared("LOG_LEVEL", "INFO")
    log_format: str = shared("LOG_FORMAT", "auto")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_pool_size: int = 10

    @field_validator("amqp_url")
    @classmethod
    def _node_urls(cls, value: str) -> str:
        return ",".join(amqp_urls(value))  # raises on a URL that is not amqp(s)://

    @model_validator(mode="after")
    def _heartbeat_on_every_node(self) -> ServiceSettings:
        self.amqp_url = with_heartbeat(self.amqp_url, self.amqp_heartbeat_seconds)
        return self


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
        default=5,
        ge=2,
        description="Handler failures (errors, or the consumer dying while handling it) before a "
        "message is parked and dead-lettered; lost connections never count.",
    )
