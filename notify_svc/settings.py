"""notify_svc's configuration: one typed object read from `NOTIFY_*` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from servicekit.settings import ConsumerSettings


class NotifySettings(ConsumerSettings):
    """Every field is read from `NOTIFY_<FIELD>` (e.g. `NOTIFY_SMTP_URL`)."""

    model_config = SettingsConfigDict(env_prefix="NOTIFY_", extra="ignore", populate_by_name=True)

    port: int = Field(
        default=8103,
        description="Reserved for an HTTP API; notify_svc has none (health: NOTIFY_CONSUMER_PORT).",
    )
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/notify",
        description="PostgreSQL URL of notify_svc's own database (recipients and mail intents).",
    )
    db_pool_size: int = Field(default=4, ge=1, description="Connections of the mail dispatcher.")
    consumer_port: int = Field(
        default=8131, description="Port of the consumer's health and metrics server."
    )
    smtp_url: str | None = Field(
        default=None,
        description="smtp://[user:password@]host[:port] (STARTTLS when offered) or smtps:// "
        "(implicit TLS). Unset: mail is written to NOTIFY_MAILDIR.",
    )
    maildir: str = Field(
        default="var/maildir", description="Maildir that receives mail when no SMTP_URL is set."
    )
    mail_from: str = Field(
        default="eskit <no-reply@eskit.local>",
        description="From: address; its domain also ends every Message-ID.",
    )
    smtp_timeout_seconds: float = Field(
        default=15.0, gt=0, description="Bound on one SMTP conversation (connect to QUIT)."
    )
    send_concurrency: int = Field(default=4, ge=1, description="Mails sent at the same time.")
    retry_initial_seconds: float = Field(
        default=10.0, gt=0, description="Delay before the first retry; doubles each attempt."
    )
    retry_max_interval_seconds: float = Field(
        default=3600.0, gt=0, description="Longest delay between two attempts."
    )
    retry_window_seconds: float = Field(
        default=86400.0, gt=0, description="After this long a mail still unsent is marked failed."
    )
    breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive SMTP failures that pause sending."
    )
    breaker_cooldown_seconds: float = Field(
        default=30.0, gt=0, description="Pause before one mail probes a failing SMTP server again."
    )
    dispatch_poll_seconds: float = Field(
        default=2.0, gt=0, description="Longest wait for new intents when no NOTIFY arrives."
    )
    lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long a claimed mail is reserved; after a crash it is sent again then.",
    )
