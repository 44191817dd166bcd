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
