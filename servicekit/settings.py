"""Settings shared by every service. Each service has one typed settings class built on these.

Beside the base classes, the fields that mean the same in several services, each declared
here once: the ports of the processes (every service has its own numbers, the wording is
one), and the dispatchers' retry schedule, breaker, lease and poll (one type, bound and
default; each service describes them in the words of what it sends).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servicekit.amqp import DEFAULT_HEARTBEAT_SECONDS, amqp_urls, with_heartbeat
from servicekit.batching import COALESCE_SECONDS
from servicekit.eventstore import personal_data_env

# Read by every settings class (subclasses inherit it with the rest of `model_config`).
ENV_FILE = ".env"

DELIVERY_LIMIT = (
    "Handler failures (errors, or the consumer dying while handling it) before a "
    "message is parked and dead-lettered; lost connections never count."
)


def shared(name: str, default: Any, **constraints: Any) -> Any:
    """A field read from an unprefixed variable (shared by all services), e.g. AMQP_URL."""
    return Field(default=default, validation_alias=AliasChoices(name), **constraints)


def http_port(default: int) -> Any:
    return Field(default=default, description="Port the HTTP server listens on.")


def no_http_port(default: int, service: str, *, health: str) -> Any:
    """The `port` of a service without a REST API: reserved, and says where its health is."""
    return Field(
        default=default,
        description=f"Reserved for an HTTP API; {service} has none (health: {health}).",
    )


def relay_health_port(default: int) -> Any:
    return Field(default=default, description="Port of the relay's health and metrics server.")


def consumer_health_port(default: int) -> Any:
    return Field(default=default, description="Port of the consumer's health and metrics server.")


class ServiceSettings(BaseSettings):
    """Fields every service reads. Subclasses set `env_prefix` for their own fields.

    Values come from the environment, then from a `.env` file in the working directory
    (`ENV_FILE`): a variable set in the environment wins over the same one in the file.
    """

    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, env_file=ENV_FILE, env_file_encoding="utf-8"
    )

    # One node, or the nodes of a cluster separated by commas (clients fail over between them).
    amqp_url: str = shared("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    amqp_heartbeat_seconds: int = shared(
        "AMQP_HEARTBEAT_SECONDS", DEFAULT_HEARTBEAT_SECONDS, ge=1, le=60
    )
    # The native stream protocol (plugin rabbitmq_stream) on AMQP_URL's hosts, with its
    # credentials and vhost: replays read events.history there, or over AMQP where it is off.
    amqp_stream_port: int = shared("AMQP_STREAM_PORT", 5552, ge=1, le=65535)
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


class ApiSettings(ServiceSettings):
    """Fields of a service with a REST API; it declares its `port` with `http_port`."""

    host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds to.")


class PersonalDataStoreSettings(ApiSettings):
    """Fields of a service whose event store holds personal data (servicekit.shredding)."""

    personal_data_key: str | None = Field(
        default=None,
        description="Service key (32 bytes, base64url; `python -m servicekit.shredding` makes "
        "one) that wraps each person's key in the service's `personal_keys` table. Unset: "
        "personal fields are stored unencrypted (a warning at start) and cannot be shredded.",
    )
    encrypt_personal_data: bool = Field(
        default=True,
        description="Encrypt the personal fields of new events with the person's key (off: "
        "stored plain, as the benchmark compares; encrypted ones still read).",
    )

    def personal_data_env(self) -> dict[str, str]:
        """The event store's environment entries for crypto-shredding."""
        return personal_data_env(self.personal_data_key, encrypt=self.encrypt_personal_data)


class ConsumerSettings(ServiceSettings):
    """Fields of a service whose process is a consumer (a projection: no REST API)."""

    host: str = Field(default="127.0.0.1", description="Interface the health server binds to.")
    consumer_port: int = consumer_health_port(8120)
    consumer_prefetch: int = Field(
        default=1000, ge=1, description="AMQP prefetch: the most events applied in one batch."
    )
    consumer_delivery_limit: int = Field(default=5, ge=2, description=DELIVERY_LIMIT)
    consumer_coalesce_seconds: float = Field(
        default=COALESCE_SECONDS,
        ge=0,
        le=5,
        description="While the host's CPUs are saturated (tasks waited for one over 65% of the "
        "last second: the kernel's CPU pressure), the most often a batch is applied under steady "
        "traffic: events arriving meanwhile share its transaction, each waiting at most this "
        "long. On a quiet host each goes at once. 0: never.",
    )


class DispatchSettings(ConsumerSettings):
    """Fields of a consumer that dispatches the intents it records (mails, webhook deliveries).

    What the dispatcher reads. The retry schedule, the breaker, the lease and the poll mean the
    same for every intent, so their bounds and defaults are here; a service declares each field
    annotated below with the static method that follows, in the words of what it sends.
    """

    retry_initial_seconds: float
    retry_max_interval_seconds: float = Field(
        default=3600.0, gt=0, description="Longest delay between two attempts."
    )
    retry_window_seconds: float
    breaker_failures: int
    breaker_cooldown_seconds: float
    dispatch_poll_seconds: float
    lease_seconds: float

    @staticmethod
    def first_retry_delay(default: float) -> Any:
        return Field(
            default=default, gt=0, description="Delay before the first retry; doubles each attempt."
        )

    @staticmethod
    def retry_window(description: str) -> Any:
        return Field(default=86400.0, gt=0, description=description)

    @staticmethod
    def breaker_threshold(description: str) -> Any:
        return Field(default=5, ge=1, description=description)

    @staticmethod
    def breaker_cooldown(description: str) -> Any:
        return Field(default=30.0, gt=0, description=description)

    @staticmethod
    def dispatch_poll(description: str) -> Any:
        """The longest wait between two claims; a NOTIFY wakes the dispatcher sooner."""
        return Field(default=2.0, gt=0, description=description)

    @staticmethod
    def claim_lease(description: str) -> Any:
        """How long a claimed intent is reserved: after a crash it is sent again then."""
        return Field(default=120.0, gt=0, description=description)
